"""AdamW as the paper configures it."""

from __future__ import annotations

import torch


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices (embeddings, projections), not vectors (RMSNorm gains).

    A rule on dimensionality rather than a list of names keeps working when wrappers
    (checkpointing, FSDP) rename parameters.
    """
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(
    model: torch.nn.Module,
    lr: float,
    betas: tuple[float, float] = (0.9, 0.95),
    weight_decay: float = 0.1,
    eps: float = 1e-8,
) -> torch.optim.AdamW:
    """AdamW(b1=0.9, b2=0.95, wd=0.1); fused kernels where torch has them for the device."""
    groups = param_groups(model, weight_decay)
    device = next(model.parameters()).device
    # The fused kernel updates each tensor in one pass with no temporaries. On CPU this matters
    # as much as on GPU: for the `small` preset the foreach path took 502 ms a step (fresh
    # ~100 MB buffers for the embedding and output matrices, page-faulted every time), the
    # fused one 90 ms.
    fused = device.type in ("cpu", "cuda")
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=fused)
