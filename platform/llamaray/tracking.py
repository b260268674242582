"""MLflow tracking: one MLflow run per llamaray run name, resumed by every relaunch.

The one module that talks to MLflow's client: every other part (drivers, rank 0, sweeps,
evaluation, the planner, jobs/) opens, finds, nests, parameterizes and ends runs through
the functions here, and reaches the client for anything else through `client(uri)`.

The driver opens (or finds) the run and records what is known before training: the
resolved config as parameters, the config file, the corpus manifest, the mixture plan and
the tokenizer. Rank 0 then logs step metrics into the same run (with MLflow's system
metrics sampled in its process, on the machine doing the work) and, at the end, the loss
curve and the final model as an MLflow model, registered in the Model Registry
(`log_model`; the model itself is `llamaray.pyfunc`). The driver also records the corpus and
the mixture plan as the run's dataset inputs (`log_dataset`). A relaunch of the same run
name finds the run by its `llamaray.run_name` tag, so resumed steps continue the same
curves. Experiments are created as MLflow's model-training kind, and the UI links
llamaray prints open that view (`ui_link`).

An outage of the tracking server does not stop training (`MetricLogger`): rank 0 hands its
metrics to a background sender that keeps them (up to `OUTAGE_BUFFER_STEPS` steps) while
the server is away and sends them when it is back; the outage and the recovery are said
once each; the run's status is set when the server answers. The driver, which must find or
create the run, refuses to start when the server does not answer (`require_tracking`),
before any cluster work.

Secrets: a tracking URI may carry credentials (`http://user:password@host:5000`, a
`postgresql://user:password@host/db` backend). `redact` is the one function that removes
them from whatever is shown or recorded (console lines, MLflow params, config.yaml,
best.yaml, error messages); the URI itself only travels to the processes that log.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
import threading
import time
import warnings
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from llamaray.console import logger, quiet_mlflow_retries

RUN_NAME_TAG = "llamaray.run_name"
PARENT_TAG = "mlflow.parentRunId"
"""MLflow's own tag for nesting: the UI shows such a run under its parent."""


REDACTED = "***"

# `scheme://userinfo@`: everything between `//` and the last `@` of the authority (a
# password may hold a raw `@`), up to the first `/`, `?`, `#`, quote or space.
_USERINFO = re.compile(r"\b([A-Za-z][A-Za-z0-9+.-]*://)[^/?#\s'\"<>]*@")
# Query parameters that carry secrets (`?password=`, `&sslpassword=`, `X-Amz-Signature=`...).
_SECRET_QUERY = re.compile(
    r"(?i)([?&;][^=&#\s'\"]*(?:password|passwd|pwd|secret|token|signature|credential|apikey"
    r"|api_key|access_key)[^=&#\s'\"]*=)[^&#\s'\"]+"
)


def redact(text: str | None) -> str | None:
    """`text` (a URI, or any text holding URIs: an error message, a YAML file) with the
    credentials of every URI in it replaced by `***`: the user and password before the host,
    and the values of query parameters such as `password=` or `token=`. The one function
    for whatever is shown on the console or recorded (MLflow params, config.yaml, best.yaml).

    >>> redact("http://user:pa@ss@mlflow.internal:5000/path")
    'http://***@mlflow.internal:5000/path'
    >>> redact("postgresql://mlflow:secret@db:5432/mlflow?sslpassword=x&sslmode=require")
    'postgresql://***@db:5432/mlflow?sslpassword=***&sslmode=require'
    >>> redact("API request to http://u:p@h:5000/api/2.0/runs failed")
    'API request to http://***@h:5000/api/2.0/runs failed'
    >>> redact("sqlite:////runs/mlflow.db")
    'sqlite:////runs/mlflow.db'
    """
    if not text:
        return text
    return _SECRET_QUERY.sub(rf"\g<1>{REDACTED}", _USERINFO.sub(rf"\g<1>{REDACTED}@", text))


