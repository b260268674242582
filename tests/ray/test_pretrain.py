"""Pretraining on the shared local Ray cluster: 2 CPU FSDP workers under Ray Train.

One launch per behaviour Ray adds: tracking from rank 0 (the reference run), a device mesh
over Ray's workers and a stop that reaches the driver (one launch). What the loop does the
same in or out of Ray (stop and bit-exact resume, NaN steps skipped, a truncated
checkpoint passed over, one rank equal to two) is tested in process, in
tests/unit/test_checkpoint.py, test_gradient_sync.py and test_tensor_parallel.py; resuming
through Ray Train's checkpoint registry, after a relaunch and after a killed worker, is
tested on S3 in test_pretrain_s3.py, and a lost node in tests/multinode.

The corpus, the MLflow store (SQLite) and the reference run are shared with every module
under tests/ray (conftest.py); each run has its own name. Per-step losses are read back
from MLflow, where rank 0 logged them.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from pretrain_helpers import STEPS, config, history

from llamaray.model import Llama
from llamaray.orchestrate.pretrain import TrainingStopped, pretrain
from llamaray.tracking import RUN_NAME_TAG

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
    assert {"config.yaml", "data", "tokenizer", "loss_curve.png"} <= artifacts

    # The exported model is the trained one: it scores held-out text like the run said.
    exported = Llama.from_pretrained(reference.model_uri)
    assert all(torch.isfinite(p).all() for p in exported.parameters())


def test_run_registers_its_model_and_records_its_corpus_and_mixture(reference):
    """The final model is the run's MLflow model, registered under the run's name: loaded
    through MLflow it generates what the exported folder generates. The corpus and the
    mixture plan are the run's dataset inputs, by digest."""
    import json

    import mlflow

    from llamaray import storage, tracking
    from llamaray.model.generation import SamplingConfig, generate_text
    from llamaray.tokenizer import Tokenizer

    assert reference.registered_model == "models:/reference/1"
    client = MlflowClient(reference.tracking_uri)
    version = client.get_model_version("reference", "1")
    assert version.run_id == reference.mlflow_run_id
    assert version.tags["llamaray.run_name"] == "reference"
    outputs = client.get_run(reference.mlflow_run_id).outputs.model_outputs
    assert [o.step for o in outputs] == [STEPS]

    mlflow.set_tracking_uri(reference.tracking_uri)
    try:
        served = mlflow.pyfunc.load_model(reference.registered_model)
        texts = served.predict(["def "], params={"temperature": 0.0, "max_new_tokens": 8})
    finally:
        mlflow.set_tracking_uri(None)
    with storage.local_copy(reference.model_uri) as folder:
        expected = generate_text(
            Llama.from_pretrained(folder),
            Tokenizer(folder / "tokenizer.model"),
            ["def "],
            SamplingConfig(max_new_tokens=8, temperature=0.0),
        )
    assert texts == expected

    run_id = reference.mlflow_run_id
    inputs = {(n, c): d for n, d, c in tracking.dataset_inputs(reference.tracking_uri, run_id)}
    manifest = json.loads(Path(client.download_artifacts(run_id, "data/manifest.json")).read_text())
    assert inputs[(manifest["name"], "training")] == manifest["digest"]
    assert (f"{manifest['name']}-mixture", "mixture") in inputs
    experiment = client.get_experiment(client.get_run(reference.mlflow_run_id).info.experiment_id)
    assert experiment.tags[tracking.EXPERIMENT_KIND_TAG] == tracking.MODEL_TRAINING_KIND


def test_tensor_parallel_workers_match_data_parallel_and_a_nan_stop_ends_the_run(reference, root):
    """parallel.tensor=2 on 2 workers (dp 1 x tp 2): the same model and batch, split by
    heads and sequence instead of by rows, gives the reference's losses. A NaN at step 5
    under `train.nan_policy=stop` then ends the launch: the driver raises naming the step
    and the MLflow run is marked KILLED (one launch for both: each costs ~35 s)."""
    overrides = ["parallel.tensor=2", "faults.nan_at_steps=[5]", "train.nan_policy=stop"]
    with pytest.raises(TrainingStopped, match="at step 5"):
        pretrain(config(root, "tensor", *overrides))
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("llamaray").experiment_id
    (run,) = client.search_runs([experiment], filter_string=f"tags.`{RUN_NAME_TAG}` = 'tensor'")
    assert run.info.status == "KILLED"
    tp = {}
    for m in client.get_metric_history(run.info.run_id, "loss"):
        tp.setdefault(m.step, []).append(m.value)
    two = history(reference)
    assert set(tp) >= {1, 2, 3, 4} and max(tp) == 5  # nothing after the stop
    for step in range(1, 5):
        assert tp[step][0] == pytest.approx(two[step][0], rel=1e-5, abs=1e-5), step
