"""Read and write LLaMA checkpoints in Meta's and Hugging Face's formats.

Two folder layouts are understood:

* **Meta** (the reference `llama` repository): `params.json` plus `consolidated.00.pth`
  ... `consolidated.NN.pth`, one file per model-parallel rank. Parameter names are ours.
* **Hugging Face** (`LlamaForCausalLM`): `config.json` plus `model.safetensors`, or shards
  `model-0000x-of-0000y.safetensors` listed in `model.safetensors.index.json`.

Everything is keyed on `Llama.state_dict()` names; the rotary tables are non-persistent
buffers, recomputed from the arguments. Loading builds the model on the meta device and
assigns the checkpoint's tensors to it, so a 65B model is never randomly initialized first
and (for a single Meta shard, which is memory-mapped) not copied either.

    >>> model = load_pretrained("checkpoints/llama-2-7b")  # doctest: +SKIP
    >>> save_hf(model, "checkpoints/llama-2-7b-hf")  # doctest: +SKIP

Pickle files are only ever read with `torch.load(..., weights_only=True)`: a checkpoint can
carry tensors and plain containers, never code.

Hugging Face pairs the two halves of each head for rotary embeddings where Meta (and this
package) pairs adjacent dimensions, and compensates by permuting the rows of wq and wk
(transformers' `convert_llama_weights_to_hf.py`). `hf_permute` applies that permutation on
save and `hf_unpermute` undoes it on load; the two are exact index shuffles, so conversions
in either direction are bit-exact.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Literal

import torch

from llamaray.model.args import ModelArgs
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
]

CheckpointFormat = Literal["meta", "hf"]

META_PARAMS = "params.json"
HF_CONFIG = "config.json"
HF_SINGLE = "model.safetensors"
HF_INDEX = "model.safetensors.index.json"
_META_SHARD_RE = re.compile(r"^consolidated\.(\d+)\.pth$")
_HF_SHARD_RE = re.compile(r"^model-\d+-of-\d+\.safetensors$")

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
_HF_IGNORED_SUFFIX = "rotary_emb.inv_freq"

# Our name <-> Hugging Face name, per layer and at the top level.
_HF_LAYER_NAMES = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
_HF_TOP_NAMES = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_HF_LAYER_NAMES_INV = {v: k for k, v in _HF_LAYER_NAMES.items()}
_HF_TOP_NAMES_INV = {v: k for k, v in _HF_TOP_NAMES.items()}
_LAYER_RE = re.compile(r"^layers\.(\d+)\.(.+)$")
_HF_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")

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
    names = [f"consolidated.{i:02d}.pth" for i in range(num_shards)]
    _refuse_stale(folder, keep={META_PARAMS, *names}, fmt="meta")
    folder.mkdir(parents=True, exist_ok=True)
    state = _model_tensors(model)
    for rank, name in enumerate(names):
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
    return folder


def save_hf(model: Llama, out_dir: str | Path, dtype: torch.dtype | str | None = None) -> Path:
    """Write `config.json` + `model.safetensors`, loadable by transformers'
    `LlamaForCausalLM.from_pretrained(out_dir)`. dtype: None keeps the model's. Returns the
    folder."""
    from safetensors.torch import save_file

    folder = Path(out_dir)
    _refuse_stale(folder, keep={HF_CONFIG, HF_SINGLE}, fmt="hf")
    folder.mkdir(parents=True, exist_ok=True)
    target = _as_dtype(dtype)
    state = _model_tensors(model, target)
    saved_dtype = target or _common_dtype(state.values())
    hf_state = meta_to_hf_state_dict(state, model.args)
    seen: set[int] = set()
    for key, tensor in hf_state.items():  # safetensors refuses tensors sharing memory
        tensor = tensor.contiguous()
        if tensor.data_ptr() in seen:
            tensor = tensor.clone()
        seen.add(tensor.data_ptr())
        hf_state[key] = tensor
    save_file(hf_state, str(folder / HF_SINGLE), metadata={"format": "pt"})
    config = hf_config_from_args(model.args, saved_dtype)
    (folder / HF_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
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
    tokenizer = src / "tokenizer.model"
    if tokenizer.is_file():
        shutil.copy2(tokenizer, dst / "tokenizer.model")
    return dst


# ---------------------------------------------------------------------------- name mapping


def hf_permute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Meta's (adjacent-pair) wq/wk rows -> Hugging Face's (half-split) order, per head."""
    dim1, dim2 = w.shape
    return w.view(n_heads, dim1 // n_heads // 2, 2, dim2).transpose(1, 2).reshape(dim1, dim2)


def hf_unpermute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of `hf_permute`: Hugging Face's wq/wk rows back to Meta's order."""
    dim1, dim2 = w.shape
    return w.view(n_heads, 2, dim1 // n_heads // 2, dim2).transpose(1, 2).reshape(dim1, dim2)


def meta_to_hf_state_dict(
    state: Mapping[str, torch.Tensor], args: ModelArgs
) -> dict[str, torch.Tensor]:
    """Our parameter names and wq/wk row order -> `LlamaForCausalLM`'s."""
    out = {}
    for key, tensor in state.items():
        m = _LAYER_RE.match(key)
        if m and m.group(2) in _HF_LAYER_NAMES:
            layer, rest = m.groups()
            if rest == "attention.wq.weight":
                tensor = hf_permute(tensor, args.n_heads)
            elif rest == "attention.wk.weight":
                tensor = hf_permute(tensor, args.kv_heads)
            out[f"model.layers.{layer}.{_HF_LAYER_NAMES[rest]}"] = tensor
        elif key in _HF_TOP_NAMES:
            out[_HF_TOP_NAMES[key]] = tensor
        else:
            raise ValueError(f"no Hugging Face name for parameter {key!r}")
    return out


def hf_to_meta_state_dict(
    state: Mapping[str, torch.Tensor], args: ModelArgs
) -> dict[str, torch.Tensor]:
    """`LlamaForCausalLM` names and wq/wk row order -> ours. Names that do not map are kept
    unchanged, so the caller's missing/unexpected check reports them."""
    out = {}
    for key, tensor in state.items():
        m = _HF_LAYER_RE.match(key)
        if m and m.group(2) in _HF_LAYER_NAMES_INV:
            layer, rest = m.groups()
            ours = _HF_LAYER_NAMES_INV[rest]
            if ours == "attention.wq.weight":
                tensor = _unpermute_checked(tensor, args.n_heads, key)
            elif ours == "attention.wk.weight":
                tensor = _unpermute_checked(tensor, args.kv_heads, key)
            out[f"layers.{layer}.{ours}"] = tensor
        elif key in _HF_TOP_NAMES_INV:
            out[_HF_TOP_NAMES_INV[key]] = tensor
        else:
            out[key] = tensor
    return out


def _unpermute_checked(tensor: torch.Tensor, n_heads: int, key: str) -> torch.Tensor:
    if tensor.ndim != 2 or tensor.shape[0] % (2 * n_heads):
        raise ValueError(
            f"tensor {key!r} has shape {tuple(tensor.shape)}: its rows do not split into "
            f"{n_heads} heads of even size"
        )
    return hf_unpermute(tensor, n_heads)


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


def hf_config_from_args(args: ModelArgs, dtype: torch.dtype = torch.float32) -> dict:
    """config.json contents of a `LlamaForCausalLM` with the architecture `args`.

    rope_theta is written both the transformers 4.x way (top-level `rope_theta`) and the 5.x
    way (`rope_parameters`); `dtype` both as `torch_dtype` (4.x) and `dtype` (5.x).
    """
    dtype_name = str(dtype).removeprefix("torch.")
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": args.vocab_size,
        "hidden_size": args.dim,
        "intermediate_size": args.ffn_hidden_dim,
        "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.kv_heads,
        "head_dim": args.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": args.max_seq_len,
        "initializer_range": 0.02,
        "rms_norm_eps": args.norm_eps,
        "use_cache": True,
        "pad_token_id": None,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pretraining_tp": 1,
        "tie_word_embeddings": False,
        "rope_theta": args.rope_theta,
        "rope_scaling": None,
        "rope_parameters": {"rope_theta": args.rope_theta, "rope_type": "default"},
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "torch_dtype": dtype_name,
        "dtype": dtype_name,
        # Not read by transformers: lets our loader rebuild the exact same ModelArgs.
        "llamaray": {
            "multiple_of": args.multiple_of,
            "ffn_dim_multiplier": args.ffn_dim_multiplier,
        },
    }


