"""The device mesh of a run: which ranks shard, replicate and split tensors together.

Ranks are laid out row-major over (data parallel, tensor parallel), so tensor-parallel
peers are neighbouring ranks (one node's GPUs). With `replicate` > 1 (HSDP) the
data-parallel dimension is itself split into (replicate, shard): FSDP shards parameters
within a group of `shard` ranks and all-reduces gradients across the `replicate` groups.
With one group per node, the per-block all-gathers and reduce-scatters stay on the node's
fast links and only one gradient all-reduce per step crosses nodes.

Whatever the layout, the mesh has a one-dimensional "dp" (flattened from (replicate,
shard) under HSDP) whose local rank is `rank // tensor`: the data feed's rank, the same
for every layout of the same world, so a run's batches do not depend on it.
"""

from __future__ import annotations

from torch.distributed.device_mesh import DeviceMesh, init_device_mesh


def build_mesh(device_type: str, world: int, tensor: int = 1, replicate: int = 1) -> DeviceMesh:
    """The mesh of `world` ranks: dims ("dp", "tp"), or ("replicate", "shard", "tp") plus
    the flattened "dp" when `replicate` > 1. Collective: every rank calls it."""
    if world % tensor:
        raise ValueError(f"parallel.tensor: {tensor} must divide the world size {world}")
    dp = world // tensor
    if dp % replicate:
        raise ValueError(
            f"parallel.replicate: {replicate} must divide the data-parallel size "
            f"{dp} (world {world} / tensor {tensor})"
        )
    if replicate == 1:
        return init_device_mesh(device_type, (dp, tensor), mesh_dim_names=("dp", "tp"))
    mesh = init_device_mesh(
        device_type,
        (replicate, dp // replicate, tensor),
        mesh_dim_names=("replicate", "shard", "tp"),
    )
    mesh["replicate", "shard"]._flatten("dp")
    return mesh


def fsdp_mesh(mesh: DeviceMesh) -> DeviceMesh:
    """What FSDP shards over: "dp", or ("replicate", "shard") under HSDP (a 2-D mesh is
    how `fully_shard` is told to replicate across the first dim and shard across the
    second)."""
    if "replicate" in (mesh.mesh_dim_names or ()):
        return mesh["replicate", "shard"]
    return mesh["dp"]


__all__ = ["build_mesh", "fsdp_mesh"]
