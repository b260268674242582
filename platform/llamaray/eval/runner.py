"""Evaluation fanned out over Ray, and its record in MLflow beside the training run.

Every task's requests (`scoring.build_requests`) and the held-out perplexity rows are cut
into contiguous shards, one per `Scorer` actor; each actor loads the model once. Results
come back in shard order, so the outcome does not depend on the number of workers (up to
floating-point noise of batch shapes; tested against one in-process scorer). With
`EvalConfig.samples`, code and free-form tasks are sampled instead (`sampling.py`), and
generated programs, greedy or sampled, run in the sandbox on the actors' nodes too.

    >>> result = evaluate(run_target(cfg), [load_task("jobs/tasks/stdlib-modules")],
    ...                   EvalConfig(num_workers=2), corpus_dir)  # doctest: +SKIP
    >>> log_evaluation(cfg, result)  # doctest: +SKIP
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from llamaray.console import logger
from llamaray.eval import report
from llamaray.eval.checkpoint import EvalTarget
from llamaray.eval.config import EvalConfig
from llamaray.eval.perplexity import PerplexityStats, heldout_rows, score_rows
from llamaray.eval.sampling import sample_requests, score_samples
from llamaray.eval.scoring import TaskResult, aggregate, build_requests, run_requests
from llamaray.eval.tasks import Task

log = logger("eval")

EVAL_OF_TAG = "llamaray.eval_of"
STEP_TAG = "llamaray.checkpoint_step"


@dataclass
class EvalResult:
    step: int | None
    tasks: dict[str, TaskResult] = field(default_factory=dict)
    perplexity: dict[str, dict[str, float]] = field(default_factory=dict)

    def metrics(self) -> dict[str, float]:
        out = {}
        for name, result in self.tasks.items():
            # MLflow refuses "@" in a metric name: pass@1 is logged as pass_at_1.
            out |= {
                f"eval/{name}/{k.replace('@', '_at_')}": float(v) for k, v in result.metrics.items()
            }
        for source, values in self.perplexity.items():
            out |= {f"ppl/{source}/{k}": v for k, v in values.items()}
        return out


class Scorer:
    """One model replica: in this process, or as a Ray actor (`ray.remote(Scorer)`)."""

    def __init__(self, target: EvalTarget, batch_size: int, device: str = "cpu"):
        import torch

        from llamaray.eval.lm import LanguageModel

        if device == "cpu":
            torch.set_num_threads(1)  # one core per actor: actors are the parallelism
        model, tokenizer = target.load(device)
        self.lm = LanguageModel(model, tokenizer, batch_size=batch_size, device=device)

    def requests(self, requests, max_new_tokens: int, stop: Sequence[str]) -> list:
        return run_requests(self.lm, requests, max_new_tokens, stop)

    def perplexity(self, rows) -> PerplexityStats:
        return score_rows(self.lm, rows) if len(rows) else PerplexityStats()

    def samples(self, requests, n, temperature, top_p, max_new_tokens, stop, seed) -> list:
        return sample_requests(
            self.lm,
            requests,
            n,
            temperature=temperature,
            top_p=top_p,
            max_new_tokens=max_new_tokens,
            stop=stop,
            seed=seed,
        )

    def run_code(self, pairs) -> list[bool]:
        """(item, completion) pairs through the sandbox, on this actor's node."""
        from llamaray.eval.code import run_completions

        return run_completions([item for item, _ in pairs], [text for _, text in pairs])


def ray_scorers(target: EvalTarget, opts: EvalConfig) -> list:
    """`opts.num_workers` Scorer actors: one GPU each on a GPU cluster, else fractional CPUs.
    Each loads the model on its own node (`EvalTarget.load`), with the S3 endpoint and
    region this driver resolved (credentials come from each node's own AWS chain)."""
    import ray

    from llamaray.storage import s3_endpoint_env

    gpu = ray.cluster_resources().get("GPU", 0) > 0
    env = s3_endpoint_env()
    actor = ray.remote(Scorer).options(
        num_cpus=opts.cpus_per_worker,
        num_gpus=1 if gpu else 0,
        runtime_env={"env_vars": env} if env else None,
    )
    return [
        actor.remote(target, opts.batch_size, "cuda" if gpu else "cpu")
        for _ in range(opts.num_workers)
    ]


