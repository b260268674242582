"""Helpers shared by the pretraining tests: a small run config and metric histories."""

from __future__ import annotations

from mlflow.tracking import MlflowClient

from llamaray.config import load_config

STEPS = 6


def config(root, name, *overrides):
    return load_config(
        None,
        [
            f"name={name}",
            f"output_dir={root}",
            "model.preset=debug",
            "tokenizer.vocab_size=512",
            "data.prepare.name=corpus",
            "data.prepare.sample_mb=0.25",
            "data.prepare.tokenizer.vocab_size=512",
            "data.prepare.validation_fraction=0.05",
            "data.eval_rows=16",
            "optimizer.lr=3e-3",
            "optimizer.warmup_steps=2",
            f"train.steps={STEPS}",
            "train.seq_len=32",
            "train.batch_tokens=512",  # 16 rows: 2 micro-batches of 4 per worker at 2 workers
            "train.micro_batch_size=4",
            "train.num_workers=2",
            "train.cpus_per_worker=0.5",
            "train.log_every=1",
            "train.checkpoint_every=2",
            "tracking.system_metrics=false",
            *overrides,
        ],
    )


def history(result, key="loss") -> dict[int, list[float]]:
    out: dict[int, list[float]] = {}
    for m in MlflowClient(result.tracking_uri).get_metric_history(result.mlflow_run_id, key):
        out.setdefault(m.step, []).append(m.value)
    return out
