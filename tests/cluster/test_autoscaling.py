"""Autoscaling on one machine: cluster/local.yaml with Ray's fake multi-node provider.

A head with no CPUs is started from cluster/local.yaml on 127.0.0.1 (free ports, a
temporary directory); a llamaray pretraining run with 2 Ray Train workers x 1 CPU then
needs two worker nodes, which the autoscaler adds; once the run is over they sit idle and
the autoscaler removes them after the file's idle timeout (15 s).

Teardown stops exactly the processes this test started, by process ID: everything in the
session that `ray start` ran in (the head's daemons, and the fake worker nodes the
autoscaler spawned from it) plus anything else still naming the cluster's temporary
directory. `ray stop --force` is not used: it kills every Ray process of the user on the
machine, including other test sessions' clusters.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

pytestmark = [
    pytest.mark.slow,
    pytest.mark.ray,
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc"),
]

RAY = str(Path(sys.executable).with_name("ray"))


def _pids_of(session_id: int, marker: str) -> list[int]:
    """Live processes in session `session_id`, or whose command line contains `marker`."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        pid = int(entry)
        try:
            if os.getsid(pid) == session_id:
                pids.append(pid)
                continue
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if marker.encode() in f.read():
                    pids.append(pid)
        except OSError:  # gone, or not ours to read
            continue
    return pids


def _stop_processes(session_id: int, marker: str, grace: float = 10.0) -> list[int]:
    """SIGTERM, then SIGKILL after `grace` seconds, the processes `_pids_of` finds."""
    found = _pids_of(session_id, marker)
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        pids = _pids_of(session_id, marker)
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait
        while _pids_of(session_id, marker) and time.monotonic() < deadline:
            time.sleep(0.2)
    return found


@pytest.fixture
def fake_cluster(cluster_dir, loopback_port):
    """cluster/local.yaml started on 127.0.0.1: yields the GCS address and environment."""
    # A short path: Ray's Unix sockets live under it (108-byte limit).
    temp = tempfile.mkdtemp(prefix="lr-as-", dir="/tmp")
    gcs = loopback_port()
    config = yaml.safe_load((cluster_dir / "local.yaml").read_text())
    config["provider"]["gcs_address"] = f"127.0.0.1:{gcs}"
    config_path = Path(temp) / "local.yaml"
    config_path.write_text(yaml.safe_dump(config))
    env = dict(
        os.environ,
        RAY_FAKE_CLUSTER="1",
        AUTOSCALER_UPDATE_INTERVAL_S="1",
        RAY_AUTH_MODE="disabled",
        RAY_USAGE_STATS_ENABLED="0",
        PYTHONUNBUFFERED="1",
    )
    env.pop("RAY_ADDRESS", None)
    start = [
        RAY, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={gcs}",
        "--num-cpus=0", "--num-gpus=0", "--object-store-memory=200000000",
        f"--autoscaling-config={config_path}", f"--temp-dir={temp}",
        "--dashboard-host=127.0.0.1", f"--dashboard-port={loopback_port()}",
        f"--ray-client-server-port={loopback_port()}",
        f"--dashboard-agent-listen-port={loopback_port()}", "--disable-usage-stats",
    ]  # fmt: skip
    # Its own session: every process of this cluster inherits the session ID, which is
    # how teardown finds them (and only them).
    proc = subprocess.Popen(
        start,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    session_id = proc.pid
    try:
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, out[-4000:]
        yield {"address": f"127.0.0.1:{gcs}", "env": env, "temp": temp}
    finally:
        if proc.poll() is None:
            proc.kill()
        _stop_processes(session_id, temp)
        left = _pids_of(session_id, temp)
        shutil.rmtree(temp, ignore_errors=True)
        assert not left, f"processes left behind: {left}"


def _monitor_log(temp: str) -> str:
    logs = sorted(Path(temp).glob("session_*/logs/monitor.log"))
    return logs[-1].read_text()[-1500:] if logs else "(no monitor.log)"


def test_training_job_scales_workers_up_then_down(fake_cluster, repo, tmp_path):
    env = dict(fake_cluster["env"], RAY_ADDRESS=fake_cluster["address"])
    driver = [
        sys.executable, str(repo / "tests/cluster/autoscale_job.py"), "llamaray",
        "--output", str(tmp_path / "runs"), "--settle-timeout", "90",
    ]  # fmt: skip
    done = subprocess.run(driver, env=env, cwd=repo, capture_output=True, text=True, timeout=300)
    log = done.stdout[-4000:] + done.stderr[-4000:]
    assert done.returncode == 0, log + _monitor_log(fake_cluster["temp"])
    line = next(x for x in done.stdout.splitlines() if x.startswith("RESULT "))
    result = json.loads(line.removeprefix("RESULT "))

    # The run finished, on worker nodes the autoscaler added for it (the head has 0 CPUs),
    assert result["train"]["step"] == 4, result
    assert result["peak_nodes_during_training"] == 3, (result, _monitor_log(fake_cluster["temp"]))
    # and the idle workers were removed afterwards, leaving the head.
    assert result["nodes_after"] == 1, (result, _monitor_log(fake_cluster["temp"]))