def evaluate(
    target: EvalTarget,
    tasks: Sequence[Task],
    opts: EvalConfig,
    corpus_dir: str | None = None,
    scorers: Sequence | None = None,
) -> EvalResult:
    """Score `tasks` (and held-out perplexity of `corpus_dir`'s sources) on `scorers`
    (default: Ray actors per `opts`)."""
    scorers = list(scorers) if scorers is not None else ray_scorers(target, opts)
    result = EvalResult(target.step)
    for task in tasks:
        start = time.perf_counter()
        requests = build_requests(task, opts.num_fewshot, opts.seed, opts.limit)
        if opts.samples and task.spec.type != "multiple_choice":
            result.tasks[task.name] = _sampled(task, requests, opts, scorers)
        else:
            args = (task.spec.max_new_tokens, task.spec.stop)
            parts = _gather(scorers, "requests", _shards(requests, len(scorers)), args)
            responses = [r for p in parts for r in p]
            result.tasks[task.name] = aggregate(task, requests, responses, _run_code_on(scorers))
        shots = task.spec.num_fewshot if opts.num_fewshot is None else opts.num_fewshot
        result.tasks[task.name].shots = shots
        shown = ", ".join(f"{k} {v:.4f}" for k, v in result.tasks[task.name].metrics.items())
        log.info(
            f"{task.name}: {shown} ({len(requests)} requests, {time.perf_counter() - start:.1f}s)"
        )
    if corpus_dir and opts.perplexity_rows:
        for source, rows in heldout_rows(corpus_dir, opts.perplexity_rows).items():
            parts = _gather(scorers, "perplexity", _shards(rows, len(scorers)), ())
            total = sum(parts, PerplexityStats())
            result.perplexity[source] = total.metrics()
            log.info(
                f"perplexity {source}: {result.perplexity[source]['bits_per_byte']:.4f} bits/byte,"
                f" {result.perplexity[source]['nats_per_token']:.4f} nats/token ({len(rows)} rows)"
            )
    return result


def _sampled(task: Task, requests: list, opts: EvalConfig, scorers: Sequence) -> TaskResult:
    """`opts.samples` samples per problem on the scorers; code run on them too."""
    spec = task.spec
    args = (opts.samples, opts.temperature, opts.top_p, spec.max_new_tokens, spec.stop, opts.seed)
    parts = _gather(scorers, "samples", _shards(requests, len(scorers)), args)
    samples = [s for p in parts for s in p]
    return score_samples(task, requests, samples, opts.pass_k, _run_code_on(scorers))


def _run_code_on(scorers: Sequence):
    """Generated programs run on the scorers' nodes (on a cluster the driver's node may
    have no CPUs, or not be where work runs), shared out like the requests."""

    def run_code(items: list[dict], completions: list[str]) -> list[bool]:
        pairs = list(zip(items, completions, strict=True))
        passed = _gather(scorers, "run_code", _shards(pairs, len(scorers)), ())
        return [ok for part in passed for ok in part]

    return run_code


def _shards(items, n: int) -> list:
    """`n` contiguous, near-equal slices (some may be empty)."""
    size, extra = divmod(len(items), n)
    out, start = [], 0
    for i in range(n):
        end = start + size + (i < extra)
        out.append(items[start:end])
        start = end
    return out