def tracking_uri(configured: str | None, output_dir: str | Path) -> str:
    """The config's URI, else $MLFLOW_TRACKING_URI, else a SQLite file under output_dir.

    The SQLite default is one machine's file: on a cluster whose nodes share no disk the
    driver refuses it (`llamaray.placement`). An `output_dir` on S3 has no such file, so
    there a URI must be given. A URI whose credentials were redacted (from a config.yaml or
    best.yaml that llamaray wrote) is refused: it would log in as the user `***`."""
    if configured and f"://{REDACTED}@" in configured:
        from llamaray.config import ConfigError

        raise ConfigError(
            f"tracking.uri: {configured} holds credentials that llamaray redacted when it "
            "recorded the config; give the URI with its credentials, or the URI without them "
            "and the user and password in MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"
        )
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
    """MLflow's client for the store at `uri` (the only place one is built).

    For a URI with credentials, MLflow's own "View run <name> at: <URI>/#/..." lines (printed
    to stdout as a run ends) are turned off in this process: they would print the password."""
    from mlflow.tracking import MlflowClient

    if redact(uri) != uri:
        os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
    return MlflowClient(uri)


HTTP_LIMITS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
}
"""MLflow's HTTP client, where llamaray must not wait long: 2 retries (after 0 s, then
2-3 s) and 10 s per request, instead of MLflow's defaults of 7 retries with backoff up to
about 4 minutes and 120 s per request. Rank 0's sender retries on its own schedule, and the
driver's check should say within seconds that the server does not answer. A value set in
the environment wins (the operator's choice)."""


@contextlib.contextmanager
def bounded_requests() -> Iterator[None]:
    """Within the block, this process's MLflow HTTP requests give up as `HTTP_LIMITS` says
    (MLflow reads these variables at every request); variables already set stay as set."""
    added = [name for name in HTTP_LIMITS if name not in os.environ]
    for name in added:
        os.environ[name] = HTTP_LIMITS[name]
    try:
        yield
    finally:
        for name in added:
            os.environ.pop(name, None)


def require_tracking(uri: str) -> None:
    """Fail fast, with the fix, when the MLflow server at `uri` does not answer: the driver
    calls this before any cluster work, since it needs the server to find or create the run
    (a relaunch continues the run it finds by name). Local stores (SQLite, files) are not
    checked: they are opened when used. Once training runs, an outage no longer stops it
    (`MetricLogger`)."""
    if not uri.startswith(("http://", "https://")):
        return
    try:
        with bounded_requests():
            client(uri).search_experiments(max_results=1)
    except Exception as err:
        from llamaray.config import ConfigError

        reason = redact(str(err)).splitlines()[0][:300]
        raise ConfigError(
            f"tracking.uri: the MLflow server at {redact(uri)} does not answer ({reason}); "
            "start it or correct tracking.uri (or MLFLOW_TRACKING_URI), or set "
            "tracking.enabled=false to train without MLflow"
        ) from None


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
        experiment_id = mlflow.create_experiment(
            experiment,
            artifact_location=location,
            tags={EXPERIMENT_KIND_TAG: MODEL_TRAINING_KIND},
        )
    else:
        experiment_id = found.experiment_id
        if EXPERIMENT_KIND_TAG not in found.tags:  # made before llamaray tagged, or by hand
            mlflow.set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND)
    tags = {RUN_NAME_TAG: run_name}
    if parent_run_id:
        tags[PARENT_TAG] = parent_run_id
    run = mlflow.create_run(experiment_id, run_name=run_name, tags=tags)
    return run.info.run_id, True


def log_params(uri: str, run_id: str, params: dict[str, str]) -> None:
    """Log `params` (flat strings, see `flatten`) in name order, 100 per request (MLflow's
    limit per batch), credentials redacted (`redact`): params are shown to anyone who can
    read the experiment."""
    from mlflow.entities import Param

    items = sorted((k, redact(v)) for k, v in params.items())
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


MODEL_NAME = "model"
"""The name of a run's MLflow model (its final model, logged by rank 0)."""
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING_KIND = "custom_model_development"
"""MLflow 3's kind for experiments whose runs train models (its UI's "Model training" view,
with runs, charts and the model registry) rather than GenAI apps (traces, evaluations).
Set on every experiment llamaray creates; earlier MLflow 3 UIs open an experiment in the
view its kind names, 3.17's in the view the browser chose (`ui_link` asks for it)."""


