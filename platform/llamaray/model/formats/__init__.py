"""Read and write LLaMA checkpoints in Meta's and Hugging Face's formats.

Two folder layouts are understood, each in its own module:

* **Meta** (`formats.meta`, the reference `llama` repository): `params.json` plus
  `consolidated.00.pth` ... `consolidated.NN.pth`, one file per model-parallel rank.
  Parameter names are ours.
* **Hugging Face** (`formats.hf`, `LlamaForCausalLM`): `config.json` plus
  `model.safetensors`, or shards `model-0000x-of-0000y.safetensors` listed in
  `model.safetensors.index.json`.

This module holds the public API (format detection, loading, saving, conversion) and what
both formats share. Everything is keyed on `Llama.state_dict()` names; the rotary tables are
non-persistent buffers, recomputed from the arguments. Loading builds the model on the meta
device and assigns the checkpoint's tensors to it, so a 65B model is never randomly
initialized first and (for a single Meta shard, which is memory-mapped) not copied either.

    >>> model = load_pretrained("checkpoints/llama-2-7b")  # doctest: +SKIP
    >>> save_hf(model, "checkpoints/llama-2-7b-hf")  # doctest: +SKIP
"""

from __future__ import annotations

import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

import torch

from llamaray.model.args import ModelArgs
from llamaray.model.formats.hf import (
    _HF_SHARD_RE,
    HF_CONFIG,
    HF_INDEX,
    HF_SINGLE,
    TOKENIZER_MODEL,
    _read_hf,
    _write_hf,
    args_from_hf_config,
    hf_config_from_args,
    hf_permute,
    hf_to_meta_state_dict,
    hf_unpermute,
    meta_to_hf_state_dict,
    write_hf_tokenizer,
)
from llamaray.model.formats.meta import (
    _META_SHARD_RE,
    META_PARAMS,
    _check_shardable,
    _meta_shard_names,
    _read_meta,
    _write_meta,
    args_from_meta_params,
    meta_params_from_args,
)
from llamaray.model.llama import Llama

__all__ = [
    "args_from_hf_config",
    "args_from_meta_params",
    "convert",
    "detect_format",
    "hf_config_from_args",
    "hf_permute",
    "hf_to_meta_state_dict",
    "hf_unpermute",
    "load_pretrained",
    "meta_params_from_args",
    "meta_to_hf_state_dict",
    "save_hf",
    "save_meta",
    "write_hf_tokenizer",
]

CheckpointFormat = Literal["meta", "hf"]

_DTYPE_NAMES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}


# ---------------------------------------------------------------------------- public API


def detect_format(path: str | Path) -> CheckpointFormat:
    """Detect the format: "meta" for a folder with `params.json`, "hf" for `config.json`.

    Raises FileNotFoundError for a missing folder or one holding neither, ValueError for one
    holding both (which file would win is a guess we refuse to make).
    """
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"checkpoint folder {str(folder)!r} does not exist")
    has_meta = (folder / META_PARAMS).is_file()
    has_hf = (folder / HF_CONFIG).is_file()
    if has_meta and has_hf:
        raise ValueError(
            f"checkpoint folder {str(folder)!r} holds both {META_PARAMS} (Meta) and "
            f"{HF_CONFIG} (Hugging Face); keep one format per folder"
        )
    if has_meta:
        return "meta"
    if has_hf:
        return "hf"
    present = sorted(p.name for p in folder.iterdir())[:10]
    raise FileNotFoundError(
        f"no LLaMA checkpoint in {str(folder)!r}: expected either Meta's {META_PARAMS} + "
        f"consolidated.NN.pth or Hugging Face's {HF_CONFIG} + {HF_SINGLE} (or sharded "
        f"model-*-of-*.safetensors with {HF_INDEX}); found {present or 'an empty folder'}"
    )


def load_pretrained(
    path: str | Path,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | str | None = None,
    attention_backend: str = "auto",
    max_seq_len: int | None = None,
) -> Llama:
    """Build a `Llama` from a Meta or Hugging Face checkpoint folder (format detected).

    dtype: parameter dtype (torch.dtype or a name such as "bfloat16"); None keeps the
    checkpoint's own. max_seq_len: override the length the rotary tables are built for
    (Meta's params.json usually omits it; Hugging Face's is max_position_embeddings).
    The output projection of a checkpoint with tied embeddings is loaded as an untied copy.

    >>> model = load_pretrained("checkpoints/llama-2-7b", dtype="bfloat16")  # doctest: +SKIP
    """
    folder = Path(path)
    fmt = detect_format(folder)
    if fmt == "meta":
        args, state = _read_meta(folder)
    else:
        args, state = _read_hf(folder)
    if max_seq_len is not None:
        args = args.with_(max_seq_len=max_seq_len)
    return _build(
        args,
        state,
        folder,
        device=device,
        dtype=_as_dtype(dtype),
        attention_backend=attention_backend,
    )


def save_meta(model: Llama, out_dir: str | Path, num_shards: int = 1) -> Path:
    """Write `params.json` + `consolidated.00.pth` ... in Meta's layout, split over
    `num_shards` model-parallel ranks as Meta's reference code would. Returns the folder."""
    if num_shards < 1:
        raise ValueError(f"num_shards={num_shards} must be at least 1")
    args: ModelArgs = model.args
    _check_shardable(args, num_shards)
    folder = Path(out_dir)
    _refuse_stale(folder, keep={META_PARAMS, *_meta_shard_names(num_shards)}, fmt="meta")
    folder.mkdir(parents=True, exist_ok=True)
    _write_meta(_model_tensors(model), args, folder, num_shards)
    return folder


