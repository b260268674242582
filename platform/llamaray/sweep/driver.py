"""`llamaray sweep`: learning rate x batch size sweeps on Ray Tune, with ASHA early stopping.

    llamaray sweep --config jobs/configs/sweep-demo.yaml
    ray job submit --runtime-env jobs/runtime_env.yaml -- python jobs/sweep.py --config ...

The driver prepares (or reuses) the corpus once, so trials never prepare it concurrently;
opens the sweep's MLflow run (the parent); then runs a Ray Tune `Tuner` whose trials each
launch one pretraining run on Ray Train (`trial.run_trial`). ASHA compares trials by
validation loss at its rungs and stops the worse ones. At the end every trial's MLflow
run (a child of the parent) is marked with how it ended, and the parent gets the summary
table, a plot of loss against LR per batch size, and `best.yaml`, the best trial's config
ready to train.

Resuming: the Tune experiment lives at `<storage>/<sweep name>`. Relaunching the same
sweep finds it (`Tuner.can_restore`) and restores it: finished trials stay finished,
unfinished ones start again under the same run name and so resume their pretraining
checkpoints and their MLflow runs. ASHA's rungs are restored with it (`rungs.py`), so the
resumed sweep stops the trials the first driver would have stopped.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from llamaray import storage
from llamaray.config import ConfigError, RunConfig
from llamaray.console import logger
from llamaray.storage import S3_MAX_ATTEMPTS, S3Storage
from llamaray.sweep.config import (
    SearchSpace,
    SweepConfig,
    SweepFile,
    load_sweep_config,
    planned_trials,
    resolve_asha,
    resolve_space,
    search_algorithm,
)
from llamaray.sweep.report import (
    FAILED,
    STOPPED_EARLY,
    TrialOutcome,
    best_config,
    best_trial,
    classify,
    loss_vs_lr_png,
    summary_csv,
    summary_markdown,
)
from llamaray.tracking import redact

log = logger()  # the drivers' lines: [llamaray] ...

SWEEP_TAG = "llamaray.sweep"
"""On the parent and every child: the sweep's name."""
CONFIG_HASH_TAG = "llamaray.sweep.config_hash"
STOPPED_EARLY_TAG = "llamaray.sweep.stopped_early"
TRIAL_DRIVER_MEMORY = 512 * 2**20
"""What a trial reserves for itself: it only drives a Train run (the workers reserve the
CPUs and GPUs), but Tune cannot place a trial that asks for nothing, and memory is what
its process really uses. Reserving a CPU instead would take a core from the workers."""


@dataclass
class SweepResult:
    name: str
    outcomes: list[TrialOutcome]
    best: TrialOutcome | None
    best_yaml: str | None
    """`<output_dir>/sweeps/<name>/best.yaml` (a local path or s3://; also in MLflow):
    `llamaray train --config` it."""
    out_dir: str
    tracking_uri: str
    parent_run_id: str
    resumed: bool


