"""The training feed over a prepared corpus, built here in prepare.py's layout (no Ray)."""

import gc
import json
import pickle
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from llamaray.data.mixed_stream import MixedStream, validation_rows
from llamaray.data.mixture import global_batch
from llamaray.data.packed_corpus import CorpusRows
from llamaray.data.prefetch import Prefetcher

SEQ_LEN = 8
W = SEQ_LEN + 1
# Rows per file of each (train, validation) split. Three rows a row group, so the files
# end mid-group; github has no validation files at all.
LAYOUT = {
    "commoncrawl": ([7, 5, 8], [4, 3]),
    "c4": ([6, 4], [5]),
    "github": ([3, 2, 4], []),
}
LIST_TYPED = {"c4"}  # a plain list<int32> column; the others are fixed_size_list like prepare
SOURCE_ID = {name: i for i, name in enumerate(LAYOUT)}
BUCKET = "feed"


def expected_row(source: str, split: str, r: int) -> np.ndarray:
    """Row r's tokens encode (source, split, r), so any mix-up shows."""
    base = (SOURCE_ID[source] + 1) * 1_000_000 + (500_000 if split == "validation" else 0)
    return base + 16 * r + np.arange(W, dtype=np.int64)


def expected(source: str, split: str, indices) -> np.ndarray:
    return np.stack([expected_row(source, split, int(r)) for r in indices]).astype(np.int64)


def source_of(rows: np.ndarray) -> np.ndarray:
    return rows[:, 0] // 1_000_000 - 1


def write_shard(path: Path, rows: np.ndarray, list_typed: bool, width: int = W) -> None:
    flat = pa.array(rows.astype(np.int32).ravel())
    if list_typed:
        offsets = pa.array(np.arange(0, len(flat) + 1, width, dtype=np.int32))
        column = pa.ListArray.from_arrays(offsets, flat)
    else:
        column = pa.FixedSizeListArray.from_arrays(flat, width)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"tokens": column}), path, row_group_size=3)


