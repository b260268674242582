"""Run generated code in a sandbox: one program, one contained process tree, pass or fail.

HumanEval and MBPP are scored by running what the model wrote against the problem's
tests. That code is untrusted: it may loop forever, fork without end, allocate all memory,
write over files or open sockets. Each sample runs as its own process tree, where:

- **nobody else's uid**: it runs under a fresh unprivileged uid of its own (drawn per
  sample), so the kernel refuses writes to anything it does not own (the repository, the
  caller's files), and it cannot signal or read other processes or samples;
- **its own folder**: a temporary folder, owned by that uid, mounted over `/tmp` in a
  private mount namespace (its working directory); `/var/tmp`, `/dev/shm` and `/run/lock`,
  the other world-writable places, are empty 1 MiB tmpfs there. The folder is removed after;
- **no network**: a new network namespace, which has no interface but a down loopback, so
  every connect fails ("Network is unreachable");
- **limits** (`setrlimit`, through `prlimit`): CPU seconds (RLIMIT_CPU), address space
  (RLIMIT_AS), the largest file it may write, its stdout and stderr included
  (RLIMIT_FSIZE), and processes of its uid (RLIMIT_NPROC), which stops a fork bomb;
- **a wall-clock timeout**: the sample's process group is killed; it runs in its own PID
  namespace, so even processes that left the group (setsid) die with it;
- **a clean environment**: no variables of the caller (credentials stay out), Python in
  isolated mode (`-I`: no user site, no PYTHON* variables).

A sample that breaks out of a limit fails that sample only. This needs root (to create
namespaces and change uid) and util-linux's `unshare`, `setpriv` and `prlimit`; without
them `run_program` raises `SandboxUnavailable` rather than running untrusted code
uncontained (run code evaluation in a container as root, where these work unprivileged
from the host's point of view).

    >>> run_program("assert sum([1, 2]) == 3").passed  # doctest: +SKIP
    True
"""

from __future__ import annotations

import functools
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

# Inside the new namespaces, still root: put the sample's folder at /tmp, empty the other
# world-writable places, then drop to the sample's uid with the limits set. Any failure
# here is the sandbox's, not the sample's: it exits with SETUP_FAILED.
_SETUP = r"""
fail() { echo "llamaray-sandbox setup failed: $1" >&2; exit 97; }
mount --bind "$1" /tmp || fail "mount --bind $1 /tmp"
for d in /var/tmp /dev/shm /run/lock; do
  if [ -d "$d" ]; then mount -t tmpfs -o size=1m,mode=1777 tmpfs "$d" || fail "tmpfs on $d"; fi
done
cd /tmp || fail "cd /tmp"
shift
exec "$@" || fail "exec $*"
"""
SETUP_FAILED = 97
_UID_RANGE = (200_000, 2_000_000_000)  # far above any real account's uid


class SandboxUnavailable(RuntimeError):
    """This machine cannot contain untrusted code (not root, or no namespaces)."""


@dataclass(frozen=True)
class SandboxLimits:
    """What one sample may use."""

    cpu_seconds: int = 10
    """CPU time of each of its processes (RLIMIT_CPU): SIGXCPU, then SIGKILL."""
    wall_seconds: float = 20.0
    """Wall-clock time of the whole sample; then its process tree is killed."""
    memory_bytes: int = 2 << 30
    """Address space of each process (RLIMIT_AS); an allocation beyond fails."""
    file_bytes: int = 4 << 20
    """Largest file it may write, stdout and stderr included (RLIMIT_FSIZE)."""
    processes: int = 16
    """Processes (and threads) its uid may have at once (RLIMIT_NPROC)."""

    def __post_init__(self) -> None:
        bad = [
            f"{name}={getattr(self, name)} must be > 0"
            for name in ("cpu_seconds", "wall_seconds", "memory_bytes", "file_bytes", "processes")
            if getattr(self, name) <= 0
        ]
        if bad:
            raise ValueError("invalid sandbox limits: " + "; ".join(bad))


@dataclass
class SandboxResult:
    passed: bool
    """The program exited with status 0 within its limits."""
    status: str
    """"passed", "failed" (non-zero exit or a signal) or "timeout" (wall clock)."""
    returncode: int | None
    stdout: str
    stderr: str
    seconds: float


