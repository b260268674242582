"""`torch.compile` per transformer block.

Every block has the same structure, so one compiled graph serves them all (dynamo compiles
the first block and reuses its code for the rest, guarded on shapes), and compile time does
not grow with depth. Compiling blocks rather than the whole model keeps each FSDP unit's
hooks (all-gather before a block, reduce-scatter after) outside the compiled code, where
they overlap with it as in eager mode.

Order, as in `build_parallel_model`: tensor parallel -> activation checkpointing -> compile
-> FSDP. Compiling after checkpointing puts the checkpoint (and the selective policy) inside
the graph, so the compiler sees what is recomputed; FSDP then wraps the compiled blocks.
"""

from __future__ import annotations

import torch
from torch import nn


def apply_compile(model: nn.Module) -> None:
    """Replace every block in `model.layers` (a ModuleDict) by its compiled version, in place.

    State-dict keys stay those of the plain model for everything that reads them through
    `torch.distributed.checkpoint.state_dict` (checkpoints, exports) and `canonical_name`
    (initialization): both drop the `_orig_mod.` part the compiled wrapper adds.

    `fullgraph=False`: a graph break (an attention backend choosing its kernel in Python, an
    op the compiler does not know) costs speed, never the run.
    """
    for name, block in list(model.layers.items()):
        model.layers[name] = torch.compile(block, fullgraph=False)


__all__ = ["apply_compile"]
