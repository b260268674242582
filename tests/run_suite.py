"""`make test`: the whole suite, with the tests that need no Ray cluster run beside the ones
that start one, at idle CPU priority.

    python tests/run_suite.py            # what `make test` runs; PYTEST_ADDOPTS reaches both

The tests marked `ray` (tests/ray, tests/multinode, two in tests/cluster) start Ray clusters
and jobs; on 2 cores they keep the CPUs about three quarters busy, the rest of the time
waiting on processes starting, health checks, polls and timers. The other tests (tests/unit
and the cluster-file checks: `-m "not ray"`) and the doctests need no cluster. They run at
the same time, in a second pytest under the SCHED_IDLE policy: the kernel gives them only
the cycles nothing else wants, so they never take a core from the clusters, whose timing
some tests depend on (a node killed between two checkpoints, a driver killed mid-trial).

The Ray tiers' output streams as they run; the idle tier's is printed when both are done,
then one line with each tier's time and exit status. The exit status is the first non-zero
one, 0 when every tier passed. Interrupted (Ctrl-C, SIGTERM), both are stopped and their
own clean-up (tests/conftest.py) stops what they started.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RAY_TIERS = ["tests", "-q", "-m", "ray"]
IDLE_TIERS = [
    ("tests -m 'not ray'", ["tests", "-q", "-m", "not ray"]),
    ("doctests", ["platform/llamaray", "-q", "--doctest-modules"]),
]


def _make_idle(pid: int) -> None:
    """The lowest CPU priority there is (Linux's SCHED_IDLE), elsewhere the highest
    niceness; the processes `pid` starts from then on inherit it. (Set from here, not in
    a preexec_fn, which is unsafe in a process with threads.)"""
    if hasattr(os, "SCHED_IDLE"):
        os.sched_setscheduler(pid, os.SCHED_IDLE, os.sched_param(0))
    else:
        os.setpriority(os.PRIO_PROCESS, pid, 19)


class IdleTiers(threading.Thread):
    """Runs IDLE_TIERS one after another at idle priority, into one log file."""

    def __init__(self, log):
        super().__init__(daemon=True)
        self.log = log
        self.results: list[tuple[str, int, float]] = []
        self.proc: subprocess.Popen | None = None
        self.stopped = False

    def run(self) -> None:
        for name, args in IDLE_TIERS:
            if self.stopped:
                return
            began = time.monotonic()
            self.log.write(f"==== {name}\n")
            self.log.flush()
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "pytest", *args],
                cwd=REPO,
                stdout=self.log,
                stderr=subprocess.STDOUT,
            )
            _make_idle(self.proc.pid)
            self.results.append((name, self.proc.wait(), time.monotonic() - began))


def main() -> int:
    began = time.monotonic()
    with tempfile.TemporaryFile("w+") as log:
        idle = IdleTiers(log)
        idle.start()
        ray = subprocess.Popen([sys.executable, "-m", "pytest", *RAY_TIERS], cwd=REPO)

        def stop(signum, frame):  # pass it on; each pytest cleans up after itself
            idle.stopped = True
            for proc in (ray, idle.proc):
                if proc is not None and proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)

        signal.signal(signal.SIGTERM, stop)
        try:
            ray_rc = ray.wait()
        except KeyboardInterrupt:  # the terminal sent SIGINT to both pytests as well
            stop(None, None)
            ray_rc = ray.wait()
        ray_seconds = time.monotonic() - began
        idle.join()
        log.seek(0)
        sys.stdout.write(f"\n==== beside them, at idle CPU priority\n{log.read()}")
    results = [("tests -m ray", ray_rc, ray_seconds), *idle.results]
    summary = "; ".join(f"{name}: {seconds:.0f} s, exit {rc}" for name, rc, seconds in results)
    print(f"==== make test: {summary}; {time.monotonic() - began:.0f} s in all", flush=True)
    if len(idle.results) < len(IDLE_TIERS):
        return ray_rc or 1  # stopped before every tier ran
    return next((rc for _, rc, _ in results if rc), 0)


if __name__ == "__main__":
    sys.exit(main())
