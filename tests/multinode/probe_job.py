"""A job for the no-shared-disk cluster (run by `ray job submit` from test_no_shared_disk.py).

One task pinned to each worker node (by the node's custom resource) writes a file into each
private folder given on the command line; then every node, and this driver, report which of
those files they can see. Node A puts an object in S3 that node B reads back, and node B
logs a run to the MLflow server. The result is one line: `PROBE-RESULT {json}`.

python tests/multinode/probe_job.py --nodes node_a node_b --dirs DIR... --bucket B --tag T
"""

from __future__ import annotations

import argparse
import json
import os
import socket
from pathlib import Path

import ray


def write_probe(node: str, dirs: list[str], tag: str) -> dict:
    """On `node`: a file `<dir>/<tag>-<node>.txt` in each folder."""
    written = []
    for folder in dirs:
        path = Path(folder) / f"{tag}-{node}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"written on {node}\n")
        written.append(str(path))
    return {"node_id": ray.get_runtime_context().get_node_id(), "written": written}


def visible(paths: list[str]) -> list[str]:
    """Which of `paths` exist where this runs."""
    return [p for p in paths if os.path.exists(p)]


def put_s3(uri: str, text: str) -> str:
    from llamaray import storage

    storage.write_text(uri, text)
    return ray.get_runtime_context().get_node_id()


def get_s3_and_log(uri: str, run_name: str) -> dict:
    """Read what another node put in S3, and log it to the MLflow server as a run."""
    import mlflow

    from llamaray import storage

    text = storage.read_text(uri)
    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    mlflow.set_experiment("multinode-probe")
    with mlflow.start_run(run_name=run_name) as run:
        mlflow.log_metric("chars", len(text))
        mlflow.log_text(text, "from_s3.txt")  # uploaded through the server (--serve-artifacts)
    node_id = ray.get_runtime_context().get_node_id()
    return {"text": text, "run_id": run.info.run_id, "node_id": node_id}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", nargs="+", required=True)
    parser.add_argument("--dirs", nargs="+", required=True)
    parser.add_argument("--bucket", required=True)
    parser.add_argument("--tag", required=True)
    opts = parser.parse_args()

    ray.init()
    on = {n: {"resources": {n: 0.01}, "num_cpus": 0.1} for n in opts.nodes}
    writes = {
        n: ray.get(ray.remote(write_probe).options(**on[n]).remote(n, opts.dirs, opts.tag))
        for n in opts.nodes
    }
    every = [p for w in writes.values() for p in w["written"]]
    seen = {n: ray.get(ray.remote(visible).options(**on[n]).remote(every)) for n in opts.nodes}
    seen["driver"] = visible(every)

    first, second = opts.nodes[0], opts.nodes[1]
    uri = f"s3://{opts.bucket}/{opts.tag}/hello.txt"
    put_by = ray.get(ray.remote(put_s3).options(**on[first]).remote(uri, f"hello from {first}"))
    got = ray.get(
        ray.remote(get_s3_and_log).options(**on[second]).remote(uri, f"{opts.tag}-{second}")
    )
    result = {
        "driver_node_id": ray.get_runtime_context().get_node_id(),
        "driver_host": socket.gethostname(),
        "writes": writes,
        "seen": seen,
        "s3": {"uri": uri, "put_by": put_by, **got},
    }
    print("PROBE-RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
