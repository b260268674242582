"""`llamaray harness`: lm-evaluation-harness tasks on a training run's checkpoint (results
into MLflow beside the run, as `llamaray eval` does) or on an exported model folder.

    llamaray harness --model runs/checkpoints/demo/hf --tasks arc_easy,hellaswag --fewshot 0
    llamaray harness --config jobs/configs/demo.yaml --tasks my_task --include-path tasks/
    llamaray harness --config jobs/configs/demo.yaml --step 200 --tasks my_task --output r.json

Imports neither torch nor lm-eval until the command runs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def add_harness_parser(sub) -> None:
    from llamaray.eval.cli import add_target_arguments

    p = sub.add_parser(
        "harness",
        help="lm-evaluation-harness tasks on a run's checkpoint or a model folder (MLflow)",
    )
    add_target_arguments(p)
    p.add_argument("--tasks", required=True, help="harness task names, comma-separated")
    p.add_argument(
        "--include-path", action="append", default=[], help="folder of task YAML; repeat"
    )
    p.add_argument("--fewshot", type=int, default=None, help="shots (default: each task's)")
    p.add_argument("--limit", type=float, default=None, help="items per task (or a fraction)")
    p.add_argument("--seed", type=int, default=0, help="seeds the harness's shots")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default=None, help="default: cuda when present, else cpu")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument(
        "--output", default=None, help="write the harness's results as JSON here (path or s3://)"
    )
    p.set_defaults(func=cmd_harness)


def cmd_harness(opts: argparse.Namespace) -> int:
    """Options, tasks and the checkpoint are checked before the model is loaded."""
    from llamaray.config import ConfigError
    from llamaray.eval.cli import check_one_target, load_target, log_beside_run

    check_one_target(opts)
    if opts.batch_size < 1:
        raise ConfigError(f"--batch-size must be at least 1, got {opts.batch_size}")
    if opts.limit is not None and opts.limit <= 0:
        raise ConfigError(f"--limit must be positive, got {opts.limit}")
    tasks = [t.strip() for t in opts.tasks.split(",") if t.strip()]
    if not tasks:
        raise ConfigError("--tasks names no task")
    for folder in opts.include_path:
        if not Path(folder).is_dir():
            raise ConfigError(f"--include-path {folder} is not a folder")
    try:
        from llamaray.eval import harness
    except ImportError as err:
        raise ConfigError(str(err)) from None
    manager = harness.task_manager(tasks, opts.include_path)
    run_cfg, target = load_target(opts, opts.step)
    limit = int(opts.limit) if opts.limit is not None and opts.limit >= 1 else opts.limit

    lm = harness.HarnessLM(
        target=target, batch_size=opts.batch_size, device=opts.device, dtype=opts.dtype
    )
    results = harness.evaluate_with_harness(
        lm, tasks, manager=manager, num_fewshot=opts.fewshot, limit=limit, seed=opts.seed
    )
    metrics = harness.harness_metrics(results)
    if opts.output:  # a local path, or s3:// to keep it past a `ray job submit` driver
        from llamaray.storage import write_text

        write_text(opts.output, json.dumps(results, indent=2, default=str))
        print(f"wrote {opts.output}")
    log_beside_run(run_cfg, harness.as_eval_result(results, target.step))
    for task, values in sorted(metrics.items()):
        for name, value in sorted(values.items()):
            print(f"{task + '/' + name:48} {value:.4f}")
    sys.stdout.flush()
    return 0
