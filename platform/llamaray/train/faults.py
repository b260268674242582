"""Fault injection for tests and drills (`faults.*` in the run config): kill a rank's
process at one or more steps, as a lost worker would end, or freeze it (SIGSTOP) as a hung
process or a frozen node would stop answering. Each fault fires once per run name.
`slow_step` slows every step down, as a slow cluster would."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable

from llamaray.config import RunConfig
from llamaray.console import logger


def fault_marker(run_dir: str, rank: int, step: int, what: str = "killed") -> str:
    """Where a fault records that it fired, in the run's storage: a replacement worker on
    another node must see it too."""
    from llamaray.storage import join

    return join(run_dir, ".faults", f"{what}-rank{rank}-step{step}")


def maybe_kill(
    cfg: RunConfig, rank: int, step: int, run_dir: str, settle: Callable[[], None] = lambda: None
) -> None:
    """`faults.kill_rank` / `faults.kill_at_step`: SIGKILL this rank's process at each of
    those steps, once per step; then `faults.stop_rank` / `faults.stop_at_step`: SIGSTOP it
    once (the process stays, answering nothing: `train.hang_timeout_s` must end it).

    A fault strikes after the step's checkpoint (if it has one) is complete: `settle`
    waits for checkpoints written in the background, so a drill resumes from the step it
    names rather than from whichever write happened to finish first."""
    f = cfg.faults
    kill_steps = [f.kill_at_step] if isinstance(f.kill_at_step, int) else f.kill_at_step or []
    if f.kill_rank == rank and step in kill_steps:
        _fire_once(run_dir, rank, step, "killed", signal.SIGKILL, settle)
    if f.stop_rank == rank and f.stop_at_step == step:
        _fire_once(run_dir, rank, step, "stopped", signal.SIGSTOP, settle)


def _fire_once(
    run_dir: str, rank: int, step: int, what: str, sig: signal.Signals, settle: Callable
) -> None:
    from llamaray import storage

    marker = fault_marker(run_dir, rank, step, what)
    if storage.exists(marker):  # once per run name: the restarted worker must get past it
        return
    settle()
    storage.write_text(marker, f"{what} at step {step}\n")
    logger("fault").warning(f"fault injection: rank {rank} {what} at step {step}")
    os.kill(os.getpid(), sig)


def slow_step(cfg: RunConfig) -> None:
    """`faults.slow_step_s`: wait that long after a step (every rank alike, so the ranks stay
    in step and the losses are those of an unslowed run)."""
    if cfg.faults.slow_step_s:
        time.sleep(cfg.faults.slow_step_s)
