"""MLflow tracking helpers on a SQLite store in a temporary directory (no server, no Ray)."""

from __future__ import annotations

import struct
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from llamaray.tracking import (
    PARENT_TAG,
    RUN_NAME_TAG,
    MetricLogger,
    end_run,
    find_run,
    flatten,
    log_metrics,
    log_params,
    loss_curve_png,
    metric_history,
    open_run,
    tracking_uri,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# MLflow's SQLAlchemy store, not this code.
pytestmark = pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy is deprecated")


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    """One SQLite store for the module (creating its schema is the slow part)."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


def test_tracking_uri_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking.example:5000")
    assert tracking_uri("http://configured:5000", tmp_path) == "http://configured:5000"
    assert tracking_uri(None, tmp_path) == "http://tracking.example:5000"
    assert tracking_uri("", tmp_path) == "http://tracking.example:5000"

    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert tracking_uri(None, tmp_path) == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "")  # set but empty counts as unset
    monkeypatch.chdir(tmp_path)
    # A relative output_dir is made absolute, so workers elsewhere find the same file.
    assert tracking_uri(None, "runs") == f"sqlite:///{tmp_path.resolve() / 'runs' / 'mlflow.db'}"
    assert tracking_uri("file:///elsewhere", "runs") == "file:///elsewhere"


def test_flatten_nested_config():
    tree = {
        "name": "demo",
        "train": {"steps": 10, "lr": 1e-3, "stop_at_step": None},
        "model": {"preset": "debug", "extra": {"deep": True}},
        "data": {"proportions": {}, "sources": ["a", "b"]},
    }
    assert flatten(tree) == {
        "name": "demo",
        "train.steps": "10",
        "train.lr": "0.001",
        "train.stop_at_step": "None",
        "model.preset": "debug",
        "model.extra.deep": "True",
        "data.proportions": "{}",  # an empty section is a value, not nothing
        "data.sources": "['a', 'b']",
    }
    assert flatten({"x": {"y": 1}}, prefix="cfg.") == {"cfg.x.y": "1"}
    assert flatten({"long": "v" * 7000})["long"] == "v" * 6000  # MLflow's limit on a value
    assert flatten({}) == {}


def test_open_run_creates_once_then_finds_it_by_name(store, tmp_path):
    run_id, created = open_run(store, "exp-open", "alpha")
    assert created
    assert open_run(store, "exp-open", "alpha") == (run_id, False)
    assert find_run(store, "exp-open", "alpha") == run_id
    assert find_run(store, "exp-open", "nobody") is None
    assert find_run(store, "no-such-experiment", "alpha") is None
    assert find_run(store, "exp-open", "alpha", status="FINISHED") is None  # still running
    MlflowClient(store).set_terminated(run_id, "FINISHED")
    assert find_run(store, "exp-open", "alpha", status="FINISHED") == run_id

    other, created = open_run(store, "exp-open", "beta")
    assert created and other != run_id
    assert open_run(store, "exp-open", "beta") == (other, False)
    # The same run name in another experiment is another run.
    elsewhere, created = open_run(store, "exp-other", "alpha")
    assert created and elsewhere not in (run_id, other)

    client = MlflowClient(store)
    run = client.get_run(run_id)
    assert run.data.tags[RUN_NAME_TAG] == "alpha" and run.info.run_name == "alpha"
    experiment = client.get_experiment_by_name("exp-open")
    assert run.info.experiment_id == experiment.experiment_id
    # Artifacts of a new experiment on SQLite live next to the database by default...
    db_dir = Path(store.removeprefix("sqlite:///")).parent
    assert experiment.artifact_location == (db_dir / "mlartifacts").resolve().as_uri()
    # ...or under the root given.
    open_run(store, "exp-rooted", "alpha", artifact_root=tmp_path / "art")
    rooted = client.get_experiment_by_name("exp-rooted")
    assert rooted.artifact_location == (tmp_path / "art").resolve().as_uri()


def test_open_run_nests_a_child_under_its_parent(store):
    parent, _ = open_run(store, "exp-nest", "sweep")
    child, created = open_run(store, "exp-nest", "sweep-trial-0", parent_run_id=parent)
    assert created
    client = MlflowClient(store)
    assert client.get_run(child).data.tags[PARENT_TAG] == parent
    assert PARENT_TAG not in client.get_run(parent).data.tags


def test_metric_logger_batches_metrics_and_sets_status(store, tmp_path):
    run_id, _ = open_run(store, "exp-log", "logged")
    client = MlflowClient(store)
    logger = MetricLogger(store, run_id, system_metrics=False)
    assert client.get_run(run_id).info.status == "RUNNING"

    logger.log({"loss": 4.5, "lr": 1e-3, "mfu": None}, step=1)
    logger.log({"loss": 3.25, "lr": 2e-3}, step=2)
    logger.log({"val_loss": None}, step=2)  # nothing to write
    assert logger.flush(timeout=30)  # sent in the background (`log` only queues)
    history = client.get_metric_history(run_id, "loss")
    assert sorted((m.step, m.value) for m in history) == [(1, 4.5), (2, 3.25)]
    assert sorted((m.step, m.value) for m in client.get_metric_history(run_id, "lr")) == [
        (1, 1e-3),
        (2, 2e-3),
    ]
    metrics = client.get_run(run_id).data.metrics
    assert "mfu" not in metrics and "val_loss" not in metrics

    note = tmp_path / "note.txt"
    note.write_text("hello")
    logger.artifact(note)
    logger.artifact(note, "notes")
    assert {a.path for a in client.list_artifacts(run_id)} == {"note.txt", "notes"}

    logger.finish()
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.end_time is not None

    # A relaunch of the same run name logs into the same run and can end it otherwise.
    again = MetricLogger(store, open_run(store, "exp-log", "logged")[0], system_metrics=False)
    assert client.get_run(run_id).info.status == "RUNNING"
    again.log({"loss": 3.0}, step=3)
    again.finish("KILLED")
    assert client.get_run(run_id).info.status == "KILLED"
    assert sorted(m.step for m in client.get_metric_history(run_id, "loss")) == [1, 2, 3]


def test_metrics_logged_every_step_go_in_one_request_per_interval(store, monkeypatch):
    """A step logged every 20 ms does not cost a request each: the sender waits out
    SEND_INTERVAL_S between requests and sends what queued meanwhile in one; a flush sends
    at once."""
    from llamaray import tracking

    monkeypatch.setattr(tracking, "SEND_INTERVAL_S", 60.0)
    requests = []
    real = MlflowClient.log_batch

    def counted(self, run_id, metrics=(), *args, **kwargs):
        requests.append(len(metrics))
        return real(self, run_id, metrics, *args, **kwargs)

    monkeypatch.setattr(MlflowClient, "log_batch", counted)
    run_id, _ = open_run(store, "exp-interval", "every-step")
    logger = MetricLogger(store, run_id, system_metrics=False)
    for step in range(1, 21):
        logger.log({"loss": 1.0 / step}, step)
        time.sleep(0.02)
    assert logger.flush(timeout=30)
    assert requests == [1, 19]  # the first step at once, the rest after the interval
    history = MlflowClient(store).get_metric_history(run_id, "loss")
    assert sorted(m.step for m in history) == list(range(1, 21))
    logger.finish()


def test_params_past_one_batch_metrics_and_the_end_of_a_run(store):
    run_id, _ = open_run(store, "bookkeeping", "many-params")
    params = {f"p.{i:03d}": str(i) for i in range(250)}  # 3 of MLflow's 100-param batches
    log_params(store, run_id, params)
    log_metrics(store, run_id, {"val_loss": 2.5, "skipped": None}, step=7)
    end_run(store, run_id, "FAILED")
    run = MlflowClient(store).get_run(run_id)
    assert run.data.params == params
    assert [(m.step, m.value) for m in metric_history(store, run_id, "val_loss")] == [(7, 2.5)]
    assert "skipped" not in run.data.metrics
    assert run.info.status == "FAILED"


def test_loss_curve_png(tmp_path):
    history = [{"step": s, "loss": 5.0 - 0.4 * s} for s in range(1, 11)]
    history[4]["val_loss"] = 3.1
    history[9]["val_loss"] = 1.2
    history.append({"step": 11, "val_loss": None})  # no loss at all: not plotted
    path = loss_curve_png(iter(history), tmp_path / "curve.png", title="demo")
    assert path == tmp_path / "curve.png"
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    assert len(data) > 5000  # axes, two lines, legend: not a blank image
    width, height = struct.unpack(">II", data[16:24])  # the IHDR chunk
    assert (width, height) == (700, 400)
