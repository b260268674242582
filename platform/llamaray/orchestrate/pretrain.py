"""The pretraining driver: corpus -> tracking -> Ray Train -> outcome.

Runs where `llamaray train` or `ray job submit -- python jobs/pretrain.py` runs: it
prepares the corpus unless one is named (reusing a prepared one whose config is
unchanged), plans the mixture, opens the MLflow run, then hands the workers to Ray Train's
`TorchTrainer` with a fixed run name so that relaunching the name resumes it, and
`FailureConfig(max_failures)` so a dead worker is replaced and the group resumes from the
newest complete checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from llamaray.config import RunConfig
from llamaray.train.worker import WorkerSpec


class TrainingStopped(RuntimeError):
    """Training ended early on purpose (non-finite loss with nan_policy=stop, too many
    skipped steps); the message says at which step."""


@dataclass
class PretrainResult:
    name: str
    step: int
    metrics: dict
    checkpoint: str | None
    run_dir: Path
    tracking_uri: str | None
    mlflow_run_id: str | None
    paused: str | None = None
    """Set when the launch ended at train.stop_at_step: relaunch to continue."""


def _say(msg: str) -> None:
    print(f"[llamaray] {msg}", file=sys.stderr, flush=True)


def ensure_ray() -> None:
    """Join the cluster named by RAY_ADDRESS (as `ray job submit` sets), else start a local one."""
    import ray

    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS"), log_to_driver=True)


def corpus_for(cfg: RunConfig) -> str:
    """The run's corpus directory: `data.corpus`, or `data.prepare` prepared (or reused)."""
    if cfg.data.corpus:
        return cfg.data.corpus
    from llamaray.data.prepare import MANIFEST, prepare_corpus

    prep = cfg.data.prepare.model_copy(
        update={"seq_len": cfg.train.seq_len, "output_dir": cfg.output_dir}
    )
    out = Path(prep.output_dir).resolve() / prep.name
    manifest = out / MANIFEST
    expected = hashlib.sha256(prep.model_dump_json().encode()).hexdigest()[:16]
    if manifest.is_file() and json.loads(manifest.read_text()).get("config_hash") == expected:
        _say(f"corpus {out} is prepared with this config; reusing it")
        return str(out)
    _say(f"preparing corpus {prep.name} into {out}")
    prepare_corpus(prep)
    return str(out)


def read_manifest(corpus_dir: str) -> dict:
    from llamaray.data.feed import CorpusRows

    return CorpusRows.open(corpus_dir).manifest


def check_corpus(cfg: RunConfig, manifest: dict, corpus_dir: str) -> None:
    """Mismatches between the run and its corpus, found before any worker starts."""
    problems = []
    if manifest["seq_len"] != cfg.train.seq_len:
        problems.append(
            f"train.seq_len: {cfg.train.seq_len}, but {corpus_dir} is packed for "
            f"seq_len={manifest['seq_len']}"
        )
    vocab = manifest["tokenizer"]["vocab_size"]
    if cfg.model.vocab_size and cfg.model.vocab_size != vocab:
        problems.append(
            f"model.vocab_size: {cfg.model.vocab_size}, but the corpus tokenizer has {vocab}"
        )
    names = set(manifest["sources"])
    unknown = sorted(set(cfg.data.proportions or {}) - names)
    if unknown:
        problems.append(
            f"data.proportions: no source {', '.join(unknown)} in the corpus "
            f"(it has {', '.join(sorted(names))})"
        )
    if problems:
        from llamaray.config import ConfigError

        raise ConfigError("run does not fit its corpus:\n" + "\n".join(f"  {p}" for p in problems))


