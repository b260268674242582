"""HSDP (`parallel.replicate`): 2 replicas x 2 shards trains exactly as FSDP over 4.

Four CPU ranks over gloo on 127.0.0.1 build the debug model with the worker's own
`build_parallel_model`, once as plain FSDP over 4 ranks and once as HSDP (replicate=2,
shard=2), and train a few steps on the same batches (each data-parallel rank's batch is
keyed by its "dp" rank, which is the same in both layouts). Then each layout's DCP
checkpoint is loaded into the other layout's model. The same again with tensor
parallelism: FSDP over 2 x tp 2 against replicate 2 x shard 1 x tp 2. And tensor
parallelism over all 4 ranks, with no data parallelism and so no FSDP, against one
process training the whole model.
"""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor, Replicate, Shard

from llamaray.config import ConfigError, load_config
from llamaray.model import Llama
from llamaray.parallel.init import materialize
from llamaray.train.checkpoint import TrainState, load_checkpoint, save_checkpoint
from llamaray.train.optim import build_optimizer
from llamaray.train.step import train_step
from llamaray.train.worker import build_parallel_model

WORLD = 4
STEPS = 3
SEQ_LEN = 16
VOCAB = 64
LR = 1e-2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _build(replicate: int, tensor: int):
    cfg = load_config(
        None,
        ["model.preset=debug", f"train.seq_len={SEQ_LEN}", f"train.num_workers={WORLD}",
         f"parallel.replicate={replicate}", f"parallel.tensor={tensor}"],
    )  # fmt: skip
    model, mesh = build_parallel_model(cfg, cfg.model.args(VOCAB), torch.device("cpu"))
    return model, mesh, build_optimizer(model, LR)


def _batches(dp_rank: int) -> list[list[torch.Tensor]]:
    generator = torch.Generator().manual_seed(dp_rank)
    rows = torch.randint(0, VOCAB, (STEPS, 2, 2, SEQ_LEN + 1), generator=generator)
    return [list(step) for step in rows]


def _train(model, mesh, optimizer) -> list[float]:
    average = lambda x: (dist.all_reduce(x, op=dist.ReduceOp.AVG), x)[1]  # noqa: E731
    batches = _batches(mesh["dp"].get_local_rank())
    return [train_step(model, optimizer, mb, LR, average=average).loss for mb in batches]


def _full(model) -> dict[str, torch.Tensor]:
    return {n: p.full_tensor().detach().clone() for n, p in model.named_parameters()}


