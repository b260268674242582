"""The pretraining driver: corpus -> tracking -> Ray Train -> outcome.

Runs where `llamaray train` or `ray job submit -- python jobs/pretrain.py` runs: it
joins the cluster and checks that the run's shared state can be shared there
(`placement`), prepares the corpus unless one is named (reusing a prepared one whose
config is unchanged), plans the mixture once (the workers stream that plan), opens the
MLflow run, then hands the workers to Ray Train's `TorchTrainer` with a fixed run name so
that relaunching the name resumes it, and `FailureConfig(max_failures)` so a dead worker is
replaced and the group resumes from the newest complete checkpoint.

Everything a run leaves for later is in its storage folder `<storage_path>/<name>/`
(checkpoints, the exported model in `hf/`) or in MLflow; the driver reads nothing that a
worker wrote to its own disk.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

from llamaray import storage
from llamaray.config import ConfigError, RunConfig
from llamaray.console import logger
from llamaray.data.corpus_layout import corpus_digest
from llamaray.data.mixture import MixturePlan
from llamaray.ray_session import start_ray
from llamaray.tracking import redact
from llamaray.train.course import relaunch_changes, trajectory
from llamaray.train.outputs import model_uri
from llamaray.train.worker import WorkerSpec

log = logger()  # the drivers' lines: [llamaray] ...


class TrainingStopped(RuntimeError):
    """Training ended early on purpose (non-finite loss with nan_policy=stop, too many
    skipped steps); the message says at which step."""


@dataclass
class PretrainResult:
    name: str
    step: int
    metrics: dict
    checkpoint: str | None
    run_uri: str
    """The run's folder in its storage (`<storage_path>/<name>`, a local path or s3://)."""
    model_uri: str | None
    """The exported model (Hugging Face format, tokenizer beside it) in the run's storage:
    `<run_uri>/hf`; None when the run did not finish or `tracking.export_hf` is off.
    Read it anywhere with `llamaray.storage.local_copy`."""
    tracking_uri: str | None
    mlflow_run_id: str | None
    paused: str | None = None
    """Set when the launch ended at train.stop_at_step: relaunch to continue."""
    registered_model: str | None = None
    """The final model's version in MLflow's Model Registry, `models:/<name>/<version>`
    (`mlflow.pyfunc.load_model` takes it); None when not registered."""


def corpus_for(cfg: RunConfig) -> str:
    """Where the run reads its corpus: the current version of `data.corpus`, or of
    `data.prepare` prepared (or reused) under `output_dir` (a local path or s3://). The
    version's own folder (`corpus_layout.pinned_corpus`), so the workers, and a worker
    restarted after a failure, read the version the run was launched with even when the
    corpus is rebuilt meanwhile; its manifest's `version` and `digest` name it."""
    from llamaray.data.corpus_layout import corpus_location, pinned_corpus, read_manifest

    if cfg.data.corpus:
        return pinned_corpus(cfg.data.corpus)
    from llamaray.data.prepare import prepare_corpus

    prep = cfg.data.prepare.model_copy(
        update={"seq_len": cfg.train.seq_len, "output_dir": cfg.output_dir}
    )
    out = corpus_location(prep.output_dir, prep.name)
    expected = hashlib.sha256(prep.model_dump_json().encode()).hexdigest()[:16]
    prepared = read_manifest(out)
    if prepared and prepared.get("config_hash") == expected:
        log.info(f"corpus {out} is prepared with this config; reusing it")
        return pinned_corpus(out)
    log.info(f"preparing corpus {prep.name} into {out}")
    prepare_corpus(prep)
    return pinned_corpus(out)


def read_manifest(corpus_dir: str) -> dict:
    from llamaray.data.packed_corpus import CorpusRows

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
        raise ConfigError("run does not fit its corpus:\n" + "\n".join(f"  {p}" for p in problems))


def plan_data(cfg: RunConfig, manifest: dict) -> tuple[dict[str, float], MixturePlan]:
    """The run's mixture, decided once: the sampling weights (`mixture.mixture_weights`)
    that go to every worker in `WorkerSpec.proportions`, and the plan they give, which is
    the one the workers stream (`MixedStream` plans with the same weights)."""
    from llamaray.data.mixture import mixture_weights, plan_mixture

    rows = {n: s["splits"]["train"]["rows"] for n, s in manifest["sources"].items()}
    token_budget = cfg.train.steps * cfg.batch_tokens
    try:
        weights, warnings = mixture_weights(cfg.data.proportions, rows)
        plan = plan_mixture(rows, token_budget, cfg.train.seq_len, weights, cfg.train.seed)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    for warning in warnings:
        log.warning(warning)
    return weights, plan


