"""The worker side of `llamaray.bench.ray_overhead`: a torchrun entry point, and the
`StepRecorder` both setups wrap their launcher in.

    python -m torch.distributed.run --standalone --nproc_per_node 2 \\
        -m llamaray.bench.torchrun_entry SPEC.json

SPEC.json is a `WorkerSpec` as a dict (`dataclasses.asdict`). Each rank joins a gloo
process group from torchrun's environment and runs `run_worker` -- the same function Ray
Train's `train_loop_per_worker` runs -- with a `LocalLauncher` (checkpoints under
`<run_dir>/checkpoints`). Rank 0 writes what it reported, step by step, to
`<run_dir>/steps.json`. Imports torch, never Ray.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch.distributed as dist

from llamaray.train.launcher import Launcher, LocalLauncher
from llamaray.train.worker import WorkerSpec, run_worker

STEPS_FILE = "steps.json"


@dataclass
class StepRecorder:
    """A `Launcher` that passes everything on to `inner` and keeps each logged step's
    metrics with the moment it was logged (`time.perf_counter()` on entry, before `inner`
    sees it), so the time between two logged steps is whole iterations: batch, step,
    metrics, and any report or checkpoint staging in between. `cpu` is the process's CPU
    time then (`time.process_time()`: every thread, the launcher's own included), which a
    busy shared machine inflates far less than wall time."""

    inner: Launcher
    records: list[dict] = field(default_factory=list)
    started: float = field(default_factory=time.perf_counter)

    def checkpoint_candidates(self):
        return self.inner.checkpoint_candidates()

    def save_checkpoint(self, model, optimizer, state, metrics: dict, background: bool) -> None:
        self.inner.save_checkpoint(model, optimizer, state, metrics, background)

    def report(self, metrics: dict) -> None:
        self.inner.report(metrics)

    def log(self, metrics: dict) -> None:
        self._record(metrics, checkpoint=False)
        self.inner.log(metrics)

    def wait_for_checkpoints(self) -> None:
        self.inner.wait_for_checkpoints()

    def _record(self, metrics: dict, checkpoint: bool) -> None:
        self.records.append(
            {
                "step": int(metrics["step"]),
                "step_time_s": float(metrics["step_time_s"]),
                "tokens_per_s": float(metrics["tokens_per_s"]),
                "t": time.perf_counter(),
                "cpu": time.process_time(),
                "checkpoint": checkpoint,
            }
        )

    def write(self, run_dir: str | Path) -> Path | None:
        """Rank 0's records to `<run_dir>/steps.json` (other ranks write nothing)."""
        if dist.get_rank() != 0:
            return None
        path = Path(run_dir) / STEPS_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "world_size": dist.get_world_size(),
            "started": self.started,
            "finished": time.perf_counter(),
            "records": self.records,
        }
        path.write_text(json.dumps(payload, indent=1))
        return path


def main(argv: list[str]) -> None:
    if len(argv) != 1:
        raise SystemExit("usage: torchrun ... -m llamaray.bench.torchrun_entry SPEC.json")
    spec = WorkerSpec(**json.loads(Path(argv[0]).read_text()))
    dist.init_process_group("gloo")
    try:
        recorder = StepRecorder(LocalLauncher(Path(spec.run_dir) / "checkpoints"))
        run_worker(spec, recorder)
        recorder.write(spec.run_dir)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
