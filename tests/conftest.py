"""Fixtures shared by every test directory: a real S3 API (moto's server) on loopback,
not an in-process mock."""

import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

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


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory):
    """One moto S3 server for the session; each test module uses buckets of its own."""
    port = free_port()
    log = open(tmp_path_factory.mktemp("moto") / "moto.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(moto_command(port), stdout=log, stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(endpoint + "/moto-api/", timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto_server did not start (rc {proc.poll()})") from None
                time.sleep(0.1)
        yield endpoint
    finally:
        proc.kill()
        proc.wait(timeout=10)
        log.close()


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