def ui_link(ui: str, experiment_id: str, run_id: str | None = None) -> str:
    """The MLflow UI's page of an experiment (or of one of its runs) at `ui` (the server's
    or `mlflow ui`'s address), in the UI's model-training view. MLflow 3.17's UI picks the
    view per browser (its GenAI / Model training switch, GenAI at first) and ignores the
    experiment's kind tag, so the link asks for the view itself."""
    page = f"experiments/{experiment_id}" + (f"/runs/{run_id}" if run_id else "")
    return f"{redact(ui.rstrip('/'))}/#/{page}?workflowType=machine_learning"


@dataclass
class RegisteredModel:
    """Where a logged model is: `model_uri` (`models:/m-...`, the logged model itself) and,
    when it was registered, `name` and `version` in the Model Registry."""

    model_uri: str
    model_id: str
    name: str | None = None
    version: str | None = None

    @property
    def registry_uri(self) -> str | None:
        """`models:/<name>/<version>`, what `mlflow.pyfunc.load_model` takes."""
        return f"models:/{self.name}/{self.version}" if self.name else None


def log_model(
    uri: str,
    run_id: str,
    folder: str | Path,
    registered_name: str | None = None,
    tags: dict[str, str] | None = None,
    step: int = 0,
) -> RegisteredModel:
    """Log the exported model `folder` (Hugging Face format with `tokenizer.model`) as the
    run's MLflow model `MODEL_NAME`: a pyfunc that generates text (`llamaray.pyfunc`), its
    weights the folder's files, copied as they are (never loaded into this process's
    memory), llamaray's code inside it. Registered as a new version of `registered_name` in
    the Model Registry when given (the registered model is created on first use), with
    `tags` on the logged model and the version. The run's model of `step` is logged once:
    when the run has one already (a finished run launched again), that one is returned."""
    import mlflow
    from mlflow.models import Model
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    from llamaray import pyfunc

    run = client(uri).get_run(run_id)
    for output in run.outputs.model_outputs if run.outputs else []:
        if output.step == step:  # a relaunch of a finished run: this step's model is logged
            return _already_logged(uri, run_id, output.model_id)
    experiment_id = run.info.experiment_id
    with (
        tempfile.TemporaryDirectory(prefix="llamaray-mlflow-model-") as tmp,
        _use_tracking_uri(uri),  # MLflow's model logging reads the global URI
        _env("MLFLOW_EXPERIMENT_ID", experiment_id),  # ... and experiment
        _env("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false"),  # bars in a worker's log
        warnings.catch_warnings(),
    ):
        # MLflow advises an input example and type hints on predict. An example would make it
        # load the model and generate while logging (the whole model in this process's
        # memory); the signature already says what goes in and out.
        warnings.filterwarnings("ignore", message=".*(input example|type hints).*")
        entry = Path(tmp) / "llamaray_model.py"
        entry.write_text(pyfunc.ENTRY_SCRIPT)
        info = Model.log(
            artifact_path=None,
            name=MODEL_NAME,
            flavor=mlflow.pyfunc,
            run_id=run_id,
            step=step,
            python_model=str(entry),
            artifacts={pyfunc.HF_ARTIFACT: str(folder)},
            code_paths=[pyfunc.code_path()],
            pip_requirements=pyfunc.requirements(),
            signature=pyfunc.signature(),
            registered_model_name=registered_name,
            tags=tags,
        )
    return RegisteredModel(
        info.model_uri,
        info.model_id,
        registered_name if info.registered_model_version else None,
        str(info.registered_model_version) if info.registered_model_version else None,
    )


def _already_logged(uri: str, run_id: str, model_id: str) -> RegisteredModel:
    """The logged model `model_id` of `run_id`, with its newest registered version if any."""
    versions = [m for m in registered_versions(uri, run_id) if m.model_id == model_id]
    if versions:
        return versions[-1]
    return RegisteredModel(f"models:/{model_id}", model_id)


def registered_versions(uri: str, run_id: str) -> list[RegisteredModel]:
    """The Model Registry's versions made from `run_id`'s models, oldest first."""
    versions = client(uri).search_model_versions(f"run_id = '{run_id}'")
    found = [
        RegisteredModel(v.source, v.source.removeprefix("models:/"), v.name, str(v.version))
        for v in versions
    ]
    return sorted(found, key=lambda m: (m.name or "", int(m.version or 0)))


