"""The final model as an MLflow model, datasets as MLflow inputs, the model-training kind of
llamaray's experiments: on a real MLflow store (SQLite), without Ray.

The model is logged from an exported Hugging Face folder as rank 0 logs it
(`tracking.log_model`), registered, loaded back with `mlflow.pyfunc.load_model` and made to
generate: its greedy text must be the text `llamaray generate` prints for the same prompt."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from llamaray import tracking
from llamaray.config import ConfigError, load_config
from llamaray.data.sample_text import write_stdlib_sample
from llamaray.model import Llama, get_preset
from llamaray.model.formats import save_hf
from llamaray.tokenizer import train_tokenizer
from llamaray.train.outputs import model_tags, registered_name

REPO = Path(__file__).resolve().parents[2]
PROMPTS = ["def main(", "import os"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    """A debug model (random weights: any tokens will do) exported as a run exports it:
    Hugging Face format with `tokenizer.model` beside the weights."""
    out = tmp_path_factory.mktemp("export")
    sample = write_stdlib_sample(out / "corpus", 200_000)
    tokenizer = train_tokenizer([sample["prose"]], out / "tokenizer", vocab_size=384)
    torch.manual_seed(0)
    model = Llama(get_preset("debug").args.with_(vocab_size=tokenizer.vocab_size))
    folder = save_hf(model, out / "hf")
    (folder / "tokenizer.model").write_bytes(Path(tokenizer.path).read_bytes())
    return folder


@pytest.fixture
def store(tmp_path) -> tuple[str, str]:
    """(tracking URI, run id) of a run in a fresh SQLite store."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id, _ = tracking.open_run(uri, "llamaray", "demo", artifact_root=tmp_path / "artifacts")
    return uri, run_id


def _cli_generate(folder: Path, prompt: str, tokens: int) -> str:
    """What `llamaray generate` prints for `prompt`, greedy."""
    command = [sys.executable, "-m", "llamaray.cli", "generate", "--model", str(folder)]
    out = subprocess.run(
        [*command, "--prompt", prompt, "--temperature", "0", "--max-new-tokens", str(tokens)],
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO,
        env={"PYTHONPATH": str(REPO / "platform"), "PATH": "/usr/bin:/bin"},
    )
    return out.stdout.rstrip("\n")


def test_registered_model_generates_what_llamaray_generate_prints(exported, store):
    import mlflow

    uri, run_id = store
    logged = tracking.log_model(uri, run_id, exported, "demo", {"llamaray.run_name": "demo"}, 7)
    assert (logged.name, logged.version, logged.registry_uri) == ("demo", "1", "models:/demo/1")
    mlflow.set_tracking_uri(uri)
    try:
        model = mlflow.pyfunc.load_model(logged.registry_uri)
        greedy = {"temperature": 0.0, "max_new_tokens": 12}
        texts = model.predict(PROMPTS, params=greedy)
        # A DataFrame (what `mlflow models serve` hands over) gives the same continuations.
        assert model.predict(pd.DataFrame({"prompt": PROMPTS}), params=greedy) == texts
        for prompt, text in zip(PROMPTS, texts, strict=True):
            assert text, "no tokens generated"
            assert _cli_generate(exported, prompt, 12) == prompt + text
        # Sampling params reach generation: another seed, another continuation.
        sampled = [
            model.predict(PROMPTS[:1], params={"temperature": 1.0, "seed": s, "top_p": 1.0})[0]
            for s in (0, 1)
        ]
        assert sampled[0] != sampled[1]
    finally:
        mlflow.set_tracking_uri(None)

    client = tracking.client(uri)
    version = client.get_model_version("demo", "1")
    assert version.run_id == run_id and version.tags["llamaray.run_name"] == "demo"
    # The run shows the model as its output, and the weights were copied, not rewritten.
    assert [o.model_id for o in client.get_run(run_id).outputs.model_outputs] == [logged.model_id]
    files = client.list_logged_model_artifacts(logged.model_id, "artifacts/hf")
    names = {Path(f.path).name for f in files}
    assert {"config.json", "model.safetensors", "tokenizer.model"} <= names
    weights = next(f for f in files if f.path.endswith("model.safetensors"))
    assert weights.file_size == (exported / "model.safetensors").stat().st_size

    # A finished run launched again logs and registers nothing new for the same step ...
    assert tracking.log_model(uri, run_id, exported, "demo", step=7) == logged
    assert len(client.get_run(run_id).outputs.model_outputs) == 1
    # ... a later step's model is the next version; the driver finds the newest.
    tracking.log_model(uri, run_id, exported, "demo", step=9)
    found = tracking.registered_versions(uri, run_id)
    assert [(m.name, m.version) for m in found] == [("demo", "1"), ("demo", "2")]


