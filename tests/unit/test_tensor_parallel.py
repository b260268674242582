"""Tensor + sequence parallelism, alone and under FSDP2 on a dp x tp mesh, against one process.

Each distributed test spawns 4 CPU processes talking over gloo on 127.0.0.1; every rank
builds the same reference model in-process and checks its parallel copy against it.
"""

from __future__ import annotations

import copy
import os
import socket
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from llamaray.model import Llama, get_preset
from llamaray.parallel.tensor import apply_tensor_parallel, build_mesh, check_divisible

WORLD = 4
ARGS = get_preset("debug").args.with_(vocab_size=64, dim=64, n_heads=4, n_layers=2)
TOL = {"rtol": 1e-5, "atol": 1e-6}
LR = 1e-3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(fn, *args) -> None:
    # Errors in a rank come back as ProcessRaisedException carrying that rank's traceback.
    mp.spawn(_worker, args=(_free_port(), fn, args), nprocs=WORLD, join=True)


def _worker(rank: int, port: int, fn, args) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    # gloo otherwise binds whatever address the hostname resolves to, which a sandbox may
    # not route; loopback is all 4 local ranks need (Linux's name for it).
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)  # 4 ranks share 2 cores
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        fn(*args)
    finally:
        dist.destroy_process_group()


def _named(name: str, sequence_parallel: bool = True):
    """assert_close's own mismatch report, prefixed with what was compared."""
    return lambda report: f"{name} (sequence_parallel={sequence_parallel}): {report}"


def _models(args):
    """A reference model and an identical copy to parallelize (same seed on every rank)."""
    torch.manual_seed(0)
    reference = Llama(args)
    return reference, copy.deepcopy(reference)


def _batch(batch: int, seq: int):
    generator = torch.Generator().manual_seed(1)
    data = torch.randint(0, ARGS.vocab_size, (batch, seq + 1), generator=generator)
    return data[:, :-1], data[:, 1:]


def _tp_only() -> None:
    mesh = build_mesh(WORLD, WORLD, "cpu")
    for sequence_parallel in (True, False):  # one spawn for both: starting ranks dominates
        _check_tp_only(mesh, sequence_parallel)


def _check_tp_only(mesh, sequence_parallel: bool) -> None:
    reference, model = _models(ARGS)
    apply_tensor_parallel(model, mesh["tp"], sequence_parallel=sequence_parallel)
    # All on one mesh, so fully_shard puts them all on the same 2-D mesh (gradient clipping).
    assert all(isinstance(p, DTensor) and p.device_mesh == mesh["tp"] for p in model.parameters())
    tokens, targets = _batch(2, 8)

    close = {"rtol": 1e-5, "atol": 1e-5}
    logits, expected = model(tokens), reference(tokens)
    torch.testing.assert_close(logits, expected, **close, msg=_named("logits", sequence_parallel))
    loss = model(tokens, targets=targets)
    expected = reference(tokens, targets=targets)
    torch.testing.assert_close(loss, expected, **close, msg=_named("loss", sequence_parallel))

    loss.backward()
    expected.backward()
    want = dict(reference.named_parameters())
    for name, param in model.named_parameters():
        got = param.grad.full_tensor()
        torch.testing.assert_close(got, want[name].grad, **TOL, msg=_named(name, sequence_parallel))

    if sequence_parallel:
        with pytest.raises(ValueError, match="multiple of the tensor parallel degree"):
            model(tokens[:, :6])


@pytest.mark.slow  # starts a process group of 4 processes
def test_tensor_parallel_matches_one_process():
    """tp=4, with and without sequence parallelism: logits, fused loss and every gradient
    equal the un-parallelized model's."""
    _spawn(_tp_only)


def _fsdp_tp_step() -> None:
    mesh = build_mesh(WORLD, 2, "cpu")
    # Grouped-query attention too: 2 kv heads shared by 4 query heads, one kv head per rank.
    args = ARGS.with_(n_kv_heads=2)
    reference, model = _models(args)
    apply_tensor_parallel(model, mesh["tp"])
    for block in model.layers.values():
        fully_shard(block, mesh=mesh["dp"])
    fully_shard(model, mesh=mesh["dp"])

    tokens, targets = _batch(4, 8)
    dp, dp_rank = mesh["dp"].size(), mesh["dp"].get_local_rank()
    rows = slice(dp_rank * 4 // dp, (dp_rank + 1) * 4 // dp)

    optimizers = [
        torch.optim.AdamW(n.parameters(), lr=LR, weight_decay=0.1) for n in (reference, model)
    ]
    expected = reference(tokens, targets=targets)
    loss = model(tokens[rows], targets=targets[rows])
    # No ignored targets and equal shards: the global mean is the mean of the dp means,
    # and FSDP's averaging reduce-scatter gives the gradient of exactly that.
    global_loss = loss.detach().clone()
    dist.all_reduce(global_loss, group=mesh["dp"].get_group())
    torch.testing.assert_close(global_loss / dp, expected.detach(), **TOL)

    expected.backward()
    loss.backward()
    want = dict(reference.named_parameters())
    for name, param in model.named_parameters():
        assert param.device_mesh.mesh_dim_names == ("dp", "tp"), name
        torch.testing.assert_close(
            param.grad.full_tensor(), want[name].grad, **TOL, msg=_named(name)
        )

    for optimizer in optimizers:
        optimizer.step()
    # Looser than the gradients: Adam's first step is lr * g / (|g| + eps), so an element
    # whose gradient is small by cancellation turns its fp32 summation-order error (~1e-8,
    # the reductions over dp and tp add in another order) into a visible share of an
    # update; we see up to ~2e-6 against updates of lr = 1e-3. A wrong shard or a missing
    # reduction moves parameters by the order of lr, far outside lr / 100.
    for name, param in model.named_parameters():
        torch.testing.assert_close(
            param.full_tensor(), want[name].detach(), rtol=1e-5, atol=LR / 100, msg=_named(name)
        )


@pytest.mark.slow  # starts a process group of 4 processes
def test_fsdp_over_tensor_parallel_training_step():
    """dp2 x tp2: one AdamW step on a batch split over dp equals one process on the whole
    batch, in loss and in every updated parameter."""
    _spawn(_fsdp_tp_step)


def test_tp_degree_must_divide_heads():
    model = Llama(ARGS.with_(n_heads=2))  # 2 query and 2 kv heads; tp = 4
    mesh = SimpleNamespace(size=lambda: 4)  # rejected before the mesh is used for anything
    with pytest.raises(ValueError, match=r"n_heads=2, n_kv_heads=2"):
        apply_tensor_parallel(model, mesh)
    assert not any(isinstance(p, DTensor) for p in model.parameters())
    check_divisible(Llama(ARGS), 4)  # 4 heads, ffn 192, vocab 64: fine


def test_mesh_shape_must_divide_world():
    with pytest.raises(ValueError, match="divide world_size=4"):
        build_mesh(4, 3, "cpu")
