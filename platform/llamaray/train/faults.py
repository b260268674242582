"""Fault injection for tests and drills (`faults.*` in the run config): kill a rank's
process at a step, once, as a lost worker would end."""

from __future__ import annotations

import os
import signal

from llamaray.config import RunConfig
from llamaray.console import logger


def fault_marker(run_dir: str, rank: int, step: int) -> str:
    """Where `faults.kill_*` records that it fired, in the run's storage: a replacement
    worker on another node must see it too."""
    from llamaray.storage import join

    return join(run_dir, ".faults", f"killed-rank{rank}-step{step}")


def maybe_kill(cfg: RunConfig, rank: int, step: int, run_dir: str) -> None:
    """`faults.kill_rank` / `faults.kill_at_step`: SIGKILL this rank's process at that step,
    once per run (a marker in the run's storage says it fired)."""
    from llamaray import storage

    f = cfg.faults
    if f.kill_rank != rank or f.kill_at_step != step:
        return
    marker = fault_marker(run_dir, rank, step)
    if storage.exists(marker):  # once per run name: the restarted worker must get past it
        return
    storage.write_text(marker, f"killed at step {step}\n")
    logger("fault").warning(f"killing rank {rank} at step {step}")
    os.kill(os.getpid(), signal.SIGKILL)
