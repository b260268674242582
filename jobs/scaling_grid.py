"""A small real scaling grid: pretrain widths x step counts on Ray, then fit L(N, D).

python jobs/scaling_grid.py [--widths 32,64,128,256] [--steps 100,300,900] [key.path=value ...]

Every run (4 widths x 3 lengths = 12 by default) is a real pretraining run
(`llamaray.orchestrate.pretrain.pretrain`) of the `debug` preset at another width (2
layers, 4 heads, 60K to 1.9M parameters), on one Ray Train worker, tracked in the MLflow
experiment `llamaray-scaling` as a child of one parent run `scaling-grid`. Each run has
its own cosine schedule of its own length, so its final validation loss is the loss of a
run *planned* for that many tokens (Chinchilla's point about fitting to schedule-matched
runs). Then `llamaray.plan` collects (N, D, loss) from the parent's children, fits the
scaling law and writes the plot, as `llamaray plan --parent-run <id>` would.

A run that already finished in MLflow is not trained again, so an interrupted grid goes on
where it stopped. The defaults took 13.5 minutes on 2 shared CPU cores (docs/scaling.md).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from llamaray.config import ConfigError, RunConfig, load_config

EXPERIMENT = "llamaray-scaling"
PARENT_RUN = "scaling-grid"


def grid_config(output_dir: str, dim: int, steps: int, extra: list[str]) -> RunConfig:
    """One grid point: the debug preset (2 layers, 4 heads) at width `dim`, `steps` steps
    of 2048 tokens, a 512-piece vocabulary (so the embedding does not dwarf the blocks)."""
    return load_config(
        None,
        [
            f"name=scale-d{dim}-s{steps}",
            f"output_dir={output_dir}",
            "model.preset=debug",
            f"model.dim={dim}",
            "model.n_layers=2",
            "model.n_heads=4",
            "tokenizer.vocab_size=512",
            "data.prepare.name=corpus-scaling",
            # 2.5M training tokens (2.1M code, 0.4M prose): the longest run (1.8M) reads no
            # row twice.
            "data.prepare.sample_mb=4",
            "data.prepare.tokenizer.vocab_size=512",
            "data.prepare.validation_fraction=0.02",
            # The sample's `prose` is not in the paper's table; weigh both sources here.
            "data.proportions={github: 0.8, prose: 0.2}",
            "data.eval_rows=64",
            "optimizer.lr=3e-3",
            f"optimizer.warmup_steps={max(1, steps // 10)}",
            f"train.steps={steps}",
            "train.seq_len=64",
            "train.batch_tokens=2048",
            "train.micro_batch_size=32",
            "train.num_workers=1",
            "train.cpus_per_worker=1",
            "train.device=cpu",
            f"train.log_every={max(1, steps // 5)}",
            f"train.eval_every={max(1, steps // 5)}",
            "train.checkpoint_every=0",
            "train.keep_checkpoints=1",
            f"tracking.experiment={EXPERIMENT}",
            "tracking.system_metrics=false",
            "tracking.export_hf=false",
            *extra,
        ],
    )


def finished(uri: str, run_name: str) -> bool:
    """Whether the grid run `run_name` already finished in MLflow (then it is kept)."""
    from llamaray.tracking import find_run

    return find_run(uri, EXPERIMENT, run_name, status="FINISHED") is not None


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", default="runs/scaling")
    parser.add_argument("--widths", type=_ints, default=[32, 64, 128, 256], help="model.dim values")
    parser.add_argument("--steps", type=_ints, default=[100, 300, 900], help="train.steps values")
    parser.add_argument("--plot", default=None, help="default: <output-dir>/scaling.png")
    parser.add_argument(
        "--compute", type=float, default=None, help="FLOPs to plan for; default: the largest run's"
    )
    parser.add_argument("--inference-tokens", type=float, default=1e8, help="tokens to serve")
    parser.add_argument("overrides", nargs="*", help="key.path=value for every run")
    opts = parser.parse_args(argv)
    try:  # every config checked before any cluster work
        grid = [grid_config(opts.output_dir, d, s, opts.overrides) for d in opts.widths
                for s in opts.steps]  # fmt: skip
    except ConfigError as err:
        print(err, file=sys.stderr)
        return 2

    from llamaray.orchestrate.pretrain import pretrain
    from llamaray.ray_session import start_ray
    from llamaray.tracking import end_run, open_run, tracking_uri

    uri = tracking_uri(grid[0].tracking.uri, opts.output_dir)
    parent_id, _ = open_run(uri, EXPERIMENT, PARENT_RUN)
    start_ray()  # RAY_ADDRESS, else a cluster of our own (never a stale one in /tmp/ray)
    for i, cfg in enumerate(grid, 1):
        if finished(uri, cfg.name):
            print(f"[grid {i}/{len(grid)}] {cfg.name}: finished earlier, kept", flush=True)
            continue
        print(f"[grid {i}/{len(grid)}] {cfg.name}: training", flush=True)
        cfg.tracking.parent_run_id = parent_id
        pretrain(cfg)
    end_run(uri, parent_id, "FINISHED")

    from llamaray.plan import collect_mlflow_points, format_plan, make_plan, plot_plan

    points = collect_mlflow_points(uri, EXPERIMENT, parent_run_id=parent_id)
    # Default budget: the grid's largest run, i.e. "how should its compute have been split?"
    compute = opts.compute or max(6 * p.n_params * p.tokens for p in points)
    plan = make_plan(points, compute=compute, inference_tokens=opts.inference_tokens)
    print(f"\nscaling plan from {len(points)} runs (parent run {parent_id}):\n")
    print(format_plan(plan))
    print(f"\nplot: {plot_plan(plan, opts.plot or Path(opts.output_dir) / 'scaling.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
