"""Training FLOPs per token and model FLOPs utilization (MFU), as PaLM (appendix B) counts.

Per token, a forward+backward pass costs 6N for the weight matmuls (N parameters without
the embedding table: a lookup is not a matmul, while the untied output projection is)
plus 12 * layers * dim * seq for attention scores and their application to values.
Recomputation from activation checkpointing is deliberately not counted: MFU measures
useful work, so recomputing makes it go down, as it should.
"""

from __future__ import annotations

from llamaray.model.args import ModelArgs

# Dense peak FLOP/s per device for the dtypes we train in (vendor datasheets, no sparsity).
PEAK_FLOPS: dict[str, float] = {
    "h100-sxm-bf16": 989e12,
    "h200-bf16": 989e12,
    "a100-bf16": 312e12,
    "a100-fp32": 19.5e12,
}


def non_embedding_params(args: ModelArgs) -> int:
    """Parameters that take part in matmuls: blocks, final norm, output projection."""
    attn = args.dim * args.head_dim * (2 * args.n_heads + 2 * args.kv_heads)
    ffn = 3 * args.dim * args.ffn_hidden_dim
    norms = 2 * args.dim
    return args.n_layers * (attn + ffn + norms) + args.dim + args.dim * args.vocab_size


def param_count(args: ModelArgs) -> int:
    """Every parameter of the model (the embedding table too): the one count, used for the
    presets table, `derived.n_params` (N of the scaling law) and the training line. Equal
    to `Llama(args).num_params()` (tests/unit/test_train_step.py), without building it.

    >>> from llamaray.model import get_preset
    >>> round(param_count(get_preset("7B").args) / 1e9, 2)
    6.74
    """
    return non_embedding_params(args) + args.vocab_size * args.dim


def flops_per_token(args: ModelArgs, seq_len: int) -> float:
    """Training FLOPs (forward + backward) per token at sequence length `seq_len`.

    >>> from llamaray.model import get_preset
    >>> round(flops_per_token(get_preset("7B").args, 2048) / 1e9, 1)
    42.9
    """
    return 6 * non_embedding_params(args) + 12 * args.n_layers * args.dim * seq_len


def mfu(tokens_per_second: float, args: ModelArgs, seq_len: int, peak_flops: float) -> float:
    """Fraction of `peak_flops` (total over the devices producing those tokens) used."""
    if peak_flops <= 0:
        raise ValueError(f"peak_flops must be positive, got {peak_flops}")
    return tokens_per_second * flops_per_token(args, seq_len) / peak_flops


def device_peak_flops(device_name: str, dtype: str) -> float | None:
    """`PEAK_FLOPS` of a GPU by its name (`torch.cuda.get_device_name`) in `dtype` ("bf16",
    "fp32"), or None when the table has no entry for it. An H100 is taken to be the SXM
    part (the PCIe one peaks lower: pass its peak explicitly).

    >>> device_peak_flops("NVIDIA H100 80GB HBM3", "bf16") / 1e12
    989.0
    """
    name = device_name.lower()
    for marker, prefix in (("h200", "h200"), ("h100", "h100-sxm"), ("a100", "a100")):
        if marker in name:
            return PEAK_FLOPS.get(f"{prefix}-{dtype}")
    return None
