"""Meta's checkpoint layout (the reference `llama` repository).

`params.json` plus `consolidated.00.pth` ... `consolidated.NN.pth`, one file per
model-parallel rank. Parameter names are ours (`Llama.state_dict()`); the shards are merged
on load and split on save the way Meta's model parallelism splits each parameter.

Pickle files are only ever read with `torch.load(..., weights_only=True)`: a checkpoint can
carry tensors and plain containers, never code.
"""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Mapping
from pathlib import Path

import torch

from llamaray.model.args import ModelArgs

META_PARAMS = "params.json"
_META_SHARD_RE = re.compile(r"^consolidated\.(\d+)\.pth$")

# How Meta's model-parallel layers split each parameter across ranks (fairscale's
# ColumnParallelLinear splits output rows, RowParallelLinear input columns, and
# ParallelEmbedding the embedding dimension). Keyed on the last two name components.
_META_CAT_DIM: dict[str, int | None] = {
    "wq.weight": 0,
    "wk.weight": 0,
    "wv.weight": 0,
    "w1.weight": 0,
    "w3.weight": 0,
    "output.weight": 0,
    "wo.weight": 1,
    "w2.weight": 1,
    "tok_embeddings.weight": 1,
    "attention_norm.weight": None,  # replicated
    "ffn_norm.weight": None,
    "norm.weight": None,
}
# Tensors old checkpoints carry that are derived, not learned: skipped on load.
_META_IGNORED = {"rope.freqs"}


# ---------------------------------------------------------------------------- configs


def meta_params_from_args(args: ModelArgs) -> dict:
    """params.json contents for `args` (optional keys only when set)."""
    params: dict = {
        "dim": args.dim,
        "n_layers": args.n_layers,
        "n_heads": args.n_heads,
    }
    if args.n_kv_heads is not None:
        params["n_kv_heads"] = args.n_kv_heads
    params["vocab_size"] = args.vocab_size
    params["multiple_of"] = args.multiple_of
    if args.ffn_dim_multiplier is not None:
        params["ffn_dim_multiplier"] = args.ffn_dim_multiplier
    params["norm_eps"] = args.norm_eps
    params["rope_theta"] = args.rope_theta
    params["max_seq_len"] = args.max_seq_len
    return params


_META_KNOWN = {
    "dim",
    "n_layers",
    "n_heads",
    "n_kv_heads",
    "vocab_size",
    "multiple_of",
    "ffn_dim_multiplier",
    "norm_eps",
    "rope_theta",
    "max_seq_len",
}
_META_HARMLESS = {"max_batch_size"}  # inference-time settings of Meta's reference code


def args_from_meta_params(
    params: Mapping, vocab_rows: int | None = None, where: str = "params.json"
) -> ModelArgs:
    """`ModelArgs` from params.json contents. vocab_rows (the embedding's row count) stands in
    for `vocab_size: -1`, which LLaMA-1 checkpoints carry."""
    missing = [k for k in ("dim", "n_layers", "n_heads", "norm_eps") if k not in params]
    if missing:
        raise ValueError(f"{where} lacks required keys {missing}")
    if params.get("use_scaled_rope"):
        raise ValueError(
            f"{where} sets use_scaled_rope (Llama 3.1 long-context rope scaling), which this "
            "model does not implement"
        )
    unknown = set(params) - _META_KNOWN - _META_HARMLESS - {"use_scaled_rope"}
    if unknown:
        warnings.warn(f"{where}: ignoring unknown keys {sorted(unknown)}", stacklevel=3)
    vocab = params.get("vocab_size", -1)
    if vocab is None or vocab <= 0:
        if vocab_rows is None:
            raise ValueError(f"{where} has vocab_size={vocab} and no embedding to infer it from")
        vocab = vocab_rows
    kwargs = {
        "dim": params["dim"],
        "n_layers": params["n_layers"],
        "n_heads": params["n_heads"],
        "n_kv_heads": params.get("n_kv_heads"),
        "vocab_size": vocab,
        "multiple_of": params.get("multiple_of", 256),
        "ffn_dim_multiplier": params.get("ffn_dim_multiplier"),
        "norm_eps": params["norm_eps"],
        "rope_theta": float(params.get("rope_theta") or 10000.0),
    }
    if params.get("max_seq_len"):
        kwargs["max_seq_len"] = params["max_seq_len"]
    try:
        return ModelArgs(**kwargs)
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None


# ---------------------------------------------------------------------------- reading


def _torch_load(file: Path) -> dict:
    """torch.load with weights_only=True always; memory-mapped when the file allows it."""
    try:
        return torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as err:
        if "mmap" not in str(err):  # only the legacy (pre-zip) format cannot be mapped
            raise
        return torch.load(file, map_location="cpu", weights_only=True)


