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
from torch.distributed.fsdp import FSDPModule

from llamaray.model.loss import IGNORE_INDEX

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


MicroBatch = torch.Tensor | tuple[torch.Tensor, torch.Tensor]
"""(B, seq_len + 1) token rows, or an (inputs, targets) pair of (B, T) tensors."""


def train_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    micro_batches: Sequence[MicroBatch],
    lr: float,
    grad_clip: float = 1.0,
    dtype: str = "fp32",
    *,
    average: Callable[[torch.Tensor], torch.Tensor] | None = None,
    inject_nan: bool = False,
    defer_gradient_sync: bool = True,
) -> StepStats:
    """Accumulate gradients over `micro_batches`, clip the global norm to `grad_clip` and
    step at learning rate `lr`.

    Micro-batches are all one of two kinds:

    - token rows (B, seq_len + 1) (pretraining): targets are the rows shifted by one, every
      target counts, and each micro-batch's mean loss weighs 1 / len(micro_batches);
    - (inputs, targets) pairs of (B, T) (finetuning): targets hold IGNORE_INDEX (-100)
      where nothing is learned (prompt, padding). Micro-batches hold different numbers of
      learned targets, so each weighs by its count over the count of all micro-batches of
      all data-parallel ranks (one all-reduce through `average`): the step's loss and
      gradient are the mean over every learned token of the global batch, as if it were one
      batch, rather than a mean of micro-batch means.

    `model(inputs, targets=targets)` must return the mean loss over the targets that are
    not IGNORE_INDEX (as `Llama` does). `StepStats.tokens` counts this rank's targets that
    carry loss.

    A step whose loss or gradient norm is not finite is not applied (`finite=False`), so
    the parameters never become NaN; the caller decides whether to go on. Under data
    parallelism `average` all-reduces the reported loss (the gradient norm is already
    global), so every rank makes the same decision. `inject_nan` poisons the loss, to test
    that handling.

    With FSDP2 and several micro-batches, `defer_gradient_sync` reduce-scatters gradients
    once per step, in the last micro-batch's backward, instead of once per micro-batch:
    the others accumulate unsharded gradients locally (more memory: one unsharded gradient
    per parameter, in the gather dtype; fewer collectives: 1 instead of
    len(micro_batches) reduce-scatters per FSDP unit). The result is the same sum.

    >>> stats = train_step(model, optimizer, [rows[:4], rows[4:]], lr=3e-4)  # doctest: +SKIP
    >>> stats = train_step(model, optimizer, [(inputs, targets)], lr=2e-5)  # doctest: +SKIP
    """
    device = next(model.parameters()).device
    for group in optimizer.param_groups:
        group["lr"] = lr
    pairs = [isinstance(mb, tuple) for mb in micro_batches]
    if any(pairs) and not all(pairs):
        raise ValueError("micro_batches mixes token rows and (inputs, targets) pairs")
    weights = _target_weights(micro_batches, device, average) if any(pairs) else None
    total_loss = torch.zeros((), device=device)
    tokens = 0
    defer = defer_gradient_sync and isinstance(model, FSDPModule) and len(micro_batches) > 1
    for index, batch in enumerate(micro_batches):
        if defer:  # sync only in the last backward (recursive: every block's unit)
            model.set_requires_gradient_sync(index == len(micro_batches) - 1)
        if weights is None:
            rows = batch.to(device, non_blocking=True)
            inputs, targets = rows[:, :-1], rows[:, 1:]
        else:
            inputs, targets = (t.to(device, non_blocking=True) for t in batch)
        with autocast(device, dtype):
            if weights is None:
                loss = model(inputs, targets=targets) / len(micro_batches)
            else:
                loss = model(inputs, targets=targets) * weights[index]
        if inject_nan:
            loss = loss * float("nan")
        loss.backward()
        total_loss += loss.detach()
        tokens += targets.numel() if weights is None else int((targets != IGNORE_INDEX).sum())
    grad_norm = _clip_gradients([p for p in model.parameters() if p.grad is not None], grad_clip)
    if average is not None:
        total_loss = average(total_loss)
    loss_value, norm_value = total_loss.item(), float(grad_norm)
    finite = math.isfinite(loss_value) and math.isfinite(norm_value)
    if finite:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return StepStats(loss_value, norm_value, lr, tokens, finite)


def _clip_gradients(params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Scale the gradients so their global norm is at most `max_norm`; return the norm from
    before (whole, where sharded parameters give a DTensor norm).

    `clip_grad_norm_`, except that gradients already within the bound are left alone
    rather than multiplied by 1.0: torch multiplies always, to spare devices a host sync,
    but the step syncs on the norm anyway, and the pass reads and writes every gradient
    (on CPU ~30 ms of a 1.3 s `small` step). Bit for bit the same gradients for a finite
    norm (a non-finite one skips the step, so its gradients are never applied)."""
    total = torch.nn.utils.get_total_norm([p.grad for p in params])
    whole = total.full_tensor() if hasattr(total, "full_tensor") else total
    if max_norm / (whole + 1e-6) < 1.0:  # torch's coefficient, before its clamp to 1
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return whole


def _target_weights(
    micro_batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
    device: torch.device,
    average: Callable[[torch.Tensor], torch.Tensor] | None,
) -> list[float]:
    """Weight of each micro-batch's mean loss: its learned targets / (the mean over ranks
    of each rank's learned targets). Data parallelism averages gradients over ranks, so
    summing these weighted means gives sum(token losses) / (all learned tokens)."""
    counts = [int((targets != IGNORE_INDEX).sum()) for _, targets in micro_batches]
    per_rank = torch.tensor(float(sum(counts)), device=device)
    if average is not None:
        per_rank = average(per_rank)  # tensor-parallel peers hold the same targets
    denominator = max(per_rank.item(), 1.0)
    return [count / denominator for count in counts]


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
