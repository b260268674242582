"""Reading from S3 through a real (moto) S3 server on loopback (see conftest.py): no mocks."""

import gzip
import json
import os
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from llamaray import storage
from llamaray.data.files import expand_paths
from llamaray.data.read import iter_file
from llamaray.data.records import Document, Rejected
from s3_faults import FaultyS3

BUCKET = "corpus"
BAD = "corpus-bad"  # each test lists its own bucket


@pytest.fixture
def s3(s3_client):
    existing = {b["Name"] for b in s3_client.list_buckets()["Buckets"]}
    for bucket in {BUCKET, BAD} - existing:
        s3_client.create_bucket(Bucket=bucket)
    return s3_client


def jsonl(texts: list[str]) -> bytes:
    return "".join(json.dumps({"text": t, "meta": {"i": i}}) + "\n" for i, t in enumerate(texts))


def test_read_prefix_of_compressed_jsonl(s3):
    a = [f"gzip doc {i}" for i in range(50)]
    b = [f"zstd doc {i} Grüße" for i in range(30)]
    s3.put_object(Bucket=BUCKET, Key="prefix/a.jsonl.gz", Body=gzip.compress(jsonl(a).encode()))
    body = zstandard.ZstdCompressor().compress(jsonl(b).encode() + b"not json\n")
    s3.put_object(Bucket=BUCKET, Key="prefix/sub/b.jsonl.zst", Body=body)
    s3.put_object(Bucket=BUCKET, Key="other/c.jsonl", Body=b'{"text": "elsewhere"}\n')

    paths = expand_paths([f"s3://{BUCKET}/prefix/"])
    assert paths == [f"s3://{BUCKET}/prefix/a.jsonl.gz", f"s3://{BUCKET}/prefix/sub/b.jsonl.zst"]
    items = [item for path in paths for item in iter_file(path, "c4")]
    assert [(i.origin, i.text) for i in items[:-1]] == [
        (f"{paths[0]}:{n + 1}", t) for n, t in enumerate(a)
    ] + [(f"{paths[1]}:{n + 1}", t) for n, t in enumerate(b)]
    assert all(isinstance(i, Document) for i in items[:-1])
    assert items[1].meta == {"i": 1}
    last = items[-1]
    assert (last.origin, last.reason) == (f"{paths[1]}:31", "malformed_json")

    assert expand_paths([f"s3://{BUCKET}/prefix"]) == paths  # no trailing slash
    assert expand_paths([f"s3://{BUCKET}/prefix/*.gz"]) == paths[:1]
    assert expand_paths([paths[1]]) == paths[1:]
    assert expand_paths([f"s3://{BUCKET}"]) == [f"s3://{BUCKET}/other/c.jsonl", *paths]


