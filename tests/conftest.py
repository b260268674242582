"""Fixtures shared by every test directory: a real S3 API (moto's server) on loopback,
not an in-process mock; Ray heads from `ray start`; the test tiers; and the cleanup that
stops every server a test started, even when the run is interrupted.

Tiers: every test that needs a Ray cluster is marked `ray` here (whole directories
tests/ray and tests/multinode, and any test using a cluster fixture), so
`make test-fast` (`-m "not ray and not slow"`) runs without one; `make test` runs all.
"""

import atexit
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest

# ------------------------------------------------------------------------------ tiers

RAY_DIRS = ("ray", "multinode")  # directories under tests/ whose every test uses Ray
RAY_FIXTURES = {"ray_cluster", "ray_head", "no_shared_disk_cluster"}
TESTS = Path(__file__).resolve().parent


def needs_ray(item: pytest.Item) -> bool:
    """True for a test in one of RAY_DIRS or one that uses a fixture starting a cluster."""
    path = Path(item.path)
    in_ray_dir = any(path.is_relative_to(TESTS / name) for name in RAY_DIRS)
    return in_ray_dir or bool(RAY_FIXTURES & set(getattr(item, "fixturenames", ())))


def pytest_collection_modifyitems(config, items):
    for item in items:
        if needs_ray(item) and item.get_closest_marker("ray") is None:
            item.add_marker(pytest.mark.ray)


# ------------------------------------------------ servers stopped even on interruption
#
# A server fixture stops its processes at teardown. Pytest runs teardown on Ctrl-C
# (KeyboardInterrupt) but not on SIGTERM (what `timeout`, CI runners and `kill` send), so
# SIGTERM is turned into the same interruption; anything a teardown still did not stop is
# stopped at interpreter exit. Servers run in sessions of their own, so stopping one stops
# the processes it forked too (the MLflow server's workers, say).

_STOPS: dict[int, Callable[[], object]] = {}


def _stop_all() -> None:
    for key in list(_STOPS):
        stop = _STOPS.pop(key, None)
        if stop is not None:
            with contextlib.suppress(Exception):
                stop()


atexit.register(_stop_all)


def _sigterm_as_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def install_sigterm_handler() -> None:
    """SIGTERM ends the run as Ctrl-C does. Call again after anything that replaces the
    handler (`ray.init` does: its handler exits, which pytest records as one failed test)."""
    with contextlib.suppress(ValueError):  # not the main thread: leave signals alone
        signal.signal(signal.SIGTERM, _sigterm_as_interrupt)


def pytest_configure(config):
    install_sigterm_handler()


@pytest.fixture(scope="session")
def sigterm_handler() -> Callable[[], None]:
    """`install_sigterm_handler`, for fixtures that must re-install it."""
    return install_sigterm_handler


def on_interrupt(key: int, stop: Callable[[], object] | None) -> None:
    """Register `stop` (None: unregister) to run at exit if the run ends before teardown."""
    if stop is None:
        _STOPS.pop(key, None)
    else:
        _STOPS[key] = stop


