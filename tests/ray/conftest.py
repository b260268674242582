"""One local Ray cluster for the whole test session, shared by every test under tests/ray."""

import os

import pytest

from llamaray.ray_session import LOCAL_CLUSTER_ENV

# The tests' own cluster, always a new one: address="local" ignores RAY_ADDRESS and the
# "current cluster" file an earlier `ray start` leaves in Ray's temporary folder, whose head
# may be gone (joining it fails with "When connecting to an existing cluster, num_cpus and
# num_gpus must not be provided"). test_own_cluster.py starts it with this, stale file planted.
RAY_INIT = {"address": "local", "num_cpus": 2, "include_dashboard": False, "log_to_driver": False}


def pytest_runtest_teardown(item, nextitem):
    """Shut the session's cluster down once the last test here is done: the unit tier runs
    after this one, and needs no Ray."""
    if nextitem is None or "tests/ray/" not in str(nextitem.path).replace("\\", "/"):
        import ray

        ray.shutdown()


@pytest.fixture(scope="session")
def ray_init_args() -> dict:
    """The keyword arguments of the tests' `ray.init` (for tests that start it elsewhere)."""
    return dict(RAY_INIT)


@pytest.fixture(scope="session", autouse=True)
def ray_cluster(sigterm_handler):
    # Loopback only: no token auth (it would write ~/.ray/auth_token on first init).
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    # Ray Train's placement-group cleaner asks the dashboard at 127.0.0.1:8265 by default
    # whether our controller is alive; with no dashboard here, another cluster's dashboard
    # on that port would answer "no" and our workers' placement group would be removed.
    os.environ.setdefault("RAY_API_SERVER_ADDRESS", "http://127.0.0.1:9")
    for name, value in LOCAL_CLUSTER_ENV.items():  # as start_ray sets them for its clusters
        os.environ.setdefault(name, value)
    import ray

    ray.init(**RAY_INIT)
    sigterm_handler()  # ray.init replaced ours with one that only fails the current test
    try:
        yield ray
    finally:
        ray.shutdown()


@pytest.fixture(scope="session")
def root(tmp_path_factory):
    """One output directory for every module here: one prepared corpus, one MLflow store
    (SQLite), the reference run and each test's runs, under names of their own."""
    return tmp_path_factory.mktemp("ray-runs")


@pytest.fixture(scope="session")
def reference(root):
    """An uninterrupted pretraining run of `pretrain_helpers.STEPS` steps on 2 workers,
    checkpoints on local disk: what interrupted, resumed or relocated runs must match, the
    run evaluated and the base finetuned. Launched once per session (a launch costs ~35 s
    on 2 cores, ~18 s of it Ray Train starting its controller and workers)."""
    from pretrain_helpers import config

    from llamaray.orchestrate.pretrain import pretrain

    return pretrain(config(root, "reference"))
