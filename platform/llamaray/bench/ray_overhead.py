"""Ray Train's overhead: the same training loop under Ray Train and under plain torchrun.

Both setups run `llamaray.train.worker.run_worker` -- the one loop every launcher runs --
with the same config, the same corpus and the same threads per worker:

- **torchrun**: `python -m torch.distributed.run --standalone --nproc_per_node W -m
  llamaray.bench.torchrun_entry SPEC.json`: a gloo process group and a `LocalLauncher`.
- **ray**: `llamaray.orchestrate.pretrain.pretrain(cfg)` itself -- the product's driver,
  its `TorchTrainer`, scaling and run config, with `RayLauncher` reporting to Ray Train --
  on a fresh local Ray (`ray.init(num_cpus=W x cpus per worker)`). The only change is the per-worker
  function: `ray_train_loop` below is `train_loop_per_worker` with the launcher wrapped.

In both, the launcher is wrapped in `StepRecorder` (`bench/torchrun_entry.py`), which
passes every call on and keeps each logged step's metrics with a timestamp; rank 0 writes
them to `<run_dir>/steps.json`. The config logs every step (`train.log_every=1`;
`--log-every`), with tracking, validation, periodic checkpoints and the Hugging Face export
off, and `train.cpus_per_worker=1`, which `run_worker` makes the torch thread count.
Three figures per step come out, from rank 0:

- **step**: the worker's own `step_time_s`, forward + backward + all-reduce + update,
  timed around `train_step` inside `run_worker`. The goal (at most 5% slower under Ray)
  is on this one.
- **iteration**: the time between two consecutive logged steps divided by the steps
  between them: the step plus the next batch and the metrics. A logged step is not a
  `ray.train.report` (only checkpoints and validations are), so it waits on neither the
  other workers nor the Train controller's poll (`RAY_TRAIN_HEALTH_CHECK_INTERVAL_S`;
  `--poll-interval` changes it for a diagnosis).
- **cpu**: the worker process's CPU time per iteration (every thread, Ray's in-process
  ones included); the shared machine's load inflates it much less than wall time.

The first `--warmup` steps and the last one (run_worker always checkpoints and validates
at the end) are left out. Runs alternate, torchrun first, so that drift in machine load
hits both alike; the medians are over every kept step of a setup's runs. Ray is started
for each Ray run and shut down after it, so the torchrun runs share the machine with no
Ray processes. Ray starts its workers at niceness 15, below every other process; the
torchrun workers get the same (`--nice`), so other load on a shared machine slows both
alike. The wall time of a launch (from starting torchrun, or from `ray.init`, to
return: start-up, model build and the final checkpoint included) is for information and
in no ratio.

    python -m llamaray.bench.ray_overhead [--preset tiny] [--steps 30] [--warmup 5] \\
        [--workers 2] [--rounds 2] [--log-every 1] [--json]
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from unittest import mock

from llamaray.bench.torchrun_entry import STEPS_FILE, StepRecorder
from llamaray.config import RunConfig
from llamaray.console import logger
from llamaray.train.worker import WorkerSpec, run_worker

log = logger("bench")

DEFAULT_OUTPUT = "runs/bench-ray-overhead"
RAY_WORKER_NICENESS = int(os.environ.get("RAY_worker_niceness", 15))  # noqa: SIM112
"""Ray's raylet starts worker processes at this niceness (its `worker_niceness` setting,
15 unless `RAY_worker_niceness` says otherwise), below its own daemons; torchrun's workers
get it too, so that on a shared machine both stand equal against other load."""


def ray_train_loop(config: dict) -> None:
    """`llamaray.orchestrate.ray_worker.train_loop_per_worker`, its launcher recorded."""
    import ray.train

    from llamaray.orchestrate import ray_worker

    ray_worker._quiet_report_logs()
    spec = WorkerSpec(**config)
    recorder = StepRecorder(ray_worker.RayLauncher())
    result = run_worker(spec, recorder)
    recorder.write(spec.run_dir)
    ray.train.report(result.last | {"stopped": result.stopped or "", "done": True})


def bench_config(opts: argparse.Namespace, name: str, corpus: str | None = None) -> RunConfig:
    """The run both setups train: the demo's data and model, every step logged."""
    seq_len, micro = 128, 16
    batch_tokens = opts.batch_tokens or seq_len * micro * opts.workers
    return RunConfig.model_validate(
        {
            "name": name,
            "output_dir": str(Path(opts.output_dir).resolve()),
            "model": {"preset": opts.preset, "activation_checkpointing": "none"},
            "tokenizer": {"vocab_size": opts.vocab_size},
            "data": {
                "prepare": {
                    "name": "corpus",
                    "sample_mb": opts.sample_mb,
                    "tokenizer": {"vocab_size": opts.vocab_size},
                    "validation_fraction": 0.02,
                },
                "corpus": corpus,
                "proportions": {"github": 0.7, "prose": 0.3},
                "eval_rows": 0,
            },
            "optimizer": {"warmup_steps": 10},
            "train": {
                "steps": opts.steps,
                "seq_len": seq_len,
                "batch_tokens": batch_tokens,
                "micro_batch_size": micro,
                "num_workers": opts.workers,
                "cpus_per_worker": opts.cpus_per_worker,
                "dtype": "fp32",
                "device": "cpu",
                "log_every": opts.log_every,
                "eval_every": 0,
                "checkpoint_every": 0,
            },
            "tracking": {
                "enabled": bool(getattr(opts, "tracking_uri", None)),
                "uri": getattr(opts, "tracking_uri", None),
                "export_hf": False,
                "system_metrics": False,
            },
        }
    )


