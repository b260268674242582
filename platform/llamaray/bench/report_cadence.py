"""Report cadence: the wall time per step under Ray Train with metrics logged every step
against every 30 steps, the same run otherwise. Goal: at most 1.10x.

Logged metrics go from rank 0 to MLflow through a background sender and reach no other
rank (`train.launcher`: only checkpoints and validations are collective reports), so
logging every step should cost next to nothing. Before that, every logged step was a
`ray.train.report`: a barrier of all workers and a wait for the Train controller's poll.

Both runs are `bench.ray_overhead`'s Ray setup -- the product's `pretrain` driver, two
workers on a fresh local Ray, rank 0's logged steps timed by `StepRecorder` -- with MLflow
tracking on (a SQLite store under the output folder), no validation, and a checkpoint only
at the end. The figure per run is the wall time from the logged step `--from-step` to
`--to-step` divided by the steps between: whole iterations (batch, step, metrics, any
reporting), both cadences over the same window. Runs alternate; medians over `--rounds`.

    python -m llamaray.bench.report_cadence [--rounds 2] [--steps 91] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

from llamaray.bench import ray_overhead
from llamaray.bench.torchrun_entry import STEPS_FILE
from llamaray.console import logger

log = logger("bench")

SPARSE = 30
"""The sparse cadence: `train.log_every` of the reference run."""


def _options(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--steps", type=int, default=2 * SPARSE + SPARSE + 1)
    parser.add_argument("--from-step", type=int, default=SPARSE)
    parser.add_argument("--to-step", type=int, default=3 * SPARSE)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--cpus-per-worker", type=float, default=1.0)
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--sample-mb", type=float, default=1.0)
    parser.add_argument("--output-dir", default="runs/bench-report-cadence")
    parser.add_argument(
        "--no-tracking", action="store_true", help="diagnosis: MLflow off, console lines only"
    )
    parser.add_argument("--json", action="store_true", help="JSON on stdout, the table on stderr")
    opts = parser.parse_args(argv)
    if opts.from_step % SPARSE or opts.to_step % SPARSE or opts.to_step >= opts.steps:
        parser.error(f"--from-step and --to-step must be multiples of {SPARSE} below --steps")
    # What bench.ray_overhead's helpers read.
    opts.batch_tokens, opts.poll_interval, opts.warmup = None, None, 0
    opts.tracking_uri = None
    if not opts.no_tracking:
        opts.tracking_uri = f"sqlite:///{Path(opts.output_dir).resolve() / 'mlflow.db'}"
    return opts


def per_step(run_dir: Path, first: int, last: int) -> float:
    """Seconds per step from rank 0's logged step `first` to `last`."""
    records = json.loads((run_dir / STEPS_FILE).read_text())["records"]
    at = {r["step"]: r["t"] for r in records}
    missing = [s for s in (first, last) if s not in at]
    if missing:
        raise RuntimeError(f"{run_dir}: steps {missing} were not logged")
    return (at[last] - at[first]) / (last - first)


def main(argv: list[str] | None = None) -> dict:
    opts = _options(argv)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    Path(opts.output_dir).mkdir(parents=True, exist_ok=True)
    opts.log_every = 1
    corpus = ray_overhead.prepare(opts)
    times: dict[int, list[float]] = {1: [], SPARSE: []}
    for i in range(1, opts.rounds + 1):
        for every in (1, SPARSE):
            opts.log_every = every
            name = f"every-{every}-{i}"
            ray_overhead.run_ray(opts, name, corpus)
            run_dir = Path(ray_overhead.bench_config(opts, name, corpus).run_uri)
            seconds = per_step(run_dir, opts.from_step, opts.to_step)
            times[every].append(seconds)
            log.info(f"logging every {every} step(s), run {i}: {1e3 * seconds:.1f} ms/step")
    medians = {every: statistics.median(t) for every, t in times.items()}
    ratio = medians[1] / medians[SPARSE]
    out = sys.stderr if opts.json else sys.stdout
    tracking = "off" if opts.no_tracking else "on"
    print(f"\n# report cadence: {opts.preset}, {opts.workers} workers on Ray Train, MLflow "
          f"{tracking}, steps {opts.from_step}..{opts.to_step}, {opts.rounds} rounds, "
          f"{os.cpu_count()} cores", file=out)  # fmt: skip
    for every, t in times.items():
        runs = ", ".join(f"{1e3 * x:.1f}" for x in t)
        print(f"log every {every:2d}: {1e3 * medians[every]:7.1f} ms/step (runs: {runs})",
              file=out)  # fmt: skip
    print(f"every step / every {SPARSE}: {ratio:.3f}x (goal <= 1.10)", file=out)
    report = {"per_step_s": times, "median_s": medians, "ratio": ratio, "config": vars(opts)}
    if opts.json:
        print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