def test_unregistered_model_is_logged_without_a_version(exported, store):
    uri, run_id = store
    logged = tracking.log_model(uri, run_id, exported, None)
    assert logged.version is None and logged.registry_uri is None
    assert logged.model_uri.startswith("models:/m-")
    assert tracking.registered_versions(uri, run_id) == []


def test_registered_name_follows_the_config(tmp_path):
    base = ["name=ft", "tracking.export_hf=true"]
    assert registered_name(load_config(None, base)) == "ft"
    assert registered_name(load_config(None, [*base, "tracking.model_name=base-model"])) == (
        "base-model"
    )
    assert registered_name(load_config(None, [*base, "tracking.register_model=false"])) is None
    with pytest.raises(ConfigError, match=r"tracking\.model_name"):
        load_config(None, ["tracking.model_name=team/model"])
    tags = model_tags(load_config(None, ["name=r1", "model.preset=debug"]), "abc")
    assert tags == {
        "llamaray.run_name": "r1",
        "llamaray.model.preset": "debug",
        "llamaray.data_digest": "abc",
    }


def test_dataset_inputs_are_recorded_once_per_name_digest_and_context(store):
    uri, run_id = store
    profile = {"sources": {"wiki": {"train_tokens": 1200}}, "train_tokens": 1200}
    for _ in range(2):  # a relaunch records the same inputs again
        tracking.log_dataset(
            uri,
            run_id,
            name="corpus",
            digest="0123456789abcdef0123456789abcdef",
            source="s3://bucket/corpora/corpus/versions/v1",
            profile=profile,
            context="training",
            tensors={"tokens": ("int32", (-1, 65))},
        )
    tracking.log_dataset(
        uri,
        run_id,
        name="corpus-mixture",
        digest="feed",
        source="/c",
        profile={},
        context="mixture",
    )
    assert sorted(tracking.dataset_inputs(uri, run_id)) == [
        ("corpus", "0123456789abcdef0123456789abcdef", "training"),
        ("corpus-mixture", "feed", "mixture"),
    ]
    stored = next(
        d.dataset
        for d in tracking.client(uri).get_run(run_id).inputs.dataset_inputs
        if d.dataset.name == "corpus"
    )
    assert json.loads(stored.profile) == profile
    assert (stored.source_type, json.loads(stored.source)) == (
        "s3",
        {"uri": "s3://bucket/corpora/corpus/versions/v1"},
    )
    spec = json.loads(stored.schema)["mlflow_colspec"][0]
    assert (spec["name"], spec["tensor-spec"]) == ("tokens", {"dtype": "int32", "shape": [-1, 65]})


