"""The no-shared-disk cluster works and shares no disk (issue 14, point 1).

Everything goes through `ray job submit`, as on a real cluster: the pytest process is the
user's laptop, the job's driver runs on the head, tasks run on the worker nodes.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from pathlib import Path

import pytest
from multinode_cluster import REPO

pytestmark = [pytest.mark.multinode, pytest.mark.ray]

BUCKET = "multinode-probe"


@pytest.fixture(scope="module")
def probe(no_shared_disk_cluster, tmp_path_factory):
    """One probe job (tests/multinode/probe_job.py): a file from each worker node into
    the checkout's `runs/`, pytest's temp folder and /tmp; S3 from node A to node B; an
    MLflow run from node B. Returns (result JSON, private folders, tag)."""
    import boto3

    cluster = no_shared_disk_cluster
    boto3.client(
        "s3",
        endpoint_url=cluster.s3_endpoint,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    ).create_bucket(Bucket=BUCKET)
    tag = f"probe-{uuid.uuid4().hex[:6]}"
    dirs = [str(REPO / "runs" / tag), str(tmp_path_factory.mktemp("probe")), f"/tmp/{tag}"]
    rc, logs = cluster.submit(
        ["python", "tests/multinode/probe_job.py", "--nodes", "node_a", "node_b",
         "--dirs", *dirs, "--bucket", BUCKET, "--tag", tag],
        timeout=600,
    )  # fmt: skip
    assert rc == 0, logs[-4000:]
    line = re.search(r"^PROBE-RESULT (.*)$", logs, re.M)
    assert line, logs[-4000:]
    return json.loads(line.group(1)), dirs, tag


def test_tasks_run_on_the_worker_nodes_and_the_driver_on_the_head(no_shared_disk_cluster, probe):
    result, _, _ = probe
    nodes = {n["node_id"]: n for n in no_shared_disk_cluster.alive_nodes()}
    head = [i for i, n in nodes.items() if n["is_head"]]
    assert [result["driver_node_id"]] == head  # the job's driver joined the head's raylet
    for name in ("node_a", "node_b"):
        node_id = result["writes"][name]["node_id"]
        assert name in nodes[node_id]["resources"]
    assert result["writes"]["node_a"]["node_id"] != result["writes"]["node_b"]["node_id"]


def test_a_file_a_node_writes_is_seen_by_that_node_only(no_shared_disk_cluster, probe):
    result, dirs, tag = probe
    for name in ("node_a", "node_b"):
        written = result["writes"][name]["written"]
        assert len(written) == len(dirs)
        assert sorted(result["seen"][name]) == sorted(written)  # its own files, not the other's
    assert result["seen"]["driver"] == []  # nor the job's driver on the head
    for folder in dirs:  # nor the machine the job was submitted from
        assert not list(Path(folder).glob(f"{tag}-*")), folder
    # The files are really on node A's disk: read them from inside its namespace.
    node_a = no_shared_disk_cluster.nodes[0]
    shown = node_a.run(f"cat {dirs[0]}/{tag}-node_a.txt {dirs[2]}/{tag}-node_a.txt")
    assert shown.stdout == "written on node_a\n" * 2, shown.stderr


def test_nodes_share_state_through_s3_and_the_mlflow_server(no_shared_disk_cluster, probe):
    from mlflow.tracking import MlflowClient

    result, _, tag = probe
    s3 = result["s3"]
    assert s3["put_by"] == result["writes"]["node_a"]["node_id"]
    assert s3["node_id"] == result["writes"]["node_b"]["node_id"]
    assert s3["text"] == "hello from node_a"
    client = MlflowClient(no_shared_disk_cluster.mlflow_uri)
    run = client.get_run(s3["run_id"])
    assert run.info.run_name == f"{tag}-node_b" and run.info.status == "FINISHED"
    assert run.data.metrics["chars"] == len("hello from node_a")
    assert run.info.artifact_uri.startswith("mlflow-artifacts:")  # uploaded over HTTP
    assert [a.path for a in client.list_artifacts(s3["run_id"])] == ["from_s3.txt"]


def test_a_killed_node_is_replaced_by_one_with_an_empty_disk(no_shared_disk_cluster, probe):
    cluster = no_shared_disk_cluster
    _, dirs, tag = probe
    old = cluster.nodes[1]
    cluster.kill_node(1)
    assert old.pids() == []  # raylet, agents and workers: the whole node is gone
    new = cluster.restart_node(1)
    assert new.node_id != old.node_id and new.name == "node_b"
    alive = {n["node_id"] for n in cluster.alive_nodes()}
    assert new.node_id in alive and old.node_id not in alive
    listing = new.run(f"ls -A {dirs[0]} {dirs[2]} 2>&1; ls -A /tmp")
    assert f"{tag}-node_b" not in listing.stdout, listing.stdout  # a fresh, private disk


def test_the_demos_local_defaults_stop_at_once_in_one_line_naming_what_to_set(
    no_shared_disk_cluster,
):
    """Issue 14, "Done when": the demo's local defaults (output under `runs/`, SQLite
    tracking) on a cluster whose nodes share no disk stop before any work, with one line
    naming each setting to change and the opt-out for a shared file system; exit code 2,
    no traceback. Before the fix it failed in the read tasks ('no non-blank lines to train
    a tokenizer on in [.../runs/corpus-x/tokenizer/train.txt]': the sample was on the
    driver's disk). The rule itself (`placement.py`, also for a head with no CPUs and no
    workers yet) is unit-tested in tests/unit/test_placement.py."""
    from ray.job_submission import JobSubmissionClient
    from ray.util.state import list_actors, list_tasks

    cluster = no_shared_disk_cluster
    job = f"demo-{uuid.uuid4().hex[:8]}"
    started = time.monotonic()
    rc, logs = cluster.submit(
        ["python", "jobs/demo.py", "name=x", "train.steps=20"],
        runtime_env=cluster.runtime_env(shared=False),  # the local defaults
        timeout=600,
        submission_id=job,
    )
    elapsed = time.monotonic() - started
    info = JobSubmissionClient(cluster.dashboard_url).get_job_info(job)
    assert rc != 0 and "exit code 2" in (info.message or ""), (info.message, logs[-4000:])
    assert "Traceback" not in logs, logs[-4000:]
    ours = [line for line in logs.splitlines() if "share no disk" in line]
    assert len(ours) == 1, logs[-4000:]
    for setting in ("output_dir=s3://", "storage=s3://", "tracking.uri=http://"):
        assert setting in ours[0], setting
    assert "shared_filesystem=true" in ours[0]
    # Stopped before any work: the job started no task and no actor on the cluster.
    filters = [("job_id", "=", info.job_id)]
    address = cluster.dashboard_url
    assert not list_tasks(address=address, filters=filters, raise_on_missing_output=False)
    assert not list_actors(address=address, filters=filters, raise_on_missing_output=False)
    # A minute of the job's own time; the rest is `ray job submit` uploading the checkout
    # and starting the driver on a loaded 2-core machine.
    assert elapsed < 180, f"{elapsed:.0f} s before the demo stopped"
