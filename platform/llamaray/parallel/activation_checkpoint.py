"""Activation checkpointing per transformer block: none, full, or selective.

The paper (section 2.4) keeps "the activations that are expensive to compute, such as the
outputs of linear layers" and recomputes the rest in the backward pass. `selective` does
exactly that with torch's selective-checkpoint policy: matmul and attention outputs are
saved, everything else in the block (norms, rotary, SiLU, products, residual adds) is
recomputed. `full` saves only each block's input and recomputes the whole block.

The policy sees each op the block runs as an `OpOverload` and decides by its namespace and
name (`save_output`), never by identity with a fixed list of overloads: attention kernels
come from libraries that register their own ops (xformers' flash kernels are
`xformers_flash::flash_fwd` and `xformers_flash3::flash_fwd`, its cutlass kernel
`xformers::efficient_attention_forward_cutlass`), and an attention output that is not
recognized is silently recomputed in every backward: the most expensive op of the block
run twice.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

CheckpointMode = Literal["none", "full", "selective"]
MODES: tuple[str, ...] = ("none", "full", "selective")

# aten ops whose outputs are costly to recompute, by name (every overload of each): the
# matmuls, and torch's fused attention kernels (SDPA dispatches to one of the
# `_scaled_dot_product_*` ops, which call the `_*_attention_forward` kernels).
_ATEN_SAVED = frozenset(
    {
        "mm",
        "addmm",
        "bmm",
        "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_flash_attention_for_cpu",
        "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_cudnn_attention",
        "_scaled_dot_product_fused_attention_overrideable",
        "_flash_attention_forward",
        "_efficient_attention_forward",
        "_cudnn_attention_forward",
    }
)
# Words in the names of xformers' forward attention kernels: `flash_fwd` (flash 2 and 3),
# `efficient_attention_forward_cutlass`, `efficient_attention_forward_ck`, ...
_XFORMERS_FORWARD_WORDS = ("fwd", "forward", "attention", "fmha")
_BACKWARD_WORDS = ("bwd", "backward")


def save_output(namespace: str, name: str) -> bool:
    """Whether selective checkpointing keeps the output of op `namespace::name` (its
    overload packet, e.g. ("aten", "mm"), ("xformers_flash3", "flash_fwd"))."""
    if namespace == "aten":
        return name in _ATEN_SAVED
    if namespace.startswith("xformers"):
        # Every xformers op a block runs forward is attention; backward kernels never run
        # inside the checkpointed forward, but are excluded so the rule says what it means.
        forward = any(word in name for word in _XFORMERS_FORWARD_WORDS)
        return forward and not any(word in name for word in _BACKWARD_WORDS)
    return False


def _save_expensive(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    namespace = getattr(op, "namespace", "")
    packet = getattr(op, "overloadpacket", None)
    name = getattr(packet, "__name__", "") or getattr(op, "__name__", "")
    if save_output(namespace, name):
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def _selective_context():
    return create_selective_checkpoint_contexts(_save_expensive)


def apply_activation_checkpointing(model: torch.nn.Module, mode: str) -> None:
    """Wrap every block in `model.layers` (a ModuleDict) with the chosen policy, in place.

    State-dict keys stay unchanged: the wrapper strips its own prefix.
    """
    if mode not in MODES:
        raise ValueError(f"unknown activation checkpointing mode {mode!r}; choose one of {MODES}")
    if mode == "none":
        return
    kwargs = {"preserve_rng_state": False}  # the blocks have no dropout: nothing random to replay
    if mode == "selective":
        kwargs["context_fn"] = _selective_context
    for name, block in list(model.layers.items()):
        model.layers[name] = checkpoint_wrapper(block, **kwargs)


__all__ = ["MODES", "CheckpointMode", "apply_activation_checkpointing", "save_output"]
