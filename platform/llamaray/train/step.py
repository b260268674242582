"""One optimizer step: forward, backward over micro-batches, clip, update.

Pure torch. The same function runs in a notebook, under `torchrun`, in a Ray Train worker
and in the GPU benchmark; distribution is whatever the model was wrapped with.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def autocast(device: torch.device, dtype: str) -> contextlib.AbstractContextManager:
    """bf16 autocast on the device (weights stay fp32), or nothing for fp32."""
    if dtype == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=DTYPES[dtype])


@dataclass
class StepStats:
    loss: float
    grad_norm: float
    lr: float
    tokens: int
    finite: bool = True


def train_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    micro_batches: Sequence[torch.Tensor],
    lr: float,
    grad_clip: float = 1.0,
    dtype: str = "fp32",
    *,
    average: Callable[[torch.Tensor], torch.Tensor] | None = None,
    inject_nan: bool = False,
) -> StepStats:
    """Accumulate gradients over `micro_batches` (each (B, seq_len + 1) token rows), clip the
    global norm to `grad_clip` and step at learning rate `lr`.

    `model(inputs, targets=targets)` must return the mean next-token loss (as `Llama` does).

    A step whose loss or gradient norm is not finite is not applied (`finite=False`), so
    the parameters never become NaN; the caller decides whether to go on. Under data
    parallelism `average` all-reduces the reported loss (the gradient norm is already
    global), so every rank makes the same decision. `inject_nan` poisons the loss, to test
    that handling.
    """
    device = next(model.parameters()).device
    for group in optimizer.param_groups:
        group["lr"] = lr
    total_loss = torch.zeros((), device=device)
    tokens = 0
    for rows in micro_batches:
        rows = rows.to(device, non_blocking=True)
        inputs, targets = rows[:, :-1], rows[:, 1:]
        with autocast(device, dtype):
            loss = model(inputs, targets=targets) / len(micro_batches)
        if inject_nan:
            loss = loss * float("nan")
        loss.backward()
        total_loss += loss.detach()
        tokens += targets.numel()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    if hasattr(grad_norm, "full_tensor"):  # sharded parameters give a DTensor norm
        grad_norm = grad_norm.full_tensor()
    if average is not None:
        total_loss = average(total_loss)
    loss_value, norm_value = total_loss.item(), float(grad_norm)
    finite = math.isfinite(loss_value) and math.isfinite(norm_value)
    if finite:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return StepStats(loss_value, norm_value, lr, tokens, finite)


@torch.no_grad()
def evaluate_loss(
    model: torch.nn.Module, batches: Sequence[torch.Tensor], dtype: str = "fp32"
) -> float:
    """Mean next-token loss over (B, seq_len + 1) row batches, in eval mode."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    losses = []
    for rows in batches:
        rows = rows.to(device)
        with autocast(device, dtype):
            losses.append(model(rows[:, :-1], targets=rows[:, 1:]).item())
    model.train(was_training)
    return sum(losses) / max(1, len(losses))
