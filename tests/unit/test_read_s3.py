"""Reading from S3 through a real (moto) S3 server on loopback (see conftest.py): no mocks."""

import gzip
import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from llamaray.data.files import expand_paths
from llamaray.data.read import iter_file
from llamaray.data.records import Document

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
