"""make demo: the platform end to end on one machine, from nothing but Python.

Builds a real two-source text sample (the standard library's code and docs), prepares it
as a corpus on Ray Data (clean, dedup, tokenizer, pack), pretrains the `tiny` preset on
two local Ray Train FSDP workers, tracks the run in MLflow (SQLite), and samples text
from the exported model.

python jobs/demo.py [--config jobs/configs/demo.yaml] [key.path=value ...]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from llamaray.config import ConfigError, load_config

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "demo.yaml"
PROMPTS = ("def main(", "import os\n", "The following")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(DEFAULT_CONFIG))
    parser.add_argument("overrides", nargs="*", help="key.path=value")
    opts = parser.parse_args(argv)
    try:
        cfg = load_config(opts.config, opts.overrides)
    except ConfigError as err:
        print(err, file=sys.stderr)
        return 2

    from llamaray import storage
    from llamaray.model import Llama
    from llamaray.model.generation import SamplingConfig, generate_text
    from llamaray.orchestrate.pretrain import TrainingStopped, pretrain, run_page
    from llamaray.tokenizer import Tokenizer
    from llamaray.tracking import redact

    try:
        result = pretrain(cfg)
    except ConfigError as err:  # one line, e.g. local paths on a multi-node cluster
        print(err, file=sys.stderr)
        return 2
    except TrainingStopped as err:
        print(f"training stopped: {err}", file=sys.stderr)
        return 1
    if result.model_uri is None:
        print(result.paused or "no model was exported (tracking.export_hf=false)")
        return 0
    # The model is in the run's storage (a local folder, or S3 on a cluster): read it back
    # from there, never from the disk of the node that trained it.
    with storage.local_copy(result.model_uri) as model_dir:
        model = Llama.from_pretrained(model_dir)
        tokenizer = Tokenizer(Path(model_dir) / "tokenizer.model")
    sampling = SamplingConfig(max_new_tokens=48, temperature=0.7, top_p=0.9, seed=cfg.train.seed)
    for prompt, text in zip(
        PROMPTS, generate_text(model, tokenizer, list(PROMPTS), sampling), strict=True
    ):
        print(f"--- {prompt!r}\n{prompt}{text}\n")
    print(
        f"validation loss {result.metrics.get('val_loss', float('nan')):.4f} at step {result.step}"
    )
    print(f"model (Hugging Face format): {result.model_uri}")
    if result.registered_model:
        shown = redact(result.tracking_uri)
        print(
            f"registered model: {result.registered_model}; load and generate with:\n"
            f'  MLFLOW_TRACKING_URI={shown} .venv/bin/python -c "import mlflow; '
            f"m = mlflow.pyfunc.load_model('{result.registered_model}'); "
            "print(m.predict(['def main('], params={'temperature': 0.0}))\""
        )
    if result.mlflow_run_id:
        page = run_page(result.tracking_uri, result.mlflow_run_id)
        print(f"MLflow run {result.mlflow_run_id}: {page}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
