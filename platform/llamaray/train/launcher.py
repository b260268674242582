"""What a process launcher gives the training loop (`Launcher`: where checkpoints come
from, how one is saved, where metrics go), and the launcher without Ray: `LocalLauncher`
for torchrun and in-process runs. Ray Train's is `orchestrate.ray_worker.RayLauncher`.

Metrics never wait on other ranks: `log` is rank-local (rank 0's MLflow logger sends in
the background, `tracking.MetricLogger`). Only `report` and `save_checkpoint` are
collective, and the loop calls them at validation and checkpoint steps: what Ray Train's
report is for (checkpoint registration, Tune's metric for ASHA, failure handling), at a
cadence a barrier cannot throttle."""

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

    def save_checkpoint(
        self, model, optimizer, state: TrainState, metrics: dict, background: bool
    ) -> None:
        """Save a checkpoint of `state.step` (collective) and report `metrics` with it.
        With `background`, return once the state is copied to host memory; the write
        completes while training goes on (`wait_for_checkpoints`)."""

    def report(self, metrics: dict) -> None:
        """Report metrics (collective: every rank calls at the same steps)."""

    def log(self, metrics: dict) -> None:
        """A logged step's metrics, kept by this rank alone: never waits on other ranks."""

    def wait_for_checkpoints(self) -> None:
        """Block until every checkpoint saved so far is complete; raise a failed write's
        error."""


def ensure_process_group(backend: str = "gloo") -> None:
    """A one-process group when none is set up, so `run_worker` runs in a plain script."""
    if dist.is_initialized():
        return
    store = dist.HashStore()
    dist.init_process_group(backend, store=store, rank=0, world_size=1)


class LocalLauncher:
    """Checkpoints in a shared local directory; metrics kept in memory (`reports`: every
    logged step's metrics, in order). For torchrun and in-process runs (no Ray)."""

    def __init__(self, checkpoint_root: str | Path, keep: int = 3):
        from llamaray.train.checkpoint import LocalCheckpoints
        from llamaray.train.checkpoint_writer import CheckpointWriter

        self.checkpoints = LocalCheckpoints(checkpoint_root, keep)
        self.writer = CheckpointWriter()
        self.reports: list[dict] = []

    def checkpoint_candidates(self):
        return self.checkpoints.candidates()

    def save_checkpoint(
        self, model, optimizer, state: TrainState, metrics: dict, background: bool = False
    ) -> None:
        from llamaray.train.checkpoint import stage_checkpoint

        if not background:
            self.writer.wait()  # in step order, after any write still in flight
            self.checkpoints.save(model, optimizer, state)
            return
        self.writer.submit(self.checkpoints.write, stage_checkpoint(model, optimizer, state))

    def report(self, metrics: dict) -> None:
        """Nothing to do: the step's metrics were logged (`log`)."""

    def log(self, metrics: dict) -> None:
        self.reports.append(dict(metrics))

    def wait_for_checkpoints(self) -> None:
        self.writer.wait()
