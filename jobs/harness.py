"""lm-evaluation-harness tasks on a training run's checkpoint, results into MLflow.

    ray job submit --runtime-env jobs/runtime_env.yaml -- \
        python jobs/harness.py --config jobs/configs/demo.yaml --tasks arc_easy

Same options as `llamaray harness`. The harness scores in this process (one model, a GPU
if the node has one), which fetches the checkpoint or model folder (local or s3://) onto
its own node; its task data must be in the node's Hugging Face cache or in files shipped
with the job (`--working-dir`, `--include-path`). Results go to MLflow; `--output s3://...`
keeps the harness's JSON beyond the driver's node.
"""

import sys

from llamaray.cli import main

if __name__ == "__main__":
    sys.exit(main(["harness", *sys.argv[1:]]))