DATASET_CONTEXT_TAG = "mlflow.data.context"  # MLflow's tag for what a run used a dataset for


def log_dataset(
    uri: str,
    run_id: str,
    *,
    name: str,
    digest: str,
    source: str,
    profile: dict,
    context: str,
    tensors: dict[str, tuple[str, tuple[int, ...]]] | None = None,
) -> None:
    """Record a dataset the run used as one of its MLflow inputs: `name` and `digest` (what
    the UI shows and compares runs by), `source` (where it is: a local path or s3:// URI),
    `profile` (a summary: sources, token counts), `tensors` (its columns: name -> numpy
    dtype and shape, -1 for any length) and `context` ("training", ...). Logging the same
    dataset again (a relaunch) adds nothing: MLflow keeps one input per name, digest and
    context."""
    import json

    import numpy as np
    from mlflow.entities import Dataset, DatasetInput, InputTag
    from mlflow.types.schema import Schema, TensorSpec

    schema = None
    if tensors:
        specs = [TensorSpec(np.dtype(t), shape, n) for n, (t, shape) in tensors.items()]
        schema = {"mlflow_colspec": Schema(specs).to_dict()}

    dataset = Dataset(
        name=name,
        digest=digest[:36],  # MLflow's limit
        source_type="s3" if source.startswith("s3://") else "local",
        source=json.dumps({"uri": redact(source)}),
        schema=json.dumps(schema) if schema else None,
        profile=json.dumps(profile),
    )
    tags = [InputTag(DATASET_CONTEXT_TAG, context)]
    client(uri).log_inputs(run_id, datasets=[DatasetInput(dataset, tags)])


def dataset_inputs(uri: str, run_id: str) -> list[tuple[str, str, str]]:
    """(name, digest, context) of each dataset the run recorded as an input."""
    inputs = client(uri).get_run(run_id).inputs
    found = []
    for entry in inputs.dataset_inputs if inputs else []:
        tags = {t.key: t.value for t in entry.tags}
        found.append((entry.dataset.name, entry.dataset.digest, tags.get(DATASET_CONTEXT_TAG)))
    return found


MODEL_UPLOAD_TIMEOUT_S = 3600
"""Seconds one HTTP request may take while rank 0 logs the final model: a weights file
(13 GB in a 7B model) goes up to the tracking server in one request, which the 10 s of
`HTTP_LIMITS` would cut off. Only where llamaray set that bound; one set by the operator
stands."""


@contextlib.contextmanager
def _patient_uploads() -> Iterator[None]:
    name = "MLFLOW_HTTP_REQUEST_TIMEOUT"
    if os.environ.get(name) != HTTP_LIMITS[name]:
        yield
        return
    with _env(name, str(MODEL_UPLOAD_TIMEOUT_S)):
        yield


@contextlib.contextmanager
def _env(name: str, value: str) -> Iterator[None]:
    before = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before


OUTAGE_BUFFER_STEPS = 10_000
"""Steps of metrics rank 0 keeps while the tracking server is away (about 15 numbers a step:
a few MB). Past it the oldest are dropped, counted and said."""
SEND_RETRY_S = (1.0, 30.0)
"""After a failed send, the sender waits 1 s, then twice as long each time, up to 30 s."""
SEND_INTERVAL_S = 1.0
"""The sender makes at most one request per interval, with every step queued meanwhile:
logging every step of a 0.1 s step costs one request a second, not ten (each is CPU time
in rank 0's process, taken from training where the cores are all busy). A flush, the end
of the run or a status to set sends at once."""
FLUSH_S = 60.0
"""At the end of a launch, how long rank 0 waits for its buffered metrics and the run's
status to reach the server before it gives up on them (counted and said)."""
DROPPED_TAG = "llamaray.tracking.dropped_steps"


