"""Tokenizer encode throughput on real text, single-threaded and on every core.

Builds the stdlib text sample in a temporary directory, trains a tokenizer on it (or
loads ``--model``), then encodes ``--mb`` MB of the sample's documents (repeated if the
sample is smaller) four ways and prints MB/s and tokens/s, total and per core:

    python -m llamaray.bench.tokenizer_throughput --vocab-size 8000 --mb 20

- ``sentencepiece loop``: plain ``SentencePieceProcessor.encode`` per document, the floor;
- ``encode loop``: `Tokenizer.encode` per document (the lossless wrapper's overhead);
- ``encode_batch``: `Tokenizer.encode_batch` with 1 thread and with every core.

Needs no Ray and no GPU.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import sentencepiece as spm

from llamaray.data.sample_text import iter_texts, write_stdlib_sample
from llamaray.tokenizer import Tokenizer, train_tokenizer


@dataclass(frozen=True)
class Row:
    method: str
    threads: int
    seconds: float
    tokens: int
    nbytes: int

    @property
    def mb_per_s(self) -> float:
        return self.nbytes / 1e6 / self.seconds

    @property
    def tok_per_s(self) -> float:
        return self.tokens / self.seconds


def _texts_of(paths: Sequence[Path], target_bytes: int) -> list[str]:
    """The sample's documents, cycled until they hold ``target_bytes`` of UTF-8."""
    docs = list(iter_texts(paths))
    if not docs:
        raise ValueError("the text sample is empty")
    texts: list[str] = []
    total = 0
    while total < target_bytes:
        for doc in docs:
            texts.append(doc)
            total += len(doc.encode("utf-8"))
            if total >= target_bytes:
                break
    return texts


def _timed(fn: Callable[[], list[list[int]]], repeat: int) -> tuple[float, list[list[int]]]:
    """Best time of ``repeat`` runs: the least disturbed by other work on the machine."""
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def measure(tok: Tokenizer, texts: list[str], cores: int, repeat: int = 1) -> list[Row]:
    """Encode ``texts`` each way (best of ``repeat``); every way must give the same ids."""
    nbytes = sum(len(t.encode("utf-8")) for t in texts)
    raw = spm.SentencePieceProcessor(model_file=str(tok.path))
    tok.encode_batch(texts[:8], num_threads=cores)  # warm up the model and thread pool

    ways: list[tuple[str, int, Callable[[], list[list[int]]]]] = [
        ("sentencepiece loop", 1, lambda: [raw.encode(t) for t in texts]),
        ("encode loop", 1, lambda: [tok.encode(t) for t in texts]),
        ("encode_batch", 1, lambda: tok.encode_batch(texts, num_threads=1)),
        ("encode_batch", cores, lambda: tok.encode_batch(texts, num_threads=cores)),
    ]
    rows: list[Row] = []
    reference: list[list[int]] | None = None
    for method, threads, fn in ways:
        seconds, ids = _timed(fn, repeat)
        if reference is None:
            reference = ids
        elif ids != reference:
            raise AssertionError(f"{method} with {threads} thread(s) gave different ids")
        rows.append(Row(method, threads, seconds, sum(map(len, ids)), nbytes))
    return rows


def format_table(rows: Sequence[Row]) -> str:
    header = (
        f"{'method':<20} {'threads':>7} {'seconds':>8} {'MB/s':>8} {'MB/s/core':>10} "
        f"{'Mtok/s':>8} {'Mtok/s/core':>12}"
    )
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(
            f"{r.method:<20} {r.threads:>7} {r.seconds:>8.2f} {r.mb_per_s:>8.2f} "
            f"{r.mb_per_s / r.threads:>10.2f} {r.tok_per_s / 1e6:>8.3f} "
            f"{r.tok_per_s / 1e6 / r.threads:>12.3f}"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m llamaray.bench.tokenizer_throughput", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--vocab-size", type=int, default=8000, help="when training (8000)")
    parser.add_argument("--mb", type=float, default=20.0, help="MB of text encoded per way (20)")
    parser.add_argument("--model", type=Path, help="an existing tokenizer.model: no training")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="all cores")
    parser.add_argument("--repeat", type=int, default=1, help="best of this many runs (1)")
    parser.add_argument("--seed", type=int, default=0, help="sample and training seed (0)")
    args = parser.parse_args(argv)
    if args.mb <= 0 or args.repeat < 1 or args.threads < 1:
        parser.error("--mb, --repeat and --threads must be positive")

    target = int(args.mb * 1e6)
    with tempfile.TemporaryDirectory(prefix="llamaray-tokbench-") as tmp:
        sample = write_stdlib_sample(Path(tmp) / "sample", target, seed=args.seed)
        paths = [sample["code"], sample["prose"]]
        if args.model is not None:
            tok = Tokenizer(args.model)
        else:
            tok = train_tokenizer(
                paths, Path(tmp) / "tok", vocab_size=args.vocab_size, seed=args.seed
            )
        texts = _texts_of(paths, target)
        rows = measure(tok, texts, args.threads, args.repeat)

    tokens = rows[0].tokens
    print(
        f"\ntokenizer {tok.vocab_size} pieces; {rows[0].nbytes / 1e6:.1f} MB in "
        f"{len(texts)} documents -> {tokens / 1e6:.2f}M tokens, "
        f"{rows[0].nbytes / tokens:.2f} bytes/token; {os.cpu_count()} cores; "
        f"best of {args.repeat}\n"
    )
    print(format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
