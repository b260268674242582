"""Rank 0's console lines during training (`[train] step ...`), through llamaray.console."""

from __future__ import annotations

from collections.abc import Callable

from llamaray.console import logger


def progress_line(m: dict, total: int, eta: float) -> str:
    """One step's console line: loss, LR, gradient norm, throughput, memory, ETA."""
    line = (
        f"step {m['step']:>6}/{total}  loss {m['loss']:7.4f}  lr {m['lr']:.2e}  "
        f"grad {m['grad_norm']:6.3f}  {m['tokens_per_s']:8.0f} tok/s  "
        f"mem {m['memory_gb']:5.2f} GB  eta {duration(eta)}"
    )
    if "mfu" in m:
        line += f"  mfu {m['mfu']:.1%}"
    if "val_loss" in m:
        line += f"  val {m['val_loss']:.4f}"
    return line


def duration(seconds: float) -> str:
    seconds = int(seconds)
    return (
        f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
        if seconds >= 3600
        else f"{seconds // 60}m{seconds % 60:02d}s"
    )


def rank0_console(rank: int) -> Callable[[str], None]:
    """Rank 0's progress lines, `[train] ...` (llamaray.console's format); other ranks are
    silent. Through `logging`, not `print`: Ray Train patches print into a logger of its
    own, and tees it again when a library (MLflow) has wrapped sys.stdout."""
    log = logger("train")

    def say(msg: str) -> None:
        if rank == 0:
            log.info(msg)

    return say
