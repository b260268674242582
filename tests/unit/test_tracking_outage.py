"""An MLflow outage does not stop training (no Ray): the real training loop in this process
(`run_worker` with a `LocalLauncher`) logs to a real `mlflow server` that is stopped in the
middle of the run and started again on the same port and store. Training completes, the
checkpoint of a step inside the outage is written, and the metrics of the outage reach the
store once the server is back; the outage and the recovery are said once each. Also: a
tracker whose server is away from the start (a worker replaced during an outage) neither
raises nor waits, and bounds what it keeps; the driver refuses a server that does not answer
before any cluster work."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from dataclasses import asdict

import pytest
from mlflow.tracking import MlflowClient
from test_checkpoint import SEQ_LEN, write_token_corpus

from llamaray import tracking
from llamaray.config import ConfigError, load_config
from llamaray.train.checkpoint import step_dir_name, verify_checkpoint
from llamaray.train.launcher import LocalLauncher
from llamaray.train.worker import WorkerSpec, run_worker

STEPS = 6
OUTAGE = "does not answer"
RECOVERY = "answers again"


pytestmark = pytest.mark.usefixtures("process_group")  # tests/conftest.py


@pytest.fixture
def quick_retries(monkeypatch):
    """The sender's waits between attempts, shortened so the test sees the recovery within a
    second of the server's return rather than up to 30 s."""
    monkeypatch.setattr(tracking, "SEND_RETRY_S", (0.2, 0.5), raising=False)


def _config(name: str, tmp_path, *overrides: str):
    """A debug-preset run of STEPS steps in this process, a checkpoint every 2 steps and
    metrics logged every step."""
    return load_config(
        None,
        [
            f"name={name}",
            f"output_dir={tmp_path}",
            "model.preset=debug",
            "tracking.export_hf=false",
            "tracking.system_metrics=false",
            "data.eval_rows=8",
            f"train.steps={STEPS}",
            f"train.seq_len={SEQ_LEN}",
            f"train.batch_tokens={4 * SEQ_LEN}",
            "train.micro_batch_size=2",
            "train.device=cpu",
            "train.checkpoint_every=2",
            "train.log_every=1",
            *overrides,
        ],
    )


class OutageLauncher(LocalLauncher):
    """A LocalLauncher that stops the MLflow server once step `down` is logged and starts
    it again, on the same port and store, after step `up`: steps down+1..up are trained and
    logged with no server."""

    def __init__(self, root, server, down: int, up: int):
        super().__init__(root)
        self.server, self.down, self.up = server, down, up

    def _after(self, step: int) -> None:
        if step == self.down:
            self.server.stop()
        elif step == self.up:
            self.server.start()

    def log(self, metrics: dict) -> None:
        super().log(metrics)
        self._after(metrics["step"])


@pytest.mark.slow  # make test only: a real mlflow server
def test_training_rides_out_a_tracking_server_outage(
    mlflow_server, tmp_path, capsys, caplog, quick_retries
):
    uri = mlflow_server.uri
    corpus = write_token_corpus(tmp_path / "corpus")
    run_id, _ = tracking.open_run(uri, "outage", "outage-run")
    cfg = _config("outage-run", tmp_path)
    # Down after step 2 (a checkpoint), back after step 4: step 4's checkpoint and the
    # metrics of steps 3 and 4 are written with no server.
    launcher = OutageLauncher(tmp_path / "checkpoints", mlflow_server, down=2, up=4)
    spec = WorkerSpec(cfg.model_dump(), str(corpus), str(tmp_path / "run"), uri, run_id)
    try:
        result = run_worker(spec, launcher)
    finally:
        if mlflow_server.proc is None:  # the session's server outlives this test
            mlflow_server.start()

    assert (result.step, result.stopped) == (STEPS, None)
    assert verify_checkpoint(tmp_path / "checkpoints" / step_dir_name(4)).step == 4
    client = MlflowClient(uri)
    loss = {m.step: m.value for m in client.get_metric_history(run_id, "loss")}
    reported = {r["step"]: r["loss"] for r in launcher.reports}
    assert loss == pytest.approx(reported) and sorted(loss) == list(range(1, STEPS + 1))
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert tracking.DROPPED_TAG not in run.data.tags
    console = capsys.readouterr().err
    assert console.count(OUTAGE) == 1, console  # once per outage, not once per step
    assert console.count(RECOVERY) == 1, console
    assert "dropped" not in console
    retries = [r for r in caplog.records if r.getMessage().startswith("Retrying (")]
    assert not retries, retries[0].getMessage()  # not a warning per HTTP retry either