def open_tracking(cfg: RunConfig, corpus_dir: str, manifest: dict, plan: dict | None):
    """Open or find the run's MLflow run and record config, manifest, plan and tokenizer."""
    from llamaray import tracking
    from llamaray.data.packed_corpus import tokenizer_location
    from llamaray.model.flops import param_count

    uri = tracking.tracking_uri(cfg.tracking.uri, cfg.output_dir)
    run_id, created = tracking.open_run(
        uri, cfg.tracking.experiment, cfg.name, parent_run_id=cfg.tracking.parent_run_id
    )
    client = tracking.client(uri)
    if created:
        params = tracking.flatten(cfg.model_dump(exclude={"faults"}))
        params |= {
            "derived.grad_accum_steps": str(cfg.grad_accum_steps),
            "derived.peak_lr": str(cfg.peak_lr),
            "derived.batch_tokens": str(cfg.batch_tokens),
            # N of the scaling law (`llamaray plan`), with the corpus tokenizer's vocabulary.
            "derived.n_params": str(
                param_count(cfg.model.args(manifest["tokenizer"]["vocab_size"]))
            ),
        }
        tracking.log_params(uri, run_id, params)
    else:
        log.info(f"MLflow run {run_id} exists for {cfg.name!r}: continuing it")
    client.log_text(run_id, tracking.redact(cfg.to_yaml()), "config.yaml")  # no credentials
    client.log_dict(run_id, manifest, "data/manifest.json")
    if plan is not None:
        client.log_dict(run_id, plan, "data/mixture.json")
    client.set_tag(run_id, "llamaray.corpus", corpus_dir)
    record_datasets(uri, run_id, corpus_dir, manifest, plan)
    tokenizer = tokenizer_location(corpus_dir, manifest)
    if storage.exists(tokenizer):
        with storage.local_copy(tokenizer) as local:
            client.log_artifact(run_id, str(local), "tokenizer")
    return uri, run_id


def record_datasets(
    uri: str, run_id: str, corpus_dir: str, manifest: dict, plan: dict | None
) -> None:
    """The corpus (by its content digest, with its sources' token counts) and, when the run
    has one, its mixture plan (by a digest of the plan) as the MLflow run's dataset inputs:
    the UI shows them on the run and lets runs be compared by them."""
    import json

    from llamaray import tracking
    from llamaray.data.corpus_layout import corpus_profile

    name = manifest.get("name") or "corpus"
    tracking.log_dataset(
        uri,
        run_id,
        name=name,
        digest=corpus_digest(manifest),
        source=corpus_dir,
        profile=corpus_profile(manifest),
        context="training",
        # A row: seq_len + 1 token ids (the inputs and, shifted by one, the targets).
        tensors={"tokens": ("int32", (-1, manifest["seq_len"] + 1))},
    )
    if plan is not None:
        text = json.dumps(plan, sort_keys=True)
        tracking.log_dataset(
            uri,
            run_id,
            name=f"{name}-mixture",
            digest=hashlib.blake2b(text.encode(), digest_size=16).hexdigest(),
            source=corpus_dir,
            profile=plan,
            context="mixture",
        )


