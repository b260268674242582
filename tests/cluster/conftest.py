"""Tests of the cluster definitions in cluster/. There is no session-wide `ray.init` here
(that fixture is tests/ray/conftest.py's, for tests under tests/ray only): the YAML tests
start no Ray processes, and the autoscaling test starts its own cluster in subprocesses."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Loopback clusters only: no token auth unless a test asks for it (token mode would write
# ~/.ray/auth_token on first start).
os.environ.setdefault("RAY_AUTH_MODE", "disabled")


@pytest.fixture(scope="session")
def repo() -> Path:
    return Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def cluster_dir(repo) -> Path:
    return repo / "cluster"
