"""Tokenize + pack on Ray Data against plain single-process SentencePiece, per core.

The same documents go through (a) a plain `SentencePieceProcessor.encode` loop in this
process, one core, and (b) the pipeline's own stage, `TokenizePack` in an actor pool of 1
and then 2 actors, on a local Ray cluster. Ray's time includes scheduling, serialization
and packing; the ratio per core is what Ray Data costs.

    python -m llamaray.bench.tokenize_pack [--mb 8] [--vocab-size 8000]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import sentencepiece as spm

from llamaray.data.prepare import TokenizePack
from llamaray.data.sample_text import iter_texts, write_stdlib_sample
from llamaray.tokenizer import Tokenizer, train_tokenizer


def plain_encode(model_path: str, texts: list[str]) -> tuple[float, int]:
    sp = spm.SentencePieceProcessor(model_file=model_path)
    start = time.perf_counter()
    n = sum(len(sp.encode(t)) for t in texts)
    return time.perf_counter() - start, n


def ray_tokenize_pack(tokenizer: Tokenizer, texts: list[str], actors: int, seq_len: int):
    import ray.data

    items = [{"source": "s", "origin": f"doc:{i}", "text": t} for i, t in enumerate(texts)]
    ds = ray.data.from_items(items, override_num_blocks=8 * actors).materialize()
    start = time.perf_counter()
    packed = ds.map_batches(
        TokenizePack,
        fn_constructor_kwargs={
            "tokenizer": tokenizer,
            "validation_fraction": 0.0,
            "seed": 0,
            "seq_len": seq_len,
        },
        concurrency=actors,
        batch_format="numpy",
    ).materialize()
    elapsed = time.perf_counter() - start
    return elapsed, packed.count()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=float, default=8.0, help="text per source of the sample")
    parser.add_argument("--vocab-size", type=int, default=8000)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--repeat", type=int, default=3, help="pass the sample this many times")
    parser.add_argument("--max-actors", type=int, default=min(2, os.cpu_count() or 1))
    opts = parser.parse_args(argv)

    import ray

    from llamaray.ray_session import start_ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    with tempfile.TemporaryDirectory(prefix="llamaray-tpbench-") as tmp:
        paths = list(write_stdlib_sample(Path(tmp), int(opts.mb * 1e6)).values())
        texts = list(iter_texts(paths)) * opts.repeat  # more text amortizes actor start-up
        tokenizer = train_tokenizer(paths, Path(tmp) / "tok", vocab_size=opts.vocab_size)
        n_mb = sum(len(t.encode()) for t in texts) / 1e6
        seconds, tokens = plain_encode(str(tokenizer.path), texts)
        rows = [("plain sentencepiece", 1, seconds, tokens, tokens / seconds)]
        start_ray("local", num_cpus=opts.max_actors, include_dashboard=False, log_to_driver=False)
        try:
            for actors in range(1, opts.max_actors + 1):
                ray_tokenize_pack(tokenizer, texts[:50], actors, opts.seq_len)  # warm-up
                sec, _packed_tokens = ray_tokenize_pack(tokenizer, texts, actors, opts.seq_len)
                rows.append(("ray tokenize+pack", actors, sec, tokens, tokens / sec / actors))
        finally:
            ray.shutdown()

    print(
        f"\n# {len(texts)} documents, {n_mb:.1f} MB, {tokens} tokens, vocab {opts.vocab_size}, "
        f"{os.cpu_count()} cores"
    )
    print(
        f"{'path':22} {'workers':>7} {'seconds':>8} {'tok/s':>10} {'tok/s/core':>11} "
        f"{'vs plain':>8}"
    )
    base = rows[0][4]
    for name, workers, sec, n, per_core in rows:
        print(
            f"{name:22} {workers:7} {sec:8.2f} {n / sec:10.0f} {per_core:11.0f} "
            f"{per_core / base:7.2f}x"
        )
    sys.stdout.flush()


if __name__ == "__main__":
    main(sys.argv[1:])
