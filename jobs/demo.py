"""make demo: build a real text sample, train the tokenizer and a small LLaMA, sample text.

python jobs/demo.py [--config jobs/configs/demo.yaml] [key.path=value ...]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from llamaray.config import ConfigError, load_config
from llamaray.train.local_run import run_local

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "demo.yaml"


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
    out = run_local(cfg)
    print(f"done: run directory {out.run_dir}, validation loss {out.result.val_loss:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
