"""What a process launcher gives the training loop (`Launcher`: where checkpoints come
from, how one is saved, where metrics go), and the launcher without Ray: `LocalLauncher`
for torchrun and in-process runs. Ray Train's is `orchestrate.ray_worker.RayLauncher`."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Protocol

import torch.distributed as dist

from llamaray.train.checkpoint import TrainState


class Launcher(Protocol):
    """What the process launcher provides to `run_worker`."""

    def checkpoint_candidates(self) -> Iterable[Callable[[], Path]]:
        """Checkpoint directories to resume from, newest first (fetched when called)."""

    def save_checkpoint(self, model, optimizer, state: TrainState, metrics: dict) -> None:
        """Save a checkpoint of `state.step` (collective) and report `metrics` with it."""

    def report(self, metrics: dict) -> None:
        """Report metrics (collective: every rank calls at the same steps)."""


def ensure_process_group(backend: str = "gloo") -> None:
    """A one-process group when none is set up, so `run_worker` runs in a plain script."""
    if dist.is_initialized():
        return
    store = dist.HashStore()
    dist.init_process_group(backend, store=store, rank=0, world_size=1)


class LocalLauncher:
    """Checkpoints in a shared local directory; metrics kept in memory. For torchrun and
    in-process runs (no Ray)."""

    def __init__(self, checkpoint_root: str | Path, keep: int = 3):
        from llamaray.train.checkpoint import LocalCheckpoints

        self.checkpoints = LocalCheckpoints(checkpoint_root, keep)
        self.reports: list[dict] = []

    def checkpoint_candidates(self):
        return self.checkpoints.candidates()

    def save_checkpoint(self, model, optimizer, state: TrainState, metrics: dict) -> None:
        self.checkpoints.save(model, optimizer, state)
        self.reports.append(dict(metrics))

    def report(self, metrics: dict) -> None:
        self.reports.append(dict(metrics))
