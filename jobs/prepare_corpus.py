"""Prepare a pretraining corpus on Ray: clean, deduplicate, tokenize, pack, write shards.

python jobs/prepare_corpus.py --config jobs/configs/corpus-demo.yaml [key.path=value ...]
ray job submit --working-dir . -- python jobs/prepare_corpus.py --config my-corpus.yaml
"""

from __future__ import annotations

import argparse
import sys

from llamaray.config import ConfigError, CorpusConfig, load_config


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=None)
    parser.add_argument("--address", default=None, help="Ray cluster (default: RAY_ADDRESS/local)")
    parser.add_argument("overrides", nargs="*", help="key.path=value")
    opts = parser.parse_args(argv)
    from llamaray.data.prepare import check_models, corpus_location, prepare_corpus

    try:
        cfg = load_config(opts.config, opts.overrides, schema=CorpusConfig)
        check_models(cfg)  # CommonCrawl's quality models, when it is a source
    except ConfigError as err:  # before any cluster work
        print(err, file=sys.stderr)
        return 2

    from llamaray.data.corpus_lock import CorpusLocked, check_free
    from llamaray.ray_session import start_ray

    try:
        check_free(corpus_location(cfg))  # seconds before Ray would be up
        start_ray(opts.address)
        prepare_corpus(cfg)
    except CorpusLocked as err:  # another launch is building this corpus; it names it
        print(err, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