def test_missing_truncated_and_parquet_on_s3(s3, tmp_path):
    texts = [f"document number {i} " * 20 for i in range(2000)]
    full = gzip.compress(jsonl(texts).encode())
    s3.put_object(Bucket=BAD, Key="bad/cut.jsonl.gz", Body=full[: len(full) // 2])
    local = tmp_path / "t.parquet"
    pq.write_table(pa.table({"text": ["p1", "", "p3"]}), local, row_group_size=1)
    s3.put_object(Bucket=BAD, Key="bad/t.parquet", Body=local.read_bytes())

    cut = f"s3://{BAD}/bad/cut.jsonl.gz"
    items = list(iter_file(cut, "c4"))
    docs, last = items[:-1], items[-1]
    assert 0 < len(docs) < len(texts)
    assert [d.text for d in docs] == texts[: len(docs)]
    assert (last.origin, last.reason) == (f"{cut}:{len(docs) + 1}", "truncated_compression")

    pqpath = f"s3://{BAD}/bad/t.parquet"
    got = [(i.origin, getattr(i, "text", None) or i.reason) for i in iter_file(pqpath, "c4")]
    assert got == [(f"{pqpath}:1", "p1"), (f"{pqpath}:2", "empty"), (f"{pqpath}:3", "p3")]

    for missing in [f"s3://{BAD}/bad/nope.jsonl", f"s3://{BAD}/bad/nope.parquet"]:
        (item,) = iter_file(missing, "c4")
        assert (item.origin, item.reason) == (f"{missing}:0", "missing_file")
    nothing = f"s3://{BAD}/no/such/prefix/"
    assert expand_paths([nothing]) == [nothing]
    assert os.environ["AWS_ENDPOINT_URL"].startswith("http://127.0.0.1:")


# ------------------------------------------------------------ transient S3 errors
# Through `FaultyS3` (tests/s3_faults.py), a proxy in front of moto that answers chosen
# requests with an error. The filesystem is the one a Ray task or a training worker gets
# from the driver (`storage.adopt_s3`), with few attempts so a test is quick: pyarrow's
# SDK retries each request `max_attempts` times, and llamaray.storage retries the whole
# call as often again. Failures injected beyond what one SDK round absorbs (or that the
# SDK does not retry) show the policy; a genuinely missing file must stay `missing_file`.

FAULTS = "corpus-faults"
ATTEMPTS = 3


@pytest.fixture
def faulty(s3, s3_endpoint, monkeypatch):
    existing = {b["Name"] for b in s3.list_buckets()["Buckets"]}
    if FAULTS not in existing:
        s3.create_bucket(Bucket=FAULTS)
    proxy = FaultyS3(s3_endpoint)
    monkeypatch.setattr(storage, "_ADOPTED_S3", None)
    storage.adopt_s3(storage.S3Storage(proxy.url, "us-east-1", max_attempts=ATTEMPTS))
    yield proxy
    proxy.close()


def listing(method, key, query, n):
    return method == "GET" and "list-type" in query


def object_get(method, key, query, n):
    return method == "GET" and "list-type" not in query


def first(n_faults: int, what, answers):
    """A FaultyS3 rule: the first `n_faults` requests that `what` picks (per method and
    key) get the answers in turn (cycled): (status, code)."""

    def rule(method, key, query, n):
        if what(method, key, query, n) and n <= n_faults:
            status, code = answers[(n - 1) % len(answers)]
            return status, code, False
        return None

    return rule


TRANSIENT = [(503, "SlowDown"), (0, "reset"), (502, "BadGateway"), (500, "InternalError")]


def test_listing_retries_transient_errors_and_still_reports_missing_files(s3, faulty):
    texts = [f"listed doc {i}" for i in range(5)]
    for name in ("a", "b"):
        s3.put_object(Bucket=FAULTS, Key=f"list/{name}.jsonl", Body=jsonl(texts).encode())
    # More failures in a row than one round of SDK attempts: 503, reset, 502 (which the SDK
    # does not retry on a listing), 500, 503.
    faulty.reset(first(ATTEMPTS + 2, listing, TRANSIENT))
    paths = expand_paths([f"s3://{FAULTS}/list/"])
    assert paths == [f"s3://{FAULTS}/list/a.jsonl", f"s3://{FAULTS}/list/b.jsonl"]
    assert sum(faulty.faults(503).values()) >= 1 and len(faulty.failed) == ATTEMPTS + 2
    items = [i for p in paths for i in iter_file(p, "c4")]
    assert [i.text for i in items] == texts + texts

    # Genuinely missing: a prefix with nothing under it and a key that is not there are
    # still "missing_file", through the same proxy and policy, without a retry.
    faulty.reset()
    nothing = f"s3://{FAULTS}/list/none/"
    assert expand_paths([nothing]) == [nothing]
    for missing in (nothing, f"s3://{FAULTS}/list/c.jsonl", f"s3://{FAULTS}/list/c.parquet"):
        (item,) = iter_file(missing, "c4")
        assert (item.origin, item.reason) == (f"{missing}:0", "missing_file")
    assert faulty.failed == []


@pytest.mark.slow  # make test only: retries until they give up
def test_a_listing_that_never_answers_raises_instead_of_a_missing_file(s3, faulty):
    from llamaray.storage import StorageUnavailable

    s3.put_object(Bucket=FAULTS, Key="down/a.jsonl", Body=b'{"text": "x"}\n')
    faulty.reset(first(10**6, listing, [(503, "SlowDown")]))
    with pytest.raises(StorageUnavailable, match=f"listing {FAULTS}/down"):
        expand_paths([f"s3://{FAULTS}/down/"])
    assert sum(faulty.faults(503).values()) == ATTEMPTS * ATTEMPTS  # SDK x storage.retry


@pytest.mark.parametrize("kind", ["jsonl", "jsonl.gz", "jsonl.zst", "parquet"])
def test_reads_retry_transient_errors_and_resume_where_they_were(s3, faulty, tmp_path, kind):
    """A small object whose first GETs and HEAD fail (pyarrow cannot even read the error
    answer to a small GET, and used to give up at once: "unreadable_file"), and a large one
    read in many GETs whose second one fails more times than one SDK round absorbs, so it
    is retried at its offset: the records come out whole and in order, none rejected."""
    small = [f"small doc {i}" for i in range(3)]
    rng = random.Random(0)  # random words: a body that compresses little, read in many GETs
    large = [f"large document {i} {rng.getrandbits(256):064x}" for i in range(40_000)]
    for name, texts in (("small", small), ("large", large)):
        key = f"get/{name}.{kind}"
        if kind == "parquet":
            local = tmp_path / f"{name}.parquet"
            pq.write_table(pa.table({"text": texts}), local, row_group_size=5000)
            body = local.read_bytes()
        else:
            body = jsonl(texts).encode()
            if kind.endswith(".gz"):
                body = gzip.compress(body, compresslevel=1)
            elif kind.endswith(".zst"):
                body = zstandard.ZstdCompressor(level=1).compress(body)
        s3.put_object(Bucket=FAULTS, Key=key, Body=body)
        if name == "large":
            assert len(body) > 2 * (1 << 18)  # several GETs

        failing = {"small": {1, 2}, "large": set(range(2, ATTEMPTS + 3))}[name]
        faulty.reset(
            lambda method, key, query, n, failing=failing: (
                (TRANSIENT[n % 2][0], TRANSIENT[n % 2][1], False)
                if method == "GET" and "list-type" not in query and n in failing
                else (503, "SlowDown", False)
                if method == "HEAD" and n == 1
                else None
            )
        )
        path = f"s3://{FAULTS}/{key}"
        items = list(iter_file(path, "c4"))
        assert [i.reason for i in items if isinstance(i, Rejected)] == []
        assert [i.text for i in items] == texts
        assert len(faulty.faults(503, "GET")) == 1 and len(faulty.failed) == len(failing) + 1


def test_permanent_read_errors_are_rejected_records(s3, faulty):
    s3.put_object(Bucket=FAULTS, Key="deny/a.jsonl", Body=b'{"text": "x"}\n')
    path = f"s3://{FAULTS}/deny/a.jsonl"
    faulty.reset(lambda method, key, query, n: (403, "AccessDenied", False))
    (item,) = iter_file(path, "c4")
    assert (item.origin, item.reason) == (f"{path}:0", "unreadable_file")
    assert "ACCESS_DENIED" in item.excerpt
    assert len(faulty.failed) == 1  # not retried


@pytest.mark.slow  # make test only: retries until they give up
@pytest.mark.parametrize("name", ["b.jsonl", "b.jsonl.gz", "b.parquet"])
def test_a_read_that_never_succeeds_raises_instead_of_an_unreadable_file(
    s3, faulty, tmp_path, name
):
    from llamaray.storage import StorageUnavailable

    body = jsonl(["x"]).encode()
    if name.endswith(".gz"):
        body = gzip.compress(body)
    elif name.endswith(".parquet"):  # read by pyarrow, through storage's retrying file
        pq.write_table(pa.table({"text": ["x"]}), tmp_path / name)
        body = (tmp_path / name).read_bytes()
    s3.put_object(Bucket=FAULTS, Key=f"down/{name}", Body=body)
    faulty.reset(first(10**6, object_get, [(503, "SlowDown")]))
    with pytest.raises(StorageUnavailable, match=f"reading {FAULTS}/down/{name}"):
        list(iter_file(f"s3://{FAULTS}/down/{name}", "c4"))
    # Each of storage's attempts is one GET (whose error pyarrow cannot read, for a small
    # range) or a round of the SDK's (Parquet's footer read is a large range).
    assert len(faulty.failed) in (ATTEMPTS, ATTEMPTS * ATTEMPTS)
