"""A sweep end to end on local Ray: `jobs/sweep.py` (the entry point `ray job submit` runs)
drives a Tune Tuner whose 3 trials are Ray Train pretraining runs of the `debug` preset;
ASHA stops the lagging ones; the driver is killed with SIGKILL in the middle of a trial
and launched again, and the sweep completes; every trial is a child of the sweep's MLflow
run, which holds the summary, the plot and best.yaml, the best trial's config.

Why a cluster of its own (`ray start --head`, with its dashboard) rather than the session
cluster of conftest.py: a driver that dies must leave a cluster behind to resume on, and
a trial that ASHA stops is ended by Tune with its Ray Train controller, whose workers'
placement group Ray Train's cleaner releases after asking the dashboard's state API that
the controller is gone. The session cluster runs without a dashboard, so the CPUs of every
stopped trial would stay reserved.

Why one trial at a time (`max_concurrent_trials: 1`): ASHA stops a trial by comparing it
with the trials that already reported at the same rung, so with several running at once
which trial is stopped would depend on timing. One at a time, in the grid's order, the
decisions are the same on every run.

One scenario in one test: each trial costs about half a minute of Ray Train start-up on 2
cores, so the sweep runs once and every claim is checked on it.
"""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from matplotlib import image
from mlflow.tracking import MlflowClient
from pretrain_helpers import config

from llamaray.config import load_config
from llamaray.tracking import PARENT_TAG, RUN_NAME_TAG