def run_sweep(run: RunConfig, sweep: SweepConfig) -> SweepResult:
    """Run (or resume) the sweep `run.name` on the Ray cluster and report it in MLflow.

    >>> run, sweep = load_sweep_config("jobs/configs/sweep-demo.yaml")  # doctest: +SKIP
    >>> result = run_sweep(run, sweep)  # doctest: +SKIP
    >>> result.best_yaml.parts[-3:]  # doctest: +SKIP
    ('sweeps', 'sweep-demo', 'best.yaml')
    """
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    from llamaray.data.packed_corpus import CorpusRows
    from llamaray.orchestrate.pretrain import corpus_for
    from llamaray.placement import require_run_shared_state
    from llamaray.ray_session import start_ray
    from llamaray.sweep.rungs import KeepRungs
    from llamaray.sweep.trial import ProgressLines, run_trial
    from llamaray.tracking import require_tracking, tracking_uri

    space, asha = resolve_space(run, sweep), resolve_asha(run, sweep)
    uri = _absolute_sqlite(tracking_uri(run.tracking.uri, run.output_dir))
    require_tracking(uri)  # the sweep's run is opened after the corpus: said now, before Ray
    start_ray()
    # Trials run on any node: their corpus, checkpoints, Tune's experiment state and the
    # tracking store must be where every node reads them (s3://, an MLflow server).
    require_run_shared_state(run)
    corpus = corpus_for(run)  # once, here: trials never prepare the corpus concurrently
    require_validation_rows(run, CorpusRows.open(corpus).rows_per_source("validation"), corpus)
    parent_id = open_parent(run, sweep, space, uri)
    base = trial_base(run, corpus, uri)

    storage, storage_fs = sweep_state_location(base.storage_path)
    experiment_path = f"{storage.rstrip('/')}/{run.name}"
    trainable = tune.with_resources(
        tune.with_parameters(
            run_trial,
            base=base.model_dump(),
            sweep_name=run.name,
            parent_run_id=parent_id,
            last_step=asha.max_t,
        ),
        {"memory": TRIAL_DRIVER_MEMORY},
    )
    resumed = tune.Tuner.can_restore(experiment_path, storage_filesystem=storage_fs)
    if resumed:
        log.info(
            f"sweep {run.name}: resuming {experiment_path}: finished trials are kept, "
            "unfinished ones resume from their checkpoints"
        )
        tuner = tune.Tuner.restore(
            experiment_path,
            trainable,
            resume_unfinished=True,
            resume_errored=True,
            storage_filesystem=storage_fs,
        )
    else:
        concurrency = _concurrency(run, sweep, space, ray)
        log.info(f"sweep {run.name}: {space.n_trials} trial(s); " + _describe(space, asha))
        scheduler = ASHAScheduler(
            time_attr="step",
            max_t=asha.max_t,
            grace_period=asha.grace_period,
            reduction_factor=asha.reduction_factor,
        )
        tuner = tune.Tuner(
            trainable,
            param_space=space.param_space(),
            tune_config=tune.TuneConfig(
                metric="val_loss",
                mode="min",
                num_samples=space.num_samples,
                # The generator itself limits concurrency: Tune ignores max_concurrent_trials
                # next to a BasicVariantGenerator passed as search_alg (which we need for
                # its seed).
                search_alg=search_algorithm(space, concurrency),
                scheduler=scheduler,
                # Never reused: ending a trial's actor is what ends its Ray Train run.
                reuse_actors=False,
            ),
            run_config=tune.RunConfig(
                name=run.name,
                storage_path=storage,
                storage_filesystem=storage_fs,
                # KeepRungs: Tune does not save ASHA's rungs with the experiment (rungs.py).
                callbacks=[ProgressLines(run.name, asha.max_t), KeepRungs(scheduler)],
                verbose=0,  # ProgressLines says what happens, one line per event
            ),
        )
    grid = tuner.fit()
    outcomes = collect_outcomes(grid, run, asha.max_t, uri)
    return report_sweep(run, outcomes, uri, parent_id, corpus, resumed)


def sweep_state_location(path: str):
    """(storage_path, storage_filesystem) for Ray Tune's own state of the sweep (tuner.pkl,
    experiment_state-*.json, the trials' folders): `storage.storage_location`, except that an
    S3 filesystem is a `TuneStateS3`, which pickles with no credentials."""
    from llamaray.storage import storage_location

    location, fs = storage_location(path)
    if isinstance(fs, S3Storage):
        fs = TuneStateS3.from_env(fs.max_attempts)  # the same environment, read the same way
    return location, fs


class TuneStateS3(S3Storage):
    """The S3 filesystem given to Ray Tune: `S3Storage` (endpoint, region, retries), but its
    pickled form holds no credentials, only those settings.

    Tune persists the filesystem it is given: pickled in `tuner.pkl` and, for every trial,
    in `experiment_state-*.json`, both in the sweep's folder in S3, where whoever can read
    the bucket can read them, for as long as the sweep is kept. `S3Storage` carries the
    driver's static keys from its environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY) in
    its pickle, so that Ray Train's workers on nodes without credentials reach S3; here that
    would store the keys in the bucket. So each process that unpickles this one (a trial on
    any node, a driver restoring the sweep) signs with its own AWS chain: its environment,
    instance profile or web identity. The trade-off: a driver that joins a cluster whose
    nodes have no credentials of their own (static keys only in the driver's shell) cannot
    run a sweep on S3 until the nodes get some, e.g. an instance profile, or
    `ray job submit --runtime-env-json '{"env_vars": {"AWS_ACCESS_KEY_ID": ...}}'`, a choice
    the operator makes knowing the job's runtime env is visible in the cluster's job
    records. Each trial's own Ray Train run still hands its workers the trial's keys as
    `S3Storage` does (in memory, never persisted by Ray Train). See docs/sweeps.md."""

    def __init__(self, endpoint=None, region=None, max_attempts: int = S3_MAX_ATTEMPTS):
        super().__init__(endpoint, region, max_attempts)
        self._public = (endpoint, region, max_attempts)

    def __reduce__(self):
        return (TuneStateS3, self._public)