def pretrain(cfg: RunConfig, callbacks: Sequence = ()) -> PretrainResult:
    """Run (or resume) the pretraining run `cfg.name` on the Ray cluster.

    `callbacks` are Ray Train callbacks, e.g. Tune's `TuneReportCallback` when a sweep
    trial runs this.
    """
    from llamaray.placement import require_run_shared_state
    from llamaray.tracking import require_tracking, tracking_uri

    if cfg.tracking.enabled:
        # The run is found or created in MLflow after the corpus is ready; a server that does
        # not answer is said now, before any cluster work, not after preparing a corpus.
        require_tracking(tracking_uri(cfg.tracking.uri, cfg.output_dir))
    start_ray()  # RAY_ADDRESS (as `ray job submit` sets), else a local cluster of its own
    require_run_shared_state(cfg)  # seconds after joining, before any work
    corpus_dir = corpus_for(cfg)
    manifest = read_manifest(corpus_dir)
    check_corpus(cfg, manifest, corpus_dir)
    weights, plan = plan_data(cfg, manifest)
    log.info("mixture: " + ", ".join(
        f"{s.name} {s.realized_proportion:.1%} ({s.epochs:.2f} epochs)" for s in plan.sources
    ))  # fmt: skip

    digest = corpus_digest(manifest)  # by content: the same rows wherever they are stored
    changes = relaunch_changes(cfg, trajectory(cfg, digest))  # refuses a changed course

    uri = run_id = None
    if cfg.tracking.enabled:
        uri, run_id = open_tracking(cfg, corpus_dir, manifest, plan.to_dict())
        record_course_changes(uri, run_id, changes)
    spec = WorkerSpec(
        cfg.model_dump(), corpus_dir, cfg.run_uri, uri, run_id, weights, data_digest=digest
    )
    return launch(cfg, spec, callbacks=callbacks)


def record_course_changes(uri: str, run_id: str, changes: list[str]) -> None:
    """The changes `train.allow_changes` let a relaunch make, said on the console and kept
    in the MLflow run's tag `llamaray.course_changes` (each launch's changes appended)."""
    if not changes:
        return
    from llamaray import tracking

    for change in changes:
        log.info(f"relaunch changes the run's course, as train.allow_changes permits: {change}")
    client = tracking.client(uri)
    earlier = client.get_run(run_id).data.tags.get(COURSE_TAG)
    client.set_tag(run_id, COURSE_TAG, "; ".join(([earlier] if earlier else []) + changes))


COURSE_TAG = "llamaray.course_changes"


CONTROLLER_POLL_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
CONTROLLER_POLL_S = "0.5"
HEALTH_CHECK_TIMEOUT_ENV = "RAY_TRAIN_WORKER_HEALTH_CHECK_TIMEOUT_S"
REPORT_BARRIER_TIMEOUT_ENV = "RAY_TRAIN_COLLECTIVE_TIMEOUT_S"
COLLECTIVE_TIMEOUT_S = 1800.0  # torch's default process-group timeout


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

    from llamaray.orchestrate.failure_notes import FailureNotes
    from llamaray.orchestrate.ray_worker import train_loop_per_worker
    from llamaray.storage import storage_location

    uri, run_id = spec.tracking_uri, spec.mlflow_run_id
    # Ray Train's controller acts on the workers' reports (a checkpoint to register, the end
    # of the run) once per poll, every 2 s by default, and a reporting worker waits for it.
    # A 6-step debug run on 2 CPU workers took 45-49 s at 2 s and 35 s at 0.5 s: a poll is
    # one cheap actor call per worker. Trainer.fit passes the driver's value to the
    # controller; one set by the user (or the job's runtime env) wins.
    os.environ.setdefault(CONTROLLER_POLL_ENV, CONTROLLER_POLL_S)
    # A worker that stops answering (hung, frozen node) is declared dead by the controller's
    # health check after train.hang_timeout_s, naming it; the controller then kills the
    # group, peers blocked on the hung one included, and max_failures restarts it.
    # Collectives (the peers' all-reduces, the barrier in ray.train.report, which has none
    # by default) give up later, at torch's 30 minutes or twice the hang timeout, so that
    # the hung worker is the one named and a long legitimate wait (rank 0 exporting the
    # model, a slow upload) is not cut short. The config owns these: set at every launch.
    hang = cfg.train.hang_timeout_s
    collective = max(COLLECTIVE_TIMEOUT_S, 2 * hang)
    os.environ[HEALTH_CHECK_TIMEOUT_ENV] = f"{hang:g}"
    os.environ[REPORT_BARRIER_TIMEOUT_ENV] = f"{collective:g}"
    use_gpu = cfg.train.device == "cuda" or (cfg.train.device == "auto" and _cluster_has_gpus())
    resources = {"CPU": cfg.train.cpus_per_worker} | ({"GPU": 1} if use_gpu else {})
    # s3:// gets our S3 filesystem (endpoint, region, retries, credentials: llamaray.storage).
    location, location_fs = storage_location(cfg.storage_path)
    shown = cfg.storage_path.rstrip("/") if location_fs is not None else location
    trainer = TorchTrainer(
        train_loop or train_loop_per_worker,
        train_loop_config=asdict(spec),
        torch_config=TorchConfig(
            backend="nccl" if use_gpu else "gloo", timeout_s=math.ceil(collective)
        ),
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.train.num_workers,
            use_gpu=use_gpu,
            resources_per_worker=resources,
            accelerator_type=cfg.train.accelerator_type,
        ),
        run_config=ray.train.RunConfig(
            name=cfg.name,
            storage_path=location,
            storage_filesystem=location_fs,
            failure_config=ray.train.FailureConfig(max_failures=cfg.train.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints),
            callbacks=[*callbacks, FailureNotes(hang, uri, run_id)],
            # Ray Train's INFO lines repeat every report's metrics per worker; the workers'
            # own progress lines already say what happens.
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
        ),
    )
    log.info(
        f"launching {cfg.train.num_workers} worker(s) ({'GPU' if use_gpu else 'CPU'}); "
        f"checkpoints under {shown}/{cfg.name}"
    )
    try:
        result = trainer.fit()
    except Exception:
        if run_id:
            settle_status(uri, run_id, "FAILED")
        raise
    metrics = dict(result.metrics or {})
    stopped = metrics.get("stopped") or ""
    step = int(metrics.get("step", 0))
    exported = model_uri(spec.run_dir)
    finished = not stopped and step == cfg.train.steps and cfg.tracking.export_hf
    out = PretrainResult(
        cfg.name,
        step,
        metrics,
        result.checkpoint.path if result.checkpoint else None,
        spec.run_dir,
        exported if finished and storage.exists(exported) else None,
        uri,
        run_id,
    )
    if run_id:
        # Rank 0 sets the status; where the server was away at its end, it is set here.
        complete = not stopped and step == cfg.train.steps
        settle_status(uri, run_id, "FINISHED" if complete else "KILLED")
    if stopped:
        raise TrainingStopped(stopped)
    if out.step < cfg.train.steps:
        out.paused = (
            f"paused at step {out.step} of {cfg.train.steps}; relaunch {cfg.name!r} to go on"
        )
        log.info(out.paused)
    if out.model_uri and run_id:
        out.registered_model = registered_model(uri, run_id)
    if uri:
        log.info(f"tracked in MLflow run {run_id} ({redact(uri)}): {run_page(uri, run_id)}")
    return out


