"""Gradient accumulation under FSDP2 reduce-scatters once per step, with the same result.

Two CPU ranks over gloo on 127.0.0.1 train the debug model for a few steps of 4
micro-batches each, once reducing every micro-batch's gradients and once deferring the
reduction to the last micro-batch (`train_step(defer_gradient_sync=True)`). FSDP2's
per-unit reduction (`foreach_reduce`) is counted on every rank.
"""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp._fully_shard import _fsdp_param_group

from llamaray.model import Llama, get_preset
from llamaray.parallel.fsdp import apply_fsdp
from llamaray.parallel.init import materialize
from llamaray.train.step import train_step

WORLD = 2
MICRO_BATCHES = 4
STEPS = 3
ARGS = get_preset("debug").args.with_(vocab_size=64, dim=64, n_heads=4, n_layers=2)
UNITS = ARGS.n_layers + 1  # one FSDP unit per block, and the root


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(defer: bool) -> tuple[list[float], dict[str, torch.Tensor], list[int]]:
    """Losses, full parameters after STEPS steps and reductions per step, on this rank."""
    mesh = init_device_mesh("cpu", (WORLD,))
    with torch.device("meta"):
        model = Llama(ARGS)
    apply_fsdp(model, mesh)
    materialize(model, torch.device("cpu"), seed=0)
    # SGD: the update is linear in the gradient, so equal gradients show as equal weights
    # (Adam's division by sqrt(v) magnifies rounding where a gradient is near zero).
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    generator = torch.Generator().manual_seed(dist.get_rank())
    rows = torch.randint(0, ARGS.vocab_size, (STEPS, MICRO_BATCHES, 2, 17), generator=generator)

    reductions = 0
    original = _fsdp_param_group.foreach_reduce

    def counting(*args, **kwargs):
        nonlocal reductions
        reductions += 1
        return original(*args, **kwargs)

    _fsdp_param_group.foreach_reduce = counting
    losses, per_step = [], []
    try:
        for step in range(STEPS):
            before = reductions
            stats = train_step(
                model, optimizer, list(rows[step]), lr=0.5,
                average=lambda x: (dist.all_reduce(x, op=dist.ReduceOp.AVG), x)[1],
                defer_gradient_sync=defer,
            )  # fmt: skip
            losses.append(stats.loss)
            per_step.append(reductions - before)
    finally:
        _fsdp_param_group.foreach_reduce = original
    params = {n: p.full_tensor().detach().clone() for n, p in model.named_parameters()}
    return losses, params, per_step


def _compare(rank: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        every_losses, every_params, every_count = _run(defer=False)
        once_losses, once_params, once_count = _run(defer=True)
        assert every_count == [UNITS * MICRO_BATCHES] * STEPS, every_count
        assert once_count == [UNITS] * STEPS, once_count
        torch.testing.assert_close(once_losses, every_losses, rtol=1e-6, atol=0)
        # Summing 4 local gradients, then reducing, rounds differently from reducing each.
        for name, value in every_params.items():
            torch.testing.assert_close(once_params[name], value, rtol=1e-5, atol=1e-6)
        # The three steps moved the weights: equal parameters are not equal by staying put.
        assert every_losses[0] != every_losses[-1]
    finally:
        dist.destroy_process_group()


def test_deferred_sync_reduces_once_per_step_and_equals_per_micro_batch_sync():
    mp.spawn(_compare, args=(_free_port(),), nprocs=WORLD, join=True)
