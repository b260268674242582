"""The LLaMA model in pure torch: no Ray, no torch.distributed.

>>> from llamaray.model import Llama, get_preset
>>> model = Llama(get_preset("debug").args)
"""

from llamaray.model.args import PRESETS, ModelArgs, Preset, get_preset
from llamaray.model.kv_cache import KVCache
from llamaray.model.llama import Llama

__all__ = ["PRESETS", "KVCache", "Llama", "ModelArgs", "Preset", "get_preset"]
