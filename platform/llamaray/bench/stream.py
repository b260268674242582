"""The training stream's cost per step at the paper's scale, and the corpus feed's rows/s
by Parquet row-group size, from local disk and from S3.

Stream: the paper's budget (1.4T tokens at seq_len 2048: 683.6M rows) over its seven
sources, each sized so the paper's epochs come out (`rows = proportion * rows / epochs`),
4M-token steps (2048 rows). Nothing is written: `MixedStream` reads a stand-in corpus
that has the manifest's row counts and answers `rows()` with zeros, so what is measured is
the stream itself: the plan, the first step's rows, and a late step (10^5), each with its
time and its peak Python allocation (tracemalloc), plus the process's peak RSS growth.

Feed: for each row-group size, one source of `--rows` random rows of 2049 int32 tokens
(below 32000, prepare's column type and Parquet defaults) in files of `--file-rows` rows,
read as a trainer reads it: `CorpusRows.rows` on seeded random indices, `--per-call` rows a
call (one rank's share of a step), with no row-group cache (`cache_bytes=0`: a real corpus
is far bigger than the cache, so a random row is almost never cached). Once from the local
folder, once from moto's S3 server on 127.0.0.1 started here. Also printed: the decoded
bytes per row read and a footer's bytes per row group (what the index must not hold for
every group of a big corpus).

    python -m llamaray.bench.stream [--groups 8,16,32,64,256] [--rows 4096] [--reads 512]
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from llamaray.data.mixed_stream import MixedStream
from llamaray.data.mixture import global_batch
from llamaray.data.packed_corpus import CorpusRows
from llamaray.data.sources import PAPER_MIXTURE

PAPER_TOKENS = 1_400_000_000_000
SEQ_LEN = 2048
ROWS_PER_STEP = 2048  # the paper's 4M-token batch
LATE_STEP = 100_000
VOCAB = 32000


class PaperSizedCorpus:
    """What `MixedStream` asks of a corpus, with the paper's sources sized so its epochs
    come out, and zero tokens for every row (no shard is read)."""

    seq_len = SEQ_LEN
    row_tokens = SEQ_LEN + 1

    def __init__(self, total_rows: int):
        self._rows = {
            name: round(m.proportion * total_rows / m.epochs) for name, m in PAPER_MIXTURE.items()
        }
        self.source_names = tuple(self._rows)

    def rows_per_source(self, split: str = "train") -> dict[str, int]:
        return dict(self._rows)

    def rows(self, source: str, indices, split: str = "train") -> np.ndarray:
        return np.zeros((len(indices), self.row_tokens), dtype=np.int64)


def _peak_rss_bytes() -> int:
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def _measured(fn):
    """(result, seconds, tracemalloc peak bytes) of `fn()`."""
    tracemalloc.start()
    start = time.perf_counter()
    try:
        result = fn()
        seconds = time.perf_counter() - start
        _current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return result, seconds, peak


def measure_stream(world_size: int) -> dict:
    total_rows = PAPER_TOKENS // SEQ_LEN
    corpus = PaperSizedCorpus(total_rows)
    rss_before = _peak_rss_bytes()

    def first_batch():
        stream = MixedStream(corpus, PAPER_TOKENS, seed=0)
        return stream, next(stream.batches(0, world_size, ROWS_PER_STEP))

    (stream, batch), first_s, first_peak = _measured(first_batch)
    _pairs, late_s, late_peak = _measured(
        lambda: global_batch(stream.plan, LATE_STEP, ROWS_PER_STEP)
    )
    start = time.perf_counter()
    for step in range(LATE_STEP, LATE_STEP + 20):
        global_batch(stream.plan, step, ROWS_PER_STEP)
    per_step_s = (time.perf_counter() - start) / 20
    return {
        "total_rows": stream.plan.total_rows,
        "steps": stream.steps(ROWS_PER_STEP),
        "epochs": {s.name: round(s.epochs, 2) for s in stream.plan.sources},
        "world_size": world_size,
        "batch_bytes": batch.nbytes,
        "first_batch_s": first_s,
        "first_batch_peak_bytes": first_peak,
        "late_step_s": late_s,
        "late_step_peak_bytes": late_peak,
        "global_batch_s": per_step_s,
        "rss_growth_bytes": _peak_rss_bytes() - rss_before,
    }


def write_source(root: Path, rows: int, file_rows: int, group_rows: int) -> Path:
    """A corpus of one source (`c4`) of random rows, `group_rows` rows a row group."""
    rng = np.random.default_rng(0)
    width = SEQ_LEN + 1
    files = []
    for i, start in enumerate(range(0, rows, file_rows)):
        n = min(file_rows, rows - start)
        flat = pa.array(rng.integers(0, VOCAB, n * width, dtype=np.int32))
        rel = f"shards/source=c4/split=train/part-{i:04d}.parquet"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        table = pa.table({"tokens": pa.FixedSizeListArray.from_arrays(flat, width)})
        pq.write_table(table, root / rel, row_group_size=group_rows)
        files.append(rel)
    split = {"documents": rows, "tokens": rows * width, "rows": rows, "packed_tokens": 0}
    empty = {"documents": 0, "tokens": 0, "rows": 0, "packed_tokens": 0, "files": []}
    manifest = {
        "name": "bench-stream", "seq_len": SEQ_LEN, "row_tokens": width,
        "tokenizer": {"path": "tokenizer/tokenizer.model", "vocab_size": VOCAB},
        "sources": {"c4": {"splits": {"train": {**split, "files": files}, "validation": empty}}},
    }  # fmt: skip
    import json

    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def rows_per_second(corpus_dir: str, group_rows: int, reads: int, per_call: int) -> float:
    """Random rows a second, each row of a call in a row group of its own: in a corpus of
    millions of groups two rows of a step almost never share one, so this small source
    must not let them (it would count one decode for several rows)."""
    corpus = CorpusRows.open(corpus_dir, cache_bytes=0)
    n = corpus.rows_per_source()["c4"]
    corpus.rows("c4", [0])  # the index (every footer) is built on the first access
    rng = np.random.default_rng(1)
    n_groups = -(-n // group_rows)
    calls = []
    for _ in range(max(1, reads // per_call)):
        groups = rng.choice(n_groups, min(per_call, n_groups), replace=False)
        calls.append(
            np.minimum(groups * group_rows + rng.integers(0, group_rows, len(groups)), n - 1)
        )
    start = time.perf_counter()
    for idx in calls:
        corpus.rows("c4", idx)
    return sum(map(len, calls)) / (time.perf_counter() - start)


def measure_feed(groups: list[int], rows: int, file_rows: int, reads: int, per_call: int):
    from llamaray.bench.checkpoint_stall import moto_s3
    from llamaray.storage import upload

    results = []
    with (
        tempfile.TemporaryDirectory(prefix="llamaray-bench-stream-") as tmp,
        moto_s3("bench-stream") as s3_uri,
    ):
        bucket = s3_uri.rsplit("/", 1)[0]
        for g in groups:
            local = write_source(Path(tmp) / f"g{g}", rows, file_rows, g)
            first = next(local.glob("shards/**/*.parquet"))
            md = pq.read_metadata(first)
            remote = f"{bucket}/g{g}"
            upload(local, remote)
            results.append(
                {
                    "group_rows": g,
                    "file_bytes": first.stat().st_size,
                    "footer_bytes_per_group": md.serialized_size / md.num_row_groups,
                    "decoded_bytes_per_row_read": g * (SEQ_LEN + 1) * 4,
                    "local_rows_s": rows_per_second(str(local), g, reads, per_call),
                    "s3_rows_s": rows_per_second(remote, g, reads // 2, per_call),
                }
            )
    return results


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--groups", default="8,16,32,64,256", help="row-group sizes to feed")
    parser.add_argument("--rows", type=int, default=4096, help="rows of the feed's source")
    parser.add_argument("--file-rows", type=int, default=1024)
    parser.add_argument("--reads", type=int, default=512, help="random rows read (S3: half)")
    parser.add_argument("--per-call", type=int, default=32, help="rows per rows() call")
    parser.add_argument("--world-size", type=int, default=8)
    opts = parser.parse_args(argv)

    stream = measure_stream(opts.world_size)
    mb = 1 << 20
    print(f"stream: {stream['total_rows']:,} rows (1.4T tokens / seq_len {SEQ_LEN}), "
          f"{stream['steps']:,} steps of {ROWS_PER_STEP} rows")  # fmt: skip
    print(f"  epochs {stream['epochs']}")
    print(f"  first batch (plan + step 0, rank 0 of {opts.world_size}): "
          f"{stream['first_batch_s']:.3f} s, peak {stream['first_batch_peak_bytes'] / mb:.2f} MiB "
          f"(of which the batch's tokens {stream['batch_bytes'] / mb:.2f} MiB)")  # fmt: skip
    print(f"  step {LATE_STEP:,} alone: {stream['late_step_s'] * 1e3:.1f} ms, peak "
          f"{stream['late_step_peak_bytes'] / 1024:.0f} KiB; a step's rows (global batch, "
          f"indices only) {stream['global_batch_s'] * 1e3:.1f} ms")  # fmt: skip
    print(f"  process peak RSS growth: {stream['rss_growth_bytes'] / mb:.1f} MiB")

    groups = [int(g) for g in opts.groups.split(",")]
    feed = measure_feed(groups, opts.rows, opts.file_rows, opts.reads, opts.per_call)
    print(f"feed: {opts.rows} random rows of {SEQ_LEN + 1} tokens, {opts.file_rows} rows a file, "
          f"{opts.per_call} rows a rows() call, no row-group cache")  # fmt: skip
    print("  group rows | file MiB | footer B/group | decoded KiB/row | local rows/s | "
          "S3 (moto) rows/s")  # fmt: skip
    for r in feed:
        decoded = r["decoded_bytes_per_row_read"] / 1024
        print(f"  {r['group_rows']:10d} | {r['file_bytes'] / mb:8.2f} | "
              f"{r['footer_bytes_per_group']:14.0f} | {decoded:15.0f} "
              f"| {r['local_rows_s']:12.0f} | {r['s3_rows_s']:16.0f}")  # fmt: skip
    return {"stream": stream, "feed": feed}


if __name__ == "__main__":
    main()