def args_from_hf_config(config: Mapping, where: str = "config.json") -> ModelArgs:
    """`ModelArgs` from a Hugging Face Llama config.json; refuses what the model cannot do
    (other model types, biases, rope scaling, a non-SiLU MLP, an odd head_dim)."""
    model_type = config.get("model_type")
    if model_type != "llama":
        raise ValueError(
            f"{where} has model_type={model_type!r}; only Hugging Face 'llama' checkpoints "
            "(LlamaForCausalLM) can be loaded"
        )
    required = [
        "hidden_size",
        "intermediate_size",
        "num_attention_heads",
        "num_hidden_layers",
        "vocab_size",
    ]
    missing = [k for k in required if k not in config]
    if missing:
        raise ValueError(f"{where} lacks required keys {missing}")
    for flag in ("attention_bias", "mlp_bias"):
        if config.get(flag):
            raise ValueError(f"{where} sets {flag}=true; this LLaMA model has no biases")
    act = config.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"{where} has hidden_act={act!r}; the SwiGLU MLP needs 'silu'")
    dim, n_heads = config["hidden_size"], config["num_attention_heads"]
    head_dim = config.get("head_dim")
    if head_dim is not None and n_heads and head_dim * n_heads != dim:
        raise ValueError(
            f"{where} has head_dim={head_dim} but hidden_size/num_attention_heads="
            f"{dim}/{n_heads}; this model needs head_dim == hidden_size / num_attention_heads"
        )
    n_kv = config.get("num_key_value_heads")
    rope_theta = _hf_rope_theta(config, where)
    intermediate = config["intermediate_size"]
    ours = config.get("llamaray") or {}
    multiple_of, multiplier = ours.get("multiple_of"), ours.get("ffn_dim_multiplier")
    if multiple_of is None or _ffn(dim, multiple_of, multiplier) != intermediate:
        multiple_of, multiplier = _ffn_rule_for(dim, intermediate, where)
    kwargs = {
        "dim": dim,
        "n_layers": config["num_hidden_layers"],
        "n_heads": n_heads,
        "n_kv_heads": None if n_kv in (None, n_heads) else n_kv,
        "vocab_size": config["vocab_size"],
        "multiple_of": multiple_of,
        "ffn_dim_multiplier": multiplier,
        "norm_eps": config.get("rms_norm_eps", 1e-6),
        "rope_theta": rope_theta,
    }
    if config.get("max_position_embeddings"):
        kwargs["max_seq_len"] = config["max_position_embeddings"]
    try:
        return ModelArgs(**kwargs)
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None


