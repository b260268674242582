"""Autoscaling on one machine: cluster/local.yaml with Ray's fake multi-node provider.

A head with no CPUs is started from cluster/local.yaml on 127.0.0.1 (free ports, a
temporary directory); a llamaray pretraining run with 2 Ray Train workers x 1 CPU then
needs two worker nodes, which the autoscaler adds; once the run is over they sit idle and
the autoscaler removes them after the file's idle timeout (15 s).

The cluster is stopped by process ID, not with `ray stop --force` (conftest.py says why
and how), with the fake worker nodes, which run in the head's process session.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

pytestmark = [
    pytest.mark.slow,
    pytest.mark.ray,
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc"),
    pytest.mark.timeout(480),
]


@pytest.fixture
def fake_cluster(cluster_dir, ray_head, loopback_port, tmp_path):
    """cluster/local.yaml started on 127.0.0.1 as docs/cluster.md says, on free ports."""
    gcs = loopback_port()
    config = yaml.safe_load((cluster_dir / "local.yaml").read_text())
    config["provider"]["gcs_address"] = f"127.0.0.1:{gcs}"  # where the fake workers go
    config_path = tmp_path / "local.yaml"
    config_path.write_text(yaml.safe_dump(config))
    env = dict(
        os.environ, RAY_FAKE_CLUSTER="1", AUTOSCALER_UPDATE_INTERVAL_S="1", RAY_AUTH_MODE="disabled"
    )
    args = [
        "--num-cpus=0", "--num-gpus=0", "--object-store-memory=200000000",
        f"--autoscaling-config={config_path}",
    ]  # fmt: skip
    return ray_head(args, env, gcs_port=gcs)


def _monitor_log(temp: str) -> str:
    logs = sorted(Path(temp).glob("session_*/logs/monitor.log"))
    return logs[-1].read_text()[-1500:] if logs else "(no monitor.log)"


def test_training_job_scales_workers_up_then_down(fake_cluster, repo, tmp_path):
    env = dict(fake_cluster["env"], RAY_ADDRESS=fake_cluster["address"])
    watcher = subprocess.Popen(
        [sys.executable, str(repo / "tests/cluster/node_watcher.py"), "--settle-timeout", "90"],
        env=env, cwd=repo, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert watcher.stdout.readline().strip() == "READY"
        # The README's cluster path: the job's driver joins the cluster named by RAY_ADDRESS.
        # demo.yaml made tiny; 2 workers x 1 CPU, and the head has none.
        job = [
            sys.executable, "jobs/pretrain.py", "--config", "jobs/configs/demo.yaml",
            "name=autoscale", f"output_dir={tmp_path / 'runs'}",
            "data.prepare.sample_mb=0.25", "data.prepare.tokenizer.vocab_size=512",
            "tokenizer.vocab_size=512", "model.preset=debug", "train.steps=4",
            "train.seq_len=64", "train.batch_tokens=512", "train.micro_batch_size=4",
            "train.num_workers=2", "train.cpus_per_worker=1", "train.log_every=1",
            "train.checkpoint_every=0", "train.eval_every=0", "tracking.enabled=false",
            "shared_filesystem=true",  # fake nodes share this machine's disk
        ]  # fmt: skip
        began = time.monotonic()
        done = subprocess.run(job, env=env, cwd=repo, capture_output=True, text=True, timeout=240)
        job_seconds = time.monotonic() - began
        watcher.stdin.write("done\n")
        watcher.stdin.flush()
        out, _ = watcher.communicate(timeout=150)
    finally:
        if watcher.poll() is None:
            watcher.kill()
            watcher.wait()
    log = done.stdout[-3000:] + done.stderr[-3000:]
    assert done.returncode == 0, log + _monitor_log(fake_cluster["temp"])
    assert "run autoscale: step 4" in done.stdout, log
    line = next((x for x in out.splitlines() if x.startswith("RESULT ")), None)
    assert line, out[-3000:]
    result = json.loads(line.removeprefix("RESULT "))
    result["job_seconds"] = round(job_seconds, 1)
    print(result)  # shown with -s: how long the job and the scale-down took

    # The job ran on worker nodes the autoscaler added for it: two (the head has no CPUs),
    assert result["peak_nodes_during_job"] == 3, (result, _monitor_log(fake_cluster["temp"]))
    # which it removed once they sat idle for the file's timeout, leaving the head alone.
    assert result["nodes_after"] == 1, (result, _monitor_log(fake_cluster["temp"]))
