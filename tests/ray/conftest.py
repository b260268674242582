"""One local Ray cluster for the whole test session, shared by every test under tests/ray."""

import os

import pytest


@pytest.fixture(scope="session", autouse=True)
def ray_cluster():
    # Loopback only: no token auth (it would write ~/.ray/auth_token on first init).
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    # Ray Train's placement-group cleaner asks the dashboard at 127.0.0.1:8265 by default
    # whether our controller is alive; with no dashboard here, another cluster's dashboard
    # on that port would answer "no" and our workers' placement group would be removed.
    os.environ.setdefault("RAY_API_SERVER_ADDRESS", "http://127.0.0.1:9")
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield ray
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def root(tmp_path_factory, request):
    """An output directory per test module: its corpus, checkpoints and MLflow store."""
    return tmp_path_factory.mktemp(request.module.__name__)


@pytest.fixture(scope="module")
def reference(root):
    """An uninterrupted pretraining run of `pretrain_helpers.STEPS` steps on 2 workers,
    checkpoints on local disk: what interrupted, resumed or relocated runs must match."""
    from pretrain_helpers import config

    from llamaray.orchestrate.pretrain import pretrain

    return pretrain(config(root, "reference"))