def _concurrency(run: RunConfig, sweep: SweepConfig, space: SearchSpace, ray) -> int:
    """Trials at once (`config.sweep_concurrency`), said on the console."""
    from llamaray.sweep.config import sweep_concurrency

    now = ray.cluster_resources() if not sweep.max_concurrent_trials else {}
    maximum = None if sweep.max_concurrent_trials else configured_maximum()
    trials, how = sweep_concurrency(run, space.n_trials, sweep.max_concurrent_trials, now, maximum)
    log.info(f"sweep {run.name}: {how}")
    return trials


def configured_maximum() -> dict[str, float] | None:
    """The resources the cluster may grow to, as its autoscaler publishes them in the GCS
    (the cluster config Ray Data also reads: node groups x their max count); None when no
    autoscaler published one (a fixed cluster, a local one) or this Ray cannot say."""
    try:
        from ray._private.state import state

        found = state.get_max_resources_from_cluster_config()
    except Exception:  # a private API of Ray: its absence must not stop a sweep
        return None
    return {k: float(v) for k, v in found.items()} if found else None


def _describe(space: SearchSpace, asha) -> str:
    lr = (
        "lr " + ", ".join(f"{v:.3g}" for v in space.lr_values)
        if space.lr_values
        else f"lr log-uniform in [{space.lr_min:.3g}, {space.lr_max:.3g}]"
    )
    return (
        f"{lr}; batch tokens {', '.join(map(str, space.batch_tokens))}; ASHA compares at "
        f"steps {', '.join(map(str, asha.rungs())) or '(none)'}, trials train to step {asha.max_t}"
    )


