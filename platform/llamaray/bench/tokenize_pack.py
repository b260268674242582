"""Tokenize + pack on Ray Data against plain single-process SentencePiece, per core.

The input is at least `--mb` of text (200 MB by default: a smaller one measures Ray's
fixed start-up cost more than its throughput), made deterministically from the
standard-library sample: its documents repeated in order, as Parquet files in a temporary
folder. The same documents go through (a) a plain `SentencePieceProcessor.encode` loop in
this process, one core, on the whole input, and (b) the pipeline's own stage,
`prepare.tokenize_and_write`, with an actor pool of 1 and then 2 actors on a local Ray
cluster: tokenize, hold out, pack into rows of seq_len + 1 tokens and write the Parquet
shards, timed from the documents in Ray's object store (as `prepare` holds them) to the
last shard written. Ray's time includes actor start-up, scheduling, serialization, packing
and writing; the ratio per core is what the pipeline costs over tokenizing alone.

    python -m llamaray.bench.tokenize_pack [--mb 200] [--vocab-size 8000]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import sentencepiece as spm

from llamaray.data.prepare import tokenize_and_write
from llamaray.data.sample_text import iter_texts, write_stdlib_sample
from llamaray.storage import filesystem
from llamaray.tokenizer import Tokenizer, train_tokenizer

INPUT_FILE_BYTES = 16 << 20  # text per input Parquet file, so the read gives many blocks


def write_input(sample: dict, folder: Path, min_bytes: int) -> list[tuple[str, str]]:
    """The sample's documents (source, text), repeated in order until they hold at least
    `min_bytes` of UTF-8 text, written to `folder` as Parquet files of source, origin and
    text; returns them in order."""
    one_pass = [(source, text) for source, path in sample.items() for text in iter_texts([path])]
    pass_bytes = sum(len(text.encode()) for _, text in one_pass)
    docs = one_pass * -(-min_bytes // pass_bytes)
    folder.mkdir(parents=True)
    start, size, part = 0, 0, 0
    for i, (_, text) in enumerate(docs):
        size += len(text.encode())
        if size >= INPUT_FILE_BYTES or i == len(docs) - 1:
            chunk = docs[start : i + 1]
            table = pa.table(
                {
                    "source": [s for s, _ in chunk],
                    "origin": [f"bench:{start + j}" for j in range(len(chunk))],
                    "text": [t for _, t in chunk],
                }
            )
            pq.write_table(table, folder / f"part-{part:04d}.parquet")
            start, size, part = i + 1, 0, part + 1
    return docs


def plain_encode(model_path: str, texts: list[str]) -> tuple[float, int]:
    sp = spm.SentencePieceProcessor(model_file=model_path)
    start = time.perf_counter()
    n = sum(len(sp.encode(t)) for t in texts)
    return time.perf_counter() - start, n


def ray_tokenize_pack(tokenizer: Tokenizer, inputs: Path, out: Path, actors: int, seq_len: int):
    """Seconds for the pipeline's tokenize stage with `actors` actors, the tokens it counted
    and the rows it wrote."""
    import ray.data

    # As `prepare_corpus` runs the stage: in order, so the same input gives the same shards.
    ray.data.DataContext.get_current().execution_options.preserve_order = True
    docs = ray.data.read_parquet(str(inputs)).materialize()  # as prepare holds them
    fs, root = filesystem(str(out))
    start = time.perf_counter()
    counts, files = tokenize_and_write(
        docs, tokenizer, validation_fraction=0.0, seed=0, seq_len=seq_len,
        actors=actors, fs=fs, root=root, docs_bytes=docs.size_bytes(), n_docs=docs.count(),
    )  # fmt: skip
    elapsed = time.perf_counter() - start
    tokens = sum(c["tokens"] for c in counts.values())
    return elapsed, tokens, sum(f["rows"] for f in files)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=float, default=200.0, help="input text, at least")
    parser.add_argument("--sample-mb", type=float, default=8.0, help="sample text per source")
    parser.add_argument("--vocab-size", type=int, default=8000)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--max-actors", type=int, default=min(2, os.cpu_count() or 1))
    opts = parser.parse_args(argv)

    import ray

    from llamaray.ray_session import start_ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    with tempfile.TemporaryDirectory(prefix="llamaray-tpbench-") as tmp:
        sample = write_stdlib_sample(Path(tmp) / "sample", int(opts.sample_mb * 1e6))
        tokenizer = train_tokenizer(
            list(sample.values()), Path(tmp) / "tok", vocab_size=opts.vocab_size
        )
        docs = write_input(sample, Path(tmp) / "input", int(opts.mb * 1e6))
        texts = [text for _, text in docs]
        n_mb = sum(len(t.encode()) for t in texts) / 1e6
        seconds, tokens = plain_encode(str(tokenizer.path), texts)
        del docs, texts
        rows = [("plain sentencepiece", 1, seconds, tokens / seconds, 0)]
        start_ray("local", num_cpus=opts.max_actors, include_dashboard=False, log_to_driver=False)
        try:
            for actors in range(1, opts.max_actors + 1):
                out = Path(tmp) / f"out-{actors}"
                sec, counted, n_rows = ray_tokenize_pack(
                    tokenizer, Path(tmp) / "input", out, actors, opts.seq_len
                )
                if counted != tokens:
                    raise SystemExit(f"the pipeline counted {counted} tokens, plain {tokens}")
                rows.append(("ray tokenize+pack", actors, sec, tokens / sec / actors, n_rows))
        finally:
            ray.shutdown()

    print(
        f"\n# {n_mb:.1f} MB, {tokens} tokens, vocab {opts.vocab_size}, seq_len "
        f"{opts.seq_len}, {os.cpu_count()} cores"
    )
    print(
        f"{'path':22} {'workers':>7} {'seconds':>8} {'tok/s':>10} {'tok/s/core':>11} "
        f"{'vs plain':>8} {'rows':>7}"
    )
    base = rows[0][3]
    for name, workers, sec, per_core, n_rows in rows:
        print(
            f"{name:22} {workers:7} {sec:8.2f} {tokens / sec:10.0f} {per_core:11.0f} "
            f"{per_core / base:7.2f}x {n_rows:7}"
        )
    if len(rows) > 2:
        print(f"scaling 1 -> {rows[-1][1]} actors: {rows[1][2] / rows[-1][2]:.2f}x")
    sys.stdout.flush()


if __name__ == "__main__":
    main(sys.argv[1:])