def mixture_weights(configured: dict[str, float] | None, rows: dict[str, int]) -> dict[str, float]:
    """The sampling weight of every corpus source: the configured ones, else the paper's
    table 1. A source that ended with no training rows (everything filtered) is left out
    with a warning when its weight comes from the paper; a configured weight for it is an
    error, since the mixture asked for could not be realized."""
    from llamaray.config import ConfigError
    from llamaray.data.sources import PAPER_MIXTURE

    if configured is not None:
        empty = [n for n, w in configured.items() if w > 0 and rows.get(n, 0) == 0]
        if empty:
            raise ConfigError(
                f"data.proportions: source(s) {', '.join(empty)} have no training rows"
            )
        return {n: float(configured.get(n, 0.0)) for n in rows}
    weights = {n: PAPER_MIXTURE[n].proportion if n in PAPER_MIXTURE else 0.0 for n in rows}
    if not any(weights.values()):
        # No paper source in the corpus (the demo's `prose`): weigh sources by their rows.
        weights = {n: float(r) for n, r in rows.items()}
    outside = [n for n in rows if n not in PAPER_MIXTURE]
    if outside and any(weights.values()):
        _say(
            f"warning: source(s) {', '.join(outside)} are not in the paper's table 1 and get no "
            "weight; set data.proportions to include them"
        )
    for name, n_rows in rows.items():
        if n_rows == 0 and weights[name] > 0:
            _say(f"warning: source {name} has no training rows; left out of the mixture")
            weights[name] = 0.0
    if not any(weights.values()):
        raise ConfigError("the corpus has no training rows in any source")
    return weights


def open_tracking(cfg: RunConfig, corpus_dir: str, manifest: dict, plan: dict | None):
    """Open or find the run's MLflow run and record config, manifest, plan and tokenizer."""
    from mlflow.tracking import MlflowClient

    from llamaray.train.tracking import flatten, open_run, tracking_uri

    uri = tracking_uri(cfg.tracking.uri, cfg.output_dir)
    run_id, created = open_run(
        uri, cfg.tracking.experiment, cfg.name, parent_run_id=cfg.tracking.parent_run_id
    )
    client = MlflowClient(uri)
    if created:
        params = flatten(cfg.model_dump(exclude={"faults"}))
        params |= {
            "derived.grad_accum_steps": str(cfg.grad_accum_steps),
            "derived.peak_lr": str(cfg.peak_lr),
            "derived.batch_tokens": str(cfg.batch_tokens),
            # N of the scaling law (`llamaray plan`), with the corpus tokenizer's vocabulary.
            "derived.n_params": str(count_params(cfg, manifest["tokenizer"]["vocab_size"])),
        }
        items = sorted(params.items())
        from mlflow.entities import Param

        for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
            client.log_batch(run_id, params=[Param(k, v) for k, v in items[i : i + 100]])
    else:
        _say(f"MLflow run {run_id} exists for {cfg.name!r}: continuing it")
    client.log_text(run_id, cfg.to_yaml(), "config.yaml")
    client.log_dict(run_id, manifest, "data/manifest.json")
    if plan is not None:
        client.log_dict(run_id, plan, "data/mixture.json")
    client.set_tag(run_id, "llamaray.corpus", corpus_dir)
    tokenizer = Path(manifest["tokenizer"]["path"])
    if tokenizer.is_file():
        client.log_artifact(run_id, str(tokenizer), "tokenizer")
    return uri, run_id


def count_params(cfg: RunConfig, vocab_size: int) -> int:
    """Parameters of the run's model, counted on the meta device (no memory)."""
    import torch

    from llamaray.model import Llama

    with torch.device("meta"):
        return Llama(cfg.model.args(vocab_size)).num_params()


