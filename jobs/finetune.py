"""Instruction-finetune a pretrained model on Ray Train: responses only, MLflow child run.

    python jobs/finetune.py --config jobs/configs/finetune-demo.yaml [key.path=value ...]
    ray job submit --runtime-env jobs/runtime_env.yaml -- \
        python jobs/finetune.py --config jobs/configs/finetune-demo.yaml

Same options as `llamaray finetune`. Relaunching with the same `name` resumes it. Exit
codes: 0 done (or paused at train.stop_at_step), 1 stopped (non-finite loss), 2 bad config
or instruction data (named file:line, before any Ray work).
"""

import sys

from llamaray.cli import main

if __name__ == "__main__":
    sys.exit(main(["finetune", *sys.argv[1:]]))
