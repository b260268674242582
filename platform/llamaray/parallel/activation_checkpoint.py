"""Activation checkpointing per transformer block: none, full, or selective.

The paper (section 2.4) keeps "the activations that are expensive to compute, such as the
outputs of linear layers" and recomputes the rest in the backward pass. `selective` does
exactly that with torch's selective-checkpoint policy: matmul and attention outputs are
saved, everything else in the block (norms, rotary, SiLU, products, residual adds) is
recomputed. `full` saves only each block's input and recomputes the whole block.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

CheckpointMode = Literal["none", "full", "selective"]
MODES: tuple[str, ...] = ("none", "full", "selective")

_aten = torch.ops.aten
# Outputs that are costly to recompute: every matmul, and the attention kernels.
_SAVE_OPS = {
    _aten.mm.default,
    _aten.addmm.default,
    _aten.bmm.default,
    _aten._scaled_dot_product_flash_attention_for_cpu.default,
    _aten._scaled_dot_product_flash_attention.default,
    _aten._scaled_dot_product_efficient_attention.default,
    _aten._scaled_dot_product_cudnn_attention.default,
}


def _save_expensive(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    # xformers registers its kernels as custom ops named "...attention..." / "...fmha...".
    name = str(op)
    if op in _SAVE_OPS or (name.startswith("xformers") and ("attention" in name or "fmha" in name)):
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


__all__ = ["MODES", "CheckpointMode", "apply_activation_checkpointing"]