def _hf_rope_theta(config: Mapping, where: str) -> float:
    """rope theta from either transformers 4.x (`rope_theta` + `rope_scaling`) or 5.x
    (`rope_parameters`) fields, with transformers' precedence; only plain rope is accepted."""
    rope = config.get("rope_scaling") or config.get("rope_parameters") or {}
    if not isinstance(rope, Mapping):
        raise ValueError(f"{where}: cannot read rope parameters {rope!r}")
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise ValueError(
            f"{where} asks for rope scaling type {rope_type!r}; only plain rotary embeddings "
            "(rope_type 'default') are implemented"
        )
    partial = rope.get("partial_rotary_factor", config.get("partial_rotary_factor"))
    if partial not in (None, 1, 1.0):
        raise ValueError(f"{where} sets partial_rotary_factor={partial}; only 1.0 is supported")
    theta = rope.get("rope_theta", config.get("rope_theta"))
    return float(theta) if theta is not None else 10000.0


def _ffn(dim: int, multiple_of: int, multiplier: float | None) -> int:
    hidden = int(2 * (4 * dim) / 3)
    if multiplier is not None:
        hidden = int(multiplier * hidden)
    return multiple_of * math.ceil(hidden / multiple_of)


def _ffn_rule_for(dim: int, intermediate: int, where: str) -> tuple[int, float | None]:
    """(multiple_of, ffn_dim_multiplier) whose SwiGLU rule gives `intermediate` for `dim`:
    the known LLaMA settings first, then the ratio itself."""
    if intermediate <= 0:
        raise ValueError(f"{where} has intermediate_size={intermediate}; it must be positive")
    multiples = [256, 1024, 4096, 2048, 512, 128, 64, 32, 16, 8, 4, 2, 1]
    multiples = [m for m in multiples if intermediate % m == 0]
    # Meta's settings: LLaMA 1/2 (none), Llama 2 70B / Llama 3 (1.3), 3.1 405B (1.2),
    # 3.2 1B (1.5), 3.2 3B (1.0).
    for multiplier in (None, 1.3, 1.2, 1.5, 1.0):
        for multiple_of in multiples:
            if _ffn(dim, multiple_of, multiplier) == intermediate:
                return multiple_of, multiplier
    base = int(2 * (4 * dim) / 3)
    ratio = intermediate / base
    for multiplier in (ratio, math.nextafter(ratio, math.inf)):
        for multiple_of in multiples:
            if _ffn(dim, multiple_of, multiplier) == intermediate:
                return multiple_of, multiplier
    raise ValueError(
        f"{where}: intermediate_size={intermediate} cannot be reproduced by the SwiGLU width "
        f"rule for hidden_size={dim} (any multiple_of / ffn_dim_multiplier)"
    )


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