def test_experiments_are_of_the_model_training_kind(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = tracking.client(uri)
    tracking.open_run(uri, "new", "a", artifact_root=tmp_path)
    assert client.get_experiment_by_name("new").tags[tracking.EXPERIMENT_KIND_TAG] == (
        tracking.MODEL_TRAINING_KIND
    )
    # One made before (no kind) gets it; one whose kind a user chose keeps theirs.
    client.create_experiment("old", artifact_location=(tmp_path / "old").as_uri())
    chosen = client.create_experiment(
        "chosen",
        artifact_location=(tmp_path / "chosen").as_uri(),
        tags={tracking.EXPERIMENT_KIND_TAG: "finetuning"},
    )
    tracking.open_run(uri, "old", "a")
    tracking.open_run(uri, "chosen", "a")
    assert client.get_experiment_by_name("old").tags[tracking.EXPERIMENT_KIND_TAG] == (
        tracking.MODEL_TRAINING_KIND
    )
    assert client.get_experiment(chosen).tags[tracking.EXPERIMENT_KIND_TAG] == "finetuning"


@pytest.mark.slow
def test_mlflow_ui_shows_the_registered_model_and_the_runs_datasets(
    exported, mlflow_server, tmp_path
):
    """Headless Chromium on a real `mlflow server`: the registry lists the model's version,
    the run's page its datasets and logged model, and the link llamaray prints opens the
    experiment in the model-training view (the runs table, the model registry)."""
    import shutil

    sync_api = pytest.importorskip("playwright.sync_api")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("no chromium on PATH (make test installs Debian's chromium where it can)")
    uri = mlflow_server.uri
    run_id, _ = tracking.open_run(uri, "ui-check", "ui-demo")
    digest = "5f1c0e9a2b7d4c8e9f0a1b2c3d4e5f60"
    tracking.log_dataset(
        uri,
        run_id,
        name="corpus",
        digest=digest,
        source="/runs/corpora/corpus/versions/v1",
        profile={"train_tokens": 1_000_000},
        context="training",
        tensors={"tokens": ("int32", (-1, 65))},
    )
    tracking.log_model(uri, run_id, exported, "ui-demo", {"llamaray.run_name": "ui-demo"})
    tracking.end_run(uri, run_id)
    experiment = tracking.client(uri).get_run(run_id).info.experiment_id

    shots = Path(os.environ.get("LLAMARAY_SCREENSHOT_DIR", tmp_path))
    pages = {
        "mlflow-registered-model.png": (
            f"{uri}/#/models/ui-demo?workflowType=machine_learning",
            ["ui-demo", "Version 1", "llamaray.run_name"],
        ),
        "mlflow-run-datasets.png": (
            tracking.ui_link(uri, experiment, run_id),
            [f"corpus ({digest})", "Logged models (1)", "v1"],
        ),
        "mlflow-training-view.png": (
            tracking.ui_link(uri, experiment),
            ["Model registry", "ui-demo", f"corpus ({digest})"],
        ),
    }
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        try:
            for name, (url, texts) in pages.items():
                page = browser.new_page(viewport={"width": 1400, "height": 900})
                page.goto(url)
                for text in texts:
                    page.get_by_text(text).first.wait_for(timeout=60_000)
                page.screenshot(path=str(shots / name))
                page.close()
        finally:
            browser.close()
    assert all((shots / name).stat().st_size > 10_000 for name in pages)


@pytest.mark.slow
def test_mlflow_models_serve_answers_with_the_models_continuations(
    exported, tmp_path, server_process, serving, loopback_port
):
    """`mlflow models serve` on the registered model (in the current environment) answers
    a REST request with the continuations `predict` gives in process."""
    import urllib.request

    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id, _ = tracking.open_run(uri, "llamaray", "served", artifact_root=tmp_path / "a")
    logged = tracking.log_model(uri, run_id, exported, "served")
    request = {"inputs": PROMPTS, "params": {"temperature": 0.0, "max_new_tokens": 6}}
    mlflow.set_tracking_uri(uri)
    try:
        model = mlflow.pyfunc.load_model(logged.registry_uri)
        expected = model.predict(PROMPTS, params=request["params"])
    finally:
        mlflow.set_tracking_uri(None)
    port = loopback_port()
    bin_dir = Path(sys.executable).parent  # its scoring server runs `uvicorn` from PATH
    env = dict(os.environ, MLFLOW_TRACKING_URI=uri, PATH=f"{bin_dir}:{os.environ['PATH']}")
    command = [str(bin_dir / "mlflow"), "models", "serve", "-m", logged.registry_uri]
    server = server_process(
        [*command, "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)],
        tmp_path / "serve.log",
        env,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        serving(f"{url}/ping", server, 120, "mlflow models serve")
        post = urllib.request.Request(
            f"{url}/invocations",
            data=json.dumps(request).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(post, timeout=120) as answer:
            assert json.loads(answer.read()) == {"predictions": expected}
    finally:
        server_process.stop(server)


def test_the_model_goes_up_without_the_short_request_bound(store, exported, monkeypatch):
    """Rank 0 bounds MLflow's requests to 10 s; a weights file of gigabytes goes up in one
    request, so the bound is lifted while the model is logged, unless the operator set it."""
    uri, run_id = store
    seen = []

    def log_model(*args, **kwargs):
        seen.append(os.environ.get("MLFLOW_HTTP_REQUEST_TIMEOUT"))
        return tracking.RegisteredModel("models:/m-0", "m-0")

    monkeypatch.setattr(tracking, "log_model", log_model)
    bound = tracking.HTTP_LIMITS["MLFLOW_HTTP_REQUEST_TIMEOUT"]
    for operators in (None, "77"):
        if operators is None:
            monkeypatch.delenv("MLFLOW_HTTP_REQUEST_TIMEOUT", raising=False)
        else:
            monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", operators)
        logger = tracking.MetricLogger(uri, run_id, system_metrics=False)
        assert logger.model(exported, None, {}, 1).model_id == "m-0"
        assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == (operators or bound)  # restored
        logger.finish()
    assert seen == [str(tracking.MODEL_UPLOAD_TIMEOUT_S), "77"]