def save_hf(model: Llama, out_dir: str | Path, dtype: torch.dtype | str | None = None) -> Path:
    """Write `config.json` + `model.safetensors`, loadable by transformers'
    `LlamaForCausalLM.from_pretrained(out_dir)`. dtype: None keeps the model's. Returns the
    folder."""
    folder = Path(out_dir)
    _refuse_stale(folder, keep={HF_CONFIG, HF_SINGLE}, fmt="hf")
    folder.mkdir(parents=True, exist_ok=True)
    target = _as_dtype(dtype)
    state = _model_tensors(model, target)
    saved_dtype = target or _common_dtype(state.values())
    _write_hf(state, model.args, folder, saved_dtype)
    return folder


def convert(
    src: str | Path,
    dst: str | Path,
    to: CheckpointFormat,
    num_shards: int = 1,
    dtype: torch.dtype | str | None = None,
) -> Path:
    """Convert the checkpoint folder `src` (either format) into `dst` in format `to`.

    A `tokenizer.model` beside the weights is copied along. `num_shards` applies to
    to="meta"; dtype None keeps the checkpoint's. Returns `dst`.

    >>> convert("checkpoints/llama-2-7b", "checkpoints/llama-2-7b-hf", to="hf")  # doctest: +SKIP

    or from the shell: `llamaray convert checkpoints/llama-2-7b checkpoints/llama-2-7b-hf --to hf`
    """
    if to not in ("meta", "hf"):
        raise ValueError(f"unknown target format {to!r}; choose 'meta' or 'hf'")
    if to == "hf" and num_shards != 1:
        raise ValueError("num_shards applies to Meta checkpoints only (to='meta')")
    src, dst = Path(src), Path(dst)
    if dst.exists() and src.resolve() == dst.resolve():
        raise ValueError(f"source and destination are the same folder {str(src)!r}")
    model = load_pretrained(src, dtype=dtype)
    if to == "meta":
        save_meta(model, dst, num_shards=num_shards)
    else:
        save_hf(model, dst)
    tokenizer = src / TOKENIZER_MODEL
    if tokenizer.is_file():
        if to == "hf":
            write_hf_tokenizer(dst, tokenizer, model.args.max_seq_len)
        else:
            shutil.copy2(tokenizer, dst / TOKENIZER_MODEL)
    return dst


# ---------------------------------------------------------------------------- building


def _build(
    args: ModelArgs,
    state: dict[str, torch.Tensor],
    folder: Path,
    *,
    device: torch.device | str,
    dtype: torch.dtype | None,
    attention_backend: str,
) -> Llama:
    """Assign `state` to a model built on the meta device after checking names and shapes."""
    with torch.device("meta"):
        model = Llama(args, attention_backend=attention_backend)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing tensors {_few(missing)}")
        if unexpected:
            parts.append(f"unexpected tensors {_few(unexpected)}")
        raise ValueError(f"checkpoint {str(folder)!r} does not fit the model: " + "; ".join(parts))
    bad = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {shape}"
        for k, shape in expected.items()
        if tuple(state[k].shape) != shape
    ]
    if bad:
        raise ValueError(f"checkpoint {str(folder)!r} has tensors of the wrong shape: {_few(bad)}")
    target = dtype or _common_dtype(state.values())
    device = torch.device(device)
    tensors = {}
    for key in expected:
        tensor = state.pop(key)
        if not tensor.is_floating_point():
            raise ValueError(f"checkpoint {str(folder)!r}: tensor {key!r} is {tensor.dtype}")
        tensors[key] = tensor.to(device=device, dtype=target)
    model.load_state_dict(tensors, strict=True, assign=True)
    return model


def _few(items: list[str], n: int = 8) -> str:
    shown = ", ".join(items[:n])
    return shown + (f" and {len(items) - n} more" if len(items) > n else "")


def _common_dtype(tensors: Iterable[torch.Tensor]) -> torch.dtype:
    dtype: torch.dtype | None = None
    for t in tensors:
        if t.is_floating_point():
            dtype = t.dtype if dtype is None else torch.promote_types(dtype, t.dtype)
    return dtype or torch.float32


def _as_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype).removeprefix("torch.").lower()
    if name not in _DTYPE_NAMES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {sorted(_DTYPE_NAMES)}")
    return _DTYPE_NAMES[name]


# ---------------------------------------------------------------------------- writing


def _model_tensors(model: Llama, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The model's persistent tensors on the CPU, detached (and cast when dtype is given)."""
    if not isinstance(model, Llama):
        raise TypeError(f"expected a llamaray Llama model, got {type(model).__name__}")
    out = {}
    for key, tensor in model.state_dict().items():
        if tensor.is_meta:
            raise ValueError(f"parameter {key!r} is on the meta device: materialize it first")
        tensor = tensor.detach().cpu()
        out[key] = tensor.to(dtype) if dtype is not None else tensor
    return out


def _refuse_stale(folder: Path, keep: set[str], fmt: CheckpointFormat) -> None:
    """Refuse to write into a folder whose other checkpoint files would confuse loading."""
    if not folder.exists():
        return
    if not folder.is_dir():
        raise NotADirectoryError(f"{str(folder)!r} exists and is not a folder")
    weights = {META_PARAMS, HF_CONFIG, HF_SINGLE, HF_INDEX}
    stale = sorted(
        p.name
        for p in folder.iterdir()
        if p.name not in keep
        and (p.name in weights or _META_SHARD_RE.match(p.name) or _HF_SHARD_RE.match(p.name))
    )
    if stale:
        raise FileExistsError(
            f"cannot write a {fmt} checkpoint into {str(folder)!r}: it already holds "
            f"{_few(stale)}; use an empty folder"
        )
