"""FSDP2 (`fully_shard`) for the LLaMA model: each transformer block is its own unit, then
the root takes what is left (embeddings, final norm, output projection).

Per-block units are what lets communication overlap compute: while block i computes,
block i+1's parameters are all-gathered (forward) and block i-1's gradients are
reduce-scattered while block i-2's are all-gathered again (backward). FSDP2 prefetches one
block ahead in backward on its own; `prefetch=True` also sets the explicit forward
prefetch (`set_modules_to_forward_prefetch`), which otherwise waits for each block's
pre-forward hook to issue its own all-gather.

On a 2-D mesh ("replicate", "shard"; `parallel.mesh.fsdp_mesh`) this is HSDP: parameters
are sharded over "shard" only, so all-gathers and reduce-scatters stay within a group
(a node), and the reduced gradient shards are then all-reduced across "replicate".
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard


def worth_sharding(data_parallel: int) -> bool:
    """Whether the workers wrap the model in FSDP at all: only when more than one rank
    holds a copy of the data-parallel work (world size / tensor-parallel degree). With one,
    FSDP shards nothing and synchronizes nothing, yet still copies every parameter into and
    out of its gather buffers in each forward and backward: on CPU a `small` step took 35%
    (fp32) to 45-70% (bf16) longer wrapped than plain (docs/benchmarks.md). As in
    torchtitan, one rank trains the plain model, and tensor-parallel ranks with no
    data parallelism their DTensor shards as they are (DTensor reduces the gradients of
    replicated parameters across the tp group); checkpoints load into sharded models and
    back (DCP reshards plain tensors and DTensors alike)."""
    return data_parallel > 1


def bf16_by_fsdp(dtype: str, device: torch.device, data_parallel: int) -> bool:
    """Whether bf16 training is FSDP's mixed precision (parameters gathered in bf16 for
    compute; fp32 master weights and gradient reduction) rather than autocast around the
    step: on a GPU, wherever FSDP is applied. On a CPU autocast is used either way, and
    with no data parallelism there is no FSDP to do it."""
    return dtype == "bf16" and device.type == "cuda" and worth_sharding(data_parallel)


def step_autocast(dtype: str, device: torch.device, data_parallel: int) -> str:
    """The dtype to autocast the training step in: `dtype`, unless FSDP already computes
    in it (`bf16_by_fsdp`)."""
    return "fp32" if bf16_by_fsdp(dtype, device, data_parallel) else dtype


def apply_fsdp(
    model: nn.Module,
    mesh: DeviceMesh,
    param_dtype: torch.dtype = torch.float32,
    reduce_dtype: torch.dtype = torch.float32,
    reshard_after_forward: bool = True,
    prefetch: bool = True,
) -> nn.Module:
    """Shard `model` (a `Llama`, possibly checkpoint-wrapped, compiled and tensor-parallel)
    over `mesh`: 1-D for FSDP, 2-D (replicate, shard) for HSDP.

    `param_dtype` is the dtype parameters are gathered in for compute (bf16 on GPU), while
    the sharded fp32 master copy is what the optimizer updates; `reduce_dtype` is the
    gradient reduce-scatter dtype (fp32, so bf16 rounding does not accumulate across ranks).
    `reshard_after_forward=False` keeps gathered parameters until backward: less
    communication, more memory (ZeRO-2 rather than ZeRO-3).
    """
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    blocks = list(model.layers.values())
    for index, block in enumerate(blocks):
        # The last block's parameters are needed again as soon as backward starts; freeing
        # them after forward would only gather them straight back.
        last = index == len(blocks) - 1
        fully_shard(
            block,
            mesh=mesh,
            mp_policy=policy,
            reshard_after_forward=reshard_after_forward and not last,
        )
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    if prefetch and len(blocks) > 1:
        set_prefetch(blocks)
    return model


def set_prefetch(blocks: list[nn.Module]) -> None:
    """Gather the next block's parameters while this one computes, in both directions."""
    for index, block in enumerate(blocks):
        assert isinstance(block, FSDPModule)
        if index + 1 < len(blocks):
            block.set_modules_to_forward_prefetch([blocks[index + 1]])
        if index > 0:
            block.set_modules_to_backward_prefetch([blocks[index - 1]])