def write_corpus(root: Path) -> dict:
    sources = {}
    for name, per_split in LAYOUT.items():
        splits = {}
        for split, file_rows in zip(("train", "validation"), per_split, strict=True):
            files, start = [], 0
            for i, n in enumerate(file_rows):
                rel = f"shards/source={name}/split={split}/part-{i}.parquet"
                write_shard(
                    root / rel, expected(name, split, range(start, start + n)), name in LIST_TYPED
                )
                files.append(rel)
                start += n
            splits[split] = {
                "documents": start,
                "tokens": start * W,
                "rows": start,
                "packed_tokens": start * W,
                "files": files,
            }
        sources[name] = {"paths": [], "kept": 0, "dropped": {}, "documents_in": 0, "splits": splits}
    manifest = {
        "name": "tiny",
        "config": {},
        "config_hash": "0",
        "tokenizer": {"path": "tokenizer/tokenizer.model", "vocab_size": 64},
        "seq_len": SEQ_LEN,
        "row_tokens": W,
        "sources": sources,
        "skipped_steps": {},
        "quarantine": "quarantine.jsonl",
    }
    (root / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return manifest


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("corpus") / "tiny"
    write_corpus(root)
    return root


@pytest.fixture
def copy_dir(corpus_dir, tmp_path) -> Path:
    """A copy to damage."""
    return Path(shutil.copytree(corpus_dir, tmp_path / "tiny"))


def n_train(source: str) -> int:
    return sum(LAYOUT[source][0])


# --------------------------------------------------------------------------- CorpusRows


def test_manifest_properties(corpus_dir):
    corpus = CorpusRows.open(corpus_dir)
    assert (corpus.seq_len, corpus.row_tokens) == (SEQ_LEN, W)
    assert corpus.source_names == ("commoncrawl", "c4", "github")
    assert corpus.rows_per_source() == {"commoncrawl": 20, "c4": 10, "github": 9}
    assert corpus.rows_per_source("validation") == {"commoncrawl": 7, "c4": 5, "github": 0}
    assert corpus.manifest["name"] == "tiny"
    with pytest.raises(FileNotFoundError, match=r"manifest\.json"):
        CorpusRows.open(corpus_dir / "shards")


@pytest.mark.parametrize(("source", "split"), [("commoncrawl", "train"), ("c4", "train"),
                                               ("commoncrawl", "validation")])  # fmt: skip
def test_rows_shuffled_and_repeated_across_files_and_groups(corpus_dir, source, split):
    corpus = CorpusRows.open(corpus_dir)
    n = corpus.rows_per_source(split)[source]
    first_file = LAYOUT[source][0 if split == "train" else 1][0]
    rng = np.random.default_rng(0)
    # A permutation, then repeats around the first file boundary and of the first/last row.
    idx = np.concatenate([rng.permutation(n), [first_file - 1, first_file, first_file, 0, n - 1]])
    got = corpus.rows(source, idx, split)
    assert got.dtype == np.int64 and got.shape == (len(idx), W)
    np.testing.assert_array_equal(got, expected(source, split, idx))
    # A list instead of an array, and a single row.
    np.testing.assert_array_equal(
        corpus.rows(source, [n - 1], split), expected(source, split, [n - 1])
    )


def test_reads_only_the_needed_row_groups(corpus_dir, monkeypatch):
    calls: list[tuple[int, int]] = []  # (first row of the group read, its index in the file)
    real = pq.ParquetFile.read_row_group

    def counting(self, i, *args, **kwargs):
        table = real(self, i, *args, **kwargs)
        calls.append((table["tokens"][0].values[0].as_py() % 1_000_000 // 16, i))
        return table

    def forbidden(*args, **kwargs):
        raise AssertionError("a whole file or table was read")

    monkeypatch.setattr(pq.ParquetFile, "read_row_group", counting)
    monkeypatch.setattr(pq.ParquetFile, "read", forbidden)
    monkeypatch.setattr(pq, "read_table", forbidden)
    footers = []
    real_meta = pq.read_metadata
    monkeypatch.setattr(
        pq, "read_metadata", lambda p, **kw: footers.append(p) or real_meta(p, **kw)
    )

    corpus = CorpusRows.open(corpus_dir)
    # commoncrawl train: part-0 rows 0-6 (groups 0-2, 3-5, 6), part-1 rows 7-11, part-2 12-19.
    np.testing.assert_array_equal(
        corpus.rows("commoncrawl", [8, 0, 1]), expected("commoncrawl", "train", [8, 0, 1])
    )
    assert calls == [(0, 0), (7, 0)]
    assert len(footers) == 3 and all("source=commoncrawl/split=train" in p for p in footers)
    stats = corpus.cache_stats()
    assert (stats.row_groups_read, stats.hits, stats.footers_read) == (2, 0, 3)

    corpus.rows("commoncrawl", [2, 9, 2])  # the same two groups: served from the cache
    assert len(calls) == 2 and corpus.cache_stats().hits == 2
    corpus.rows("commoncrawl", [19, 6])
    assert calls[2:] == [(6, 2), (18, 2)]
    assert len(footers) == 3  # footers are read once per file
    assert corpus.cache_stats().cached_groups == 4


def test_cache_is_bounded_by_bytes(corpus_dir):
    group_bytes = 3 * W * 4  # three int32 rows
    corpus = CorpusRows.open(corpus_dir, cache_bytes=group_bytes)
    for _ in range(3):  # two groups alternating in a one-group cache: each read evicts the other
        corpus.rows("c4", [0])
        corpus.rows("c4", [3])
    stats = corpus.cache_stats()
    assert (stats.row_groups_read, stats.hits) == (6, 0)
    assert stats.cached_groups == 1 and stats.cached_bytes == group_bytes
    corpus.rows("c4", [4, 5])  # group of row 3: still cached
    assert corpus.cache_stats().hits == 1

    uncached = CorpusRows.open(corpus_dir, cache_bytes=0)
    uncached.rows("c4", [0])
    uncached.rows("c4", [0])
    assert uncached.cache_stats().row_groups_read == 2 and uncached.cache_stats().cached_bytes == 0


def write_grouped_corpus(root: Path, file_groups: list[list[int]]) -> Path:
    """A one-source corpus ("c4") whose file `i` has row groups of `file_groups[i]` rows."""
    files, start = [], 0
    for i, groups in enumerate(file_groups):
        rel = f"shards/source=c4/split=train/part-{i}.parquet"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        schema = pa.schema([("tokens", pa.list_(pa.int32(), W))])
        with pq.ParquetWriter(root / rel, schema) as writer:
            for n in groups:
                rows = expected("c4", "train", range(start, start + n)) if n else np.empty((0, W))
                flat = pa.array(rows.ravel(), pa.int32())
                writer.write_table(
                    pa.table({"tokens": pa.FixedSizeListArray.from_arrays(flat, W)}),
                    row_group_size=max(n, 1),
                )
                start += n
        files.append(rel)
    split = {"documents": start, "tokens": start * W, "rows": start, "packed_tokens": 0}
    empty = {"documents": 0, "tokens": 0, "rows": 0, "packed_tokens": 0, "files": []}
    manifest = {
        "name": "grouped", "config": {}, "config_hash": "0",
        "tokenizer": {"path": "tokenizer/tokenizer.model", "vocab_size": 64},
        "seq_len": SEQ_LEN, "row_tokens": W, "skipped_steps": {}, "quarantine": "q.jsonl",
        "sources": {"c4": {"paths": [], "kept": 0, "dropped": {}, "documents_in": 0,
                           "splits": {"train": {**split, "files": files}, "validation": empty}}},
    }  # fmt: skip
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def test_irregular_and_many_small_row_groups_read_with_footers_bounded(tmp_path):
    """Files of prepare's layout (equal groups, a shorter last one), of 64-row groups as
    older corpora have, of one-row groups, and of uneven groups (with an empty one) all
    read the same rows; at most `max_footers` parsed footers are kept, however many row
    groups the files have, and a file whose footer was dropped reads it again."""
    layouts = [[64, 64, 7], [1] * 40, [2, 5, 0, 1, 4], [3, 3, 3]]
    root = write_grouped_corpus(tmp_path / "grouped", layouts)
    n = sum(map(sum, layouts))
    idx = np.random.default_rng(0).permutation(n)
    for max_footers in (0, 1, 64):
        corpus = CorpusRows.open(root, cache_bytes=0, max_open_files=1, max_footers=max_footers)
        for chunk in np.array_split(idx, 7):
            np.testing.assert_array_equal(corpus.rows("c4", chunk), expected("c4", "train", chunk))
        stats = corpus.cache_stats()
        assert stats.cached_footers == min(max_footers, len(layouts)), max_footers
        # Every non-empty group (3 + 40 + 4 + 3) read, at most once per chunk (no cache).
        assert 50 <= stats.row_groups_read <= 7 * 50
        if max_footers == 64:
            assert stats.footers_read == len(layouts)  # only the index build's
        else:  # files reopened with their footer dropped read it again
            assert stats.footers_read > len(layouts)


def test_bad_indices(corpus_dir):
    corpus = CorpusRows.open(corpus_dir)
    with pytest.raises(IndexError, match=r"row 20 .*'commoncrawl' split 'train'.*\[0, 20\)"):
        corpus.rows("commoncrawl", [0, 20])
    with pytest.raises(IndexError, match=r"row -1 .*'c4'.*\[0, 10\)"):
        corpus.rows("c4", np.array([-1, 3]))
    with pytest.raises(IndexError, match=r"'github' split 'validation'.*\[0, 0\)"):
        corpus.rows("github", [0], split="validation")
    with pytest.raises(KeyError, match="books"):
        corpus.rows("books", [0])
    with pytest.raises(ValueError, match="split"):
        corpus.rows("c4", [0], split="test")
    with pytest.raises(TypeError, match="integers"):
        corpus.rows("c4", np.array([0.0, 1.0]))
    assert corpus.rows("c4", []).shape == (0, W)
    assert corpus.cache_stats().row_groups_read == 0  # nothing was read for any of these


def test_file_rows_disagreeing_with_manifest(copy_dir):
    manifest = json.loads((copy_dir / "manifest.json").read_text())
    manifest["sources"]["c4"]["splits"]["train"]["rows"] = 11
    (copy_dir / "manifest.json").write_text(json.dumps(manifest))
    corpus = CorpusRows.open(copy_dir)
    with pytest.raises(ValueError, match=r"'c4' split 'train'.*11 rows.*hold 10") as e:
        corpus.rows("c4", [0])
    assert "split=train/part-0.parquet: 6" in str(e.value)
    assert "split=train/part-1.parquet: 4" in str(e.value)
    np.testing.assert_array_equal(corpus.rows("github", [0]), expected("github", "train", [0]))


@pytest.mark.parametrize("source", ["commoncrawl", "c4"])  # fixed_size_list, list
def test_file_with_wrong_row_width(copy_dir, source):
    rel = f"shards/source={source}/split=train/part-1.parquet"
    write_shard(
        copy_dir / rel, np.zeros((LAYOUT[source][0][1], W + 1)), source in LIST_TYPED, W + 1
    )
    corpus = CorpusRows.open(copy_dir)
    first = LAYOUT[source][0][0]
    if source in LIST_TYPED:  # only decoding shows a list's width; a fixed size is in the footer
        np.testing.assert_array_equal(corpus.rows(source, [0]), expected(source, "train", [0]))
    with pytest.raises(ValueError, match=rf"{rel}: .*rows? of {W + 1} tokens.*row_tokens={W}"):
        corpus.rows(source, [first])


def test_inconsistent_manifest(copy_dir):
    manifest = json.loads((copy_dir / "manifest.json").read_text())
    manifest["row_tokens"] = SEQ_LEN
    (copy_dir / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="row_tokens=8 is not seq_len"):
        CorpusRows.open(copy_dir)


def test_pickled_copy_reads_the_same_rows(corpus_dir):
    corpus = CorpusRows.open(corpus_dir, cache_bytes=1000, max_open_files=1)
    corpus.rows("github", [0, 5])
    copy = pickle.loads(pickle.dumps(corpus))
    assert copy.cache_stats().row_groups_read == 0 and copy.cache_bytes == 1000
    idx = [8, 0, 4, 4]
    np.testing.assert_array_equal(copy.rows("github", idx), expected("github", "train", idx))
    with corpus:  # closes the handles; reading again reopens them
        pass
    np.testing.assert_array_equal(corpus.rows("github", idx), expected("github", "train", idx))


def test_validation_rows(corpus_dir):
    corpus = CorpusRows.open(corpus_dir)
    got = validation_rows(corpus, "commoncrawl", 5)  # across the two validation files
    np.testing.assert_array_equal(got, expected("commoncrawl", "validation", range(5)))
    np.testing.assert_array_equal(
        validation_rows(corpus, "c4", 100), expected("c4", "validation", range(5))
    )
    assert validation_rows(corpus, "github", 10).shape == (0, W)
    assert validation_rows(corpus, "c4", 0).shape == (0, W)
    with pytest.raises(ValueError, match="max_rows"):
        validation_rows(corpus, "c4", -1)


# -------------------------------------------------------------------------- MixedStream

TOTAL_ROWS = 3000
WORLD = 4
ROWS_PER_STEP = 8


@pytest.fixture(scope="module")
def stream(corpus_dir) -> MixedStream:
    return MixedStream(CorpusRows.open(corpus_dir), TOTAL_ROWS * SEQ_LEN, seed=3)


@pytest.fixture(scope="module")
def all_ranks(stream) -> list[list[np.ndarray]]:
    return [list(stream.batches(r, WORLD, ROWS_PER_STEP)) for r in range(WORLD)]


def test_ranks_together_give_the_global_batches(stream, all_ranks):
    names = stream.corpus.source_names
    n_steps = stream.steps(ROWS_PER_STEP)
    assert n_steps == TOTAL_ROWS // ROWS_PER_STEP and stream.plan.total_rows == TOTAL_ROWS
    assert [len(b) for b in all_ranks] == [n_steps] * WORLD
    for step in range(n_steps):
        batch = np.empty((ROWS_PER_STEP, W), dtype=np.int64)
        for rank in range(WORLD):
            got = all_ranks[rank][step]
            assert got.dtype == np.int64 and got.shape == (ROWS_PER_STEP // WORLD, W)
            batch[rank::WORLD] = got
        pairs = global_batch(stream.plan, step, ROWS_PER_STEP)
        want = np.stack([expected_row(names[s], "train", r) for s, r in pairs])
        np.testing.assert_array_equal(batch, want, err_msg=f"step {step}")


def test_realized_share_matches_the_paper_mixture(stream, all_ranks):
    rows = np.concatenate([b for rank in all_ranks for b in rank])
    share = np.bincount(source_of(rows), minlength=len(LAYOUT)) / len(rows)
    paper = np.array([0.670, 0.150, 0.045])
    np.testing.assert_allclose(share, paper / paper.sum(), atol=0.01)
    target = [s.target_proportion for s in stream.plan.sources]
    np.testing.assert_allclose(share, target, atol=0.01)
    assert stream.plan.source("github").epochs > 10  # repeats a tiny source many times


def test_resume_at_step_k_matches_the_uninterrupted_run(corpus_dir, all_ranks):
    # A fresh process's view: the corpus reopened, the stream rebuilt from the same seed.
    resumed = MixedStream(CorpusRows.open(corpus_dir), TOTAL_ROWS * SEQ_LEN, seed=3)
    k = 137
    for rank in (0, WORLD - 1):
        got = list(resumed.batches(rank, WORLD, ROWS_PER_STEP, start_step=k))
        assert len(got) == len(all_ranks[rank]) - k
        for a, b in zip(got, all_ranks[rank][k:], strict=True):
            np.testing.assert_array_equal(a, b)
    other = MixedStream(CorpusRows.open(corpus_dir), TOTAL_ROWS * SEQ_LEN, seed=4)
    assert not np.array_equal(next(other.batches(0, WORLD, ROWS_PER_STEP)), all_ranks[0][0])


def test_one_rows_call_per_source_per_step(corpus_dir):
    corpus = CorpusRows.open(corpus_dir)
    stream = MixedStream(corpus, 400 * SEQ_LEN, proportions={"commoncrawl": 1, "c4": 1}, seed=0)
    assert stream.plan.source("github").rows_drawn == 0
    calls: list[str] = []
    real = corpus.rows
    corpus.rows = lambda source, idx, split="train": (
        calls.append(source) or real(source, idx, split)
    )
    for step, batch in enumerate(stream.batches(1, 2, 16, start_step=3), start=3):
        present = [corpus.source_names[s] for s in np.unique(source_of(batch))]
        assert sorted(calls) == sorted(present) and len(present) == 2, f"step {step}"
        calls.clear()


def test_batches_checks_arguments_eagerly(stream):
    with pytest.raises(ValueError, match="multiple of world_size"):
        stream.batches(0, 3, 8)
    with pytest.raises(ValueError, match="start_step"):
        stream.batches(0, 4, 8, start_step=10_000)


def test_prefetched_stream_is_the_stream(stream, all_ranks):
    with Prefetcher(stream.batches(2, WORLD, ROWS_PER_STEP, start_step=300), depth=3) as p:
        got = list(p)
    assert len(got) == len(all_ranks[2]) - 300
    for a, b in zip(got, all_ranks[2][300:], strict=True):
        np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------------------- Prefetcher


def alive(name: str) -> bool:
    return any(t.name == name and t.is_alive() for t in threading.enumerate())


def wait_until(cond, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_prefetcher_yields_items_in_order_and_runs_ahead_by_depth():
    produced = []

    def numbers():
        for i in range(50):
            produced.append(i)
            yield i

    p = Prefetcher(numbers(), depth=3, name="pf-order")
    assert next(p) == 0
    # Three queued, one more made and waiting for room: no further.
    assert wait_until(lambda: len(produced) == 5)
    time.sleep(0.2)
    assert len(produced) == 5
    assert [0, *p] == list(range(50))
    assert list(p) == []  # exhausted stays exhausted
    assert wait_until(lambda: not alive("pf-order"))


def test_prefetcher_reraises_the_producers_exception():
    def failing():
        yield 1
        yield 2
        raise RuntimeError("shard 7 is corrupt")

    p = Prefetcher(failing(), name="pf-error")
    assert next(p) == 1 and next(p) == 2
    with pytest.raises(RuntimeError, match="shard 7 is corrupt"):
        next(p)
    assert not alive("pf-error")
    with pytest.raises(StopIteration):
        next(p)


def endless(closed: list):
    try:
        i = 0
        while True:
            yield i
            i += 1
    finally:
        closed.append(True)


def test_prefetcher_close_stops_the_thread():
    closed: list = []
    p = Prefetcher(endless(closed), depth=2, name="pf-close")
    assert [next(p), next(p)] == [0, 1]
    assert alive("pf-close")
    p.close()
    assert not alive("pf-close") and closed == [True]
    with pytest.raises(StopIteration):
        next(p)

    with Prefetcher(endless(closed), name="pf-with") as q:
        assert next(q) == 0
    assert not alive("pf-with") and closed == [True, True]


def test_abandoned_prefetcher_stops_its_thread():
    closed: list = []
    p = Prefetcher(endless(closed), name="pf-gc")
    assert next(p) == 0
    del p
    gc.collect()
    assert wait_until(lambda: not alive("pf-gc"), timeout=5)
    assert closed == [True]


# -------------------------------------------------------------------------------------- S3


def test_same_rows_through_s3(s3_client, corpus_dir):
    remote = CorpusRows.open(upload_corpus(s3_client, corpus_dir, "corpora/tiny") + "/")
    local = CorpusRows.open(corpus_dir)
    assert remote.manifest == local.manifest
    idx = np.random.default_rng(1).permutation(20)[:12]
    np.testing.assert_array_equal(remote.rows("commoncrawl", idx), local.rows("commoncrawl", idx))
    np.testing.assert_array_equal(
        validation_rows(remote, "c4", 3), expected("c4", "validation", range(3))
    )
    a = MixedStream(remote, 200 * SEQ_LEN, seed=5).batches(1, 2, 8, start_step=4)
    b = MixedStream(local, 200 * SEQ_LEN, seed=5).batches(1, 2, 8, start_step=4)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)
    with pytest.raises(FileNotFoundError):
        CorpusRows.open(f"s3://{BUCKET}/corpora/none")


def upload_corpus(s3_client, corpus_dir, prefix: str, bucket: str = BUCKET) -> str:
    existing = {b["Name"] for b in s3_client.list_buckets()["Buckets"]}
    if bucket not in existing:
        s3_client.create_bucket(Bucket=bucket)
    for path in corpus_dir.rglob("*"):
        if path.is_file():
            key = f"{prefix}/{path.relative_to(corpus_dir).as_posix()}"
            s3_client.put_object(Bucket=bucket, Key=key, Body=path.read_bytes())
    return f"s3://{bucket}/{prefix}"


@pytest.fixture
def faulty_s3(s3_endpoint, monkeypatch):
    """A FaultyS3 proxy in front of moto, adopted as this process's S3 filesystem (as a
    training worker adopts the driver's), with 3 attempts per request and per read."""
    from llamaray import storage
    from s3_faults import FaultyS3

    proxy = FaultyS3(s3_endpoint)
    monkeypatch.setattr(storage, "_ADOPTED_S3", None)
    storage.adopt_s3(storage.S3Storage(proxy.url, "us-east-1", max_attempts=3))
    yield proxy
    proxy.close()


def test_the_feed_rides_out_transient_s3_errors(s3_client, corpus_dir, faulty_s3):
    """S3 throttles the feed: every other GET of a shard (its footer, then each row group
    read) and the first request for the manifest and each shard's HEAD is answered 503
    SlowDown; the first GET of the manifest gets its connection reset. The training stream,
    prefetched as a worker reads it, gives exactly the local corpus's rows."""
    uri = upload_corpus(s3_client, corpus_dir, "corpora/flaky")

    def rule(method, key, query, n):
        if not key.startswith(f"/{BUCKET}/corpora/flaky/"):
            return None
        if key.endswith(".parquet") and method == "GET":
            return (503, "SlowDown", False) if n % 2 == 0 else None
        if key.endswith("manifest.json") and method == "GET" and n == 1:
            return 0, "reset", False
        return (503, "SlowDown", False) if n == 1 else None

    faulty_s3.reset(rule)
    remote = CorpusRows.open(uri)
    steps = MixedStream(remote, 200 * SEQ_LEN, seed=5).batches(1, 2, 8, start_step=2)
    with Prefetcher(steps, depth=2) as feed:
        got = list(feed)
    local = MixedStream(CorpusRows.open(corpus_dir), 200 * SEQ_LEN, seed=5)
    want = list(local.batches(1, 2, 8, start_step=2))
    assert len(got) == len(want) > 0
    for x, y in zip(got, want, strict=True):
        np.testing.assert_array_equal(x, y)
    assert remote.cache_stats().row_groups_read > 0
    shard_faults = [k for m, k, s in faulty_s3.failed if m == "GET" and k.endswith(".parquet")]
    assert len(set(shard_faults)) > 3 and faulty_s3.faults(503, "GET")


@pytest.mark.slow  # make test only: retries until they give up
def test_the_feed_fails_with_storage_unavailable_when_s3_stays_down(
    s3_client, corpus_dir, faulty_s3
):
    """A shard that S3 never serves: the feed raises StorageUnavailable (a storage error that
    restarts the run from its checkpoint), not a corrupt-data error, and not at once."""
    from llamaray.storage import StorageUnavailable

    uri = upload_corpus(s3_client, corpus_dir, "corpora/down")
    remote = CorpusRows.open(uri)
    faulty_s3.reset(
        lambda method, key, query, n: (
            (503, "SlowDown", False) if method == "GET" and key.endswith(".parquet") else None
        )
    )
    with pytest.raises(StorageUnavailable, match=r"corpora/down/shards/.*\.parquet"):
        remote.rows("c4", np.arange(3))
    assert sum(faulty_s3.faults(503, "GET").values()) >= 3
