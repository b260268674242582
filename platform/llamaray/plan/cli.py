"""`llamaray plan`: fit the scaling law to past runs (or a CSV) and plan a model size.

llamaray plan --experiment llamaray-scaling --tracking-uri sqlite:///runs/scaling/mlflow.db \\
    --compute 1e15 --inference-tokens 1e9 --plot scaling.png
llamaray plan --csv points.csv --target-loss 2.1 --inference-tokens 2e12
"""

from __future__ import annotations

import argparse


def add_plan_parser(subparsers) -> argparse.ArgumentParser:
    """Register `plan` on the `llamaray` command's subparsers."""
    p = subparsers.add_parser(
        "plan",
        help="fit L(N, D) = E + A/N^a + B/D^b to past runs; compute- and inference-optimal sizes",
        description=__doc__.splitlines()[0],
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--experiment", help="MLflow experiment whose finished runs are points")
    source.add_argument("--csv", help="a CSV file with columns n_params,tokens,loss")
    p.add_argument(
        "--tracking-uri",
        default=None,
        help="MLflow store (default: $MLFLOW_TRACKING_URI, else sqlite:///runs/mlflow.db)",
    )
    p.add_argument("--parent-run", default=None, help="only the child runs of this run id")
    p.add_argument("--metric", default="val_loss", help="the loss metric (default: val_loss)")
    p.add_argument(
        "--all-points",
        action="store_true",
        help="every validation of every run, not only each run's final one (biased: "
        "mid-schedule losses are higher than those of runs planned for that length)",
    )
    p.add_argument("--compute", type=float, default=None, help="training budget in FLOPs")
    p.add_argument(
        "--target-loss",
        type=float,
        default=None,
        help="loss to reach (default: what the compute-optimal model for --compute reaches)",
    )
    p.add_argument(
        "--inference-tokens", type=float, default=0.0, help="tokens the model will serve"
    )
    p.add_argument("--plot", default=None, help="write the two-panel plot to this PNG")
    p.set_defaults(func=cmd_plan)
    return p


def cmd_plan(opts: argparse.Namespace) -> int:
    """Collect points, fit, print the plan, write the plot. User errors raise ValueError
    (or FileNotFoundError), which `llamaray` prints as one line with exit code 2."""
    from llamaray.plan.planner import make_plan
    from llamaray.plan.points import collect_mlflow_points, read_csv
    from llamaray.plan.report import format_plan, plot_plan

    if opts.compute is None and opts.target_loss is None:
        raise ValueError("give a training budget (--compute) or a target loss (--target-loss)")
    if opts.csv:
        points = read_csv(opts.csv)
    else:
        from llamaray.tracking import tracking_uri

        uri = tracking_uri(opts.tracking_uri, "runs")
        points = collect_mlflow_points(
            uri,
            opts.experiment,
            parent_run_id=opts.parent_run,
            all_points=opts.all_points,
            metric=opts.metric,
        )
    plan = make_plan(
        points,
        compute=opts.compute,
        target_loss=opts.target_loss,
        inference_tokens=opts.inference_tokens,
    )
    print(format_plan(plan))
    if opts.plot:
        print(f"\nplot: {plot_plan(plan, opts.plot)}")
    return 0