def _read_hf(folder: Path) -> tuple[ModelArgs, dict[str, torch.Tensor]]:
    where = str(folder / HF_CONFIG)
    try:
        config = json.loads((folder / HF_CONFIG).read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{where} is not valid JSON: {err}") from None
    args = args_from_hf_config(config, where)
    raw = _read_safetensors(folder)
    raw = {k: v for k, v in raw.items() if not k.endswith(_HF_IGNORED_SUFFIX)}
    if config.get("tie_word_embeddings", False):
        if "lm_head.weight" in raw and "model.embed_tokens.weight" in raw:
            if not torch.equal(raw["lm_head.weight"], raw["model.embed_tokens.weight"]):
                raise ValueError(
                    f"{where} sets tie_word_embeddings but lm_head.weight differs from "
                    "model.embed_tokens.weight"
                )
        elif "model.embed_tokens.weight" in raw:
            # Our output projection is its own parameter: a copy, not shared storage.
            raw["lm_head.weight"] = raw["model.embed_tokens.weight"].clone()
    return args, hf_to_meta_state_dict(raw, args)


def _read_safetensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    if (folder / HF_SINGLE).is_file():
        files = [folder / HF_SINGLE]
    elif (folder / HF_INDEX).is_file():
        index = json.loads((folder / HF_INDEX).read_text())
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, Mapping) or not weight_map:
            raise ValueError(f"{folder / HF_INDEX} has no weight_map")
        files = [folder / name for name in sorted(set(weight_map.values()))]
        absent = [f.name for f in files if not f.is_file()]
        if absent:
            raise FileNotFoundError(
                f"Hugging Face checkpoint {str(folder)!r}: {HF_INDEX} lists missing files {absent}"
            )
    else:
        files = sorted(p for p in folder.iterdir() if _HF_SHARD_RE.match(p.name))
        if not files:
            extra = ""
            if (folder / "pytorch_model.bin").exists() or any(folder.glob("pytorch_model*.bin")):
                extra = " (pytorch_model*.bin files are not read: re-save with safetensors)"
            raise FileNotFoundError(
                f"Hugging Face checkpoint {str(folder)!r} has {HF_CONFIG} but no weights: "
                f"expected {HF_SINGLE}, or model-*-of-*.safetensors shards with {HF_INDEX}{extra}"
            )
    state: dict[str, torch.Tensor] = {}
    for file in files:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                if key in state:
                    raise ValueError(f"tensor {key!r} appears in more than one file of {folder}")
                state[key] = f.get_tensor(key)
    return state


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


def _check_shardable(args: ModelArgs, num_shards: int) -> None:
    sizes = {
        "n_heads": args.n_heads,
        "n_kv_heads": args.kv_heads,
        "dim": args.dim,
        "ffn_hidden_dim": args.ffn_hidden_dim,
        "vocab_size": args.vocab_size,
    }
    bad = [f"{k}={v}" for k, v in sizes.items() if v % num_shards]
    if bad:
        raise ValueError(
            f"cannot split the model into {num_shards} shards: {', '.join(bad)} "
            f"not divisible by {num_shards}"
        )


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
