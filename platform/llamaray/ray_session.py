"""Ray start-up: the one way every driver (CLI, jobs/, the library's drivers) joins or starts Ray.

A cluster is joined only when one is named: `--address`, else `RAY_ADDRESS` (what
`ray job submit` sets for its driver). Otherwise a local cluster of this process's own is
started with `address="local"`, never the "current cluster" an earlier `ray start` recorded
in Ray's temporary folder: nothing removes that file when its head dies, and following it
fails ("When connecting to an existing cluster, num_cpus and num_gpus must not be
provided") or lands a run on somebody else's cluster.

    >>> ray_address("ray://head:10001", {"RAY_ADDRESS": "10.0.0.1:6379"})
    'ray://head:10001'
    >>> ray_address(None, {"RAY_ADDRESS": "10.0.0.1:6379"})
    '10.0.0.1:6379'
    >>> ray_address(None, {})
    'local'
"""

from __future__ import annotations

import os
from collections.abc import Mapping

LOCAL = "local"  # ray.init's "start a new local cluster", whatever the temporary folder says

LOCAL_CLUSTER_ENV = {"TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S": "5"}
"""Settings a cluster's processes read from their environment, for the local clusters
started here (they inherit this process's). Ray Train's controller waits that long for
every worker to destroy its process group when it shuts a worker group down, 30 s by
default: a worker that hung (`train.hang_timeout_s`) never answers, so each hang cost 30 s
more before the restart. On a cluster, set it in the environment of `ray start`."""


def ray_address(address: str | None = None, environ: Mapping[str, str] | None = None) -> str:
    """The cluster to join: `address` if given, else `RAY_ADDRESS`, else "local" (a new one)."""
    environ = os.environ if environ is None else environ
    return address or environ.get("RAY_ADDRESS") or LOCAL


def start_ray(address: str | None = None, **init_kwargs) -> None:
    """Join the cluster at `address` (else `RAY_ADDRESS`), or start a local one; then keep
    Ray's internal warnings off the console (`llamaray.console.quiet_ray`).

    A no-op join when Ray is already initialized in this process (a test session's cluster,
    a driver that started it), so library drivers may call it unconditionally.
    `init_kwargs` go to `ray.init` (e.g. `num_cpus` for a local cluster; Ray refuses them
    when joining one). The workers' output reaches this driver (`log_to_driver`) unless
    the caller says otherwise.
    """
    import ray

    from llamaray.console import quiet_ray

    if not ray.is_initialized():
        init_kwargs.setdefault("log_to_driver", True)
        if ray_address(address) == LOCAL:
            for name, value in LOCAL_CLUSTER_ENV.items():
                os.environ.setdefault(name, value)
        ray.init(address=ray_address(address), **init_kwargs)
    quiet_ray()