LOCAL_UI = "http://127.0.0.1:5000"
"""Where `make mlflow-ui` serves the local store's UI."""


def run_page(uri: str, run_id: str) -> str:
    """How to see the run in the MLflow UI: its page on the tracking server, or for a local
    store, `make mlflow-ui` and the page there."""
    from llamaray import tracking

    try:
        with tracking.bounded_requests():
            experiment = tracking.client(uri).get_run(run_id).info.experiment_id
    except Exception:
        return "the MLflow server does not answer"
    if uri.startswith(("http://", "https://")):
        return tracking.ui_link(uri, experiment, run_id)
    return f"run `make mlflow-ui`, then open {tracking.ui_link(LOCAL_UI, experiment, run_id)}"


def registered_model(uri: str, run_id: str) -> str | None:
    """`models:/<name>/<version>` of the newest registered version of the run's model (rank 0
    registered it), said with how to load it; None, quietly, when there is none."""
    from llamaray import tracking

    try:
        with tracking.bounded_requests():
            versions = tracking.registered_versions(uri, run_id)
    except Exception as err:
        log.warning(f"MLflow: the registered model is not known ({redact(str(err))[:300]})")
        return None
    if not versions:
        return None
    newest = versions[-1].registry_uri
    log.info(f"the model is registered as {newest}: mlflow.pyfunc.load_model({newest!r})")
    return newest


def settle_status(uri: str, run_id: str, status: str) -> None:
    """Mark the MLflow run `status` if it is still RUNNING (rank 0 could not, or died);
    a warning, never an error, when the server does not answer."""
    from llamaray import tracking

    try:
        with tracking.bounded_requests():
            client = tracking.client(uri)
            if client.get_run(run_id).info.status == "RUNNING":
                client.set_terminated(run_id, status)
    except Exception as err:
        reason = tracking.redact(str(err)).splitlines()[0][:300]
        log.warning(f"MLflow run {run_id}: status {status} not set ({reason})")


def _cluster_has_gpus() -> bool:
    import ray

    return ray.cluster_resources().get("GPU", 0) > 0
