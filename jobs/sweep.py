"""Sweep learning rate and batch size of a LLaMA preset on Ray Tune, ASHA early stopping.

python jobs/sweep.py --config jobs/configs/sweep-demo.yaml [key.path=value ...]
ray job submit --runtime-env jobs/runtime_env.yaml -- python jobs/sweep.py --config ...

Relaunching the same sweep name resumes it. Exit codes: 0 done (best.yaml written),
1 no trial trained its whole budget, 2 bad config.
"""

from __future__ import annotations

import argparse
import sys

from llamaray.config import ConfigError
from llamaray.sweep.driver import load_sweep_config, print_result, run_sweep


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=None, help="sweep YAML: a run config plus `sweep:`")
    parser.add_argument("overrides", nargs="*", help="key.path=value, e.g. sweep.num_samples=8")
    opts = parser.parse_args(argv)
    try:
        run, sweep = load_sweep_config(opts.config, opts.overrides)  # before any cluster work
        result = run_sweep(run, sweep)  # joins RAY_ADDRESS's cluster, else starts one
    except ConfigError as err:
        print(err, file=sys.stderr)
        return 2
    print_result(result)
    return 0 if result.best is not None else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