def _compare(rank: int, port: int, folder: str, tensor: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        fsdp, fsdp_mesh, fsdp_opt = _build(replicate=1, tensor=tensor)
        hsdp, hsdp_mesh, hsdp_opt = _build(replicate=2, tensor=tensor)
        # The data feed's rank is the same in both layouts: rank // tensor.
        dp_ranks = {fsdp_mesh["dp"].get_local_rank(), hsdp_mesh["dp"].get_local_rank()}
        assert dp_ranks == {rank // tensor}
        assert hsdp_mesh["dp"].size() == WORLD // tensor
        if tensor == 1:
            # HSDP really is replicate x shard: each parameter is replicated over the first
            # dim and sharded over the second, and a rank holds 1/2 of it, not 1/4.
            weight = hsdp.layers["0"].attention.wq.weight
            assert weight.placements == (Replicate(), Shard(0)), weight.placements
            assert weight.to_local().shape[0] == weight.shape[0] // 2
            fsdp_weight = fsdp.layers["0"].attention.wq.weight
            assert fsdp_weight.to_local().shape[0] == weight.shape[0] // 4

        fsdp_losses = _train(fsdp, fsdp_mesh, fsdp_opt)
        hsdp_losses = _train(hsdp, hsdp_mesh, hsdp_opt)
        torch.testing.assert_close(hsdp_losses, fsdp_losses, rtol=1e-5, atol=0)
        assert fsdp_losses[0] != fsdp_losses[-1]  # the steps changed the weights
        fsdp_params, hsdp_params = _full(fsdp), _full(hsdp)
        for name, value in fsdp_params.items():
            torch.testing.assert_close(hsdp_params[name], value, rtol=1e-4, atol=1e-6)

        # Checkpoints carry over between the layouts, both ways.
        state = TrainState(step=STEPS, world_size=WORLD)
        save_checkpoint(os.path.join(folder, "hsdp"), hsdp, hsdp_opt, state)
        save_checkpoint(os.path.join(folder, "fsdp"), fsdp, fsdp_opt, state)
        dist.barrier()
        fresh_fsdp, _, fresh_fsdp_opt = _build(replicate=1, tensor=tensor)
        load_checkpoint(os.path.join(folder, "hsdp"), fresh_fsdp, fresh_fsdp_opt)
        fresh_hsdp, _, fresh_hsdp_opt = _build(replicate=2, tensor=tensor)
        load_checkpoint(os.path.join(folder, "fsdp"), fresh_hsdp, fresh_hsdp_opt)
        for name, value in _full(fresh_fsdp).items():
            torch.testing.assert_close(value, hsdp_params[name], rtol=0, atol=0)
        for name, value in _full(fresh_hsdp).items():
            torch.testing.assert_close(value, fsdp_params[name], rtol=0, atol=0)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_hsdp_two_by_two_equals_fsdp_over_four_and_checkpoints_carry_over(tmp_path):
    mp.spawn(_compare, args=(_free_port(), str(tmp_path), 1), nprocs=WORLD, join=True)


@pytest.mark.slow
def test_hsdp_with_tensor_parallel_equals_fsdp_with_tensor_parallel(tmp_path):
    # 2 replicas x 1 shard x tp 2 against FSDP over 2 x tp 2: the 3-D mesh's layout.
    mp.spawn(_compare, args=(_free_port(), str(tmp_path), 2), nprocs=WORLD, join=True)


def _tensor_parallel_only(rank: int, port: int, folder: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        tp, mesh, tp_opt = _build(replicate=1, tensor=WORLD)
        assert mesh["dp"].size() == 1
        # No FSDP without data parallelism: every parameter is a tp shard (or a
        # tp-replicated norm), not an FSDP-wrapped one.
        assert not any(isinstance(m, FSDPModule) for m in tp.modules())
        assert all(
            isinstance(p, DTensor) and p.device_mesh.mesh_dim_names == ("tp",)
            for p in tp.parameters()
        )
        tp_losses = _train(tp, mesh, tp_opt)

        # One process, the whole model, the same weights (`materialize` draws each
        # parameter whole from its seed) and the same batches (dp rank 0).
        cfg = load_config(None, ["model.preset=debug", f"train.seq_len={SEQ_LEN}"])
        with torch.device("meta"):
            plain = Llama(cfg.model.args(VOCAB))
        materialize(plain, torch.device("cpu"), seed=cfg.train.seed)
        plain_opt = build_optimizer(plain, LR)
        plain_losses = [train_step(plain, plain_opt, mb, LR).loss for mb in _batches(0)]
        torch.testing.assert_close(tp_losses, plain_losses, rtol=1e-5, atol=0)
        assert plain_losses[0] != plain_losses[-1]
        tp_params = _full(tp)
        # Adam's update is lr * m / (sqrt(v) + eps): an element whose gradient is small by
        # cancellation turns the tp reductions' other summation order (~1e-8) into a
        # visible share of its update (seen: 6e-6 on one element of 4096). A wrong shard or
        # a missing reduction moves parameters by the order of lr = 1e-2.
        for name, value in plain.named_parameters():
            torch.testing.assert_close(tp_params[name], value.detach(), rtol=1e-4, atol=LR / 100)

        # Its checkpoint loads into FSDP over 2 x tp 2, bit for bit.
        save_checkpoint(folder, tp, tp_opt, TrainState(step=STEPS, world_size=WORLD))
        dist.barrier()
        sharded, _, sharded_opt = _build(replicate=1, tensor=2)
        assert any(isinstance(m, FSDPModule) for m in sharded.modules())
        load_checkpoint(folder, sharded, sharded_opt)
        for name, value in _full(sharded).items():
            torch.testing.assert_close(value, tp_params[name], rtol=0, atol=0)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_tensor_parallel_without_data_parallelism_trains_unwrapped_as_one_process(tmp_path):
    mp.spawn(_tensor_parallel_only, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)


@pytest.mark.parametrize(
    ("overrides", "dp"),
    [(["train.num_workers=4", "parallel.replicate=3"], 4),
     (["train.num_workers=8", "parallel.tensor=2", "parallel.replicate=8"], 4)],
)  # fmt: skip
def test_replicate_must_divide_the_data_parallel_workers(overrides, dp):
    with pytest.raises(ConfigError, match=rf"parallel\.replicate: \d must divide .* = {dp}"):
        load_config(None, ["model.preset=debug", *overrides])


def test_replicate_dividing_the_data_parallel_workers_is_accepted():
    cfg = load_config(
        None, ["model.preset=debug", "train.num_workers=8", "parallel.tensor=2",
               "parallel.replicate=2"],
    )  # fmt: skip
    assert (cfg.parallel.replicate, cfg.data_parallel) == (2, 4)
