"""Pretrain a LLaMA model on Ray Train: corpus -> FSDP workers -> checkpoints -> MLflow.

python jobs/pretrain.py --config jobs/configs/demo.yaml [key.path=value ...]
ray job submit --working-dir . -- python jobs/pretrain.py --config jobs/configs/llama-7b.yaml

Relaunching with the same `name` resumes from its newest complete checkpoint. Exit codes:
0 done (or paused at train.stop_at_step), 1 stopped (non-finite loss), 2 bad config.
"""

from __future__ import annotations

import argparse
import sys

from llamaray.config import ConfigError, load_config


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=None, help="YAML file (defaults if omitted)")
    parser.add_argument("overrides", nargs="*", help="key.path=value, e.g. train.steps=100")
    opts = parser.parse_args(argv)
    try:
        cfg = load_config(opts.config, opts.overrides)  # before any cluster work
    except ConfigError as err:
        print(err, file=sys.stderr)
        return 2

    from llamaray.orchestrate.pretrain import TrainingStopped, pretrain

    try:
        result = pretrain(cfg)
    except ConfigError as err:
        print(err, file=sys.stderr)
        return 2
    except TrainingStopped as err:
        print(f"training stopped: {err}", file=sys.stderr)
        return 1
    print(f"run {result.name}: step {result.step}, metrics {_short(result.metrics)}")
    if result.model_uri:
        print(f"model (Hugging Face format): {result.model_uri}")
    return 0


def _short(metrics: dict) -> str:
    keys = ("loss", "val_loss", "tokens_per_s")
    return ", ".join(f"{k}={metrics[k]:.4g}" for k in keys if isinstance(metrics.get(k), float))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
