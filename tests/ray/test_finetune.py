"""Instruction finetuning on the shared local Ray cluster, from the shared reference run
of conftest.py: a bad instruction file fails before any Ray work.

That a finetune lowers the held-out response loss of its base, in a child of the base's
MLflow run, runs on the no-shared-disk cluster (tests/multinode/test_pipeline.py); masking,
token weighting, the feed, resuming and base loading are unit-tested without Ray in
tests/unit/test_instructions.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from llamaray.config import load_config
from llamaray.data.instructions import InstructionDataError
from llamaray.finetune.driver import finetune
from llamaray.tracking import find_run

pytestmark = pytest.mark.ray

STEPS = 30
SEQ_LEN = 96


@pytest.fixture(scope="module")
def base(reference):
    """The shared reference run (tests/ray/conftest.py: the debug preset pretrained for a
    few steps): the finetune's base run."""
    return reference


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


def test_bad_instruction_line_fails_before_any_ray_work(base, root, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "response": "b"}\n{"instruction": "c", "respons": "d"}\n')
    with pytest.raises(InstructionDataError, match=rf"{bad}:2: response: missing"):
        finetune(finetune_config(root, "never", bad))
    assert find_run(f"sqlite:///{root / 'mlflow.db'}", "llamaray", "never") is None
    assert not (root / "checkpoints" / "never").exists()