class MetricLogger:
    """Rank 0's handle on the run: metrics sent in the background, system metrics,
    artifacts, the run's status. An outage of the tracking server never fails or holds up
    training: `log` only queues (see `_Sender`), and the other calls warn instead of raising.

    MLflow's HTTP requests in this process are bounded (`HTTP_LIMITS`) while the logger is
    open: everything MLflow does on rank 0 is on the training path."""

    def __init__(
        self,
        uri: str,
        run_id: str,
        system_metrics: bool = True,
        buffer_steps: int = OUTAGE_BUFFER_STEPS,
        flush_s: float = FLUSH_S,
    ):
        self._limits = contextlib.ExitStack()
        self._limits.enter_context(bounded_requests())
        quiet_mlflow_retries()  # the sender says an outage once, not urllib3 at every retry
        self.client = client(uri)
        self.uri = uri
        self.run_id = run_id
        self.flush_s = flush_s
        self._sender = _Sender(uri, run_id, buffer_steps)
        self._system = None
        try:
            self.client.update_run(run_id, status="RUNNING")
        except Exception as err:
            # The server is away as this process starts (a worker replaced during an
            # outage, say): train on; the status is set when the server is back.
            self._sender.outage(err, "no system metrics in this launch" if system_metrics else "")
            self._sender.set_status("RUNNING")
            return
        if system_metrics:
            # Sampled by MLflow's thread in this process, on the machine doing the work.
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            self._system = SystemMetricsMonitor(run_id, resume_logging=True, tracking_uri=uri)
            self._system.start()

    def log(self, metrics: dict[str, float], step: int) -> None:
        """Queue `metrics` at `step` for the sender; returns at once."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items() if v is not None]
        if batch:
            self._sender.put(batch)

    def flush(self, timeout: float | None = None) -> bool:
        """Wait (up to `timeout` s, default `flush_s`) until everything queued is sent;
        True when it was."""
        return self._sender.flush(self.flush_s if timeout is None else timeout)

    def unsent(self) -> list[dict]:
        """The steps of metrics not yet known to be stored, oldest first, as plain data
        (`{"step", "timestamp", "metrics"}` per logged step): what a checkpoint carries so
        that a process that dies before sending them loses none (`resend`)."""
        return [
            {"step": b[0].step, "timestamp": b[0].timestamp, "metrics": {m.key: m.value for m in b}}
            for b in self._sender.pending()
            if b
        ]

    def resend(self, carried: list[dict]) -> int:
        """Queue the steps of `carried` (a checkpoint's `unsent()`) that the store does not
        have; returns how many. The sender stores each key's steps in order, so a step is
        stored when it is at or below its key's latest stored step: one request tells.
        (Steps the sender dropped in a long outage or the server refused are already
        counted as lost; and a run name relaunched after its checkpoints were deleted
        keeps its MLflow run, whose later steps would make carried ones look stored.)
        When the server does not answer, every carried step is queued: a step may then be
        stored twice, which loses nothing."""
        if not carried:
            return 0
        latest: dict[str, int] = {}
        if not self._sender.down:
            try:
                run = self.client.get_run(self.run_id)
                # A run's latest value of each key is its highest step's.
                latest = {m.key: m.step for m in run.data.to_proto().metrics}
            except Exception as err:
                self._sender.outage(err, "the steps a checkpoint carried are all sent again")
        from mlflow.entities import Metric

        queued = 0
        for record in carried:
            step = int(record["step"])
            batch = [
                Metric(key, float(value), int(record["timestamp"]), step)
                for key, value in record["metrics"].items()
                if step > latest.get(key, -1)
            ]
            if batch:
                self._sender.put(batch)
                queued += 1
        if queued:
            logger("tracking").info(
                f"sending {queued} step(s) of metrics that the previous launch logged but had "
                "not sent when it ended (carried by the checkpoint)"
            )
        return queued

    def history(self, key: str) -> list:
        """Every value of `key` in the store (MLflow `Metric`s), or [] with a warning when
        the server does not answer."""
        if self._sender.down:
            return []
        try:
            return self.client.get_metric_history(self.run_id, key)
        except Exception as err:
            self._sender.outage(err, f"the stored history of {key} is not read")
            return []

    def artifact(self, path: str | Path, artifact_path: str | None = None) -> bool:
        """Log a file or folder; False, with a warning, when the server does not answer (the
        run's own storage keeps what training writes, e.g. the exported model)."""
        path = Path(path)
        where = f"{artifact_path}/{path.name}" if artifact_path else path.name
        if self._sender.down:
            logger("tracking").warning(f"MLflow is away: artifact {where} is not logged")
            return False
        try:
            if path.is_dir():
                self.client.log_artifacts(self.run_id, str(path), artifact_path)
            else:
                self.client.log_artifact(self.run_id, str(path), artifact_path)
        except Exception as err:
            self._sender.outage(err, f"artifact {where} is not logged")
            return False
        return True

    def model(
        self, folder: Path, registered_name: str | None, tags: dict[str, str], step: int
    ) -> RegisteredModel | None:
        """Log the exported model as the run's MLflow model and register it under
        `registered_name` (`log_model`); None, with a warning, when the server does not
        answer or refuses (the run's storage keeps the exported folder)."""
        if self._sender.down:
            logger("tracking").warning("MLflow is away: the model is not logged")
            return None
        try:
            with _patient_uploads():
                logged = log_model(self.uri, self.run_id, folder, registered_name, tags, step)
        except Exception as err:
            reason = redact(str(err)).splitlines()[0][:300] if str(err) else type(err).__name__
            logger("tracking").warning(
                f"the model was not logged to MLflow ({reason}); it is in the run's storage"
            )
            return None
        return logged  # the driver says where it is registered

    def finish(self, status: str = "FINISHED") -> None:
        """Stop system metrics, send what is queued and then the run's `status`, waiting up
        to `flush_s`; what could not be sent is counted and said. Never raises."""
        try:
            if self._system is not None:
                self._system.finish()  # its own last batch; MLflow logs its errors
                self._system = None
            self._sender.set_status(status)
            self._sender.close(self.flush_s, status)
        finally:
            self._limits.close()


class _Sender:
    """The thread that sends rank 0's metrics, oldest first, many steps per request (up to
    MLflow's 1000 metrics per batch). While the server does not answer, steps wait in a
    bounded queue (the oldest dropped past `capacity`, counted) and are sent when it is
    back; the outage and the recovery are said once each. A status to set waits beside
    them: RUNNING before the metrics, the final one after."""

    BATCH_METRICS = 1000  # MLflow's limit per log_batch request

    def __init__(self, uri: str, run_id: str, capacity: int):
        self.client = client(uri)  # its own: a client is not shared between threads
        self.run_id = run_id
        self.shown = redact(uri)
        self.capacity = max(1, capacity)
        self.dropped = 0
        self.down_since: float | None = None
        self._queue: deque[list] = deque()
        self._status: str | None = None
        self._busy = False
        self._inflight: list[list] = []  # the steps in the request under way
        self._closing = False
        self._hurry = 0  # flushes waiting: send without waiting for the interval
        self._next_send = 0.0
        self._cond = threading.Condition()
        self._closed = threading.Event()
        self._log = logger("tracking")
        self._thread = threading.Thread(target=self._run, name="llamaray-mlflow", daemon=True)
        self._thread.start()

    @property
    def down(self) -> bool:
        return self.down_since is not None

    def put(self, batch: list) -> None:
        with self._cond:
            self._queue.append(batch)
            self._trim()
            self._cond.notify_all()

    def pending(self) -> list[list]:
        """The steps not known to be stored, oldest first: the request under way (it may
        yet fail) and the queue."""
        with self._cond:
            return [*(self._inflight if self._busy else []), *self._queue]

    def set_status(self, status: str) -> None:
        with self._cond:
            self._status = status
            self._cond.notify_all()

    def flush(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        with self._cond:
            self._hurry += 1
            self._cond.notify_all()
            try:
                while self._queue or self._status or self._busy:
                    left = deadline - time.monotonic()
                    if left <= 0 or not self._thread.is_alive():
                        return False
                    self._cond.wait(left)
            finally:
                self._hurry -= 1
        return True

    def close(self, timeout: float, status: str) -> None:
        sent = self.flush(timeout)
        with self._cond:
            self._closing = True
            self._closed.set()
            left = len(self._queue) + (len(self._inflight) if self._busy else 0)
            self.dropped += left
            self._queue.clear()
            unset = self._status is not None
            self._status = None
            self._cond.notify_all()
        if not sent:
            self._log.warning(
                f"MLflow at {self.shown} did not answer within {timeout:.0f} s of the end: "
                f"{left} step(s) of metrics not logged"
                + (f", the run's status {status} not set" if unset else "")
                + "; the checkpoints and the run's storage are complete"
            )
        if self.dropped:
            self._log.warning(f"{self.dropped} step(s) of metrics were dropped during outages")
            if sent:
                with contextlib.suppress(Exception):
                    self.client.set_tag(self.run_id, DROPPED_TAG, str(self.dropped))

    def outage(self, err: BaseException, consequence: str = "") -> None:
        """Say, once per outage, that the server does not answer and what training does."""
        with self._cond:
            first = self.down_since is None
            if first:
                self.down_since = time.monotonic()
        if first:
            reason = redact(str(err)).splitlines()[0][:300] if str(err) else type(err).__name__
            self._log.warning(
                f"MLflow at {self.shown} does not answer ({reason}); training goes on, its "
                f"metrics are kept (up to {self.capacity} steps) and sent when the server is "
                "back" + (f"; {consequence}" if consequence else "")
            )
        elif consequence:
            self._log.warning(f"MLflow is away: {consequence}")

    def _trim(self) -> None:
        """Drop the oldest steps past capacity (the caller holds the lock)."""
        while len(self._queue) > self.capacity:
            self._queue.popleft()
            self.dropped += 1
            if self.dropped == 1:
                self._log.warning(
                    f"MLflow has been away for {self.capacity} logged steps: dropping the "
                    "oldest steps' metrics from now on (counted at the end)"
                )

    def _run(self) -> None:
        wait = SEND_RETRY_S[0]
        while True:
            with self._cond:
                while not (self._queue or self._status or self._closing):
                    self._cond.wait()
                # Steps queue up until the interval since the last request has passed.
                while not (self._closing or self._hurry or self._status):
                    left = self._next_send - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
                if self._closing:
                    return
                status = self._status
                early = status == "RUNNING" or not self._queue  # RUNNING first, the end last
                chunk: list[list] = []
                count = 0
                while self._queue and count + len(self._queue[0]) <= self.BATCH_METRICS:
                    count += len(self._queue[0])
                    chunk.append(self._queue.popleft())
                if not chunk and self._queue:  # one step past the limit: sent alone
                    chunk.append(self._queue.popleft())
                self._busy, self._inflight = True, chunk
            try:
                if status and early:
                    self._send_status(status)
                if chunk:
                    self.client.log_batch(self.run_id, metrics=[m for b in chunk for m in b])
                if status and not early and not self._queue:
                    self._send_status(status)
            except Exception as err:
                refused = _is_refusal(err)  # the server answered no: retrying will not help
                with self._cond:
                    if refused:
                        self.dropped += len(chunk)
                        if self._status == status:
                            self._status = None
                    elif not self._closing:  # after close, `close` counted them
                        self._queue.extendleft(reversed(chunk))  # back in front, in order
                        self._trim()
                    self._busy = False
                    self._cond.notify_all()
                if refused:
                    self._log.warning(
                        f"MLflow refused {len(chunk)} step(s) of metrics"
                        + (f" or the status {status}" if status else "")
                        + f": {redact(str(err)).splitlines()[0][:300]}"
                    )
                    continue
                self.outage(err)
                self._closed.wait(wait)  # new steps do not cut the wait short; close does
                wait = min(wait * 2, SEND_RETRY_S[1])
                continue
            wait = SEND_RETRY_S[0]
            with self._cond:
                self._next_send = time.monotonic() + SEND_INTERVAL_S
                if status and self._status == status and (early or not self._queue):
                    self._status = None
                self._busy = False
                backlog = len(self._queue)
                recovered = self.down_since
                self.down_since = None
                self._cond.notify_all()
            if recovered is not None:
                self._log.info(
                    f"MLflow at {self.shown} answers again after "
                    f"{time.monotonic() - recovered:.0f} s; sending the metrics kept meanwhile "
                    f"({len(chunk) + backlog} step(s))"
                )

    def _send_status(self, status: str) -> None:
        if status == "RUNNING":
            self.client.update_run(self.run_id, status=status)
        else:
            self.client.set_terminated(self.run_id, status)


def _is_refusal(err: BaseException) -> bool:
    """An answer of the server that retrying will not change (a 4xx other than 429, e.g. a
    deleted run), as opposed to no answer or a transient error."""
    from mlflow.exceptions import RestException

    code = getattr(err, "get_http_status_code", lambda: None)()
    return isinstance(err, RestException) and code is not None and 400 <= code < 500 and code != 429


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