def _gather(scorers: Sequence, method: str, shards: list, args: tuple) -> list:
    if scorers and isinstance(scorers[0], Scorer):
        return [getattr(s, method)(shard, *args) for s, shard in zip(scorers, shards, strict=True)]
    import ray

    futures = [
        getattr(s, method).remote(shard, *args) for s, shard in zip(scorers, shards, strict=True)
    ]
    return ray.get(futures)


# ---- MLflow ----------------------------------------------------------------------------


def log_evaluation(
    uri: str,
    experiment: str,
    evaluated: str,
    result: EvalResult,
    training_run_id: str | None,
) -> str:
    """Record `result` as an MLflow run nested under the training run it evaluates (same
    experiment, tagged with the checkpoint step), and its headline metrics in the training
    run at that step, so they sit on its charts beside the loss. Returns the eval run id.

    Re-evaluating the same step continues the same eval run (found by name)."""
    from llamaray import tracking
    from llamaray.tracking import MetricLogger, open_run

    step = result.step or 0
    name = f"{evaluated}-eval-step-{step}" if result.step is not None else f"{evaluated}-eval"
    run_id, _ = open_run(uri, experiment, name, parent_run_id=training_run_id)
    client = tracking.client(uri)
    client.set_tag(run_id, STEP_TAG, str(step))
    if training_run_id:
        client.set_tag(run_id, EVAL_OF_TAG, training_run_id)
    metrics = result.metrics()
    logger = MetricLogger(uri, run_id, system_metrics=False)
    logger.log(metrics, step)
    with tempfile.TemporaryDirectory() as tmp:
        for task, task_result in result.tasks.items():
            path = Path(tmp) / f"{task}.jsonl"
            path.write_text("".join(json.dumps(r) + "\n" for r in task_result.records))
            logger.artifact(path, "predictions")
        summary = Path(tmp) / "results.json"
        summary.write_text(json.dumps({"step": result.step, "metrics": metrics}, indent=2))
        logger.artifact(summary)
        if result.tasks:  # the paper-style table: benchmark, shots, metric, score
            rows = report.rows_of(result.tasks)
            for name, text in (
                ("results.md", report.markdown(rows)),
                ("results.csv", report.csv_text(rows)),
            ):
                (Path(tmp) / name).write_text(text)
                logger.artifact(Path(tmp) / name)
    logger.finish()
    if training_run_id:
        headline = {k: v for k, v in metrics.items() if k.endswith(HEADLINE)}
        # Straight into the store: the training run's status (finished, killed) stays as is.
        tracking.log_metrics(uri, training_run_id, headline, step)
        log_scores_vs_tokens(uri, training_run_id, evaluated)
    return run_id


HEADLINE = ("/acc", "/exact_match", "/bits_per_byte", "/pass_at_1", "/maj1_at_1")
"""The metrics of an evaluation copied into the training run (one per task)."""
SCORES_VS_TOKENS = "eval_vs_tokens.png"


def log_scores_vs_tokens(uri: str, training_run_id: str, title: str = "") -> None:
    """Draw every headline score the training run holds (one point per evaluated
    checkpoint) against the tokens trained on by then (step x `derived.batch_tokens`), and
    log it into the training run as `eval_vs_tokens.png` (replaced at each evaluation)."""
    from llamaray import tracking

    client = tracking.client(uri)
    run = client.get_run(training_run_id)
    batch_tokens = int(run.data.params.get("derived.batch_tokens", 0) or 0)
    if not batch_tokens:
        return  # not a pretraining run of ours: no tokens per step to draw against
    series = {}
    for key in run.data.metrics:
        if key.startswith("eval/") and key.endswith(HEADLINE):
            history = tracking.metric_history(uri, training_run_id, key)
            series[key] = [(m.step * batch_tokens, m.value) for m in history]
    if not series:
        return
    with tempfile.TemporaryDirectory() as tmp:
        png = report.scores_vs_tokens_png(series, Path(tmp) / SCORES_VS_TOKENS, title)
        client.log_artifact(training_run_id, str(png))
