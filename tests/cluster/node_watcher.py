"""Counts a Ray cluster's alive nodes, for tests/cluster/test_autoscaling.py.

RAY_ADDRESS=host:port python tests/cluster/node_watcher.py [--settle-timeout S]

Joins the cluster (a driver that holds no objects, so it keeps no node busy), prints READY,
and samples the number of alive nodes every half second until a line arrives on stdin (the
test's "the job is over"); then it waits, up to the settle timeout, for the autoscaler to
remove the idle worker nodes, and prints one line `RESULT {json}`: the peak before the
signal, the count at the end, how long scaling down took, and the samples.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time

import ray


def alive_nodes() -> int:
    return sum(1 for node in ray.nodes() if node["Alive"])


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--settle-timeout", type=float, default=90.0)
    parser.add_argument("--period", type=float, default=0.5)
    opts = parser.parse_args()

    ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=False)
    job_over = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.readline(), job_over.set()), daemon=True).start()
    t0 = time.monotonic()
    samples: list[tuple[float, int]] = []

    def sample() -> int:
        n = alive_nodes()
        samples.append((round(time.monotonic() - t0, 1), n))
        return n

    sample()
    print("READY", flush=True)
    while not job_over.wait(opts.period):
        sample()
    peak = max(n for _, n in samples)
    ended = time.monotonic()
    deadline = ended + opts.settle_timeout
    while sample() > 1 and time.monotonic() < deadline:
        time.sleep(opts.period)
    result = {
        "peak_nodes_during_job": peak,
        "nodes_after": samples[-1][1],
        "scale_down_seconds": round(time.monotonic() - ended, 1),
        # (seconds, alive nodes) each time the count changed
        "changes": [s for i, s in enumerate(samples) if i == 0 or s[1] != samples[i - 1][1]],
    }
    print("RESULT " + json.dumps(result), flush=True)
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
