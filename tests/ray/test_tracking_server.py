"""Pretraining runs logged to a real `mlflow server` on 127.0.0.1 whose artifacts live in
S3 (moto's server): the shared-MLflow path of a cluster, on one machine."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from pretrain_helpers import config, history

from llamaray.orchestrate.pretrain import pretrain

pytestmark = pytest.mark.ray

BUCKET = "mlflow-artifacts"


@pytest.fixture(scope="module")
def server(s3_endpoint, aws_test_env, loopback_port, serving, server_process, tmp_path_factory):
    import boto3

    boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1", **_keys()).create_bucket(
        Bucket=BUCKET
    )
    root = tmp_path_factory.mktemp("mlflow-server")
    port = loopback_port()
    env = dict(os.environ, **aws_test_env, MLFLOW_S3_ENDPOINT_URL=s3_endpoint)
    command = [
        str(Path(sys.executable).with_name("mlflow")), "server",
        "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
        "--artifacts-destination", f"s3://{BUCKET}/runs", "--serve-artifacts",
        "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
    ]  # fmt: skip
    # In a session of its own: stopped whole (its uvicorn and job workers too) after the
    # module, or at exit if the run is interrupted first.
    proc = server_process(command, root / "server.log", env)
    uri = f"http://127.0.0.1:{port}"
    try:
        try:
            serving(uri + "/health", proc, 120, "mlflow server")
        except RuntimeError as err:
            raise RuntimeError(f"{err}: {(root / 'server.log').read_text()[-3000:]}") from None
        yield uri
    finally:
        server_process.stop(proc)


def _keys() -> dict:
    return {"aws_access_key_id": "testing", "aws_secret_access_key": "testing"}


@pytest.fixture(scope="module")
def two_runs(server, tmp_path_factory):
    """Two short runs with different learning rates, tracked on the server."""
    root = tmp_path_factory.mktemp("runs")
    return [
        pretrain(config(root, name, f"tracking.uri={server}", f"optimizer.lr={lr}"))
        for name, lr in (("lr-3e-3", 3e-3), ("lr-1e-3", 1e-3))
    ]


def test_runs_and_artifacts_land_on_the_server_and_in_s3(server, two_runs, s3_endpoint):
    import boto3

    client = MlflowClient(server)
    for run in two_runs:
        assert run.tracking_uri == server
        info = client.get_run(run.mlflow_run_id)
        assert info.info.status == "FINISHED"
        assert info.info.artifact_uri.startswith("mlflow-artifacts:")
        assert sorted(history(run)) == list(range(1, 7))
        names = {a.path for a in client.list_artifacts(run.mlflow_run_id)}
        assert {"config.yaml", "loss_curve.png", "model"} <= names
    lrs = {client.get_run(r.mlflow_run_id).data.params["optimizer.lr"] for r in two_runs}
    assert lrs == {"0.003", "0.001"}

    s3 = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1", **_keys())
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET)["Contents"]]
    for run in two_runs:
        mine = [k for k in keys if run.mlflow_run_id in k]
        assert any(k.endswith("loss_curve.png") for k in mine), mine
        assert any(k.endswith("model.safetensors") for k in mine), mine


def test_mlflow_ui_compares_two_runs_in_chromium(server, two_runs, tmp_path):
    """Headless Chromium opens the MLflow UI's comparison of the two runs."""
    import json
    import shutil

    sync_api = pytest.importorskip("playwright.sync_api")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("no chromium on PATH (make test installs Debian's chromium where it can)")
    client = MlflowClient(server)
    experiment = client.get_run(two_runs[0].mlflow_run_id).info.experiment_id
    ids = [r.mlflow_run_id for r in two_runs]
    url = f"{server}/#/compare-runs?runs={json.dumps(ids)}&experiments={json.dumps([experiment])}"
    shot = Path(os.environ.get("LLAMARAY_SCREENSHOT_DIR", tmp_path)) / "mlflow-compare.png"
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(url)
            for run in two_runs:  # the comparison names both runs
                page.get_by_text(run.name).first.wait_for(timeout=60_000)
            page.get_by_text("optimizer.lr").first.wait_for(timeout=60_000)
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    assert shot.stat().st_size > 10_000
