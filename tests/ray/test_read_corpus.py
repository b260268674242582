"""`read_corpus` on Ray Data gives the same documents and rejections as `iter_file`."""

import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from llamaray.data.files import expand_paths
from llamaray.data.read import from_row, iter_file, read_corpus, to_row
from llamaray.data.records import Document, Rejected

pytestmark = pytest.mark.ray


def jsonl(texts) -> bytes:
    return "".join(json.dumps({"text": t, "meta": {"n": i}}) + "\n" for i, t in enumerate(texts))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    (d / "web").mkdir()
    (d / "web" / "a.jsonl").write_bytes(
        jsonl(["web one", "web two"]).encode()
        + b'{"text": "bad \xff byte"}\n{"text": broken\n{"meta": {}}\n{"text": "  "}\n'
        + json.dumps({"text": "x" * 500}).encode()
    )
    big = [f"document {i} " + "filler " * 20 for i in range(3000)]
    full = gzip.compress(jsonl(big).encode())
    (d / "web" / "cut.jsonl.gz").write_bytes(full[: len(full) // 2])
    (d / "web" / "c.jsonl.zst").write_bytes(
        zstandard.ZstdCompressor().compress(jsonl(["zst doc"]).encode())
    )
    pq.write_table(
        pa.table(
            {"text": ["wiki one", None, "wiki three"], "meta": [{"t": "a"}, {"t": "b"}, None]}
        ),
        d / "wiki.parquet",
    )
    (d / "book.txt").write_text("Chapter 1.\n\nIt was a dark night.\n")
    return {
        "c4": [str(d / "web")],
        "wikipedia": [str(d / "wiki.parquet"), str(d / "missing.parquet")],
        "books": [str(d / "*.txt")],
    }


def unit_rows(sources, max_chars):
    return [
        to_row(item)
        for source, patterns in sources.items()
        for path in expand_paths(patterns)
        for item in iter_file(path, source, max_chars=max_chars)
    ]


def key(row):
    return (row["source"], row["origin"])


def test_read_corpus_matches_the_unit_path(corpus):
    ds = read_corpus(corpus, max_chars=400)
    rows = sorted(ds.take_all(), key=key)
    expected = sorted(unit_rows(corpus, max_chars=400), key=key)
    assert rows == expected
    items = [from_row(r) for r in rows]
    docs = [i for i in items if isinstance(i, Document)]
    rejected = sorted(
        (r.source, r.origin.rsplit("/", 1)[1], r.reason) for r in items if isinstance(r, Rejected)
    )
    assert len(docs) > 1500  # the part of the truncated file before the cut
    assert {d.text for d in docs} >= {"web one", "web two", "zst doc", "wiki one", "wiki three"}
    assert "Chapter 1.\n\nIt was a dark night.\n" in {d.text for d in docs}
    n_cut = sum(d.origin.split("/")[-1].startswith("cut.jsonl.gz:") for d in docs)
    assert rejected == sorted(
        [
            ("c4", "a.jsonl:3", "invalid_utf8"),
            ("c4", "a.jsonl:4", "malformed_json"),
            ("c4", "a.jsonl:5", "missing_text"),
            ("c4", "a.jsonl:6", "empty"),
            ("c4", "a.jsonl:7", "too_long"),
            ("c4", f"cut.jsonl.gz:{n_cut + 1}", "truncated_compression"),
            ("wikipedia", "missing.parquet:0", "missing_file"),
            ("wikipedia", "wiki.parquet:2", "missing_text"),
        ]
    )
    assert [d.meta for d in docs if d.text == "wiki one"] == [{"t": "a"}]


def test_a_large_file_is_emitted_in_several_blocks(tmp_path):
    from ray.data import DataContext

    path = tmp_path / "big.jsonl"
    texts = [f"{i:06d} " + "words " * 100 for i in range(10_000)]  # about 6 MB
    path.write_bytes(jsonl(texts).encode())
    ctx = DataContext.get_current()
    old = ctx.target_max_block_size
    ctx.target_max_block_size = 1 << 20
    try:
        ds = read_corpus({"c4": [str(path)]}).materialize()
    finally:
        ctx.target_max_block_size = old
    assert ds.num_blocks() > 3
    assert sorted(r["text"] for r in ds.take_all()) == texts


def test_strict_read_corpus_raises_with_file_and_line(corpus):
    with pytest.raises(Exception, match=r"a\.jsonl:3: invalid_utf8"):
        read_corpus({"c4": corpus["c4"]}, strict=True).take_all()
    with pytest.raises(ValueError, match="no sources"):
        read_corpus({})