def _read_meta(folder: Path) -> tuple[ModelArgs, dict[str, torch.Tensor]]:
    where = str(folder / META_PARAMS)
    try:
        params = json.loads((folder / META_PARAMS).read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{where} is not valid JSON: {err}") from None
    numbered = {}
    for p in folder.iterdir():
        m = _META_SHARD_RE.match(p.name)
        if m:
            numbered[int(m.group(1))] = p
    if not numbered:
        raise FileNotFoundError(
            f"Meta checkpoint {str(folder)!r} has {META_PARAMS} but no consolidated.NN.pth files"
        )
    if sorted(numbered) != list(range(len(numbered))):
        raise ValueError(
            f"Meta checkpoint {str(folder)!r} has shards {sorted(numbered)}; expected "
            f"consolidated.00.pth .. consolidated.{len(numbered) - 1:02d}.pth"
        )
    shards = []
    for i in range(len(numbered)):
        shard = _torch_load(numbered[i])
        if not isinstance(shard, Mapping):
            raise ValueError(f"{numbered[i]} does not hold a state dict")
        shards.append({k: v for k, v in shard.items() if k not in _META_IGNORED})
    state = _merge_meta_shards(shards, folder)
    embed = state.get("tok_embeddings.weight")
    vocab_rows = embed.shape[0] if isinstance(embed, torch.Tensor) and embed.ndim == 2 else None
    return args_from_meta_params(params, vocab_rows, where), state


def _merge_meta_shards(shards: list[dict], folder: Path) -> dict[str, torch.Tensor]:
    if len(shards) == 1:
        return dict(shards[0])
    keys = list(shards[0])
    for i, shard in enumerate(shards[1:], start=1):
        if set(shard) != set(keys):
            diff = sorted(set(shard) ^ set(keys))[:5]
            raise ValueError(
                f"Meta checkpoint {str(folder)!r}: consolidated.{i:02d}.pth and "
                f"consolidated.00.pth hold different tensor names (e.g. {diff})"
            )
    merged = {}
    for key in keys:
        parts = [shard[key] for shard in shards]
        dim = _meta_cat_dim(key)
        if dim is None:
            if not all(torch.equal(parts[0], p) for p in parts[1:]):
                raise ValueError(
                    f"Meta checkpoint {str(folder)!r}: replicated tensor {key!r} differs "
                    "between shards"
                )
            merged[key] = parts[0]
        else:
            try:
                merged[key] = torch.cat(parts, dim=dim)
            except RuntimeError as err:
                raise ValueError(
                    f"Meta checkpoint {str(folder)!r}: cannot merge the shards of {key!r} "
                    f"along dim {dim} (shapes {[tuple(p.shape) for p in parts]}): {err}"
                ) from None
        for shard in shards:  # drop references as we go: the shards are memory-mapped
            del shard[key]
    return merged


def _meta_cat_dim(key: str) -> int | None:
    """Dimension Meta's model parallelism splits `key` along; None if replicated (and for
    names we do not know, which the name check after merging reports)."""
    return _META_CAT_DIM.get(".".join(key.split(".")[-2:]))


# ---------------------------------------------------------------------------- writing


def _meta_shard_names(num_shards: int) -> list[str]:
    """`consolidated.00.pth` ... one file name per model-parallel rank."""
    return [f"consolidated.{i:02d}.pth" for i in range(num_shards)]


def _check_shardable(args: ModelArgs, num_shards: int) -> None:
    names = ("n_heads", "n_kv_heads", "dim", "ffn_hidden_dim", "vocab_size")
    bad = args.not_divisible(num_shards, names)
    if bad:
        raise ValueError(
            f"cannot split the model into {num_shards} shards: {', '.join(bad)} "
            f"not divisible by {num_shards}"
        )


def _write_meta(
    state: dict[str, torch.Tensor], args: ModelArgs, folder: Path, num_shards: int
) -> None:
    """Write `state` into the existing `folder` split over `num_shards` model-parallel ranks
    as Meta's reference code would, then `params.json`."""
    for rank, name in enumerate(_meta_shard_names(num_shards)):
        shard = {}
        for key, tensor in state.items():
            dim = _meta_cat_dim(key)
            if num_shards == 1 or dim is None:
                shard[key] = tensor
            else:
                part = tensor.chunk(num_shards, dim=dim)[rank]
                # A chunk is a view; saved as is it would drag the whole storage along.
                shard[key] = part.clone(memory_format=torch.contiguous_format)
        torch.save(shard, folder / name)
    (folder / META_PARAMS).write_text(json.dumps(meta_params_from_args(args), indent=2) + "\n")
