"""Evaluate a training run's checkpoint on local tasks and held-out perplexity.

    ray job submit --runtime-env jobs/runtime_env.yaml -- \
        python jobs/evaluate.py --config jobs/configs/demo.yaml --task jobs/tasks/stdlib-modules

Same options as `llamaray eval`; results land in MLflow under the training run. Task
folders are read by this driver (ship them with `--working-dir`); the Scorer actors fetch
the checkpoint and tokenizer from the run's storage (s3:// on a cluster) onto their nodes.
"""

import sys

from llamaray.cli import main

if __name__ == "__main__":
    sys.exit(main(["eval", *sys.argv[1:]]))