@functools.cache
def unavailable_reason() -> str | None:
    """Why this machine cannot run the sandbox, or None when it can."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "the code sandbox needs root (namespaces, a fresh uid per sample)"
    missing = [t for t in ("unshare", "setpriv", "prlimit") if shutil.which(t) is None]
    if missing:
        return f"the code sandbox needs util-linux's {', '.join(missing)}"
    probe = subprocess.run(
        ["unshare", "--net", "--pid", "--fork", "--mount", "--mount-proc", "true"],
        capture_output=True,
        text=True,
    )
    if probe.returncode != 0:
        return f"cannot create namespaces: {probe.stderr.strip()}"
    return None


def run_program(
    code: str,
    limits: SandboxLimits | None = None,
    python: str | None = None,
) -> SandboxResult:
    """Run the Python program `code` in the sandbox; passed iff it exits 0 in its limits.

    `python`: the interpreter (default: this one's real path; the standard library is all
    a benchmark's tests need)."""
    reason = unavailable_reason()
    if reason:
        raise SandboxUnavailable(reason + "; refusing to run generated code uncontained")
    limits = limits or SandboxLimits()
    python = python or os.path.realpath(sys.executable)
    _check_python(python)
    return _run(code, limits, python)


@functools.cache
def _check_python(python: str) -> None:
    """A trivial program must pass under `python`, once per process: an interpreter the
    sample's uid cannot execute (under a 0700 home, say) would otherwise fail every sample,
    a silent score of zero."""
    probe = _run("pass", SandboxLimits(), python)
    if not probe.passed:
        raise SandboxUnavailable(
            f"the sandbox cannot run {python} as an unprivileged uid (install Python where "
            f"every user can read it, or pass python=): {probe.stderr.strip()[-300:]}"
        )


def _run(code: str, limits: SandboxLimits, python: str) -> SandboxResult:
    uid = _UID_RANGE[0] + secrets.randbelow(_UID_RANGE[1] - _UID_RANGE[0])
    folder = Path(tempfile.mkdtemp(prefix="llamaray-sample-"))
    logs = Path(tempfile.mkdtemp(prefix="llamaray-sample-logs-"))  # out of the sample's reach
    try:
        (folder / "program.py").write_text(code, encoding="utf-8")
        os.chown(folder, uid, uid)
        os.chown(folder / "program.py", uid, uid)
        folder.chmod(0o700)
        command = [
            *("unshare", "--net", "--pid", "--fork", "--kill-child", "--mount", "--mount-proc"),
            *("--", "/bin/sh", "-c", _SETUP, "sandbox", str(folder)),
            "prlimit",
            f"--cpu={limits.cpu_seconds}:{limits.cpu_seconds + 1}",
            f"--as={limits.memory_bytes}",
            f"--fsize={limits.file_bytes}",
            f"--nproc={limits.processes}",
            "--core=0",
            *("--", "setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups"),
            *("--no-new-privs", "--", python, "-I", "-B", "program.py"),
        ]
        env = {"PATH": "/usr/bin:/bin", "HOME": "/tmp", "LANG": "C.UTF-8", "TMPDIR": "/tmp"}
        start = time.monotonic()
        with open(logs / "out", "wb") as out, open(logs / "err", "wb") as err:
            proc = subprocess.Popen(
                command, stdout=out, stderr=err, env=env, start_new_session=True
            )
            try:
                returncode: int | None = proc.wait(timeout=limits.wall_seconds)
                timed_out = False
            except subprocess.TimeoutExpired:
                # The group holds unshare (the PID namespace's parent): its death takes
                # the namespace's init, and the kernel then kills everything inside.
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                returncode, timed_out = None, True
        seconds = time.monotonic() - start
        stdout, stderr = _tail(logs / "out"), _tail(logs / "err")
        if returncode == SETUP_FAILED and "llamaray-sandbox setup failed" in stderr:
            raise SandboxUnavailable(stderr.strip())
        _wait_gone(uid)
        status = "timeout" if timed_out else "passed" if returncode == 0 else "failed"
        return SandboxResult(status == "passed", status, returncode, stdout, stderr, seconds)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        shutil.rmtree(logs, ignore_errors=True)


def _tail(path: Path, limit: int = 8192) -> str:
    with open(path, "rb") as f:
        f.seek(max(0, path.stat().st_size - limit))
        return f.read().decode("utf-8", "replace")


def _wait_gone(uid: int, timeout: float = 5.0) -> None:
    """Until no process of `uid` is left (a killed namespace dies asynchronously), so the
    folder is not removed under a process still writing to it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not any(_uid_of(p) == uid for p in Path("/proc").iterdir() if p.name.isdigit()):
            return
        time.sleep(0.05)


def _uid_of(proc: Path) -> int | None:
    try:
        for line in (proc / "status").read_text().splitlines():
            if line.startswith("Uid:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None