def _fresh(cfg: RunConfig) -> Path:
    """The run's folder (`cfg.run_uri`: where rank 0 writes steps.json, under both setups),
    emptied of what an earlier bench left there (it would be resumed)."""
    run_dir = Path(cfg.run_uri)
    shutil.rmtree(run_dir, ignore_errors=True)
    return run_dir


def _start_ray(opts: argparse.Namespace) -> None:
    from llamaray.ray_session import start_ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    # A fresh local cluster sized to the run: the bench compares against torchrun on this host.
    start_ray("local", num_cpus=math.ceil(opts.workers * opts.cpus_per_worker))


def prepare(opts: argparse.Namespace) -> str:
    """The corpus, prepared once on a local Ray (reused while its config is unchanged)."""
    import ray

    from llamaray.orchestrate.pretrain import corpus_for

    _start_ray(opts)
    try:
        return corpus_for(bench_config(opts, "prepare"))
    finally:
        ray.shutdown()


def run_torchrun(opts: argparse.Namespace, name: str, corpus: str) -> dict:
    cfg = bench_config(opts, name, corpus)
    run_dir = _fresh(cfg)
    run_dir.mkdir(parents=True)
    spec = WorkerSpec(cfg.model_dump(), corpus, str(run_dir), None, None, _weights(cfg))
    spec_path = run_dir / "spec.json"
    spec_path.write_text(json.dumps(asdict(spec)))
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        "--nproc_per_node", str(opts.workers), "-m", "llamaray.bench.torchrun_entry",
        str(spec_path),
    ]  # fmt: skip
    if opts.nice:
        cmd = ["nice", "-n", str(opts.nice), *cmd]
    log = run_dir / "torchrun.log"
    start = time.perf_counter()
    with log.open("w") as out:
        proc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, check=False)
    wall = time.perf_counter() - start
    if proc.returncode:
        sys.stderr.write(log.read_text()[-4000:])
        raise RuntimeError(f"torchrun exited with {proc.returncode}; log: {log}")
    return _summary("torchrun", name, run_dir, wall, opts)


def run_ray(opts: argparse.Namespace, name: str, corpus: str) -> dict:
    import ray

    from llamaray.bench import ray_overhead  # by module name, so Ray pickles it by reference
    from llamaray.orchestrate import ray_worker
    from llamaray.orchestrate.pretrain import pretrain

    cfg = bench_config(opts, name, corpus)
    run_dir = _fresh(cfg)
    start = time.perf_counter()
    _start_ray(opts)
    try:
        with mock.patch.object(ray_worker, "train_loop_per_worker", ray_overhead.ray_train_loop):
            pretrain(cfg)
        wall = time.perf_counter() - start
    finally:
        ray.shutdown()
    return _summary("ray", name, run_dir, wall, opts)


def _weights(cfg: RunConfig) -> dict[str, float]:
    from llamaray.orchestrate.pretrain import plan_data, read_manifest

    return plan_data(cfg, read_manifest(cfg.data.corpus))[0]


def _summary(setup: str, name: str, run_dir: Path, wall: float, opts) -> dict:
    steps_file = run_dir / STEPS_FILE
    if not steps_file.is_file():  # e.g. pretrain() no longer picks up the patched loop
        raise RuntimeError(f"{setup}: rank 0 wrote no {steps_file}")
    data = json.loads(steps_file.read_text())
    records = sorted(data["records"], key=lambda r: r["step"])
    # Logged steps after the warm-up, but not the last one; each paired with the one
    # before it, so that an iteration is (time between them) / (steps between them).
    pairs = [
        (prev, cur)
        for prev, cur in itertools.pairwise(records)
        if prev["step"] >= opts.warmup and cur["step"] < opts.steps
    ]
    if not pairs:
        raise RuntimeError(f"{setup}: no logged steps left after the warm-up in {run_dir}")
    steps = [cur["step_time_s"] for _, cur in pairs]
    iterations = [(cur["t"] - prev["t"]) / (cur["step"] - prev["step"]) for prev, cur in pairs]
    cpu = [(cur["cpu"] - prev["cpu"]) / (cur["step"] - prev["step"]) for prev, cur in pairs]
    return {
        "setup": setup,
        "run": name,
        "steps_kept": len(pairs),
        "step_s": statistics.median(steps),
        "iteration_s": statistics.median(iterations),
        "cpu_s": statistics.median(cpu),
        "wall_s": wall,
        "step_times_s": steps,
        "iteration_times_s": iterations,
        "cpu_times_s": cpu,
    }


