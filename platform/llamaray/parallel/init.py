"""Materialize and initialize a model built on the meta device and then sharded.

Each rank fills only its own shard, but the values are those a one-process build would
have: every parameter's full tensor is drawn from a generator keyed by (seed, name)
(`llamaray.model.llama.param_generator`) and the rank keeps its slice. So 1 worker, 2 FSDP
workers and a dp x tp mesh all start from the same weights, which is what makes their
losses comparable and a sharded run reproducible at another world size.

The full tensor exists one parameter at a time, on the training device; the largest
(65B: the 32000 x 8192 embedding, 1 GB in fp32) is well within a GPU's memory.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from llamaray.model.llama import canonical_name, init_rule, init_tensor, param_generator


@torch.no_grad()
def materialize(model: nn.Module, device: torch.device, seed: int) -> None:
    """Allocate `model`'s (possibly sharded) parameters on `device` and initialize them as
    `Llama.init_weights(seed)` would on an unsharded model."""
    model.to_empty(device=device)
    args = _llama(model).args
    for name, param in model.named_parameters():
        name = canonical_name(name)
        rule = init_rule(args, name)
        full = torch.empty(param.shape, dtype=param.dtype, device=device)
        init_tensor(full, rule, param_generator(seed, name, device))
        if isinstance(param, DTensor):
            # src_data_rank=None: every rank holds the same full tensor, so each takes its
            # slice locally instead of receiving it from rank 0.
            local = distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None)
            param.to_local().copy_(local.to_local())
        else:
            param.copy_(full)


def _llama(model: nn.Module) -> nn.Module:
    if hasattr(model, "args"):
        return model
    inner = getattr(model, "_checkpoint_wrapped_module", None) or getattr(model, "_orig_mod", None)
    if inner is None:
        raise TypeError(f"{type(model).__name__} is not a Llama model")
    return _llama(inner)
