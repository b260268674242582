"""`ray job submit` against a head started with `ray start --head` on 127.0.0.1: the
README's cluster path, on one machine. The job is the real entry point, jobs/pretrain.py.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from llamaray.tracking import RUN_NAME_TAG

pytestmark = [pytest.mark.ray, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
RAY = str(Path(sys.executable).with_name("ray"))


@pytest.fixture
def head(ray_head):
    """A one-node cluster from `ray start --head` on loopback (stopped by process ID)."""
    env = dict(os.environ, RAY_AUTH_MODE=os.environ.get("RAY_AUTH_MODE", "disabled"))
    # The job's `python` is looked up on the PATH the head was started with, as on a cluster
    # whose image has the dependencies installed.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    started = ray_head(["--num-cpus=2"], env)
    return {"address": started["dashboard"], "env": started["env"]}


def test_pretrain_job_runs_end_to_end(head, tmp_path):
    out = tmp_path / "runs"
    submit = [
        RAY, "job", "submit", "--address", head["address"],
        "--runtime-env", "jobs/runtime_env.yaml", "--submission-id", "pretrain-smoke", "--",
        "python", "jobs/pretrain.py", "--config", "jobs/configs/demo.yaml",
        "name=job", f"output_dir={out}", "data.prepare.sample_mb=0.25",
        "data.prepare.tokenizer.vocab_size=512", "tokenizer.vocab_size=512",
        "model.preset=debug", "train.steps=4", "train.log_every=1", "train.checkpoint_every=2",
        "train.eval_every=0", "tracking.system_metrics=false",
    ]  # fmt: skip
    done = subprocess.run(
        submit, env=head["env"], capture_output=True, text=True, timeout=900, cwd=REPO
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert "succeeded" in (done.stdout + done.stderr).lower()

    logs = subprocess.run(
        [RAY, "job", "logs", "--address", head["address"], "pretrain-smoke"],
        env=head["env"], capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert logs.returncode == 0
    assert re.search(r"run job: step 4\b", logs.stdout), logs.stdout[-3000:]
    assert "[train] step      4/4" in logs.stdout

    status = subprocess.run(
        [RAY, "job", "status", "--address", head["address"], "pretrain-smoke"],
        env=head["env"], capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert "pretrain-smoke' succeeded" in status.stdout + status.stderr

    # The job's outputs: the checkpoint and the MLflow run, where the driver said.
    assert (out / "checkpoints" / "job" / "step-00000004" / "train_state.json").is_file()
    state = json.loads(
        (out / "checkpoints" / "job" / "step-00000004" / "train_state.json").read_text()
    )
    assert state["step"] == 4 and state["world_size"] == 2
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("llamaray").experiment_id
    runs = client.search_runs([experiment], filter_string=f"tags.`{RUN_NAME_TAG}` = 'job'")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(runs[0].info.run_id, "loss")] == [1, 2, 3, 4]
