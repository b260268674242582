"""The rule for local paths on a cluster (`llamaray.placement`), on plain data: Ray's
node table as `ray.nodes()` returns it, and the settings a run resolves."""

from __future__ import annotations

import pytest

from llamaray.config import load_config
from llamaray.placement import (
    SHARED_FILESYSTEM_ENV,
    is_local_path,
    is_local_tracking,
    run_paths,
    shared_filesystem_opted,
    shared_state_problem,
    spans_nodes,
)


def node(node_id: str, cpus: float = 0, gpus: float = 0, alive: bool = True) -> dict:
    resources = {"memory": 1e9, f"node:{node_id}": 1.0}
    if cpus:
        resources["CPU"] = cpus
    if gpus:
        resources["GPU"] = gpus
    return {"NodeID": node_id, "Alive": alive, "Resources": resources}


ONE_MACHINE = [node("head", cpus=8)]
HEAD_AND_WORKER = [node("head"), node("worker-1", cpus=16)]
AUTOSCALE_FROM_ZERO = [node("head")]  # no worker yet: work will run on nodes to come
TWO_WITH_CPUS = [node("head", cpus=8), node("worker-1", cpus=8, gpus=1)]
WORKER_GONE = [node("head", cpus=8), node("worker-1", cpus=8, alive=False)]

SMALL = ["model.preset=debug", "train.seq_len=32", "train.batch_tokens=512"]


def cfg(*overrides: str):
    return load_config(None, [*SMALL, *overrides])


LOCAL = {"output_dir": "runs", "storage": "/home/me/runs/checkpoints"}
SQLITE = "sqlite:////home/me/runs/mlflow.db"


@pytest.mark.parametrize(
    ("nodes", "spans"),
    [
        (ONE_MACHINE, False),
        (HEAD_AND_WORKER, True),
        (AUTOSCALE_FROM_ZERO, True),
        (TWO_WITH_CPUS, True),
        (WORKER_GONE, False),
        ([node("head", gpus=1)], False),  # a GPU box where the driver runs
    ],
)
def test_spans_nodes(nodes, spans):
    assert spans_nodes(nodes, "head") is spans


def test_one_machine_keeps_local_defaults():
    assert shared_state_problem(LOCAL, SQLITE, ONE_MACHINE, "head") is None


@pytest.mark.parametrize("nodes", [HEAD_AND_WORKER, AUTOSCALE_FROM_ZERO, TWO_WITH_CPUS])
def test_multi_node_cluster_stops_local_defaults_in_one_line(nodes):
    problem = shared_state_problem(LOCAL, SQLITE, nodes, "head")
    assert problem is not None and "\n" not in problem
    for setting in ("output_dir=s3://", "storage=s3://", "tracking.uri=http://"):
        assert setting in problem, setting
    assert "MLFLOW_TRACKING_URI" in problem and "(now runs)" in problem and SQLITE in problem
    assert "shared_filesystem=true" in problem and SHARED_FILESYSTEM_ENV in problem


def test_only_the_local_settings_are_named():
    paths = {"data.corpus": "/data/corpus", "storage": "s3://bucket/ckpt"}
    problem = shared_state_problem(paths, "http://mlflow:5000", HEAD_AND_WORKER, "head")
    assert problem is not None
    assert "data.corpus=s3://" in problem and "storage=" not in problem
    assert "tracking.uri" not in problem


def test_shared_locations_pass_on_a_cluster():
    paths = {"output_dir": "s3://bucket/runs", "storage": "s3://bucket/runs/checkpoints"}
    assert shared_state_problem(paths, "http://mlflow:5000", HEAD_AND_WORKER, "head") is None
    assert shared_state_problem(paths, None, HEAD_AND_WORKER, "head") is None  # tracking off
    unused = {"data.corpus": None, "storage": "s3://b/c"}
    assert shared_state_problem(unused, "https://mlflow.internal", HEAD_AND_WORKER, "head") is None


def test_shared_filesystem_opts_out():
    assert shared_state_problem(LOCAL, SQLITE, HEAD_AND_WORKER, "head", True) is None


def test_opt_out_from_config_or_environment(monkeypatch):
    monkeypatch.delenv(SHARED_FILESYSTEM_ENV, raising=False)
    assert not shared_filesystem_opted(cfg())
    assert shared_filesystem_opted(cfg("shared_filesystem=true"))
    monkeypatch.setenv(SHARED_FILESYSTEM_ENV, "1")
    assert shared_filesystem_opted(cfg())
    monkeypatch.setenv(SHARED_FILESYSTEM_ENV, "0")
    assert not shared_filesystem_opted(None)


@pytest.mark.parametrize(
    ("uri", "local"),
    [
        ("runs", True),
        ("/abs/path", True),
        ("file:///abs/path", True),
        ("s3://bucket/prefix", False),
        ("gs://bucket/prefix", False),
    ],
)
def test_is_local_path(uri, local):
    assert is_local_path(uri) is local


@pytest.mark.parametrize(
    ("uri", "local"),
    [
        ("sqlite:///runs/mlflow.db", True),
        ("file:///runs/mlruns", True),
        ("runs/mlruns", True),
        ("http://10.0.0.5:5000", False),
        ("https://mlflow.example.com", False),
        ("postgresql://user@db:5432/mlflow", False),
        ("databricks", False),  # MLflow's name for a Databricks workspace
        ("mlruns", True),  # a plain folder name: MLflow's file store
    ],
)
def test_is_local_tracking(uri, local):
    assert is_local_tracking(uri) is local


def test_run_paths_name_the_settings_a_run_shares(tmp_path):
    prepared = cfg(f"output_dir={tmp_path}")
    assert run_paths(prepared) == {
        "output_dir": str(tmp_path),
        "storage": str(tmp_path / "checkpoints"),
    }
    named = cfg("data.corpus=s3://b/corpus", "storage=s3://b/ckpt")
    assert run_paths(named) == {"data.corpus": "s3://b/corpus", "storage": "s3://b/ckpt"}
    on_s3 = cfg("output_dir=s3://b/runs/")
    assert run_paths(on_s3) == {"output_dir": "s3://b/runs/", "storage": "s3://b/runs/checkpoints"}


def test_local_quality_models_are_named_on_a_cluster_and_s3_ones_pass():
    """CommonCrawl's model files are opened by cleaning tasks on any node (`prepare_corpus`
    checks them with this rule): a local one, and the files read beside it, are named."""
    from llamaray.config import QualityConfig
    from llamaray.data.quality.steps import model_paths

    local = model_paths(
        QualityConfig(lid_model="/models/lid.bin", perplexity_model="m/en.arpa.bin")
    )
    problem = shared_state_problem(local, None, HEAD_AND_WORKER, "head")
    assert problem is not None
    for setting in ("lid_model", "perplexity_model", "perplexity_tokenizer", "perplexity_cutoffs"):
        assert f"quality.{setting}=s3://" in problem, setting
    assert "(now m/en.sp.model)" in problem and "reference_model" not in problem
    assert shared_state_problem(local, None, ONE_MACHINE, "head") is None
    in_s3 = model_paths(QualityConfig(lid_model="s3://b/lid.bin", perplexity_model="s3://b/en.bin"))
    assert shared_state_problem(in_s3, None, HEAD_AND_WORKER, "head") is None
