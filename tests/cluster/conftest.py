"""Tests of the cluster definitions in cluster/. There is no session-wide `ray.init` here
(that fixture is tests/ray/conftest.py's, for tests under tests/ray only): the YAML tests
start no Ray processes, and the Ray tests start their own heads with `ray start` in
subprocesses, each with its environment (RAY_AUTH_MODE included) given explicitly.

Those heads (the `ray_head` fixture of tests/conftest.py) are stopped by process ID,
never with `ray stop`, which would kill every Ray process of the user on the machine, other
test sessions' clusters included: each head is started in a session of its own, which
every process of that cluster inherits (its daemons, its workers, and the fake worker
nodes the autoscaler starts), and teardown signals the processes of that session, plus
any other process naming the cluster's temporary directory.
"""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def repo() -> Path:
    return Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def cluster_dir(repo) -> Path:
    return repo / "cluster"
