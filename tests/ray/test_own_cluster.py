"""The tests start a Ray cluster of their own, whatever an earlier `ray start` left behind.

`ray start --head` records its head's address in Ray's temporary folder
(`<RAY_TMPDIR or /tmp>/ray/ray_current_cluster`) and nothing removes that file when the head
dies. `ray.init()` without an address joins the cluster named there, and refuses `num_cpus`
when joining, so with a stale file every Ray test used to error before it began. The
session's `ray.init` (tests/ray/conftest.py, `RAY_INIT`) runs here in a subprocess whose
Ray temporary folder holds such a file, naming a port where nothing listens.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

START = """
import json, sys, ray
ray.init(**json.loads(sys.argv[1]))
print("CPUS", ray.cluster_resources().get("CPU"), flush=True)
ray.shutdown()
"""


def run_init(init_args: dict, env: dict, script: str = START) -> subprocess.CompletedProcess:
    proc = subprocess.Popen(
        [sys.executable, "-c", script, json.dumps(init_args)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # so a hung start is stopped with every process it forked
    )
    try:
        out, _ = proc.communicate(timeout=240)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out)


@pytest.fixture
def stale_temp(loopback_port):
    """A Ray temporary folder whose current-cluster file names a head that is gone."""
    temp = tempfile.mkdtemp(prefix="lr-st-", dir="/tmp")  # short: Ray's Unix socket paths
    stale = Path(temp, "ray", "ray_current_cluster")
    stale.parent.mkdir()
    stale.write_text(f"127.0.0.1:{loopback_port()}")  # a free port: no GCS listens there
    env = dict(os.environ, RAY_TMPDIR=temp, RAY_USAGE_STATS_ENABLED="0")
    env.pop("RAY_ADDRESS", None)
    yield env
    shutil.rmtree(temp, ignore_errors=True)


def test_the_planted_file_is_the_one_ray_reads(stale_temp, ray_init_args):
    """Without address="local" the stale file is followed: the failure the fix avoids."""
    joining = {k: v for k, v in ray_init_args.items() if k != "address"}
    done = run_init(joining, stale_temp)
    assert done.returncode != 0, done.stdout[-3000:]
    assert "When connecting to an existing cluster" in done.stdout, done.stdout[-3000:]


BOTH = """
import json, os, sys, ray
from pathlib import Path
from llamaray.ray_session import start_ray
stale = Path(os.environ["RAY_TMPDIR"], "ray", "ray_current_cluster")
planted = stale.read_text()
ray.init(**json.loads(sys.argv[1]))
print("TESTS-CPUS", ray.cluster_resources().get("CPU"), flush=True)
ray.shutdown()
stale.write_text(planted)  # the dead head again, whatever the first start wrote there
start_ray(num_cpus=1, include_dashboard=False)
print("DRIVER-CPUS", ray.cluster_resources().get("CPU"), flush=True)
ray.shutdown()
"""


def test_the_tests_and_the_drivers_start_their_own_cluster_despite_a_stale_file(
    stale_temp, ray_init_args
):
    """Both ways in, one after the other in one process (a Ray start costs seconds): the
    tests' `ray.init(**RAY_INIT)`, and llamaray.ray_session.start_ray, every driver's way
    in (pretrain, prepare, eval, jobs/), with no RAY_ADDRESS. Each starts a new local
    cluster, never the dead head the file names."""
    done = run_init(ray_init_args, stale_temp, BOTH)
    assert done.returncode == 0, done.stdout[-3000:]
    assert f"TESTS-CPUS {float(ray_init_args['num_cpus'])}" in done.stdout, done.stdout[-3000:]
    assert "DRIVER-CPUS 1.0" in done.stdout, done.stdout[-3000:]
