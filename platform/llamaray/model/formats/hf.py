"""Hugging Face's checkpoint layout (`LlamaForCausalLM`).

`config.json` plus `model.safetensors`, or shards `model-0000x-of-0000y.safetensors` listed
in `model.safetensors.index.json`. Parameter names are mapped to and from ours
(`Llama.state_dict()`).

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
from collections.abc import Mapping
from pathlib import Path

import torch

from llamaray.model.args import ModelArgs

HF_CONFIG = "config.json"
HF_SINGLE = "model.safetensors"
HF_INDEX = "model.safetensors.index.json"
HF_TOKENIZER_CONFIG = "tokenizer_config.json"
HF_SPECIAL_TOKENS = "special_tokens_map.json"
TOKENIZER_MODEL = "tokenizer.model"
_HF_SHARD_RE = re.compile(r"^model-\d+-of-\d+\.safetensors$")
# Tensors old checkpoints carry that are derived, not learned: skipped on load.
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


# ---------------------------------------------------------------------------- writing


def _write_hf(
    state: dict[str, torch.Tensor], args: ModelArgs, folder: Path, dtype: torch.dtype
) -> None:
    """Write `state` as `model.safetensors` + `config.json` (declaring `dtype`) into the
    existing `folder`."""
    from safetensors.torch import save_file

    hf_state = meta_to_hf_state_dict(state, args)
    seen: set[int] = set()
    for key, tensor in hf_state.items():  # safetensors refuses tensors sharing memory
        tensor = tensor.contiguous()
        if tensor.data_ptr() in seen:
            tensor = tensor.clone()
        seen.add(tensor.data_ptr())
        hf_state[key] = tensor
    save_file(hf_state, str(folder / HF_SINGLE), metadata={"format": "pt"})
    config = hf_config_from_args(args, dtype)
    (folder / HF_CONFIG).write_text(json.dumps(config, indent=2) + "\n")


def write_hf_tokenizer(folder: str | Path, tokenizer_model: str | Path, max_length: int) -> None:
    """Copy a SentencePiece `tokenizer.model` into an HF folder with the two files that let
    transformers' `AutoTokenizer.from_pretrained(folder)` read it as a Llama tokenizer that
    adds bos and not eos, as Meta's converted checkpoints do.

    The piece names are LLaMA's (`<unk>`, `<s>`, `</s>`: ids 0, 1, 2), which our trainer's
    spec and Meta's tokenizer both use. transformers' tokenizer agrees with SentencePiece
    except on text that starts with whitespace or holds a literal "▁" (tested)."""
    import shutil

    folder = Path(folder)
    if Path(tokenizer_model).resolve() != (folder / TOKENIZER_MODEL).resolve():
        shutil.copyfile(tokenizer_model, folder / TOKENIZER_MODEL)
    special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    config = {
        "tokenizer_class": "LlamaTokenizer",
        **special,
        "pad_token": None,
        "add_bos_token": True,
        "add_eos_token": False,
        "legacy": True,
        "clean_up_tokenization_spaces": False,
        "model_max_length": max_length,
    }
    (folder / HF_TOKENIZER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    (folder / HF_SPECIAL_TOKENS).write_text(json.dumps(special, indent=2) + "\n")
