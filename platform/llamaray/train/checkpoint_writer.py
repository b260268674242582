"""Checkpoints written in the background: training is blocked only while a rank copies its
state to host memory (`checkpoint.stage_checkpoint`); the write, the hashing of every file
and the upload happen in a writer thread while the next steps run.

Why a process group of its own: DCP's save is collective (the ranks agree on a plan and
rank 0 writes the metadata), and it now runs beside the training thread's own
collectives. Two threads must never issue collectives on one group (their order would
differ between ranks), so the writer uses a gloo group created for it, as torchtitan does.

One write at a time: a checkpoint due while the previous one is still being written waits
for it (and raises its error, if it failed), so writes complete in step order and no two
ever interleave their collectives. A checkpoint is "latest" only once its write is
complete: a folder renamed from `.partial` (`LocalCheckpoints`) or registered by Ray Train
after every rank's upload (`orchestrate.ray_worker`); a failed write leaves the last good
one as it was.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

import torch.distributed as dist

from llamaray.train.checkpoint import StagedCheckpoint

T = TypeVar("T")


class CheckpointWriter:
    """Runs checkpoint writes one at a time in a background thread, each with the writer's
    own process group. Every rank must create it and submit at the same steps."""

    def __init__(self) -> None:
        self._group = None
        self._pool: ThreadPoolExecutor | None = None
        self._pending: Future | None = None

    def submit(
        self, write: Callable[[StagedCheckpoint, object], T], staged: StagedCheckpoint
    ) -> Future:
        """Run `write(staged, process_group)` in the background, after the write before
        it; raises that earlier write's error, if it failed."""
        self.wait()
        if self._group is None:
            # Collective: every rank creates it at its first checkpoint (the same step).
            self._group = dist.new_group(backend="gloo")
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint")
        self._pending = self._pool.submit(write, staged, self._group)
        return self._pending

    def wait(self) -> None:
        """Block until the write in flight (if any) is complete; raise its error."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    @property
    def busy(self) -> bool:
        return self._pending is not None and not self._pending.done()
