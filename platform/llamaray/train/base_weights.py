"""A finetune's starting point: a base model's weights loaded into the sharded model.

Two kinds of base, as the driver resolved them (`finetune.base.resolve_base`):

- `checkpoint`: a training checkpoint folder (DCP). Only its "model" entries are read,
  straight into each rank's shards (DCP reshards on load, so the base may have been
  trained on any number of ranks); the optimizer state in the folder is not touched.
- `folder`: a Meta or Hugging Face model folder. Rank 0 reads the full weights and they are
  broadcast tensor by tensor, each rank keeping its shard
  (`set_model_state_dict(full_state_dict=True, broadcast_from_rank0=True)`): only one
  process holds the whole model in memory, and only rank 0 reads the folder.

The base's `path` is a URI: a local path (one machine, or a shared file system) or
`s3://`, since ranks run on nodes that share no disk with the driver that resolved (and
checked) the base. A checkpoint is read in place (`stored_checkpoints.dcp_reader`); a model
folder is fetched onto rank 0's node and removed after.

Collective: every rank calls it, after `build_parallel_model`. No Ray.

    >>> load_base_weights(model, {"kind": "checkpoint", "path": "ckpt/base/step-00000300"})
    ... # doctest: +SKIP
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    set_model_state_dict,
)

BASE_KINDS = ("checkpoint", "folder")


def load_base_weights(model: torch.nn.Module, base: dict) -> None:
    """Replace the (freshly initialized) weights of `model` with the base's."""
    from llamaray import storage
    from llamaray.train.safe_dcp import SafeLoadPlanner
    from llamaray.train.stored_checkpoints import dcp_reader

    kind, path = base["kind"], base["path"]
    if kind == "checkpoint":
        state = {"model": get_model_state_dict(model)}
        # Reads only the keys asked for: on S3 each of this rank's model shards is one
        # ranged read; the optimizer state in the same files is never fetched.
        dcp.load(state, storage_reader=dcp_reader(path), planner=SafeLoadPlanner())
        set_model_state_dict(model, state["model"])
    elif kind == "folder":
        full: dict[str, torch.Tensor] = {}
        if dist.get_rank() == 0:
            from llamaray.model.formats import load_pretrained

            with storage.local_copy(path) as local:
                full = load_pretrained(Path(local), dtype=torch.float32).state_dict()
        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
        set_model_state_dict(model, full, options=options)
    else:
        raise ValueError(f"base kind {kind!r} is not one of {', '.join(BASE_KINDS)}")
