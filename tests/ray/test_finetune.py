"""Instruction finetuning on the shared local Ray cluster: a tiny base pretrained briefly
(the shared reference run of conftest.py), then finetuned by 2 CPU FSDP workers under Ray
Train on the project's generated instruction set (jobs/data/make_instructions.py),
tracked as a child run of the base's MLflow run.

Masking, token weighting, the feed, resuming and base loading are unit-tested without Ray
in tests/unit/test_instructions.py.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from pretrain_helpers import history

from llamaray.config import load_config
from llamaray.data.instructions import InstructionDataError
from llamaray.model import Llama
from llamaray.orchestrate.finetune import finetune
from llamaray.tracking import PARENT_TAG, find_run

pytestmark = pytest.mark.ray

REPO = Path(__file__).resolve().parents[2]
STEPS = 30
SEQ_LEN = 96


@pytest.fixture(scope="module")
def base(reference):
    """The shared reference run (tests/ray/conftest.py: the debug preset pretrained for a
    few steps): the finetune's base run."""
    return reference


@pytest.fixture(scope="module")
def instructions(root) -> Path:
    out = root / "instructions.jsonl"
    subprocess.run(
        [sys.executable, str(REPO / "jobs/data/make_instructions.py"), "--out", str(out),
         "--n", "400", "--seed", "0"],
        check=True,
    )  # fmt: skip
    return out


def finetune_config(root: Path, name: str, train_file: Path, *overrides: str):
    return load_config(
        None,
        [
            f"name={name}",
            f"output_dir={root}",
            "model.preset=debug",
            "finetune.base=reference",  # the run name: its newest complete checkpoint
            f"finetune.train_file={train_file}",
            "finetune.validation_fraction=0.1",
            "optimizer.lr=3e-3",
            "optimizer.warmup_steps=3",
            f"train.steps={STEPS}",
            f"train.seq_len={SEQ_LEN}",
            f"train.batch_tokens={16 * SEQ_LEN}",  # 16 examples: 2 micro-batches of 4 a worker
            "train.micro_batch_size=4",
            "train.num_workers=2",
            "train.cpus_per_worker=0.5",
            "train.log_every=5",
            "train.checkpoint_every=0",
            "tracking.system_metrics=false",
            *overrides,
        ],
    )


def test_finetune_lowers_heldout_response_loss_under_the_base_run(base, instructions, root):
    result = finetune(finetune_config(root, "sft", instructions))
    assert result.step == STEPS and result.paused is None

    val = history(result, "val_loss")
    assert sorted(val) == [0, STEPS]  # the base model's, before any update, and the end's
    before, after = val[0][0], val[STEPS][0]
    assert after < 0.7 * before, (before, after)  # an untouched model stays at 1.0 x

    client = MlflowClient(result.tracking_uri)
    run = client.get_run(result.mlflow_run_id)
    assert run.data.tags[PARENT_TAG] == base.mlflow_run_id
    assert run.data.tags["llamaray.kind"] == "finetune"
    assert run.info.status == "FINISHED"
    assert run.data.params["data.train.examples"] == "360"
    assert run.data.params["data.validation.examples"] == "40"
    assert run.data.params["finetune.base"] == "reference"
    for key in ("loss", "lr", "grad_norm", "tokens_per_s"):
        assert key in run.data.metrics, key
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "data", "tokenizer", "model", "loss_curve.png"} <= artifacts
    # The base run is left as it was: still one run of that name, not reopened.
    assert find_run(result.tracking_uri, "llamaray", "reference") == base.mlflow_run_id
    assert client.get_run(base.mlflow_run_id).info.status == "FINISHED"

    # The finetune keeps its own checkpoints, and its exported model is the finetuned one.
    assert (root / "checkpoints" / "sft" / f"step-{STEPS:08d}").is_dir()
    exported = Llama.from_pretrained(result.model_uri)
    assert exported.args.vocab_size == 512


def test_bad_instruction_line_fails_before_any_ray_work(base, root, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "response": "b"}\n{"instruction": "c", "respons": "d"}\n')
    with pytest.raises(InstructionDataError, match=rf"{bad}:2: response: missing"):
        finetune(finetune_config(root, "never", bad))
    assert find_run(f"sqlite:///{root / 'mlflow.db'}", "llamaray", "never") is None
    assert not (root / "checkpoints" / "never").exists()