def pretrain(cfg: RunConfig, callbacks: Sequence = ()) -> PretrainResult:
    """Run (or resume) the pretraining run `cfg.name` on the Ray cluster.

    `callbacks` are Ray Train callbacks, e.g. Tune's `TuneReportCallback` when a sweep
    trial runs this.
    """
    from llamaray.data.mixture import plan_mixture

    ensure_ray()
    corpus_dir = corpus_for(cfg)
    manifest = read_manifest(corpus_dir)
    check_corpus(cfg, manifest, corpus_dir)
    rows = {n: s["splits"]["train"]["rows"] for n, s in manifest["sources"].items()}
    weights = mixture_weights(cfg.data.proportions, rows)
    token_budget = cfg.train.steps * cfg.batch_tokens
    plan = plan_mixture(rows, token_budget, cfg.train.seq_len, weights, cfg.train.seed)
    _say("mixture: " + ", ".join(
        f"{s.name} {s.realized_proportion:.1%} ({s.epochs:.2f} epochs)" for s in plan.sources
    ))  # fmt: skip

    uri = run_id = None
    if cfg.tracking.enabled:
        uri, run_id = open_tracking(cfg, corpus_dir, manifest, plan.to_dict())
    run_dir = Path(cfg.output_dir).resolve() / cfg.name
    spec = WorkerSpec(cfg.model_dump(), corpus_dir, str(run_dir), uri, run_id, weights)
    return launch(cfg, spec, callbacks=callbacks)


def launch(
    cfg: RunConfig,
    spec: WorkerSpec,
    *,
    callbacks: Sequence = (),
    train_loop: Callable[[dict], None] | None = None,
) -> PretrainResult:
    """Start `cfg.train.num_workers` Ray Train workers running `train_loop` (default:
    `run_worker` through `train_loop_per_worker`) on `spec`, under the fixed run name
    `cfg.name`, and wait for the outcome. Relaunching a name resumes its checkpoints."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from llamaray.orchestrate.ray_worker import train_loop_per_worker
    from llamaray.storage import storage_location

    uri, run_id = spec.tracking_uri, spec.mlflow_run_id
    use_gpu = cfg.train.device == "cuda" or (cfg.train.device == "auto" and _cluster_has_gpus())
    resources = {"CPU": cfg.train.cpus_per_worker} | ({"GPU": 1} if use_gpu else {})
    # s3:// gets our S3 filesystem (endpoint, region, retries, credentials: llamaray.storage).
    storage, storage_fs = storage_location(cfg.storage_path)
    shown = cfg.storage_path.rstrip("/") if storage_fs is not None else storage
    trainer = TorchTrainer(
        train_loop or train_loop_per_worker,
        train_loop_config=asdict(spec),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.train.num_workers,
            use_gpu=use_gpu,
            resources_per_worker=resources,
            accelerator_type=cfg.train.accelerator_type,
        ),
        run_config=ray.train.RunConfig(
            name=cfg.name,
            storage_path=storage,
            storage_filesystem=storage_fs,
            failure_config=ray.train.FailureConfig(max_failures=cfg.train.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints),
            callbacks=list(callbacks),
            # Ray Train's INFO lines repeat every report's metrics per worker; the workers'
            # own progress lines already say what happens.
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
        ),
    )
    _say(
        f"launching {cfg.train.num_workers} worker(s) ({'GPU' if use_gpu else 'CPU'}); "
        f"checkpoints under {shown}/{cfg.name}"
    )
    try:
        result = trainer.fit()
    except Exception:
        if run_id:
            from mlflow.tracking import MlflowClient

            MlflowClient(uri).set_terminated(run_id, "FAILED")
        raise
    metrics = dict(result.metrics or {})
    stopped = metrics.get("stopped") or ""
    out = PretrainResult(
        cfg.name,
        int(metrics.get("step", 0)),
        metrics,
        result.checkpoint.path if result.checkpoint else None,
        Path(spec.run_dir),
        uri,
        run_id,
    )
    if stopped:
        raise TrainingStopped(stopped)
    if out.step < cfg.train.steps:
        out.paused = (
            f"paused at step {out.step} of {cfg.train.steps}; relaunch {cfg.name!r} to go on"
        )
        _say(out.paused)
    if uri:
        _say(f"tracked in MLflow run {run_id} ({uri}); browse with: make mlflow-ui")
    return out


def _cluster_has_gpus() -> bool:
    import ray

    return ray.cluster_resources().get("GPU", 0) > 0
