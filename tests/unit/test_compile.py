"""`model.compile`: each block compiled (after selective checkpointing, before FSDP) trains
as the eager model does, and keeps its checkpoint keys."""

from __future__ import annotations

import pytest
import torch
from torch.distributed.checkpoint.state_dict import get_model_state_dict

from llamaray.config import load_config
from llamaray.train.optim import build_optimizer
from llamaray.train.step import train_step
from llamaray.train.worker import build_parallel_model

VOCAB = 64
SEQ_LEN = 16
LR = 1e-2

pytestmark = [pytest.mark.usefixtures("process_group"), pytest.mark.slow]


def _train(compile: bool):
    cfg = load_config(
        None,
        ["model.preset=debug", f"train.seq_len={SEQ_LEN}", f"model.compile={compile}",
         "model.activation_checkpointing=selective"],
    )  # fmt: skip
    model, _mesh = build_parallel_model(cfg, cfg.model.args(VOCAB), torch.device("cpu"))
    optimizer = build_optimizer(model, LR)
    generator = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(3):
        rows = torch.randint(0, VOCAB, (2, SEQ_LEN + 1), generator=generator)
        losses.append(train_step(model, optimizer, [rows], LR).loss)
    return model, losses


def test_compiled_blocks_train_as_eager_ones():
    eager, eager_losses = _train(compile=False)
    compiled, compiled_losses = _train(compile=True)
    blocks = list(compiled.layers.values())
    assert all(isinstance(b, torch._dynamo.eval_frame.OptimizedModule) for b in blocks)
    assert not any(isinstance(b, torch._dynamo.eval_frame.OptimizedModule)
                   for b in eager.layers.values())  # fmt: skip
    # Fused kernels round differently, never by more than a few ulps of a loss near log(64).
    torch.testing.assert_close(compiled_losses, eager_losses, rtol=1e-4, atol=0)
    assert eager_losses[0] != eager_losses[-1]
    # Checkpoints and exports see the plain model's names.
    assert sorted(get_model_state_dict(compiled)) == sorted(get_model_state_dict(eager))
