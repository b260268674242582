"""One local Ray cluster for the whole test session, shared by every test under tests/ray."""

import os

import pytest


@pytest.fixture(scope="session", autouse=True)
def ray_cluster():
    # Loopback only: no token auth (it would write ~/.ray/auth_token on first init).
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield ray
    finally:
        ray.shutdown()
