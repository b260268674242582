"""A Ray cluster whose nodes share no disk, on one machine.

Every Ray node (the head too) runs in a mount namespace of its own (`unshare -m`) in which
/tmp, /dev/shm, the checkout's output folder (`runs/`) and pytest's temporary folders are
private tmpfs mounts. A file one node writes there is invisible to every other node and to
the process that started the cluster, as on a real cluster where each node has its own disk.
All nodes share 127.0.0.1 and the PID namespace, so each gets ports of its own. The shared
state is what a cluster has: S3 (moto's server) and a real `mlflow server`, both on loopback.

Why this works with several nodes on one IP: a driver (the job supervisor's child on the
head) finds raylets by scanning the process table, which lists every node here, and Ray
picks the head among nodes on the same IP (`get_node_to_connect_for_driver`). Its
`RAY_ADDRESS=auto` reads the head's bootstrap file from the head's own temp dir, so other
Ray clusters on the machine are never picked up.

Used by tests/multinode/conftest.py; `python multinode_cluster.py --reap ...` is the
watchdog that stops the cluster if the test process dies without cleaning up.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import random
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
RAY = str(BIN / "ray")
BUCKET = "mlflow-artifacts"
S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}
# Node death is noticed in about 3 s instead of Ray's default ~30 s (GCS health checks).
FAST_FAILURE_DETECTION = {
    "RAY_health_check_initial_delay_ms": "1000",
    "RAY_health_check_period_ms": "1000",
    "RAY_health_check_timeout_ms": "1000",
    "RAY_health_check_failure_threshold": "3",
}
READY, FAILED = "LLAMARAY-NODE-READY", "LLAMARAY-NODE-FAILED"  # in a node's start-up log
OBJECT_STORE_BYTES = 150 * 1024 * 1024  # small: the machine is shared, the tests move little


def _root_conftest():
    """tests/conftest.py loaded by path: its helpers without depending on which `conftest`
    module pytest last put in sys.modules."""
    spec = importlib.util.spec_from_file_location(
        "_llamaray_tests_conftest", Path(__file__).resolve().parents[1] / "conftest.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_helpers = _root_conftest()
free_port = _helpers.free_port
moto_command = _helpers.moto_command
wait_until_serving = _helpers.wait_until_serving
cluster_pids = _helpers.cluster_pids


def node_ip() -> str:
    """The address Ray gives every node started with --node-ip-address=127.0.0.1."""
    from ray._private.services import resolve_ip_for_localhost

    return resolve_ip_for_localhost("127.0.0.1")


def unavailable_reason() -> str | None:
    """Why this machine cannot run the cluster, or None if it can."""
    if not sys.platform.startswith("linux"):
        return "needs Linux mount namespaces"
    if os.geteuid() != 0:
        return "needs root for `unshare -m` and tmpfs mounts (run the tests as root, as CI does)"
    if shutil.which("unshare") is None:
        return "needs `unshare` (util-linux) on PATH"
    probe = subprocess.run(
        ["unshare", "-m", "--propagation", "private", "true"], capture_output=True, text=True
    )
    if probe.returncode != 0:
        return f"`unshare -m` is not permitted here: {probe.stderr.strip()}"
    return None


class JobResult(NamedTuple):
    rc: int
    logs: str


@dataclass
class Node:
    """One Ray node: `ray start --block` in a mount namespace of its own."""

    name: str
    proc: subprocess.Popen
    temp_dir: str
    log_path: Path
    is_head: bool = False
    tag: bytes = b""  # LLAMARAY_MULTINODE=<marker>, in the environment of every node process
    namespace: str = ""  # /proc/<pid>/ns/mnt of the node's processes
    node_id: str = ""

    def pids(self) -> list[int]:
        """Every live process of this node: its session, or its mount namespace (Ray
        workers that left the session are still in the namespace) and the cluster's tag
        (a namespace's number can be reused once it is gone)."""
        found = set(cluster_pids(self.proc.pid, self.temp_dir))
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                with contextlib.suppress(OSError):
                    if os.readlink(f"/proc/{entry}/ns/mnt") == self.namespace:
                        with open(f"/proc/{entry}/environ", "rb") as f:
                            if self.tag in f.read().split(b"\0"):
                                found.add(int(entry))
        found.discard(os.getpid())
        return sorted(found)

    def run(self, command: str, timeout: float = 60) -> subprocess.CompletedProcess:
        """`command` (shell) inside this node's mount namespace: what the node's disk holds."""
        pids = self.pids()
        if not pids:
            raise RuntimeError(f"node {self.name} has no live process to enter")
        return subprocess.run(
            ["nsenter", "-t", str(pids[0]), "-m", "sh", "-c", command],
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def log_tail(self, chars: int = 3000) -> str:
        """The end of `ray start`'s output and, while the node lives, of its Ray logs (they
        are on the node's private disk)."""
        text = ""
        with contextlib.suppress(OSError):
            text = self.log_path.read_text(errors="replace")[-chars:]
        try:
            logs = f"{shlex.quote(self.temp_dir)}/session_latest/logs"
            done = self.run(
                f"cd {logs} && tail -n 25 raylet.err gcs_server.err dashboard_agent.err",
                timeout=20,
            )
            text += "\n" + (done.stdout + done.stderr)[-chars:]
        except Exception as err:  # a diagnostic: never hide the failure it explains
            text += f"\n(no Ray logs from node {self.name}: {err})"
        return text


@dataclass
class NoSharedDiskCluster:
    """Head (0 CPUs) plus worker nodes, each with a private disk; moto S3 and an MLflow
    server as the only shared state. Start with `start()`, stop with `stop()`."""

    private_dirs: list[str]  # mounted as private tmpfs in every node, beside /tmp and /dev/shm
    workers: int = 2
    cpus_per_worker: int = 2
    root: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="lrmn-", dir="/tmp")))
    head: Node | None = None
    nodes: list[Node] = field(default_factory=list)
    services: list[subprocess.Popen] = field(default_factory=list)
    gcs_address: str = ""
    dashboard_url: str = ""
    s3_endpoint: str = ""
    mlflow_uri: str = ""
    _started: list[Node] = field(default_factory=list)  # every node ever started
    _worker_port_base: int = field(default_factory=lambda: random.randrange(20000, 28000, 400))
    _node_count: int = 0
    _count_lock: threading.Lock = field(default_factory=threading.Lock)
    _keep_dirs: list[Path] = field(default_factory=list)  # see _launch: a checkout under /tmp

    # ------------------------------------------------------------------ start and stop

    @property
    def marker(self) -> str:
        """A string in the command line of every Ray process of this cluster (temp dirs)."""
        return f"/tmp/{self.root.name}/"

    @property
    def env(self) -> dict[str, str]:
        """Environment for jobs: S3 on moto, the MLflow server, no Ray auth token."""
        return {
            **S3_ENV,
            "AWS_ENDPOINT_URL": self.s3_endpoint,
            "MLFLOW_TRACKING_URI": self.mlflow_uri,
            "MLFLOW_S3_ENDPOINT_URL": self.s3_endpoint,
            "RAY_AUTH_MODE": "disabled",
        }

    def start(self) -> NoSharedDiskCluster:
        self._start_watchdog()
        s3_port, mlflow_port = free_port(), free_port()
        self.s3_endpoint = f"http://127.0.0.1:{s3_port}"
        self.mlflow_uri = f"http://127.0.0.1:{mlflow_port}"
        moto = self._service("moto", moto_command(s3_port), os.environ)
        self.head = self._launch("head", head=True)
        wait_until_serving(self.s3_endpoint + "/moto-api/", moto, 60, "moto_server")
        self._make_bucket(BUCKET)
        mlflow = self._service(
            "mlflow",
            [
                str(BIN / "mlflow"),
                "server",
                "--backend-store-uri",
                f"sqlite:///{self.root / 'mlflow.db'}",
                "--artifacts-destination",
                f"s3://{BUCKET}/runs",
                "--serve-artifacts",
                "--host",
                "127.0.0.1",
                "--port",
                str(mlflow_port),
                "--workers",
                "1",
            ],
            {
                **os.environ,
                **S3_ENV,
                "MLFLOW_S3_ENDPOINT_URL": self.s3_endpoint,
                # Tracking needs none of the server's job runner (GenAI jobs): 8 processes,
                # about 25 s of CPU to start, taken from the nodes starting beside it.
                "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
            },
        )
        # The worker nodes start together: each waits mostly on its own processes' imports,
        # and a failed start is retried alone (`_launch`).
        names = [f"node_{chr(ord('a') + i)}" for i in range(self.workers)]
        with ThreadPoolExecutor(len(names)) as pool:
            self.nodes.extend(pool.map(self._launch, names))
        try:
            wait_until_serving(self.mlflow_uri + "/health", mlflow, 180, "mlflow server")
        except RuntimeError as err:
            raise RuntimeError(f"{err}: {self._service_log('mlflow')}") from None
        return self

    def stop(self) -> list[int]:
        """Stop every node and service; returns the PIDs still alive (should be none).
        Stopping again returns what the first stop returned."""
        if self._stopped is not None:
            return self._stopped
        self._stopped = self._stop()
        return self._stopped

    _stopped: list[int] | None = None

    def _stop(self) -> list[int]:
        if self._watchdog is not None:
            self._watchdog.kill()
            self._watchdog.wait(timeout=10)
        # Nothing of the cluster outlives it (every disk is a private tmpfs, S3 and the
        # MLflow store are thrown away), so there is nothing to shut down gracefully: kill.
        for node in reversed(self._started):  # nodes still starting too; the head last
            self._kill(node, signal.SIGKILL, grace=0.0)
        for proc in self.services:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=3)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        left = _sweep(self.marker)  # anything of ours that escaped its node's namespace
        shutil.rmtree(self.root, ignore_errors=True)
        for keep in self._keep_dirs:  # empty on the host: the mounts were the nodes' own
            shutil.rmtree(keep, ignore_errors=True)
        return left

    _watchdog: subprocess.Popen | None = None

    def _start_watchdog(self) -> None:
        """A process that stops the cluster if this one dies without doing it (SIGKILL)."""
        self._watchdog = subprocess.Popen(
            [sys.executable, __file__, "--reap", str(os.getpid()), self.marker, str(self.root)],
            start_new_session=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def _service(self, name: str, command: list[str], env) -> subprocess.Popen:
        log = open(self.root / f"{name}.log", "wb")  # noqa: SIM115 - the child holds it
        proc = subprocess.Popen(
            command,
            env={**env, "LLAMARAY_MULTINODE": self.marker},  # the watchdog finds it by this
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        self.services.append(proc)
        return proc

    def _service_log(self, name: str) -> str:
        return (self.root / f"{name}.log").read_text(errors="replace")[-3000:]

    def _make_bucket(self, name: str) -> None:
        import boto3

        boto3.client(
            "s3",
            endpoint_url=self.s3_endpoint,
            region_name="us-east-1",
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        ).create_bucket(Bucket=name)

    # ------------------------------------------------------------------ nodes

    def _start_node(self, name: str, head: bool = False, resources: dict | None = None) -> Node:
        temp_dir = f"/tmp/{self.root.name}/{name}"  # short: Unix socket paths <= 107 bytes
        ports = {
            "--node-manager-port": free_port(),
            "--object-manager-port": free_port(),
            "--dashboard-agent-listen-port": free_port(),
            "--dashboard-agent-grpc-port": free_port(),
            "--runtime-env-agent-port": free_port(),
            "--metrics-export-port": free_port(),
        }
        # Disjoint worker port ranges: every node listens on the same IP.
        with self._count_lock:  # worker nodes start concurrently
            low = self._worker_port_base + 100 * self._node_count
            self._node_count += 1
        args = [
            RAY, "start", "--node-ip-address=127.0.0.1", f"--temp-dir={temp_dir}",
            f"--min-worker-port={low}", f"--max-worker-port={low + 99}",
            f"--object-store-memory={OBJECT_STORE_BYTES}", "--disable-usage-stats",
            *(f"{flag}={port}" for flag, port in ports.items()),
        ]  # fmt: skip
        if head:
            gcs, dashboard = free_port(), free_port()
            # Ray swaps 127.0.0.1 for the machine's address (`resolve_ip_for_localhost`) and
            # the GCS listens there: every node still shares the one IP.
            self.gcs_address = f"{node_ip()}:{gcs}"
            self.dashboard_url = f"http://127.0.0.1:{dashboard}"
            args += [
                "--head", "--num-cpus=0", f"--port={gcs}", "--include-dashboard=true",
                "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
                f"--ray-client-server-port={free_port()}",
            ]  # fmt: skip
        else:
            args += [
                f"--address={self.gcs_address}",
                f"--num-cpus={self.cpus_per_worker}",
                f"--resources={json.dumps(resources or {name: 1})}",
            ]
        script = "set -e\n"
        # A checkout under /tmp (`git clone . /tmp/x`) would vanish under the private /tmp:
        # hold it on a mount point outside /tmp meanwhile, then move it back in place.
        keep = None
        if REPO.is_relative_to("/tmp"):
            keep = Path(tempfile.mkdtemp(prefix=f"lrmn-keep-{name}-", dir="/var/tmp"))
            self._keep_dirs.append(keep)
            script += f"mount --bind {shlex.quote(str(REPO))} {shlex.quote(str(keep))}\n"
        for path in ("/tmp", "/dev/shm"):
            script += f"mount -t tmpfs -o mode=1777 lrmn-{name} {path}\n"
        if keep is not None:
            repo = shlex.quote(str(REPO))
            script += f"mkdir -p {repo}\nmount --move {shlex.quote(str(keep))} {repo}\n"
        for path in self.private_dirs:
            quoted = shlex.quote(path)
            script += f"mkdir -p {quoted}\nmount -t tmpfs -o mode=1777 lrmn-{name} {quoted}\n"
        # The private /tmp hides pytest's folders: give the node empty ones of its own.
        script += "".join(f"mkdir -p {shlex.quote(p)}\n" for p in self.private_dirs)
        # `ray start` returns once the node is up; `sleep` then holds the namespace open (the
        # node's processes live in it either way) and is where `nsenter` enters the node.
        script += (
            f"mkdir -p {shlex.quote(temp_dir)}\n"
            f"if {shlex.join(args)}; then echo {READY}; else\n"
            # The node's logs are on its private disk: copy their ends into the start-up log.
            f"  for f in {shlex.quote(temp_dir)}/session_latest/logs/*.err; do\n"
            '    echo "== $f"; grep -v state-dump "$f" | tail -n 20; done\n'
            f"  echo {FAILED}\nfi\n"
            "exec sleep 2147483647\n"
        )
        for path in self.private_dirs:  # the mount points must exist on the host
            if not path.startswith("/tmp/"):
                Path(path).mkdir(parents=True, exist_ok=True)
        env = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith(("RAY_", "AWS_", "MLFLOW_"))
        }
        env.update(
            PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",  # the job's `python` is the venv's
            RAY_USAGE_STATS_ENABLED="0",
            RAY_AUTH_MODE="disabled",
            PYTHONUNBUFFERED="1",
            LLAMARAY_MULTINODE=self.marker,  # inherited by every Ray process: the watchdog's tag
            **(FAST_FAILURE_DETECTION if head else {}),
            # Patience for agents that import slowly on a loaded machine.
            RAY_agent_register_timeout_ms="120000",
        )
        log_path = self.root / f"{name}.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                ["unshare", "-m", "--propagation", "private", "sh", "-c", script],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                cwd="/",
            )
        node = Node(name=name, proc=proc, temp_dir=temp_dir, log_path=log_path, is_head=head)
        node.tag = f"LLAMARAY_MULTINODE={self.marker}".encode()
        self._started.append(node)
        deadline = time.monotonic() + 30
        # The namespace is the node's once the shell has moved in (before `ray start`).
        while not node.namespace or node.namespace == os.readlink("/proc/self/ns/mnt"):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"node {name} did not start: {node.log_tail()}")
            with contextlib.suppress(OSError):
                node.namespace = os.readlink(f"/proc/{proc.pid}/ns/mnt")
            time.sleep(0.05)
        return node

    def _launch(self, name: str, head: bool = False, resources: dict | None = None) -> Node:
        """Start a node and wait until the GCS lists it. On a loaded machine a raylet can
        give up on its dashboard agent's start-up (a fatal error in Ray), so a failed start
        is cleaned up and tried again, up to three times."""
        for attempt in range(3):
            node = self._start_node(name, head=head, resources=resources)
            try:
                self._wait_alive(node)
                return node
            except RuntimeError as err:
                self._kill(node, signal.SIGKILL, grace=0.0)
                if attempt == 2:
                    raise
                print(f"[multinode] node {name} failed to start, retrying: {err}"[:2000])
        raise AssertionError("unreachable")

    def add_node(self, name: str | None = None, resources: dict | None = None) -> Node:
        """Start one more worker node with a fresh private disk; its custom resource is its
        name (`node_a`, `node_b`, ...) unless `resources` is given."""
        name = name or f"node_{chr(ord('a') + len(self.nodes))}"
        node = self._launch(name, resources=resources)
        self.nodes.append(node)
        return node

    def kill_node(self, i: int) -> None:
        """SIGKILL every process of worker node `i` (raylet, agents, workers) at once, as a
        lost machine: its disk (tmpfs) goes with it."""
        self._kill(self.nodes[i], signal.SIGKILL, grace=0.0)

    def restart_node(self, i: int) -> Node:
        """Kill worker node `i` if alive and start a replacement with the same name and
        resources on a fresh, empty disk."""
        old = self.nodes[i]
        self._kill(old, signal.SIGKILL, grace=0.0)
        self._wait_dead(old)
        self.nodes[i] = node = self._launch(old.name)
        return node

    def _kill(self, node: Node, sig: int, grace: float) -> None:
        for step, wait in ((sig, grace), (signal.SIGKILL, 10.0)):
            for pid in node.pids():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, step)
            deadline = time.monotonic() + wait
            while node.pids() and time.monotonic() < deadline:
                time.sleep(0.1)
        with contextlib.suppress(subprocess.TimeoutExpired):
            node.proc.wait(timeout=5)
        if node.pids():
            raise RuntimeError(f"node {node.name} survived SIGKILL: {node.pids()}")

    def alive_nodes(self) -> list[dict]:
        """The cluster's view (state API on the dashboard): [{"node_id", "resources",
        "is_head"}] of ALIVE nodes."""
        from ray.util.state import list_nodes

        nodes = list_nodes(
            address=self.dashboard_url,
            filters=[("state", "=", "ALIVE")],
            timeout=30,
            raise_on_missing_output=False,
        )
        return [
            {"node_id": n.node_id, "resources": dict(n.resources_total), "is_head": n.is_head_node}
            for n in nodes
        ]

    def _wait_alive(self, node: Node, timeout: float = 240) -> None:
        """Until `ray start` in the node has returned and the GCS lists the node as alive."""
        deadline = time.monotonic() + timeout
        while True:
            started = node.log_path.read_text(errors="replace")
            if node.proc.poll() is not None or FAILED in started:
                raise RuntimeError(f"node {node.name} did not start: {node.log_tail()}")
            if READY in started:
                if node.is_head:  # the state API is served by the dashboard
                    wait_until_serving(
                        self.dashboard_url + "/api/version", node.proc, 60, "dashboard"
                    )
                taken = {n.node_id for n in self.nodes if n is not node}
                for info in self.alive_nodes():
                    if info["node_id"] in taken:
                        continue
                    if info["is_head"] if node.is_head else node.name in info["resources"]:
                        node.node_id = info["node_id"]
                        break
                if node.node_id:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"node {node.name} never joined: {node.log_tail()}")
            time.sleep(0.5)

    def _wait_dead(self, node: Node, timeout: float = 60) -> None:
        """Until the GCS has marked `node` dead (health checks; ~3 s here)."""
        deadline = time.monotonic() + timeout
        while any(n["node_id"] == node.node_id for n in self.alive_nodes()):
            if time.monotonic() > deadline:
                raise RuntimeError(f"the GCS still lists node {node.name} as alive")
            time.sleep(0.5)

    # ------------------------------------------------------------------ jobs

    def runtime_env(self, env_vars: dict | None = None, shared: bool = True, **extra) -> dict:
        """The runtime env of jobs/runtime_env.yaml (this checkout, `platform` importable)
        with the cluster's environment for S3 and MLflow (`shared=False`: without it, only
        RAY_AUTH_MODE, to try a program's local defaults)."""
        import yaml

        # The file users pass to `ray job submit --runtime-env`, so it is tested here.
        documented = yaml.safe_load((REPO / "jobs" / "runtime_env.yaml").read_text())
        base = self.env if shared else {"RAY_AUTH_MODE": "disabled"}
        return {
            **documented,
            "working_dir": str(REPO / documented["working_dir"]),  # submitted from anywhere
            "env_vars": {**documented["env_vars"], **base, **(env_vars or {})},
            **extra,
        }

    def submit(
        self,
        entrypoint: str | list[str],
        runtime_env: dict | None = None,
        timeout: float = 600,
        submission_id: str | None = None,
    ) -> JobResult:
        """`ray job submit` to the head's dashboard; waits for the end and returns the exit
        status of `ray job submit` (0 when the job succeeded) and the job's logs."""
        # `ray job submit` quotes each argument after `--` itself.
        argv = shlex.split(entrypoint) if isinstance(entrypoint, str) else list(entrypoint)
        submission_id = submission_id or f"job-{uuid.uuid4().hex[:8]}"
        command = [
            RAY, "job", "submit", "--address", self.dashboard_url,
            "--submission-id", submission_id,
            "--runtime-env-json", json.dumps(runtime_env or self.runtime_env()),
            "--", *argv,
        ]  # fmt: skip
        client_env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
        client_env["RAY_AUTH_MODE"] = "disabled"
        try:
            done = subprocess.run(
                command, env=client_env, capture_output=True, text=True, timeout=timeout, cwd=REPO
            )
            rc, out = done.returncode, done.stdout + done.stderr
        except subprocess.TimeoutExpired as err:
            subprocess.run(
                [RAY, "job", "stop", "--address", self.dashboard_url, submission_id],
                env=client_env, capture_output=True, timeout=60,
            )  # fmt: skip
            rc, out = 124, f"timed out after {timeout}s\n{_text(err.stdout)}{_text(err.stderr)}"
        logs = subprocess.run(
            [RAY, "job", "logs", "--address", self.dashboard_url, submission_id],
            env=client_env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        return JobResult(rc, logs.stdout if logs.returncode == 0 and logs.stdout else out)


def _text(data) -> str:
    return data.decode(errors="replace") if isinstance(data, bytes) else (data or "")


def _tagged(marker: str) -> list[int]:
    """Processes of the cluster: the marker in their command line, or the tag every node
    and service process inherits in its environment."""
    tag = f"LLAMARAY_MULTINODE={marker}".encode()
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                ours = marker.encode() in f.read()
            if not ours:
                with open(f"/proc/{entry}/environ", "rb") as f:
                    ours = tag in f.read()
            if ours:
                pids.append(int(entry))
    return pids


def _sweep(marker: str, grace: float = 3.0) -> list[int]:
    """SIGTERM, then SIGKILL, every tagged process; returns those still alive."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        for pid in _tagged(marker):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while _tagged(marker) and time.monotonic() < deadline:
            time.sleep(0.2)
    return _tagged(marker)


def _reap(parent: int, marker: str, root: str) -> None:
    """Watchdog: once `parent` is gone (even by SIGKILL), stop every process of the cluster."""
    while True:
        try:
            os.kill(parent, 0)
        except ProcessLookupError:
            break
        time.sleep(1)
    _sweep(marker)
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__" and sys.argv[1:2] == ["--reap"]:
    _reap(int(sys.argv[2]), sys.argv[3], sys.argv[4])
