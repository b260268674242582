"""The LLaMA model in pure torch: no Ray, no torch.distributed.

    >>> from llamaray.model import Llama, get_preset
    >>> model = Llama(get_preset("debug").args)

`Llama` and `KVCache` load on first use: configs and the corpus pipeline's Ray workers
need the presets but not torch, whose import costs each worker process about 2 s.
"""

from llamaray.model.args import PRESETS, ModelArgs, Preset, get_preset

__all__ = ["PRESETS", "KVCache", "Llama", "ModelArgs", "Preset", "get_preset"]


def __getattr__(name: str):
    if name == "Llama":
        from llamaray.model.llama import Llama

        return Llama
    if name == "KVCache":
        from llamaray.model.kv_cache import KVCache

        return KVCache
    raise AttributeError(f"module 'llamaray.model' has no attribute {name!r}")