def _absolute_sqlite(uri: str) -> str:
    """A relative SQLite path made absolute: trials run in other working directories."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri[len(prefix) :].startswith("/"):
        return prefix + str(Path(uri[len(prefix) :]).resolve())
    return uri


def _local_absolute(path: str | None) -> str | None:
    if path is None or "://" in path:
        return path
    return str(Path(path).resolve())


def require_validation_rows(run: RunConfig, held_out: dict[str, int], corpus: str) -> None:
    """ASHA compares trials by val_loss, computed on the corpus's held-out rows: with none,
    no trial reports it and Tune's scheduler fails in the middle of the sweep. Checked
    before the sweep's run or any trial starts. `held_out`: validation rows per source
    (`CorpusRows.rows_per_source("validation")`).

    >>> from llamaray.config import load_config
    >>> run = load_config(None, ["name=s", "data.corpus=c", "model.preset=debug",
    ...                          "train.seq_len=64"])
    >>> require_validation_rows(run, {"web": 1, "code": 0}, "c")  # passes
    >>> require_validation_rows(run, {"web": 0, "code": 0}, "c")
    Traceback (most recent call last):
    ...
    llamaray.config.ConfigError: data.corpus: c holds out no rows (no validation split), ...
    """
    if any(held_out.values()):
        return
    field = "data.corpus" if run.data.corpus else "data.prepare.validation_fraction"
    raise ConfigError(
        f"{field}: {corpus} holds out no rows (no validation split), so no trial can report "
        "the val_loss ASHA compares trials by; prepare the corpus with "
        "data.prepare.validation_fraction > 0 (e.g. 0.05) and enough documents to hold some out"
    )


def trial_base(run: RunConfig, corpus: str, uri: str) -> RunConfig:
    """The run every trial starts from: local paths absolute (a trial's working directory
    is its Tune trial folder), the prepared corpus named, the tracking URI fixed."""
    doc = run.model_dump()
    doc["output_dir"] = _local_absolute(run.output_dir)
    doc["storage"] = _local_absolute(run.storage_path)
    doc["tokenizer"]["path"] = _local_absolute(run.tokenizer.path)
    doc["data"]["corpus"] = _local_absolute(corpus)
    doc["tracking"]["uri"] = uri
    return RunConfig.model_validate(doc)


def config_hash(run: RunConfig, sweep: SweepConfig) -> str:
    """What decides a sweep's trials; a resumed sweep must have the same. The concurrency
    is left out: a restored sweep keeps the one it started with."""
    doc = {"run": run.model_dump(), "sweep": sweep.model_dump(exclude={"max_concurrent_trials"})}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]


def open_parent(run: RunConfig, sweep: SweepConfig, space: SearchSpace, uri: str) -> str:
    """Find or create the sweep's MLflow run (named like the sweep); refuse to resume a
    sweep whose config changed, since its restored trials would not match it."""
    from llamaray import tracking

    run_id, created = tracking.open_run(uri, run.tracking.experiment, run.name)
    client = tracking.client(uri)
    digest = config_hash(run, sweep)
    if created:
        # Tags first: they mark the run as this sweep's if the driver dies right after.
        client.set_tag(run_id, CONFIG_HASH_TAG, digest)
        client.set_tag(run_id, SWEEP_TAG, run.name)
        asha = resolve_asha(run, sweep)
        params = space.as_params() | {
            "sweep.asha.grace_period": str(asha.grace_period),
            "sweep.asha.reduction_factor": str(asha.reduction_factor),
            "sweep.asha.max_t": str(asha.max_t),
            "model.preset": run.model.preset,
            "train.steps": str(run.train.steps),
            "train.seq_len": str(run.train.seq_len),
            "train.num_workers": str(run.train.num_workers),
        }
        tracking.log_params(uri, run_id, params)
        doc = SweepFile.model_validate(run.model_dump() | {"sweep": sweep.model_dump()})
        client.log_text(run_id, redact(doc.to_yaml()), "sweep.yaml")
        return run_id
    previous = client.get_run(run_id).data.tags.get(CONFIG_HASH_TAG)
    if previous is None:
        raise ConfigError(
            f"name: MLflow experiment {run.tracking.experiment!r} has a run named "
            f"{run.name!r} that is not a sweep; give the sweep another name"
        )
    if previous != digest:
        raise ConfigError(
            f"sweep {run.name!r} was started with another config (MLflow run {run_id}); "
            "relaunch it unchanged to resume it, or give the new sweep another name"
        )
    client.update_run(run_id, status="RUNNING")
    log.info(f"sweep {run.name}: continuing its MLflow run {run_id}")
    return run_id


def collect_outcomes(grid, run: RunConfig, last_step: int, uri: str) -> list[TrialOutcome]:
    """Each trial's outcome from Tune's results, with its MLflow child run."""
    from llamaray.tracking import find_run

    outcomes = []
    for result in grid:
        metrics = result.metrics or {}
        trial_id = metrics["trial_id"]
        name = f"{run.name}-{trial_id}"
        step, val_loss = int(metrics.get("step", 0)), metrics.get("val_loss")
        error = f"{type(result.error).__name__}: {result.error}" if result.error else None
        outcomes.append(
            TrialOutcome(
                trial_id=trial_id,
                name=name,
                lr=float(result.config["lr"]),
                batch_tokens=int(result.config["batch_tokens"]),
                step=step,
                last_step=last_step,
                val_loss=None if val_loss is None else float(val_loss),
                status=classify(step, last_step, val_loss, error),
                error=error,
                mlflow_run_id=find_run(uri, run.tracking.experiment, name),
            )
        )
    return outcomes


def report_sweep(
    run: RunConfig,
    outcomes: list[TrialOutcome],
    uri: str,
    parent_id: str,
    corpus: str,
    resumed: bool,
) -> SweepResult:
    """Mark each child run with how its trial ended; log the summary, the plot and
    best.yaml on the parent; write them under `<output_dir>/sweeps/<name>/`."""
    from llamaray.tracking import client as mlflow_client

    client = mlflow_client(uri)
    for o in outcomes:
        if o.mlflow_run_id is None:
            continue
        client.set_tag(o.mlflow_run_id, SWEEP_TAG, run.name)
        client.set_tag(o.mlflow_run_id, "llamaray.sweep.status", o.status)
        # The last step trained: for a stopped trial, a step or two past ASHA's decision
        # may have run before Tune ended its processes.
        trained = client.get_metric_history(o.mlflow_run_id, "loss")
        client.set_tag(
            o.mlflow_run_id,
            "llamaray.sweep.step_reached",
            str(max((m.step for m in trained), default=0)),
        )
        if o.val_loss is not None:
            client.log_metric(o.mlflow_run_id, "final_val_loss", o.val_loss, step=o.step)
        if o.status == STOPPED_EARLY:
            client.set_tag(o.mlflow_run_id, STOPPED_EARLY_TAG, "true")
            client.set_tag(o.mlflow_run_id, "llamaray.sweep.stopped_at_step", str(o.step))
            # The worker processes were ended by Tune, so nobody closed the run.
            client.set_terminated(o.mlflow_run_id, "KILLED")
        elif o.status == FAILED:
            client.set_terminated(o.mlflow_run_id, "FAILED")

    # Written here, logged to MLflow, and put under output_dir through the storage layer
    # (local or s3://): this driver may be on a node the user never logs into.
    root = run.output_dir if storage.is_s3(run.output_dir) else Path(run.output_dir).resolve()
    out_dir = storage.join(root, "sweeps", run.name)
    tmp = Path(tempfile.mkdtemp(prefix="llamaray-sweep-"))
    (tmp / "summary.csv").write_text(summary_csv(outcomes))
    (tmp / "summary.md").write_text(summary_markdown(outcomes))
    loss_vs_lr_png(outcomes, tmp / "loss_vs_lr.png", f"sweep {run.name}: validation loss")
    for name in ("summary.csv", "summary.md", "loss_vs_lr.png"):
        client.log_artifact(parent_id, str(tmp / name))
        storage.upload(tmp / name, storage.join(out_dir, name))

    counts = {s: sum(o.status == s for o in outcomes) for s in {o.status for o in outcomes}}
    for status, n in counts.items():
        client.log_metric(parent_id, "trials_" + status.replace(" ", "_"), n)
    best = best_trial(outcomes)
    best_yaml = None
    if best is not None:
        best_yaml = storage.join(out_dir, "best.yaml")
        # No credentials in a file kept in storage and MLflow: a tracking.uri that had some
        # is refused with the fix when best.yaml is trained (`tracking.tracking_uri`).
        (tmp / "best.yaml").write_text(redact(best_config(run, run.name, best, corpus).to_yaml()))
        client.log_artifact(parent_id, str(tmp / "best.yaml"))
        storage.upload(tmp / "best.yaml", best_yaml)
        client.log_metric(parent_id, "best_val_loss", best.val_loss)
        client.log_metric(parent_id, "best_lr", best.lr)
        client.log_metric(parent_id, "best_batch_tokens", best.batch_tokens)
        client.set_tag(parent_id, "llamaray.sweep.best_trial", best.name)
        if best.mlflow_run_id:
            client.set_tag(parent_id, "llamaray.sweep.best_run_id", best.mlflow_run_id)
    shutil.rmtree(tmp, ignore_errors=True)
    client.set_terminated(parent_id, "FINISHED" if best is not None else "FAILED")
    return SweepResult(run.name, outcomes, best, best_yaml, out_dir, uri, parent_id, resumed)


def print_result(result: SweepResult) -> None:
    print(summary_markdown(result.outcomes), end="")
    if result.best is None:
        print(f"sweep {result.name}: no trial trained its whole budget; see {result.out_dir}")
        return
    print(
        f"best: {result.best.name} (lr {result.best.lr:.4g}, {result.best.batch_tokens} "
        f"tokens/step) val_loss {result.best.val_loss:.4f}\n"
        f"train it: llamaray train --config {result.best_yaml}\n"
        f"MLflow: run {result.parent_run_id} in {redact(result.tracking_uri)} (make mlflow-ui)"
    )


def cmd_sweep(opts: argparse.Namespace) -> int:
    """`llamaray sweep`: exit 0 with a best trial, 1 when no trial finished, 2 on a bad
    config (raised as ConfigError for cli.main to print)."""
    run, sweep = load_sweep_config(opts.config, opts.overrides)  # before any cluster work
    if opts.print_config:
        doc = SweepFile.model_validate(run.model_dump() | {"sweep": sweep.model_dump()})
        space, asha = resolve_space(run, sweep), resolve_asha(run, sweep)
        print(redact(doc.to_yaml()), end="")
        print(f"# {space.n_trials} trials; {_describe(space, asha)}")
        for i, trial in enumerate(planned_trials(space)):
            print(f"#   trial {i}: lr {trial['lr']:.4g}, {trial['batch_tokens']} tokens/step")
        return 0
    result = run_sweep(run, sweep)
    print_result(result)
    return 0 if result.best is not None else 1


def add_sweep_parser(sub) -> None:
    """Register `llamaray sweep` on the CLI's subcommands."""
    p = sub.add_parser(
        "sweep",
        help="learning rate x batch size sweep on Ray Tune with ASHA (config + `sweep:`); "
        "relaunching a sweep name resumes it",
    )
    p.add_argument("--config", default=None, help="sweep YAML: a run config plus `sweep:`")
    p.add_argument("--print-config", action="store_true", help="print the resolved sweep, exit")
    p.add_argument("overrides", nargs="*", help="key.path=value, e.g. sweep.num_samples=8")
    p.set_defaults(func=cmd_sweep)
