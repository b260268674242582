"""The `no_shared_disk_cluster` fixture: a Ray head and two worker nodes on this machine,
each node in a mount namespace with private tmpfs disks, plus moto S3 and an MLflow server
(see multinode_cluster.py and docs/cluster.md, "Testing without a shared disk")."""

from __future__ import annotations

import contextlib
import signal

import pytest
from multinode_cluster import REPO, NoSharedDiskCluster, unavailable_reason


def _is_multinode(item) -> bool:
    return "tests/multinode/" in str(item.path).replace("\\", "/")


def pytest_collection_modifyitems(items):
    for item in items:
        if _is_multinode(item):
            item.add_marker(pytest.mark.multinode)


_STARTED: list[NoSharedDiskCluster] = []


def pytest_runtest_teardown(item, nextitem):
    """Stop the cluster as soon as the last test here is done, not at the end of the
    session: the tiers after this one run for a quarter of an hour, and an idle cluster
    (three raylets with their agents, a dashboard, MLflow, moto) takes CPU from them."""
    if nextitem is None or not _is_multinode(nextitem):
        for cluster in _STARTED:
            cluster.stop()


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """SIGTERM ends the run like Ctrl-C does, so fixture teardown still stops the cluster."""

    def interrupt(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    try:
        previous = signal.signal(signal.SIGTERM, interrupt)
    except ValueError:  # not the main thread: leave signals alone (the watchdog still reaps)
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@pytest.fixture(scope="session")
def no_shared_disk_cluster(tmp_path_factory):
    """Head (0 CPUs) + worker nodes `node_a`, `node_b` (2 logical CPUs and a custom resource
    named after the node each), every node with private /tmp, /dev/shm, `runs/` and pytest's
    temporary folders; S3 on moto and an MLflow server (artifacts in S3) on 127.0.0.1.

    Yields the NoSharedDiskCluster: gcs_address, dashboard_url, s3_endpoint, mlflow_uri, env
    (for jobs), submit(entrypoint, runtime_env=..., timeout=...) -> (rc, logs), kill_node(i),
    add_node(), restart_node(i), nodes[i].run(shell command inside the node)."""
    reason = unavailable_reason()
    if reason:
        pytest.skip(f"no-shared-disk cluster: {reason}")
    private = [str(REPO / "runs"), str(tmp_path_factory.getbasetemp())]
    cluster = NoSharedDiskCluster(private_dirs=private)
    _STARTED.append(cluster)
    with _sigterm_as_interrupt():
        try:
            yield cluster.start()
        finally:
            left = cluster.stop()
    assert not left, f"processes left behind by the no-shared-disk cluster: {left}"
