"""`CorpusRows.rows` from S3 reads a call's row groups concurrently (moto behind a proxy that
counts the GETs in flight), with the same rows, counters and retries as one at a time."""

import json
import pickle
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_feed import upload_corpus

from llamaray import storage
from llamaray.data.packed_corpus import CorpusRows
from s3_faults import FaultyS3

SEQ_LEN = 8
W = SEQ_LEN + 1
FILE_ROWS = [40, 36, 40, 44]  # four files of 4-row groups: 40 row groups in all
GROUP_ROWS = 4
BUCKET = "feed-concurrent"


def expected(indices) -> np.ndarray:
    """Row r's tokens encode r, so a mix-up shows."""
    return np.stack([16 * int(r) + np.arange(W, dtype=np.int64) for r in indices])


def write_corpus(root: Path) -> Path:
    files, start = [], 0
    for i, n in enumerate(FILE_ROWS):
        rel = f"shards/source=c4/split=train/part-{i}.parquet"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        flat = pa.array(expected(range(start, start + n)).ravel(), pa.int32())
        table = pa.table({"tokens": pa.FixedSizeListArray.from_arrays(flat, W)})
        pq.write_table(table, root / rel, row_group_size=GROUP_ROWS)
        files.append(rel)
        start += n
    split = {"documents": start, "tokens": start * W, "rows": start, "packed_tokens": 0}
    empty = {"documents": 0, "tokens": 0, "rows": 0, "packed_tokens": 0, "files": []}
    manifest = {
        "name": "concurrent", "seq_len": SEQ_LEN, "row_tokens": W,
        "tokenizer": {"path": "tokenizer/tokenizer.model", "vocab_size": 64},
        "sources": {"c4": {"splits": {"train": {**split, "files": files}, "validation": empty}}},
    }  # fmt: skip
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


class CountingS3(FaultyS3):
    """A FaultyS3 proxy that also records the most object GETs it had in flight at once.
    Each GET is held a few milliseconds so that reads issued together overlap here too."""

    def __init__(self, upstream: str):
        super().__init__(upstream)
        self.in_flight = self.max_in_flight = 0
        self._count_lock = threading.Lock()

    def _forward(self, request, body: bytes):
        counted = request.command == "GET" and request.path.split("?")[0].endswith(".parquet")
        if not counted:
            return super()._forward(request, body)
        with self._count_lock:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            time.sleep(0.005)
            return super()._forward(request, body)
        finally:
            with self._count_lock:
                self.in_flight -= 1

    def reset(self, rule=None) -> None:
        super().reset(rule)
        with self._count_lock:
            self.max_in_flight = 0


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus") / "concurrent")


@pytest.fixture
def counting_s3(s3_client, s3_endpoint, monkeypatch):
    """The corpus on moto, read through a CountingS3 proxy adopted as this process's S3
    filesystem (3 attempts per request and per read)."""
    proxy = CountingS3(s3_endpoint)
    monkeypatch.setattr(storage, "_ADOPTED_S3", None)
    storage.adopt_s3(storage.S3Storage(proxy.url, "us-east-1", max_attempts=3))
    yield proxy
    proxy.close()


def upload(s3_client, corpus_dir: Path, prefix: str) -> str:
    return upload_corpus(s3_client, corpus_dir, prefix, BUCKET)


def test_a_call_reads_its_row_groups_from_s3_concurrently(s3_client, corpus_dir, counting_s3):
    uri = upload(s3_client, corpus_dir, "corpora/concurrent")
    remote = CorpusRows.open(uri)
    local = CorpusRows.open(corpus_dir)
    n = sum(FILE_ROWS)
    remote.rows("c4", [0])  # builds the index: its footers are read in parallel anyway
    counting_s3.reset()

    # Every row once, shuffled, and some twice: all 40 row groups, in four files.
    rng = np.random.default_rng(0)
    idx = np.concatenate([rng.permutation(n), rng.integers(0, n, 30)])
    got = remote.rows("c4", idx)
    np.testing.assert_array_equal(got, local.rows("c4", idx))
    np.testing.assert_array_equal(got, expected(idx))
    assert counting_s3.max_in_flight > 1
    assert (remote.read_threads, local.read_threads) == (16, 1)
    groups = n // GROUP_ROWS
    stats = remote.cache_stats()
    # Group 0 was read (and cached) by the first call; each other group once now.
    assert (stats.row_groups_read, stats.hits, stats.footers_read) == (groups, 1, 4)
    assert stats.cached_groups == groups

    again = remote.rows("c4", idx[::-1])  # every group cached: nothing read
    np.testing.assert_array_equal(again, expected(idx[::-1]))
    stats = remote.cache_stats()
    assert (stats.row_groups_read, stats.hits) == (groups, 1 + groups)


def test_concurrent_reads_keep_the_open_files_bound_and_retry_transient_errors(
    s3_client, corpus_dir, counting_s3
):
    """Two open files at a time, no footer kept, no cache: files are opened two at a time
    (each reading its footer again), their groups read concurrently. The second and third
    GET of each shard in the call are answered 503 SlowDown: what they were for is read
    again (3 attempts a read, so each succeeds by its third whatever the interleaving)."""
    uri = upload(s3_client, corpus_dir, "corpora/bounded")
    remote = CorpusRows.open(uri, cache_bytes=0, max_open_files=2, max_footers=0)
    n = sum(FILE_ROWS)
    remote.rows("c4", [0])
    counting_s3.reset(
        lambda method, key, query, k: (
            (503, "SlowDown", False)
            if method == "GET" and key.endswith(".parquet") and k in (2, 3)
            else None
        )
    )
    idx = np.random.default_rng(1).permutation(n)
    np.testing.assert_array_equal(remote.rows("c4", idx), expected(idx))
    assert counting_s3.max_in_flight > 1
    assert sorted(counting_s3.faults(503, "GET").values()) == [2] * len(FILE_ROWS)
    stats = remote.cache_stats()
    assert stats.row_groups_read == 1 + n // GROUP_ROWS and stats.cached_groups == 0
    # The index's 4, part-0's again when the first call opened it, then this call's opens
    # of the three others (part-0 was still open).
    assert stats.footers_read == 4 + 1 + 3 and stats.cached_footers == 0


def test_callers_on_several_threads_and_a_pickled_copy_get_the_same_rows(
    s3_client, corpus_dir, counting_s3
):
    uri = upload(s3_client, corpus_dir, "corpora/shared")
    remote = CorpusRows.open(uri, cache_bytes=0)
    n = sum(FILE_ROWS)
    calls = [np.random.default_rng(seed).integers(0, n, 64) for seed in range(6)]
    results: dict[int, np.ndarray] = {}

    def read(i: int) -> None:
        results[i] = remote.rows("c4", calls[i])

    threads = [threading.Thread(target=read, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, idx in enumerate(calls):
        np.testing.assert_array_equal(results[i], expected(idx))

    copy = pickle.loads(pickle.dumps(remote))  # its read threads are not pickled
    np.testing.assert_array_equal(copy.rows("c4", calls[0]), expected(calls[0]))
    remote.close()  # stops the read threads; reading again starts them
    np.testing.assert_array_equal(remote.rows("c4", calls[1]), expected(calls[1]))
    assert CorpusRows.open(uri, read_threads=3).read_threads == 3
    with pytest.raises(ValueError, match="read_threads"):
        CorpusRows.open(uri, read_threads=0)
