"""The demo's local defaults on a cluster whose head runs no work (`ray start --head
--num-cpus=0`, as aws.yaml and KubeRay start it): the driver joins through RAY_ADDRESS and
stops within seconds, before preparing anything, with one line naming the settings to
change (platform/llamaray/placement.py), exit code 2 and no traceback."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.timeout(300)]


def test_demo_defaults_stop_in_one_line_on_a_head_without_cpus(ray_head, repo, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "LLAMARAY_"))}
    head = ray_head(["--num-cpus=0"], dict(env, RAY_AUTH_MODE="disabled"))
    began = time.monotonic()
    done = subprocess.run(
        [sys.executable, "jobs/demo.py", "name=x", "train.steps=20", f"output_dir={tmp_path}"],
        env=dict(head["env"], RAY_ADDRESS=head["address"]),
        cwd=repo,
        capture_output=True,
        text=True,
        timeout=240,
    )
    seconds = time.monotonic() - began
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr and not done.stdout, done.stderr[-3000:]
    ours = [line for line in done.stderr.splitlines() if "share no disk" in line]
    assert len(ours) == 1, done.stderr[-3000:]
    for setting in ("output_dir=s3://", "storage=s3://", "tracking.uri=http://"):
        assert setting in ours[0], setting
    assert "shared_filesystem=true" in ours[0]
    assert not any(tmp_path.iterdir())  # stopped before any work: nothing prepared
    assert seconds < 60, seconds
