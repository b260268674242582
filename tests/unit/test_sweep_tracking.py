"""The sweep's MLflow bookkeeping on a real SQLite store, without Ray: the parent run (found
again on resume, refused when the config changed or the name is not a sweep's) and the
end-of-sweep report on the parent and its children."""

from __future__ import annotations

import pytest
import yaml
from mlflow.tracking import MlflowClient

from llamaray import storage
from llamaray.config import ConfigError, load_config
from llamaray.sweep.config import load_sweep_config, resolve_space
from llamaray.sweep.driver import open_parent, report_sweep
from llamaray.sweep.report import TrialOutcome, classify
from llamaray.tracking import PARENT_TAG, open_run


@pytest.fixture
def sweep(tmp_path):
    run, sweep = load_sweep_config(
        None,
        [f"output_dir={tmp_path}", "name=sw", "model.preset=debug", "train.seq_len=32",
         "train.steps=8", "train.eval_every=2", "sweep.lr.values=[1e-3, 1e-5]",
         "sweep.batch_tokens=[512]", "sweep.num_samples=1"],
    )  # fmt: skip
    return run, sweep, f"sqlite:///{tmp_path / 'mlflow.db'}"


def test_parent_is_created_once_and_found_again(sweep):
    run, cfg, uri = sweep
    first = open_parent(run, cfg, resolve_space(run, cfg), uri)
    parent = MlflowClient(uri).get_run(first)
    assert parent.data.params["sweep.lr.values"] == "0.001,1e-05"
    assert parent.data.params["sweep.asha.max_t"] == "8"
    assert parent.data.tags["llamaray.sweep"] == "sw"
    MlflowClient(uri).set_terminated(first, "KILLED")  # as after a dead driver
    assert open_parent(run, cfg, resolve_space(run, cfg), uri) == first
    assert MlflowClient(uri).get_run(first).info.status == "RUNNING"
    # Only the concurrency may change between launches.
    wider = cfg.model_copy(update={"max_concurrent_trials": 3})
    assert open_parent(run, wider, resolve_space(run, wider), uri) == first


def test_resuming_with_another_config_or_over_a_plain_run_is_refused(sweep, tmp_path):
    run, cfg, uri = sweep
    open_parent(run, cfg, resolve_space(run, cfg), uri)
    changed = cfg.model_copy(update={"seed": 1})
    with pytest.raises(ConfigError, match="sweep 'sw' was started with another config"):
        open_parent(run, changed, resolve_space(run, changed), uri)
    plain = run.model_copy(update={"name": "plain"})
    open_run(uri, "llamaray", "plain")  # a training run, not a sweep
    with pytest.raises(ConfigError, match="has a run named 'plain' that is not a sweep"):
        open_parent(plain, cfg, resolve_space(plain, cfg), uri)


def test_report_marks_children_and_fills_the_parent(sweep, tmp_path):
    run, cfg, uri = sweep
    parent = open_parent(run, cfg, resolve_space(run, cfg), uri)
    client = MlflowClient(uri)
    outcomes = []
    for i, (lr, step, val_loss) in enumerate([(1e-3, 8, 4.5), (1e-5, 2, 6.4)]):
        name = f"sw-t_{i}"
        child, _ = open_run(uri, "llamaray", name, parent_run_id=parent)
        for s in range(1, step + 2):  # a stopped trial trains a step past the decision
            client.log_metric(child, "loss", 6.0 - s * 0.1, step=s)
        status = classify(step, 8, val_loss, None)
        outcomes.append(
            TrialOutcome(f"t_{i}", name, lr, 512, step, 8, val_loss, status, None, child)
        )
    client.set_terminated(outcomes[0].mlflow_run_id, "FINISHED")

    result = report_sweep(run, outcomes, uri, parent, str(tmp_path / "corpus"), resumed=False)

    assert result.best is outcomes[0]
    done, stopped = (client.get_run(o.mlflow_run_id) for o in outcomes)
    assert done.info.status == "FINISHED" and stopped.info.status == "KILLED"
    assert done.data.tags["llamaray.sweep.status"] == "finished"
    assert done.data.metrics["final_val_loss"] == 4.5
    assert stopped.data.tags["llamaray.sweep.stopped_early"] == "true"
    assert stopped.data.tags["llamaray.sweep.stopped_at_step"] == "2"
    assert stopped.data.tags["llamaray.sweep.step_reached"] == "3"
    assert PARENT_TAG in stopped.data.tags
    top = client.get_run(parent)
    assert top.info.status == "FINISHED"
    assert top.data.metrics["best_val_loss"] == 4.5 and top.data.metrics["best_lr"] == 1e-3
    assert (
        top.data.metrics["trials_finished"] == 1 and top.data.metrics["trials_stopped_early"] == 1
    )
    assert top.data.tags["llamaray.sweep.best_run_id"] == outcomes[0].mlflow_run_id
    logged = {a.path for a in client.list_artifacts(parent)}
    assert {"summary.csv", "summary.md", "loss_vs_lr.png", "best.yaml", "sweep.yaml"} <= logged
    best = load_config(result.best_yaml)
    assert best.name == "sw-best" and best.optimizer.lr == 1e-3
    assert best.data.corpus == str(tmp_path / "corpus")
    assert result.best_yaml == str(tmp_path / "sweeps" / "sw" / "best.yaml")


def test_no_finished_trial_fails_the_sweep_run(sweep, tmp_path):
    run, cfg, uri = sweep
    parent = open_parent(run, cfg, resolve_space(run, cfg), uri)
    outcomes = [TrialOutcome("t", "sw-t", 1e-2, 512, 3, 8, float("inf"), "diverged")]
    result = report_sweep(run, outcomes, uri, parent, str(tmp_path / "corpus"), resumed=False)
    assert result.best is None and result.best_yaml is None
    assert MlflowClient(uri).get_run(parent).info.status == "FAILED"
    assert not (tmp_path / "sweeps" / "sw" / "best.yaml").exists()


def test_report_goes_to_an_s3_output_dir(sweep, tmp_path, s3_client):
    """On a cluster the sweep driver's disk is nobody's: with output_dir on S3 the summary,
    the plot and best.yaml land there (and in MLflow), nothing under the driver's folder."""
    run, cfg, uri = sweep
    s3_client.create_bucket(Bucket="sweep-out")
    run = run.model_copy(update={"output_dir": "s3://sweep-out/runs"})
    parent = open_parent(run, cfg, resolve_space(run, cfg), uri)
    child, _ = open_run(uri, "llamaray", "sw-t_0", parent_run_id=parent)
    outcomes = [TrialOutcome("t_0", "sw-t_0", 1e-3, 512, 8, 8, 4.5, "finished", None, child)]
    result = report_sweep(run, outcomes, uri, parent, "s3://sweep-out/corpus", resumed=False)
    assert result.best_yaml == "s3://sweep-out/runs/sweeps/sw/best.yaml"
    listed = s3_client.list_objects_v2(Bucket="sweep-out")["Contents"]
    keys = {o["Key"] for o in listed if not o["Key"].endswith("/")}  # not pyarrow's folders
    assert keys == {
        f"runs/sweeps/sw/{n}" for n in ("summary.csv", "summary.md", "loss_vs_lr.png", "best.yaml")
    }
    best = yaml.safe_load(storage.read_text(result.best_yaml))
    assert best["name"] == "sw-best" and best["data"]["corpus"] == "s3://sweep-out/corpus"
    assert not (tmp_path / "sweeps").exists()