def _pooled(runs: list[dict], setup: str, batch_tokens: int) -> dict:
    mine = [r for r in runs if r["setup"] == setup]
    step = statistics.median([t for r in mine for t in r["step_times_s"]])
    iteration = statistics.median([t for r in mine for t in r["iteration_times_s"]])
    cpu = statistics.median([t for r in mine for t in r["cpu_times_s"]])
    return {
        "setup": setup,
        "runs": len(mine),
        "step_s": step,
        "iteration_s": iteration,
        "tokens_per_s": batch_tokens / step,
        "iteration_tokens_per_s": batch_tokens / iteration,
        "cpu_s": cpu,
        "wall_s": statistics.median([r["wall_s"] for r in mine]),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5, help="first steps left out")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--cpus-per-worker", type=float, default=1.0, help="= torch threads")
    parser.add_argument("--rounds", type=int, default=2, help="torchrun, ray pairs")
    parser.add_argument("--batch-tokens", type=int, default=None, help="default 2048 x workers")
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--sample-mb", type=float, default=1.0, help="per source of the sample")
    parser.add_argument(
        "--log-every", type=int, default=1, help="train.log_every: steps between logged steps"
    )
    parser.add_argument(
        "--poll-interval",
        type=float,
        default=None,
        help="diagnosis: RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (llamaray's default 0.5 s, Ray's 2 s)",
    )
    parser.add_argument(
        "--nice",
        type=int,
        default=RAY_WORKER_NICENESS,
        help="niceness of the torchrun workers (default: Ray's for its workers)",
    )
    parser.add_argument("--output-dir", default=DEFAULT_OUTPUT)
    parser.add_argument("--json", action="store_true", help="JSON on stdout, the table on stderr")
    opts = parser.parse_args(argv)
    if opts.steps < opts.warmup + 2:
        parser.error("--steps must leave at least one step between the warm-up and the last")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if opts.poll_interval is not None:  # the local raylet, and so the controller, inherit it
        os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = str(opts.poll_interval)

    corpus = prepare(opts)
    batch_tokens = bench_config(opts, "x").batch_tokens
    runs = []
    for i in range(1, opts.rounds + 1):
        for setup, run in (("torchrun", run_torchrun), ("ray", run_ray)):
            result = run(opts, f"{setup}-{i}", corpus)
            log.info(
                f"{setup} run {i}: step {1e3 * result['step_s']:.1f} ms, iteration "
                f"{1e3 * result['iteration_s']:.1f} ms, wall {result['wall_s']:.1f} s"
            )
            runs.append(result)
    pooled = {s: _pooled(runs, s, batch_tokens) for s in ("torchrun", "ray")}
    ratios = {
        key: pooled["ray"][f"{key}_s"] / pooled["torchrun"][f"{key}_s"]
        for key in ("step", "iteration", "cpu")
    }

    out = sys.stderr if opts.json else sys.stdout
    print(
        f"\n# {opts.preset}, {opts.workers} workers x {opts.cpus_per_worker:g} CPU (torch "
        f"threads), {batch_tokens} tokens/step, logging every {opts.log_every} step(s), steps "
        f"{opts.warmup + 1}..{opts.steps - 1} of {opts.steps} kept, {os.cpu_count()} cores",
        file=out,
    )
    print(
        f"{'setup':9} {'run':11} {'step ms':>8} {'tok/s':>7} {'iter ms':>8} {'tok/s':>7} "
        f"{'cpu ms':>7} {'wall s':>7}",
        file=out,
    )
    rows = [(r["setup"], r["run"], r) for r in runs]
    rows += [(p["setup"], "median", p) for p in pooled.values()]
    for setup, run, r in rows:
        print(
            f"{setup:9} {run:11} {1e3 * r['step_s']:8.1f} {batch_tokens / r['step_s']:7.0f} "
            f"{1e3 * r['iteration_s']:8.1f} {batch_tokens / r['iteration_s']:7.0f} "
            f"{1e3 * r['cpu_s']:7.1f} {r['wall_s']:7.1f}",
            file=out,
        )
    print(
        f"ray / torchrun: step {ratios['step']:.3f}x (goal <= 1.05), iteration "
        f"{ratios['iteration']:.3f}x, cpu per iteration {ratios['cpu']:.3f}x",
        file=out,
    )
    report = {
        "config": vars(opts),
        "batch_tokens": batch_tokens,
        "cores": os.cpu_count(),
        "runs": [{k: v for k, v in r.items() if not k.endswith("times_s")} for r in runs],
        "per_step": {
            r["run"]: {k: r[k] for k in ("step_times_s", "iteration_times_s", "cpu_times_s")}
            for r in runs
        },
        "medians": pooled,
        "ratios": ratios,
    }
    if opts.json:
        print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