def test_a_tracker_whose_server_is_away_neither_raises_nor_waits(
    loopback_port, monkeypatch, capsys, quick_retries
):
    """What a worker replaced during an outage meets: no server from the start. Nothing
    raises, logging returns at once, at most `buffer_steps` steps are kept (the rest counted
    as dropped), and the end gives up after `flush_s` saying what was not logged."""
    # An operator's setting wins over HTTP_LIMITS: no retry, a refused connection fails at once.
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    uri = f"http://ops:pw-never-shown@127.0.0.1:{loopback_port()}"  # nothing listens there
    start = time.monotonic()
    logger = tracking.MetricLogger(uri, "0" * 32, buffer_steps=3, flush_s=0.5)
    for step in range(1, 8):
        logger.log({"loss": 1.0 / step, "lr": 1e-3}, step)
    logging_took = time.monotonic() - start
    logger.finish("FINISHED")
    assert logging_took < 2.0 and time.monotonic() - start < 5.0
    console = capsys.readouterr().err
    assert console.count(OUTAGE) == 1, console
    assert "7 step(s) of metrics were dropped" in console, console  # 4 past the bound, 3 at the end
    assert "status FINISHED not set" in console, console
    assert "pw-never-shown" not in console and "ops:" not in console
    assert "http://***@127.0.0.1" in console


def test_the_driver_refuses_a_server_that_does_not_answer_before_any_cluster_work(
    loopback_port, monkeypatch, tmp_path
):
    """`llamaray train` and `llamaray sweep` with a server that does not answer: one clear
    error naming tracking.uri (credentials redacted), before Ray starts or a corpus is
    prepared. A fresh run could not be created, nor a relaunch find its run, without it."""
    from llamaray import ray_session
    from llamaray.orchestrate import pretrain as pretrain_module
    from llamaray.sweep.config import load_sweep_config
    from llamaray.sweep.driver import run_sweep

    def no_cluster(*args, **kwargs):
        raise AssertionError("cluster work started before the tracking server was checked")

    monkeypatch.setattr(pretrain_module, "start_ray", no_cluster)
    monkeypatch.setattr(ray_session, "start_ray", no_cluster)
    uri = f"http://ops:pw-never-shown@127.0.0.1:{loopback_port()}"
    settings = [f"output_dir={tmp_path}", f"tracking.uri={uri}", "model.preset=debug"]
    cfg = load_config(None, ["name=down", *settings])
    run, sweep = load_sweep_config(None, ["name=down-sweep", "train.eval_every=2", *settings])
    launches = {
        "train": lambda: pretrain_module.pretrain(cfg),
        "sweep": lambda: run_sweep(run, sweep),
    }
    for name, launch in launches.items():
        if name == "sweep":  # HTTP_LIMITS were timed with train; an operator's 0 is quicker
            monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        start = time.monotonic()
        with pytest.raises(ConfigError, match=r"tracking\.uri: the MLflow server at") as err:
            launch()
        assert time.monotonic() - start < 15  # not MLflow's default of minutes of retries
        message = str(err.value)
        assert "http://***@127.0.0.1" in message and "does not answer" in message
        assert "pw-never-shown" not in message and "tracking.enabled=false" in message


# Launch 1 of the test below, in a process of its own (it is SIGKILLed): its sender makes
# one request and then none for an hour, so every later step is still unsent when it dies.
_KILLED_LAUNCH = """
import json, sys
from llamaray import tracking
from llamaray.config import load_config
from llamaray.train.launcher import LocalLauncher, ensure_process_group
from llamaray.train.worker import WorkerSpec, run_worker

tracking.SEND_INTERVAL_S = 3600.0
ensure_process_group()
spec = WorkerSpec(**json.loads(sys.argv[1]))
run_worker(spec, LocalLauncher(sys.argv[2]))
"""


@pytest.mark.slow  # two launches of the training loop, one in a subprocess
def test_metrics_a_killed_process_had_not_sent_are_sent_by_the_launch_that_resumes(tmp_path):
    """Rank 0 dies just after the checkpoint of step 4 with steps 2-4 logged but unsent
    (a node lost). The launch that resumes from that checkpoint never runs those steps
    again: their metrics reach the store only because the checkpoint carried them. Each
    step is stored once: what the store already had is not sent twice."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    corpus = write_token_corpus(tmp_path / "corpus")
    run_id, _ = tracking.open_run(uri, "killed", "killed-run")
    cfg = _config("killed-run", tmp_path, "faults.kill_rank=0", "faults.kill_at_step=4")
    spec = WorkerSpec(cfg.model_dump(), str(corpus), str(tmp_path / "run"), uri, run_id)
    checkpoints = tmp_path / "checkpoints"
    killed = subprocess.run(
        [sys.executable, "-c", _KILLED_LAUNCH, json.dumps(asdict(spec)), str(checkpoints)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    client = MlflowClient(uri)
    stored = {m.step for m in client.get_metric_history(run_id, "loss")}
    assert 4 not in stored, stored  # else the kill lost nothing and this test shows nothing
    carried = verify_checkpoint(checkpoints / step_dir_name(4)).extra["unsent_metrics"]
    assert {r["step"] for r in carried} >= {4} - stored, carried

    launcher = LocalLauncher(checkpoints)
    result = run_worker(spec, launcher)

    assert (result.step, result.stopped) == (STEPS, None)
    assert [r["step"] for r in launcher.reports] == [5, 6]  # resumed: 1-4 did not run again
    losses = [m.step for m in client.get_metric_history(run_id, "loss")]
    assert sorted(losses) == list(range(1, STEPS + 1)), losses  # each step once
    for key in ("lr", "grad_norm", "rows_crc"):
        steps = sorted(m.step for m in client.get_metric_history(run_id, key))
        assert steps == list(range(1, STEPS + 1)), (key, steps)
