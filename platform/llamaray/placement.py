"""May a run keep its state on local disks? The one rule, checked before any cluster work.

On one machine every process sees the same files, so a local `output_dir`, `storage`,
`data.corpus` and a SQLite tracking store all work. On a cluster whose work runs on nodes
other than the driver's (a head started with `--num-cpus=0`, worker nodes with disks of
their own) each of them silently splits: the corpus lands on whichever node ran a write
task, rank 0 opens a SQLite file nobody else sees, a replacement worker finds no
checkpoint. So on such a cluster those settings stop the run at once, with one line that
names each setting and what to set it to (`s3://...`, an MLflow server).

A cluster whose nodes all mount one file system at the same path (NFS, EFS, Lustre) opts
out with `shared_filesystem: true` in the run config or `LLAMARAY_SHARED_FILESYSTEM=1` in
the driver's environment.

`shared_state_problem` is the rule on plain data (Ray's node table, the settings);
`require_shared_state` asks Ray and raises `ConfigError`. Pretraining, finetuning,
evaluation and sweeps call `require_shared_state` with the settings they use.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping

from llamaray.config import ConfigError, RunConfig

SHARED_FILESYSTEM_ENV = "LLAMARAY_SHARED_FILESYSTEM"
S3_HINT = "s3://<bucket>/<prefix>"
TRACKING_HINT = "http://<mlflow-server>:5000"


def spans_nodes(nodes: Iterable[Mapping], driver_node_id: str) -> bool:
    """True when work may run on a node other than the driver's: another node is alive, or
    the driver's own node offers no CPU and no GPU (a head with `--num-cpus=0`, whose
    workers the autoscaler has yet to add). `nodes` are `ray.nodes()` entries."""
    alive = [n for n in nodes if n.get("Alive")]
    if any(n.get("NodeID") != driver_node_id for n in alive):
        return True
    own = [n for n in alive if n.get("NodeID") == driver_node_id]
    resources = own[0].get("Resources", {}) if own else {}
    return not (resources.get("CPU", 0) > 0 or resources.get("GPU", 0) > 0)


def is_local_path(uri: str) -> bool:
    """A path on this machine's disk (no scheme, or file://), as opposed to s3:// etc."""
    return "://" not in uri or uri.startswith("file://")


def is_local_tracking(uri: str) -> bool:
    """An MLflow store in a file on this machine (sqlite:, file:, a plain path), as opposed
    to a tracking server (http(s)://), a database server or Databricks."""
    if uri.startswith(("sqlite:", "file:")):
        return True
    if uri.startswith("databricks"):
        return False
    return "://" not in uri


def shared_state_problem(
    paths: Mapping[str, str | None],
    tracking_uri: str | None,
    nodes: Iterable[Mapping],
    driver_node_id: str,
    shared_filesystem: bool = False,
) -> str | None:
    """The one line that stops a run, or None when it may go on.

    `paths` maps a setting's name (`output_dir`, `storage`, `data.corpus`, ...) to the
    location it resolves to (None: not used); `tracking_uri` is the resolved MLflow URI
    (None: tracking off). Local ones are a problem only on a cluster that `spans_nodes`,
    and not at all with `shared_filesystem`.
    """
    if shared_filesystem or not spans_nodes(nodes, driver_node_id):
        return None
    fixes = [
        f"{name}={S3_HINT} (now {value})"
        for name, value in paths.items()
        if value and is_local_path(value)
    ]
    if tracking_uri and is_local_tracking(tracking_uri):
        fixes.append(f"tracking.uri={TRACKING_HINT} (or MLFLOW_TRACKING_URI; now {tracking_uri})")
    if not fixes:
        return None
    return (
        "this Ray cluster runs work on nodes other than the driver's, and they share no disk: "
        f"set {'; '.join(fixes)}. If every node mounts the same file system at the same path, "
        f"set shared_filesystem=true (or {SHARED_FILESYSTEM_ENV}=1) instead"
    )


def run_paths(cfg: RunConfig) -> dict[str, str | None]:
    """The locations a pretraining run shares between processes: its corpus (`data.corpus`,
    else prepared under `output_dir`) and its storage (checkpoints, the exported model)."""
    corpus = {"data.corpus": cfg.data.corpus} if cfg.data.corpus else {"output_dir": cfg.output_dir}
    return corpus | {"storage": cfg.storage_path}


def shared_filesystem_opted(cfg: RunConfig | None = None) -> bool:
    """The opt-out: `shared_filesystem` in the config, or LLAMARAY_SHARED_FILESYSTEM=1."""
    env = os.environ.get(SHARED_FILESYSTEM_ENV, "").strip().lower()
    return bool(cfg is not None and cfg.shared_filesystem) or env in ("1", "true", "yes")


def require_shared_state(
    paths: Mapping[str, str | None], tracking_uri: str | None, shared_filesystem: bool = False
) -> None:
    """Raise ConfigError (one line) when the joined Ray cluster spans nodes and a setting
    keeps shared state on a local disk. Call after joining the cluster, before any work."""
    import ray

    problem = shared_state_problem(
        paths,
        tracking_uri,
        ray.nodes(),
        ray.get_runtime_context().get_node_id(),
        shared_filesystem or shared_filesystem_opted(),
    )
    if problem:
        raise ConfigError(problem)


def require_run_shared_state(cfg: RunConfig) -> None:
    """`require_shared_state` for a pretraining run's settings."""
    from llamaray.tracking import tracking_uri

    uri = tracking_uri(cfg.tracking.uri, cfg.output_dir) if cfg.tracking.enabled else None
    require_shared_state(run_paths(cfg), uri, shared_filesystem_opted(cfg))
