"""MLflow tracking: one MLflow run per llamaray run name, resumed by every relaunch.

The one module that talks to MLflow's client: every other part (drivers, rank 0, sweeps,
evaluation, the planner, jobs/) opens, finds, nests, parameterizes and ends runs through
the functions here, and reaches the client for anything else through `client(uri)`.

The driver opens (or finds) the run and records what is known before training: the
resolved config as parameters, the config file, the corpus manifest, the mixture plan and
the tokenizer. Rank 0 then logs step metrics into the same run (with MLflow's system
metrics sampled in its process, on the machine doing the work) and, at the end, the loss
curve and the model in Hugging Face format. A relaunch of the same run name finds the run
by its `llamaray.run_name` tag, so resumed steps continue the same curves.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from pathlib import Path

RUN_NAME_TAG = "llamaray.run_name"
PARENT_TAG = "mlflow.parentRunId"
"""MLflow's own tag for nesting: the UI shows such a run under its parent."""


def tracking_uri(configured: str | None, output_dir: str | Path) -> str:
    """The config's URI, else $MLFLOW_TRACKING_URI, else a SQLite file under output_dir.

    The SQLite default is one machine's file: on a cluster whose nodes share no disk the
    driver refuses it (`llamaray.placement`). An `output_dir` on S3 has no such file, so
    there a URI must be given."""
    if configured:
        return configured
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    if "://" in os.fspath(output_dir):
        from llamaray.config import ConfigError

        raise ConfigError(
            f"tracking.uri: output_dir {output_dir} is not a local folder, so the default "
            "SQLite store cannot live there; set tracking.uri (or MLFLOW_TRACKING_URI) to an "
            "MLflow server, e.g. http://<mlflow-server>:5000"
        )
    return f"sqlite:///{Path(output_dir).resolve() / 'mlflow.db'}"


def flatten(tree: dict, prefix: str = "") -> dict[str, str]:
    """{"train": {"steps": 10}} -> {"train.steps": "10"}: MLflow params are flat strings."""
    out: dict[str, str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, name + "."))
        else:
            out[name] = str(value)[:6000]  # MLflow's limit on a param value
    return out


def client(uri: str):
    """MLflow's client for the store at `uri` (the only place one is built)."""
    from mlflow.tracking import MlflowClient

    return MlflowClient(uri)


def find_run(uri: str, experiment: str, run_name: str, status: str | None = None) -> str | None:
    """The newest MLflow run tagged with `run_name` in `experiment` (with `status`, e.g.
    FINISHED, when given), or None; never creates anything."""
    mlflow = client(uri)
    found = mlflow.get_experiment_by_name(experiment)
    if found is None:
        return None
    query = f"tags.`{RUN_NAME_TAG}` = '{run_name}'"
    if status:
        query += f" and attributes.status = '{status}'"
    runs = mlflow.search_runs(
        [found.experiment_id],
        filter_string=query,
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return runs[0].info.run_id if runs else None


def open_run(
    uri: str,
    experiment: str,
    run_name: str,
    artifact_root: str | Path | None = None,
    parent_run_id: str | None = None,
) -> tuple[str, bool]:
    """Find the MLflow run tagged with `run_name` in `experiment`, or create it (nested
    under `parent_run_id` when given: MLflow's `mlflow.parentRunId` tag).

    Returns (run_id, created). A new experiment on a file or SQLite store keeps its
    artifacts under `artifact_root` (default: next to the database).
    """
    existing = find_run(uri, experiment, run_name)
    if existing:
        return existing, False
    mlflow = client(uri)
    found = mlflow.get_experiment_by_name(experiment)
    if found is None:
        location = None
        if uri.startswith("sqlite:") or uri.startswith("file:"):
            root = artifact_root or Path(uri.split(":///", 1)[-1]).parent / "mlartifacts"
            location = Path(root).resolve().as_uri()
        experiment_id = mlflow.create_experiment(experiment, artifact_location=location)
    else:
        experiment_id = found.experiment_id
    tags = {RUN_NAME_TAG: run_name}
    if parent_run_id:
        tags[PARENT_TAG] = parent_run_id
    run = mlflow.create_run(experiment_id, run_name=run_name, tags=tags)
    return run.info.run_id, True


def log_params(uri: str, run_id: str, params: dict[str, str]) -> None:
    """Log `params` (flat strings, see `flatten`) in name order, 100 per request (MLflow's
    limit per batch)."""
    from mlflow.entities import Param

    items = sorted(params.items())
    mlflow = client(uri)
    for i in range(0, len(items), 100):
        mlflow.log_batch(run_id, params=[Param(k, v) for k, v in items[i : i + 100]])


def log_metrics(uri: str, run_id: str, metrics: dict[str, float], step: int) -> None:
    """Log `metrics` at `step` straight into the store, leaving the run's status as is."""
    _log_metrics(client(uri), run_id, metrics, step)


def _log_metrics(mlflow, run_id: str, metrics: dict[str, float], step: int) -> None:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    batch = [Metric(k, float(v), now, step) for k, v in metrics.items() if v is not None]
    if batch:
        mlflow.log_batch(run_id, metrics=batch)


def metric_history(uri: str, run_id: str, key: str) -> list:
    """Every logged value of `key` (MLflow `Metric`s: step, value, timestamp)."""
    return client(uri).get_metric_history(run_id, key)


def end_run(uri: str, run_id: str, status: str = "FINISHED") -> None:
    """Mark the run ended with `status` (FINISHED, FAILED, KILLED)."""
    client(uri).set_terminated(run_id, status)


class MetricLogger:
    """Rank 0's handle on the run: batched metric writes, system metrics, artifacts."""

    def __init__(self, uri: str, run_id: str, system_metrics: bool = True):
        import mlflow

        self.client = client(uri)
        self.run_id = run_id
        self._mlflow = mlflow
        self._active = False
        if system_metrics:
            # System metrics are sampled by a thread bound to the active run of this process.
            mlflow.set_tracking_uri(uri)
            mlflow.start_run(run_id=run_id, log_system_metrics=True)
            self._active = True
        else:
            self.client.update_run(run_id, status="RUNNING")

    def log(self, metrics: dict[str, float], step: int) -> None:
        _log_metrics(self.client, self.run_id, metrics, step)  # one client for the run

    def artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        path = Path(path)
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path)
        else:
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def finish(self, status: str = "FINISHED") -> None:
        if self._active:
            self._mlflow.end_run(status=status)
            self._active = False
        else:
            self.client.set_terminated(self.run_id, status)


def loss_curve_png(history: Iterable[dict], path: str | Path, title: str = "") -> Path:
    """Training loss (and validation loss where measured) against step, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")  # no display on workers
    import matplotlib.pyplot as plt

    history = list(history)
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    steps = [h["step"] for h in history if "loss" in h]
    ax.plot(steps, [h["loss"] for h in history if "loss" in h], label="train loss", lw=1)
    val = [(h["step"], h["val_loss"]) for h in history if h.get("val_loss") is not None]
    if val:
        ax.plot(*zip(*val, strict=True), "o-", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path
