"""lm-evaluation-harness tasks on a training run's checkpoint, results into MLflow.

    ray job submit --runtime-env jobs/runtime_env.yaml -- \
        python jobs/harness.py --config jobs/configs/demo.yaml --tasks arc_easy

Same options as `llamaray harness`. The harness scores in this process (one model, a GPU
if the node has one); its task data must be in the node's Hugging Face cache or local
files (`--include-path`).
"""

import sys

from llamaray.cli import main

if __name__ == "__main__":
    sys.exit(main(["harness", *sys.argv[1:]]))