def stop_group(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM the session `proc` leads, then SIGKILL what is left of it after `grace` s."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=grace)
    # The leader may have exited while processes it forked (same group) have not.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)


class Servers:
    """Starts servers in sessions of their own and stops each whole (see above)."""

    def __init__(self):
        self.running: list[subprocess.Popen] = []

    def __call__(self, command: list[str], log_path: Path, env: dict | None = None):
        with open(log_path, "wb") as log:  # the child holds its own descriptor
            proc = subprocess.Popen(
                command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        self.running.append(proc)
        on_interrupt(proc.pid, lambda: stop_group(proc, grace=2.0))
        return proc

    def stop(self, proc: subprocess.Popen) -> None:
        stop_group(proc)
        on_interrupt(proc.pid, None)
        if proc in self.running:
            self.running.remove(proc)


@pytest.fixture(scope="session")
def server_process():
    """`server_process(command, log_path, env=None)` starts a server in a session of its
    own, output to `log_path`, and returns its Popen; `server_process.stop(proc)` stops it
    and every process it forked. Whatever is still running is stopped at the end of the
    test session, or at exit if the run is cut short."""
    servers = Servers()
    yield servers
    for proc in list(servers.running):
        servers.stop(proc)


# ------------------------------------------------------------------------------- S3

S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def moto_command(port: int) -> list[str]:
    exe = Path(sys.executable).with_name("moto_server")
    args = ["-H", "127.0.0.1", "-p", str(port)]
    return [str(exe), *args] if exe.exists() else [sys.executable, "-m", "moto.server", *args]


def wait_until_serving(url: str, proc: subprocess.Popen, timeout: float, what: str) -> None:
    """Poll `url` until it answers; RuntimeError if `proc` exits or `timeout` passes first."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(url, timeout=2).close()
            return
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{what} did not start (rc {proc.poll()})") from None
            time.sleep(0.2)


@pytest.fixture(scope="session")
def serving():
    """`wait_until_serving(url, proc, timeout, what)`, for tests that start servers."""
    return wait_until_serving


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory, server_process):
    """One moto S3 server for the session; each test module uses buckets of its own."""
    port = free_port()
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    proc = server_process(moto_command(port), log)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        wait_until_serving(endpoint + "/moto-api/", proc, 30, "moto_server")
    except RuntimeError as err:
        raise RuntimeError(f"{err}: {log.read_text(errors='replace')[-3000:]}") from None
    return endpoint


@pytest.fixture
def s3_client(s3_endpoint, monkeypatch):
    """A boto3 S3 client on the moto server, with the environment pointing pyarrow at it."""
    import boto3

    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.delenv("AWS_REGION", raising=False)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    for key, value in S3_ENV.items():
        monkeypatch.setenv(key, value)
    return boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")


@pytest.fixture(scope="session")
def aws_test_env() -> dict[str, str]:
    """Credentials and region moto accepts, for subprocesses that talk to it."""
    return dict(S3_ENV)


@pytest.fixture(scope="session")
def loopback_port():
    """A function returning a free TCP port on 127.0.0.1."""
    return free_port


# ------------------------------------------------------- lm-evaluation-harness offline


@pytest.fixture(scope="module")
def hf_offline(tmp_path_factory):
    """For a module using lm-evaluation-harness: it and `datasets` read local files only,
    and cache under a temporary home (`pytest.mark.usefixtures("hf_offline")`)."""
    home = tmp_path_factory.mktemp("hf-home")
    with pytest.MonkeyPatch.context() as mp:
        for name, value in {
            "HF_HOME": str(home),
            "HF_DATASETS_CACHE": str(home / "datasets"),
            "HF_DATASETS_OFFLINE": "1",
            "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
        }.items():
            mp.setenv(name, value)
        yield


# ---------------------------------------------------------------------- MLflow server


class MlflowServer:
    """A real `mlflow server` on 127.0.0.1 with a SQLite backend store and a local artifact
    folder under `root`, which a test may `stop()` and `start()` again on the same port and
    store (an outage and its end)."""

    def __init__(self, root: Path, servers: Servers):
        self.root, self.servers = root, servers
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    def start(self) -> None:
        self.starts += 1
        log = self.root / f"mlflow-{self.starts}.log"
        command = [
            str(Path(sys.executable).with_name("mlflow")), "server",
            "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
            "--artifacts-destination", str(self.root / "artifacts"),
            "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
        ]  # fmt: skip
        # Tracking needs none of the server's job runner (GenAI jobs): processes and seconds.
        env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
        self.proc = self.servers(command, log, env)
        try:
            wait_until_serving(self.uri + "/health", self.proc, 90, "mlflow server")
        except RuntimeError as err:
            raise RuntimeError(f"{err}: {log.read_text(errors='replace')[-3000:]}") from None

    def stop(self) -> None:
        if self.proc is not None:
            self.servers.stop(self.proc)
            self.proc = None


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory, server_process) -> MlflowServer:
    """One MLflow server for the session (about 10 s to start on 2 cores). A test that stops
    it starts it again before it ends."""
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server"), server_process)
    server.start()
    return server


# ------------------------------------------------------------ Ray heads from `ray start`

RAY = str(Path(sys.executable).with_name("ray"))


def is_zombie(pid: int) -> bool:
    """True for a process that has exited and waits for its parent to reap it (state Z or
    X). Its session and command line are still readable, but it holds nothing and cannot
    be killed: waiting for it to go would wait for a parent that may never reap it."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state in (b"Z", b"X")


def cluster_pids(session_id: int, marker: str) -> list[int]:
    """Live processes in session `session_id`, or whose command line contains `marker`."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        pid = int(entry)
        try:
            if is_zombie(pid):
                continue
            if os.getsid(pid) == session_id:
                pids.append(pid)
                continue
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if marker.encode() in f.read():
                    pids.append(pid)
        except OSError:  # gone, or not ours to read
            continue
    return pids


def stop_cluster(session_id: int, marker: str, grace: float = 3.0) -> list[int]:
    """SIGTERM, then SIGKILL after `grace` seconds; returns the processes still alive."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        for pid in cluster_pids(session_id, marker):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while cluster_pids(session_id, marker) and time.monotonic() < deadline:
            time.sleep(0.2)
    return cluster_pids(session_id, marker)


@pytest.fixture
def ray_head(loopback_port):
    """Factory: `ray_head(args, env, gcs_port=None)` runs `ray start --head` with free ports
    (the GCS on `gcs_port` if given), a temporary directory and `args`, in a session of its
    own, and returns {"address" (GCS host:port), "dashboard" (URL), "env", "temp", "pids"
    (a function: the cluster's live processes)}. Every head it started is stopped after the
    test."""
    if not sys.platform.startswith("linux"):
        pytest.skip("finds the cluster's processes in /proc")
    started: list[tuple[int, str]] = []

    def start(args: list[str], env: dict[str, str], gcs_port: int | None = None) -> dict:
        # A short path: Ray's Unix sockets live under it (108-byte limit).
        temp = tempfile.mkdtemp(prefix="lr-cl-", dir="/tmp")
        gcs, dashboard = gcs_port or loopback_port(), loopback_port()
        env = dict(env, RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1")
        env.pop("RAY_ADDRESS", None)
        command = [
            RAY, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={gcs}",
            f"--temp-dir={temp}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
            f"--ray-client-server-port={loopback_port()}",
            f"--dashboard-agent-listen-port={loopback_port()}", "--disable-usage-stats", *args,
        ]  # fmt: skip
        proc = subprocess.Popen(
            command,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        started.append((proc.pid, temp))
        on_interrupt(proc.pid, lambda: stop_cluster(proc.pid, temp))
        try:
            out, _ = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
        assert proc.returncode == 0, out[-4000:]
        return {
            "address": f"127.0.0.1:{gcs}",
            "dashboard": f"http://127.0.0.1:{dashboard}",
            "env": env,
            "temp": temp,
            "pids": lambda: cluster_pids(proc.pid, temp),
        }

    yield start
    left = []
    for session_id, temp in started:
        left += stop_cluster(session_id, temp)
        on_interrupt(session_id, None)
        shutil.rmtree(temp, ignore_errors=True)
    assert not left, f"processes left behind: {left}"


# ------------------------------------------------------- training in this process (no Ray)


@pytest.fixture(scope="module")
def process_group():
    """One gloo process group of one rank, for the training worker run in this process.
    A process has a single default group, so it is created once and never destroyed: any
    later test that needs one finds it there. The worker sets the thread count and seeds
    the global RNG; the module gets them back afterwards."""
    import torch

    from llamaray.train.launcher import ensure_process_group

    ensure_process_group()
    threads = torch.get_num_threads()
    with torch.random.fork_rng():
        yield
    torch.set_num_threads(threads)
