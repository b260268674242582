"""Token authentication as cluster/aws.yaml sets it up, on one machine: the head started
with the flags and environment of aws.yaml's head start command, the token in
~/.ray/auth_token (the file aws.yaml syncs to every node), as `ray get-auth-token
--generate` writes it. A driver with the token joins; the dashboard's HTTP API and the
GCS refuse clients without it or with another; and the dashboard listens on loopback only.
"""

from __future__ import annotations

import ipaddress
import os
import re
import shlex
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

pytestmark = [pytest.mark.slow, pytest.mark.ray, pytest.mark.timeout(300)]

RAY = str(Path(sys.executable).with_name("ray"))

DRIVER = (
    "import ray, sys; ray.init(address=sys.argv[1], log_to_driver=False); "
    "print('NODES', len(ray.nodes())); ray.shutdown()"
)


def head_start_command(cluster_dir) -> tuple[dict[str, str], list[str]]:
    """aws.yaml's `ray start --head`: its environment assignments and its flags, without
    the ones tied to the real cluster (fixed ports, the autoscaler's bootstrap config)."""
    config = yaml.safe_load((cluster_dir / "aws.yaml").read_text())
    (command,) = [c for c in config["head_start_ray_commands"] if "ray start" in c]
    words = shlex.split(command.split(";")[-1])
    at = words.index("ray")
    env = dict(w.split("=", 1) for w in words[:at])
    assert words[at : at + 3] == ["ray", "start", "--head"]
    fixed = ("--port=", "--object-manager-port=", "--dashboard-port=", "--autoscaling-config=")
    return env, [w for w in words[at + 3 :] if not w.startswith(fixed)]


def http_status(url: str, token: str | None) -> int:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as err:
        return err.code


def test_head_requires_the_token(cluster_dir, ray_head, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    base = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    base["HOME"] = str(home)
    generated = subprocess.run(
        [RAY, "get-auth-token", "--generate"], env=base, capture_output=True, text=True
    )
    assert generated.returncode == 0, generated.stderr
    token = (home / ".ray" / "auth_token").read_text().strip()
    assert re.fullmatch(r"[0-9a-f]{64}", token)

    start_env, flags = head_start_command(cluster_dir)
    assert start_env == {"RAY_AUTH_MODE": "token"}
    assert "--dashboard-host=127.0.0.1" in flags
    head = ray_head(flags, dict(base, **start_env))
    env = head["env"]

    # The dashboard's HTTP API (what `ray job submit` talks to): the token or nothing.
    url = f"{head['dashboard']}/api/version"
    assert http_status(url, token) == 200
    assert http_status(url, None) == 401
    assert http_status(url, "0" * 64) == 403

    # Drivers (a job's driver runs on the head with the head's environment): with the
    # token they join; with another token, or with auth off, the GCS turns them away.
    def driver(extra: dict[str, str]) -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, "-c", DRIVER, head["address"]],
            env=dict(env, RAY_NUM_REDIS_GET_RETRIES="2", **extra),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )

    runs = {
        "token": driver({}),
        "other token": driver({"RAY_AUTH_TOKEN": "0" * 64}),
        "auth off": driver({"RAY_AUTH_MODE": "disabled", "HOME": str(tmp_path)}),
    }
    out = {name: p.communicate(timeout=120)[0] for name, p in runs.items()}
    assert runs["token"].returncode == 0 and "NODES 1" in out["token"], out["token"][-2000:]
    for name in ("other token", "auth off"):
        assert runs[name].returncode != 0, out[name][-2000:]
        assert "Failed to connect to Ray cluster" in out[name], out[name][-2000:]

    # The dashboard listens on the loopback interface only.
    port = int(head["dashboard"].rsplit(":", 1)[1])
    assert listening_addresses(port) == {"127.0.0.1"}


def listening_addresses(port: int) -> set[str]:
    """The local addresses of the TCP sockets listening on `port` (Linux's /proc/net)."""
    found = set()
    for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            local, state = line.split()[1], line.split()[3]
            addr, hex_port = local.split(":")
            if state != "0A" or int(hex_port, 16) != port:  # 0A: LISTEN
                continue
            raw = bytes.fromhex(addr)
            # /proc/net prints each 32-bit word of the address in host (little-endian) order
            words = [raw[i : i + 4][::-1] for i in range(0, width // 2, 4)]
            found.add(str(ipaddress.ip_address(b"".join(words))))
    return found