pytestmark = [pytest.mark.ray, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
STEPS = 16
CHECKPOINT_EVERY = 4
LRS = [3e-3, 1e-5, 1e-2]
"""Tried in this order. 1e-5 barely moves the weights in 2 steps: at the first rung (step
2) its loss is far above the first trial's (3e-3), so ASHA must stop it there. The driver
is killed while the third (1e-2) trains."""


@pytest.fixture
def cluster(ray_head, loopback_port):
    """A 2-CPU `ray start` head whose processes know where its dashboard is (so Ray Train's
    placement-group cleaner asks this cluster, not whichever answers on 8265)."""
    dashboard = loopback_port()
    env = dict(os.environ, RAY_API_SERVER_ADDRESS=f"http://127.0.0.1:{dashboard}")
    # The fixture picks a dashboard port of its own; a later --dashboard-port wins.
    head = ray_head(["--num-cpus=2", f"--dashboard-port={dashboard}"], env)
    return head


def write_sweep_yaml(out: Path) -> Path:
    doc = config(
        out, "sw", f"train.steps={STEPS}", "train.eval_every=2", "train.log_every=1",
        f"train.checkpoint_every={CHECKPOINT_EVERY}", "train.num_workers=1",
        "train.cpus_per_worker=1",
    ).model_dump()  # fmt: skip
    doc["sweep"] = {
        "lr": {"values": LRS},
        "batch_tokens": [512],
        "num_samples": 1,
        "asha": {"grace_period": 2, "reduction_factor": 2},  # rungs at steps 2, 4, 8
        "max_concurrent_trials": 1,
    }
    path = out / "sweep.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def child_runs(client: MlflowClient) -> dict[str, tuple[str, str, int]]:
    """Trial run name -> (run id, status, last step with a logged loss)."""
    experiment = client.get_experiment_by_name("llamaray")
    if experiment is None:
        return {}
    runs = client.search_runs(
        [experiment.experiment_id], filter_string=f"tags.`{RUN_NAME_TAG}` LIKE 'sw-%'"
    )
    out = {}
    for r in runs:
        steps = [m.step for m in client.get_metric_history(r.info.run_id, "loss")]
        out[r.data.tags[RUN_NAME_TAG]] = (r.info.run_id, r.info.status, max(steps, default=0))
    return out


def kill_mid_trial(command, env, log_path: Path, client: MlflowClient, experiment_dir: Path):
    """Run the driver until Tune has a finished trial and a running one whose report of
    its first checkpoint's step it received (Ray Train registers a checkpoint as it hands
    the report on, so that checkpoint is there to resume from), then SIGKILL the driver.
    Returns Tune's trials as saved then, and the running trial's (run name, run id)."""
    with open(log_path, "w") as log:
        driver = subprocess.Popen(
            command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        deadline = time.monotonic() + 480
        while True:
            assert driver.poll() is None, log_path.read_text()[-4000:]
            assert time.monotonic() < deadline, log_path.read_text()[-4000:]
            time.sleep(0.25)
            try:  # cheap first: MLflow says a trial is past its first checkpoint
                runs = child_runs(client)
            except Exception:  # the store is being created by the driver
                continue
            if not any(
                s == "RUNNING" and CHECKPOINT_EVERY < step < STEPS for _, s, step in runs.values()
            ):
                continue
            try:
                trials = tune_trials(experiment_dir)
            except Exception:  # the state file is being written
                continue
            finished = [t for t, (s, step) in trials.items() if s == "TERMINATED"]
            # A trial still going reads as PENDING from a saved state (it would be resumed).
            running = [
                t
                for t, (s, step) in trials.items()
                if s not in ("TERMINATED", "ERROR") and step >= CHECKPOINT_EVERY
            ]
            if finished and running and runs.get(f"sw-{running[0]}", ("", "", STEPS))[2] < STEPS:
                break
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
    name = f"sw-{running[0]}"
    return trials, (name, runs[name][0])


def tune_trials(experiment_dir: Path) -> dict[str, tuple[str, int]]:
    """Trial id -> (status, last step reported), as Tune last saved them."""
    from ray.tune import ExperimentAnalysis

    return {
        t.trial_id: (t.status, int(t.last_result.get("step", 0)))
        for t in ExperimentAnalysis(str(experiment_dir)).trials
    }


def test_sweep_stops_early_nests_runs_resumes_and_writes_a_best_config(cluster, tmp_path):
    out = tmp_path / "runs"
    out.mkdir()
    path = write_sweep_yaml(out)
    # Tune saves its experiment state at most every 10 s by default; every second here,
    # so the state is on disk whenever the driver is killed.
    env = dict(cluster["env"], RAY_ADDRESS=cluster["address"], TUNE_GLOBAL_CHECKPOINT_S="1")
    command = [sys.executable, "jobs/sweep.py", "--config", str(path)]
    uri = f"sqlite:///{out / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment_dir = out / "checkpoints" / "sw"

    # 1. The driver dies in the middle of a trial.
    before, (interrupted, interrupted_id) = kill_mid_trial(
        command, env, tmp_path / "first.log", client, experiment_dir
    )
    done_before = {t for t, (status, _) in before.items() if status == "TERMINATED"}
    assert done_before, before  # the first trial(s) finished before the kill

    # 2. Launched again, it resumes the sweep and completes it.
    second = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    output = second.stdout + second.stderr
    (tmp_path / "second.log").write_text(output)
    assert second.returncode == 0, output[-6000:]
    assert "sweep sw: resuming" in output
    after = tune_trials(experiment_dir)
    assert set(before) <= set(after) and len(after) == len(LRS)  # the same trials, no new ones
    assert all(status == "TERMINATED" for status, _ in after.values()), after

    # 3. ASHA stopped the hopeless LR at the first rung; the summary says so.
    summary = out / "sweeps" / "sw" / "summary.csv"
    rows = {float(r["lr"]): r for r in csv.DictReader(summary.open())}
    assert sorted(rows) == sorted(LRS)
    assert rows[1e-5]["status"] == "stopped early" and rows[1e-5]["steps"] == f"2/{STEPS}"
    assert rows[3e-3]["status"].startswith("finished") and rows[3e-3]["steps"] == f"{STEPS}/{STEPS}"
    finished = [r for r in rows.values() if r["status"].startswith("finished")]
    best_row = min(finished, key=lambda r: float(r["val_loss"]))
    assert best_row["status"] == "finished (best)"
    assert [r["status"] for r in finished].count("finished (best)") == 1
    stopped = [r for r in rows.values() if r["status"] == "stopped early"]
    assert all(int(r["steps"].split("/")[0]) < STEPS for r in stopped)
    assert "stopped early by ASHA at step 2" in output + (tmp_path / "first.log").read_text()

    # 4. Every trial is one child run of the sweep's run, marked with how it ended.
    experiment = client.get_experiment_by_name("llamaray").experiment_id
    (parent,) = client.search_runs([experiment], filter_string=f"tags.`{RUN_NAME_TAG}` = 'sw'")
    children = client.search_runs(
        [experiment], filter_string=f"tags.`{PARENT_TAG}` = '{parent.info.run_id}'"
    )
    by_name = {r.data.tags[RUN_NAME_TAG]: r for r in children}
    assert (
        sorted(by_name)
        == sorted(f"sw-{t}" for t in after)
        == sorted(r["trial"] for r in rows.values())
    )
    for row in rows.values():
        run = by_name[row["trial"]]
        assert float(run.data.params["optimizer.lr"]) == float(row["lr"])
        assert run.data.metrics["final_val_loss"] == pytest.approx(float(row["val_loss"]), abs=1e-4)
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "loss")]
        assert steps.count(1) == 1, row  # no trial started over from scratch
        if row["status"] == "stopped early":
            assert run.info.status == "KILLED", row
            assert run.data.tags["llamaray.sweep.stopped_early"] == "true"
            assert int(run.data.tags["llamaray.sweep.step_reached"]) < STEPS
        else:
            assert run.info.status == "FINISHED", row
            assert sorted(set(steps)) == list(range(1, STEPS + 1))
            val = [m.step for m in client.get_metric_history(run.info.run_id, "val_loss")]
            assert sorted(set(val)) == list(range(2, STEPS + 1, 2))
    for trial in done_before:  # ended before the kill: not run again
        run_id = by_name[f"sw-{trial}"].info.run_id
        steps = [m.step for m in client.get_metric_history(run_id, "loss")]
        assert len(steps) == len(set(steps)), trial
    # The interrupted trial went on in the same MLflow run from a checkpoint: the steps up
    # to its first checkpoint were trained once.
    assert by_name[interrupted].info.run_id == interrupted_id
    assert by_name[interrupted].info.status == "FINISHED"
    resumed = [m.step for m in client.get_metric_history(interrupted_id, "loss")]
    assert all(resumed.count(s) == 1 for s in range(1, CHECKPOINT_EVERY + 1)), resumed

    # 5. The sweep's run holds the search space, the summary, the plot and best.yaml.
    parent = client.get_run(parent.info.run_id)
    assert parent.info.status == "FINISHED" and PARENT_TAG not in parent.data.tags
    assert parent.data.params["sweep.lr.values"] == "0.003,1e-05,0.01"
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"summary.csv", "summary.md", "loss_vs_lr.png", "best.yaml", "sweep.yaml"} <= artifacts
    assert parent.data.metrics["best_val_loss"] == pytest.approx(
        float(best_row["val_loss"]), abs=1e-4
    )
    assert parent.data.metrics["trials_stopped_early"] == len(stopped)
    assert parent.data.tags["llamaray.sweep.best_run_id"] == by_name[best_row["trial"]].info.run_id
    png = client.download_artifacts(parent.info.run_id, "loss_vs_lr.png", str(tmp_path))
    assert image.imread(png).shape[:2] == (450, 700)

    # 6. best.yaml is the best trial's run as a config of its own: it loads, with the
    # trial's LR, the full schedule and no parent (each trial trained this very config
    # with its own LR, so it trains; a launch to show it again would cost ~35 s).
    best_yaml = out / "sweeps" / "sw" / "best.yaml"
    logged = client.download_artifacts(parent.info.run_id, "best.yaml", str(tmp_path))
    assert Path(logged).read_text() == best_yaml.read_text()
    cfg = load_config(best_yaml)
    best_run = by_name[best_row["trial"]]
    best_lr = float(best_run.data.params["optimizer.lr"])
    assert cfg.name == "sw-best" and (cfg.optimizer.lr, cfg.train.batch_tokens) == (best_lr, 512)
    assert cfg.train.steps == STEPS and cfg.train.stop_at_step is None
    assert cfg.tracking.parent_run_id is None and cfg.tracking.export_hf
    assert cfg.data.corpus == str(out / "corpus")
    # Everything else is what the best trial ran with (its params in MLflow).
    for key in (
        "model.preset",
        "train.seq_len",
        "train.micro_batch_size",
        "optimizer.warmup_steps",
    ):
        value = cfg.model_dump()
        for part in key.split("."):
            value = value[part]
        assert str(value) == best_run.data.params[key], key
