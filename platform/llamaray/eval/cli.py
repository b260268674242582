"""`llamaray eval`: score a training run's checkpoint (or an exported model) on local
tasks and held-out perplexity, over Ray, into MLflow beside the training run.

    llamaray eval --config jobs/configs/demo.yaml --task jobs/tasks/stdlib-modules
    llamaray eval --config jobs/configs/demo.yaml --step 200 --fewshot 3 --workers 2
    llamaray eval --config jobs/configs/demo.yaml --task jobs/tasks/stdlib-modules --all-steps
    llamaray eval --model runs/checkpoints/demo/hf --task jobs/tasks/stdlib-modules
    llamaray eval --config jobs/configs/demo.yaml --benchmark arc=ARC-Easy/ARC-Easy-Test.jsonl
    llamaray eval --config jobs/configs/demo.yaml --benchmark humaneval=HumanEval.jsonl \
        --samples 200 --temperature 0.8 --k 1 --k 100        # pass@k, the paper's setup
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_eval_parser(sub) -> None:
    p = sub.add_parser(
        "eval",
        help="evaluate a run's checkpoint on local tasks + held-out perplexity (Ray, MLflow)",
    )
    add_target_arguments(p)
    p.add_argument("--task", action="append", default=[], help="task folder; repeat for more")
    p.add_argument(
        "--benchmark",
        action="append",
        default=[],
        help="name=path: one of the paper's benchmarks from its published files "
        "(boolq, piqa, siqa, hellaswag, winogrande, arc, openbookqa, race, naturalquestions, "
        "triviaqa, gsm8k, math, humaneval, mbpp, mmlu); repeat for more",
    )
    p.add_argument("--fewshot", type=int, default=None, help="shots (default: each task's)")
    p.add_argument(
        "--samples", type=int, default=0, help="samples per code/free-form problem; 0: greedy"
    )
    p.add_argument("--temperature", type=float, default=0.8, help="with --samples")
    p.add_argument("--top-p", type=float, default=0.95, help="with --samples")
    p.add_argument(
        "--k", type=int, action="append", default=None, help="pass@k / maj1@k to report; repeat"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit", type=int, default=None, help="items per task at most")
    p.add_argument("--perplexity-rows", type=int, default=32, help="per source; 0: none")
    p.add_argument("--workers", type=int, default=2, help="Ray actors")
    p.add_argument("--cpus-per-worker", type=float, default=0.5)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--address", default=None, help="Ray cluster (default: RAY_ADDRESS/local)")
    p.add_argument(
        "--all-steps",
        action="store_true",
        help="every complete checkpoint of the run, oldest first; each score is drawn against "
        "training tokens in the training run's eval_vs_tokens.png (the paper's figure 2)",
    )
    p.set_defaults(func=cmd_eval)


def cmd_eval(opts: argparse.Namespace) -> int:
    """Everything is validated (config, tasks, checkpoint) before Ray starts."""
    from llamaray.config import ConfigError
    from llamaray.eval.benchmarks import read_benchmark
    from llamaray.eval.checkpoint import corpus_dir_of
    from llamaray.eval.config import EvalConfig
    from llamaray.eval.tasks import load_task

    check_one_target(opts)
    try:
        eval_cfg = EvalConfig(
            tasks=opts.task,
            step=opts.step,
            num_fewshot=opts.fewshot,
            seed=opts.seed,
            limit=opts.limit,
            perplexity_rows=opts.perplexity_rows,
            num_workers=opts.workers,
            cpus_per_worker=opts.cpus_per_worker,
            batch_size=opts.batch_size,
            benchmarks=opts.benchmark,
            samples=opts.samples,
            temperature=opts.temperature,
            top_p=opts.top_p,
            **({"pass_k": opts.k} if opts.k else {}),
        )
    except Exception as err:  # pydantic's ValidationError: one line per bad option
        raise ConfigError(f"invalid eval options: {err}") from None
    tasks = [load_task(Path(t)) for t in eval_cfg.tasks]
    for entry in eval_cfg.benchmarks:
        name, _, path = entry.partition("=")
        tasks.append(read_benchmark(name, path))
    if any(t.spec.type == "code" for t in tasks):
        from llamaray.eval.sandbox import unavailable_reason

        reason = unavailable_reason()
        if reason:
            raise ConfigError(f"code benchmarks run the generated programs, and {reason}")
    if opts.model and not tasks:
        raise ConfigError("--model needs at least one --task (no corpus to score)")
    if opts.all_steps and (opts.model or opts.step is not None):
        raise ConfigError(
            "--all-steps evaluates every checkpoint of a run: not with --model or --step"
        )
    run_cfg, target = load_target(opts, eval_cfg.step)
    corpus_dir = corpus_dir_of(run_cfg) if run_cfg is not None else None
    targets = all_step_targets(run_cfg) if opts.all_steps else [target]

    from llamaray.eval.runner import evaluate
    from llamaray.ray_session import start_ray

    start_ray(opts.address)
    require_target_shared(run_cfg, target)
    for each in targets:
        result = evaluate(each, tasks, eval_cfg, corpus_dir)
        log_beside_run(run_cfg, result)
        if len(targets) > 1:
            print(f"step {each.step}:")
        for name, value in sorted(result.metrics().items()):
            print(f"{name:48} {value:.4f}")
    return 0


def all_step_targets(run_cfg) -> list:
    """Every complete checkpoint of the run, oldest first (an incomplete one is said and
    passed over)."""
    from llamaray.eval.checkpoint import run_target
    from llamaray.train.checkpoint import CheckpointError
    from llamaray.train.stored_checkpoints import step_folders

    targets = []
    for step, _ in sorted(step_folders(run_cfg.run_uri)):
        try:
            targets.append(run_target(run_cfg, step))
        except CheckpointError as err:
            print(f"passing over step {step}: {err}")
    return targets


# ---- shared with `llamaray harness` ---------------------------------------------------


def add_target_arguments(p: argparse.ArgumentParser) -> None:
    """What to evaluate: a run (--config, --step, overrides) or a folder (--model)."""
    p.add_argument("--config", default=None, help="the training run's YAML config")
    p.add_argument("--model", default=None, help="an exported model folder instead of a run")
    p.add_argument(
        "--tokenizer", default=None, help="with --model: default <model>/tokenizer.model"
    )
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: newest)")
    p.add_argument("overrides", nargs="*", help="key.path=value overrides of the run config")


def check_one_target(opts: argparse.Namespace) -> None:
    """A training run (--config and/or overrides) or a model folder (--model), not both."""
    from llamaray.config import ConfigError

    run_given = opts.config is not None or bool(opts.overrides)
    if run_given == (opts.model is not None):
        raise ConfigError("give either the training run (--config, overrides) or --model")


def load_target(opts: argparse.Namespace, step: int | None):
    """(run config or None, EvalTarget): the run's checkpoint at `step` (default: newest
    complete) or the `--model` folder."""
    from llamaray.config import load_config
    from llamaray.eval.checkpoint import folder_target, run_target

    if opts.model:
        return None, folder_target(opts.model, opts.tokenizer)
    run_cfg = load_config(opts.config, opts.overrides)
    return run_cfg, run_target(run_cfg, step)


def require_target_shared(run_cfg, target) -> None:
    """ConfigError (one line) on a cluster whose nodes share no disk when the Scorer actors,
    on nodes of their own, could not read the checkpoint or model and its tokenizer. The
    tasks, the corpus (perplexity rows) and MLflow are read and written by this driver
    only, so they may stay local."""
    from llamaray.placement import require_shared_state, shared_filesystem_opted

    if run_cfg is not None:
        corpus = "data.corpus" if run_cfg.data.corpus else "output_dir"  # holds the tokenizer
        paths = {"storage": run_cfg.storage_path, corpus: target.tokenizer_path}
    else:
        paths = {"--model": target.model_dir, "--tokenizer": target.tokenizer_path}
    require_shared_state(paths, None, shared_filesystem_opted(run_cfg))


def log_beside_run(run_cfg, result) -> None:
    """Log `result` (an EvalResult) under the training run in MLflow, when there is a run
    and it is tracked."""
    if run_cfg is None or not run_cfg.tracking.enabled:
        return
    from llamaray.eval.runner import log_evaluation
    from llamaray.tracking import find_run, redact, tracking_uri

    uri = tracking_uri(run_cfg.tracking.uri, run_cfg.output_dir)
    experiment = run_cfg.tracking.experiment
    parent = find_run(uri, experiment, run_cfg.name)
    run_id = log_evaluation(uri, experiment, run_cfg.name, result, parent)
    print(f"logged to MLflow run {run_id} ({redact(uri)}), under training run {parent}")
