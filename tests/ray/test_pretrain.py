"""Pretraining on the shared local Ray cluster: 2 CPU FSDP workers under Ray Train.

One small prepared corpus and one MLflow store (SQLite) serve every run here; each run has
its own name. Per-step losses are read back from MLflow, where rank 0 logged them.
"""

from __future__ import annotations

import math

import pytest
import torch
from mlflow.tracking import MlflowClient
from pretrain_helpers import STEPS, config, history

from llamaray.model import Llama
from llamaray.orchestrate.pretrain import TrainingStopped, pretrain
from llamaray.tracking import RUN_NAME_TAG
from llamaray.train.checkpoint import step_dirs

pytestmark = pytest.mark.ray


def test_loss_falls_and_run_is_tracked(reference, root):
    losses = history(reference)
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert losses[STEPS][0] < losses[1][0] - 0.3, losses
    assert reference.step == STEPS and reference.metrics["val_loss"] < losses[1][0]

    client = MlflowClient(reference.tracking_uri)
    run = client.get_run(reference.mlflow_run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags[RUN_NAME_TAG] == "reference"
    assert run.data.params["train.steps"] == str(STEPS)
    assert run.data.params["model.preset"] == "debug"
    exported_params = sum(
        p.numel() for p in Llama.from_pretrained(reference.model_uri).parameters()
    )
    assert run.data.params["derived.n_params"] == str(exported_params)
    for key in ("lr", "grad_norm", "tokens_per_s", "memory_gb", "val_loss"):
        assert key in run.data.metrics, key
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "data", "tokenizer", "model", "loss_curve.png"} <= artifacts
    model_files = {a.path for a in client.list_artifacts(run.info.run_id, "model")}
    assert {"model/config.json", "model/tokenizer.model"} <= model_files

    # The exported model is the trained one: it scores held-out text like the run said.
    exported = Llama.from_pretrained(reference.model_uri)
    assert all(torch.isfinite(p).all() for p in exported.parameters())


def test_stop_and_resume_reproduces_the_uninterrupted_run(reference, root):
    first = pretrain(config(root, "resumed", "train.stop_at_step=3"))
    assert first.paused and first.step == 3
    assert [p.name for p in step_dirs(root / "checkpoints" / "resumed")] == [
        "step-00000003",
        "step-00000002",
    ]
    second = pretrain(config(root, "resumed"))
    assert second.step == STEPS and second.mlflow_run_id == first.mlflow_run_id

    expected, got = history(reference), history(second)
    for step in range(1, STEPS + 1):
        assert got[step] == expected[step], step  # bit for bit, each step logged once
    assert history(second, "rows_crc") == history(reference, "rows_crc")


def test_truncated_checkpoint_is_never_loaded(reference, root):
    run = pretrain(config(root, "truncated"))
    newest = step_dirs(root / "checkpoints" / "truncated")[0]
    assert newest.name == f"step-{STEPS:08d}"
    shard = sorted(newest.glob("__1_*.distcp"))[0]
    shard.write_bytes(shard.read_bytes()[:100])

    # Relaunching with more steps must resume from step 4 (the older complete one).
    again = pretrain(config(root, "truncated", f"train.steps={STEPS}"))
    losses = history(again)
    assert again.step == STEPS
    assert [len(losses[s]) for s in range(1, STEPS + 1)] == [1, 1, 1, 1, 2, 2]
    assert losses[5][0] == losses[5][1] and losses[6][0] == losses[6][1]
    assert again.mlflow_run_id == run.mlflow_run_id


def test_killed_worker_is_replaced_and_run_completes(reference, root):
    result = pretrain(
        config(
            root, "killed", "train.max_failures=1", "faults.kill_rank=1", "faults.kill_at_step=3"
        )
    )
    assert result.step == STEPS
    assert (root / "checkpoints" / "killed" / ".faults" / "killed-rank1-step3").exists()
    losses = history(result)
    # Step 3 ran, the worker died before its checkpoint; the group resumed from step 2.
    assert len(losses[3]) == 2 and losses[3][0] == losses[3][1]
    assert {s: v[-1] for s, v in losses.items()} == {s: v[0] for s, v in history(reference).items()}


def test_nan_steps_are_skipped_and_parameters_stay_finite(root):
    result = pretrain(config(root, "nan-skip", "faults.nan_at_steps=[2, 4]"))
    assert result.step == STEPS and result.metrics["skipped_steps"] == 2
    losses = history(result)
    assert math.isnan(losses[2][0]) and math.isnan(losses[4][0])
    assert all(math.isfinite(losses[s][0]) for s in (1, 3, 5, 6))
    exported = Llama.from_pretrained(result.model_uri)
    assert all(torch.isfinite(p).all() for p in exported.parameters())


def test_nan_with_stop_policy_names_the_step(root):
    with pytest.raises(TrainingStopped, match="at step 3"):
        pretrain(config(root, "nan-stop", "faults.nan_at_steps=[3]", "train.nan_policy=stop"))
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("llamaray").experiment_id
    run = client.search_runs([experiment], filter_string=f"tags.`{RUN_NAME_TAG}` = 'nan-stop'")
    assert run and run[0].info.status == "KILLED"


def test_one_worker_matches_two_fsdp_workers(reference, root):
    single = pretrain(config(root, "single", "train.num_workers=1", "train.cpus_per_worker=1"))
    one, two = history(single), history(reference)
    for step in range(1, STEPS + 1):
        assert one[step][0] == pytest.approx(two[step][0], rel=1e-5, abs=1e-5), step


def test_tensor_parallel_workers_match_data_parallel(reference, root):
    """parallel.tensor=2 on 2 workers (dp 1 x tp 2): the same model and batch, split by
    heads and sequence instead of by rows."""
    tp = pretrain(config(root, "tensor", "parallel.tensor=2"))
    one, two = history(tp), history(reference)
    for step in range(1, STEPS + 1):
        assert one[step][0] == pytest.approx(two[step][0], rel=1e-5, abs=1e-5), step
