"""Corpus reading: every input record ends as a Document or a Rejected with its file:line."""

import gzip
import json
import os
import subprocess
import sys
import time
import zlib

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from llamaray.data import files, read
from llamaray.data.files import expand_paths
from llamaray.data.read import REASONS, CorpusError, from_row, iter_file, to_row
from llamaray.data.records import Document, Rejected

MAX = 1000  # max_chars for the mixed files: cheap to exceed


def compress(data: bytes, kind: str | None) -> bytes:
    if kind == "gz":
        return gzip.compress(data)
    if kind == "zst":
        return zstandard.ZstdCompressor().compress(data)
    return data


def suffixed(name: str, kind: str | None) -> str:
    return f"{name}.{kind}" if kind else name


# Each case: the raw line, and ("doc", text) or ("rej", reason). Line numbers are 1-based and
# the blank line (None expectation) holds no record but still counts.
MIXED: list[tuple[bytes, tuple[str, str] | None]] = [
    (json.dumps({"text": "first doc", "meta": {"lang": "en"}}).encode(), ("doc", "first doc")),
    (b'{"text": "caf\xe9 au lait"}', ("rej", "invalid_utf8")),
    (b'{"text": "unterminated', ("rej", "malformed_json")),
    (b'{"meta": {"lang": "en"}}', ("rej", "missing_text")),
    (b'{"text": 5}', ("rej", "missing_text")),
    (b"[1, 2]", ("rej", "missing_text")),
    (b'{"text": ""}', ("rej", "empty")),
    (b'{"text": " \\n\\t  "}', ("rej", "empty")),
    (json.dumps({"text": "y" * (MAX + 1)}).encode(), ("rej", "too_long")),
    (json.dumps({"text": "z" * MAX}).encode(), ("doc", "z" * MAX)),
    (json.dumps({"text": "w" * 3_000_000}).encode(), ("rej", "too_long")),  # over 12*MAX+1MiB
    (b'{"text": "lone \\ud800 surrogate"}', ("rej", "invalid_utf8")),
    (b"", None),
    (
        json.dumps({"text": "Grüße 🙂\n\npara two"}, ensure_ascii=False).encode(),
        ("doc", "Grüße 🙂\n\npara two"),
    ),
    (b'{"text": "last, no newline", "meta": "{\\"k\\": 1}"}', ("doc", "last, no newline")),
]


def expected_mixed(path: str) -> list[tuple[str, str, str]]:
    out = []
    for lineno, (_, exp) in enumerate(MIXED, 1):
        if exp is None:
            continue
        out.append((exp[0], f"{path}:{lineno}", exp[1]))
    return out


def summarize(items) -> list[tuple[str, str, str]]:
    return [
        ("doc", i.origin, i.text) if isinstance(i, Document) else ("rej", i.origin, i.reason)
        for i in items
    ]


def write_mixed(tmp_path, kind: str | None) -> str:
    path = tmp_path / suffixed("mixed.jsonl", kind)
    path.write_bytes(compress(b"\n".join(line for line, _ in MIXED), kind))
    return str(path)


@pytest.mark.parametrize("kind", [None, "gz", "zst"])
@pytest.mark.parametrize("chunk", [None, 7])
def test_mixed_jsonl_accounts_for_every_record(tmp_path, monkeypatch, kind, chunk):
    if chunk:  # lines split across many reads, compressed input fed a few bytes at a time
        monkeypatch.setattr(read, "_CHUNK", chunk)
        monkeypatch.setattr(files, "_RAW_CHUNK", 5)
    path = write_mixed(tmp_path, kind)
    items = list(iter_file(path, "c4", max_chars=MAX))
    assert summarize(items) == expected_mixed(path)
    n_records = sum(exp is not None for _, exp in MIXED)
    assert len(items) == n_records == 14
    assert all(i.source == "c4" for i in items)
    docs = [i for i in items if isinstance(i, Document)]
    assert [d.meta for d in docs] == [{"lang": "en"}, {}, {}, {"k": 1}]
    rejected = {i.origin.rsplit(":", 1)[1]: i for i in items if isinstance(i, Rejected)}
    assert rejected["2"].excerpt == '{"text": "caf\ufffd au lait"}'
    assert rejected["3"].excerpt == '{"text": "unterminated'
    assert rejected["9"].excerpt == "y" * read.EXCERPT_CHARS
    assert rejected["11"].excerpt == ('{"text": "' + "w" * 300)[: read.EXCERPT_CHARS]
    assert set(REASONS) >= {i.reason for i in rejected.values()}


def test_too_long_is_counted_in_characters_not_bytes(tmp_path):
    path = tmp_path / "multibyte.jsonl"
    path.write_text(json.dumps({"text": "é" * 10}, ensure_ascii=False) + "\n", encoding="utf-8")
    assert summarize(iter_file(str(path), "c4", max_chars=10)) == [("doc", f"{path}:1", "é" * 10)]
    assert summarize(iter_file(str(path), "c4", max_chars=9)) == [("rej", f"{path}:1", "too_long")]


def test_bom_and_crlf(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"text": "a"}\r\n{"text": "b"}\r\n')
    assert summarize(iter_file(str(path), "c4")) == [
        ("doc", f"{path}:1", "a"),
        ("doc", f"{path}:2", "b"),
    ]


def truncated_lines(data: bytes, kind: str) -> int:
    """Complete lines a decompressor can produce from a truncated stream."""
    if kind == "gz":
        obj = zlib.decompressobj(16 + zlib.MAX_WBITS)
        out = obj.decompress(data)
        assert not obj.eof
    else:
        obj = zstandard.ZstdDecompressor().decompressobj()
        out = obj.decompress(data)
        assert not obj.eof
    return out.count(b"\n")


@pytest.mark.parametrize("kind", ["gz", "zst"])
def test_truncated_compression_keeps_the_records_before_it(tmp_path, kind):
    texts = [f"document {i} " + "lorem ipsum " * (i % 17) for i in range(3000)]
    data = "".join(json.dumps({"text": t}) + "\n" for t in texts).encode()
    full = compress(data, kind)
    cut = full[: len(full) * 2 // 3]
    path = tmp_path / suffixed("cut.jsonl", kind)
    path.write_bytes(cut)
    k = truncated_lines(cut, kind)
    assert 0 < k < len(texts)
    items = list(iter_file(str(path), "books"))
    assert len(items) == k + 1
    assert [(d.origin, d.text) for d in items[:k]] == [
        (f"{path}:{i + 1}", texts[i]) for i in range(k)
    ]
    assert (items[-1].origin, items[-1].reason) == (f"{path}:{k + 1}", "truncated_compression")
    with pytest.raises(CorpusError, match=f"cut.jsonl.{kind}:{k + 1}: truncated_compression"):
        list(iter_file(str(path), "books", strict=True))


@pytest.mark.parametrize("kind", ["gz", "zst"])
def test_concatenated_members_and_frames(tmp_path, kind):
    path = tmp_path / suffixed("multi.jsonl", kind)
    parts = [compress(json.dumps({"text": f"t{i}"}).encode() + b"\n", kind) for i in range(3)]
    path.write_bytes(b"".join(parts) + (b"\0\0\0\0" if kind == "gz" else b""))
    assert [d.text for d in iter_file(str(path), "c4")] == ["t0", "t1", "t2"]


@pytest.mark.parametrize("kind", [None, "gz", "zst"])
def test_text_file_is_one_document(tmp_path, kind):
    text = "First paragraph.\n\nSecond paragraph, Grüße.\n\n\nThird.\n"
    path = tmp_path / suffixed("book.txt", kind)
    path.write_bytes(compress(("\ufeff" + text).encode(), kind))
    items = list(iter_file(str(path), "books"))
    assert items == [Document(text, "books", f"{path}:1")]


def test_text_file_rejections(tmp_path):
    cases = {
        "empty.txt": (b"", "empty"),
        "blank.txt": (b" \n\n\t\n", "empty"),
        "latin1.txt": ("good start, then caf\xe9".encode("latin-1"), "invalid_utf8"),
        "cut_multibyte.txt": ("ends mid character é".encode()[:-1], "invalid_utf8"),
        "long.txt": (b"x" * 3_000_000, "too_long"),
        "long_multibyte.txt": (("é" * (MAX + 1)).encode(), "too_long"),
    }
    for name, (data, reason) in cases.items():
        (tmp_path / name).write_bytes(data)
        items = list(iter_file(str(tmp_path / name), "books", max_chars=MAX))
        assert summarize(items) == [("rej", f"{tmp_path / name}:1", reason)], name
    items = list(iter_file(str(tmp_path / "latin1.txt"), "books"))
    assert items[0].excerpt == "good start, then caf\ufffd"
    (tmp_path / "fits.txt").write_bytes(("é" * MAX).encode())
    assert [d.text for d in iter_file(str(tmp_path / "fits.txt"), "books", max_chars=MAX)] == [
        "é" * MAX
    ]


@pytest.mark.parametrize("kind", ["gz", "zst"])
def test_truncated_text_file(tmp_path, kind):
    path = tmp_path / suffixed("book.txt", kind)
    path.write_bytes(compress(b"some words " * 50_000, kind)[:-20])
    assert summarize(iter_file(str(path), "books")) == [
        ("rej", f"{path}:1", "truncated_compression")
    ]


def test_parquet(tmp_path):
    texts = ["good one", None, "", "   ", "v" * (MAX + 1), "good two", "good three"]
    metas = [{"lang": "en", "score": i} for i in range(len(texts))]
    path = tmp_path / "part.parquet"
    pq.write_table(pa.table({"text": texts, "meta": metas}), path, row_group_size=2)
    items = list(iter_file(str(path), "wikipedia", max_chars=MAX))
    expected = ["good one", "missing_text", "empty", "empty", "too_long", "good two", "good three"]
    assert [(i.origin, i.text if isinstance(i, Document) else i.reason) for i in items] == [
        (f"{path}:{row}", value) for row, value in enumerate(expected, 1)
    ]
    docs = [i for i in items if isinstance(i, Document)]
    assert [d.meta for d in docs] == [metas[0], metas[5], metas[6]]
    assert pq.ParquetFile(path).metadata.num_row_groups == 4  # read across row groups


def test_parquet_meta_as_json_string_and_binary_text(tmp_path):
    path = tmp_path / "strmeta.parquet"
    table = pa.table(
        {
            "text": pa.array([b"bytes text", b"bad \xff"], type=pa.binary()),
            "meta": ['{"url": "http://x"}', "not json"],
        }
    )
    pq.write_table(table, path)
    assert summarize(iter_file(str(path), "c4")) == [
        ("doc", f"{path}:1", "bytes text"),
        ("rej", f"{path}:2", "invalid_utf8"),
    ]
    assert next(iter_file(str(path), "c4")).meta == {"url": "http://x"}


def test_parquet_string_columns_with_bad_utf8_dictionary_and_large_strings(tmp_path):
    bad = pa.array([b"ok", b"bad \xff", b"fine"], type=pa.binary()).view(pa.string())
    path = tmp_path / "badutf8.parquet"
    pq.write_table(pa.table({"text": bad, "meta": bad}), path)
    items = list(iter_file(str(path), "c4"))
    assert summarize(items) == [
        ("doc", f"{path}:1", "ok"),
        ("rej", f"{path}:2", "invalid_utf8"),
        ("doc", f"{path}:3", "fine"),
    ]
    assert (items[1].excerpt, items[2].meta) == ("bad \ufffd", {"meta": "fine"})
    assert items[0].meta == {"meta": "ok"}
    path = tmp_path / "dict.parquet"
    pq.write_table(pa.table({"text": pa.array(["a", "b", "a"]).dictionary_encode()}), path)
    assert pa.types.is_dictionary(pq.ParquetFile(path).schema_arrow.field("text").type)
    assert [d.text for d in iter_file(str(path), "c4")] == ["a", "b", "a"]
    path = tmp_path / "large.parquet"
    pq.write_table(pa.table({"text": pa.array(["x", "y"], type=pa.large_string())}), path)
    assert [d.text for d in iter_file(str(path), "c4")] == ["x", "y"]


def test_parquet_without_text_column_rejects_every_row(tmp_path):
    path = tmp_path / "notext.parquet"
    pq.write_table(pa.table({"content": ["a", "b", "c"]}), path)
    assert summarize(iter_file(str(path), "c4")) == [
        ("rej", f"{path}:{row}", "missing_text") for row in (1, 2, 3)
    ]
    path = tmp_path / "inttext.parquet"
    pq.write_table(pa.table({"text": [1, 2]}), path)
    assert summarize(iter_file(str(path), "c4")) == [
        ("rej", f"{path}:{row}", "missing_text") for row in (1, 2)
    ]


def test_unreadable_missing_and_unsupported(tmp_path):
    corrupt = tmp_path / "corrupt.parquet"
    corrupt.write_bytes(b"this is not parquet at all")
    notgz = tmp_path / "plain.jsonl.gz"
    notgz.write_bytes(b'{"text": "not compressed"}\n')
    a_dir = tmp_path / "dir.jsonl"
    a_dir.mkdir()
    csv = tmp_path / "table.csv"
    csv.write_text("a,b\n")
    pgz = tmp_path / "part.parquet.gz"
    pgz.write_bytes(b"x")
    cases = [
        (corrupt, ":0", "unreadable_file"),
        (notgz, ":1", "unreadable_file"),
        (a_dir, ":0", "unreadable_file"),
        (csv, ":0", "unsupported_format"),
        (pgz, ":0", "unsupported_format"),
        (tmp_path / "missing.jsonl.zst", ":0", "missing_file"),
        (tmp_path / "missing.parquet", ":0", "missing_file"),
        (tmp_path / "missing.txt", ":0", "missing_file"),
        (tmp_path / "missing.csv", ":0", "missing_file"),
    ]
    for path, line, reason in cases:
        items = list(iter_file(str(path), "c4"))
        assert summarize(items) == [("rej", f"{path}{line}", reason)], path
    (item,) = iter_file(str(notgz), "c4")
    assert item.excerpt.startswith("error: Error -3")  # zlib's message is kept
    (item,) = iter_file(str(corrupt), "c4")
    assert "ArrowInvalid" in item.excerpt


def test_strict_raises_at_the_first_bad_record(tmp_path):
    path = write_mixed(tmp_path, "zst")
    got = []
    with pytest.raises(CorpusError, match=r"mixed\.jsonl\.zst:2: invalid_utf8") as err:
        for item in iter_file(path, "c4", strict=True, max_chars=MAX):
            got.append(item)
    assert str(err.value).startswith(f"{path}:2: invalid_utf8")
    assert isinstance(err.value, ValueError)
    assert summarize(got) == [("doc", f"{path}:1", "first doc")]
    with pytest.raises(CorpusError, match=r"nope\.jsonl:0: missing_file"):
        list(iter_file(str(tmp_path / "nope.jsonl"), "c4", strict=True))
    good = tmp_path / "good.jsonl"
    good.write_text('{"text": "a"}\n{"text": "b"}\n')
    assert [d.text for d in iter_file(str(good), "c4", strict=True)] == ["a", "b"]


def test_one_100_mb_line(tmp_path):
    text = "0123456789" * 10_000_000
    path = tmp_path / "huge.jsonl"
    with open(path, "w") as f:
        f.write('{"text": "small"}\n')
        f.write(json.dumps({"text": text, "meta": {"n": 1}}) + "\n")
        f.write('{"text": "after"}\n')
    assert path.stat().st_size > 100_000_000
    t0 = time.perf_counter()
    items = list(iter_file(str(path), "books", max_chars=len(text)))
    elapsed = time.perf_counter() - t0
    assert [i.origin for i in items] == [f"{path}:{n}" for n in (1, 2, 3)]
    assert items[1].text == text and items[1].meta == {"n": 1}
    assert [items[0].text, items[2].text] == ["small", "after"]
    assert elapsed < 20, elapsed
    too_long = list(iter_file(str(path), "books", max_chars=len(text) - 1))
    assert summarize(too_long)[1] == ("rej", f"{path}:2", "too_long")


def test_expand_paths(tmp_path):
    d = tmp_path / "corpus"
    (d / "sub" / "deeper").mkdir(parents=True)
    for rel in ["b.jsonl", "a.jsonl", "sub/c.jsonl.gz", "sub/deeper/d.parquet", "sub/e.txt"]:
        (d / rel).write_bytes(b"")
    full = [str(d / r) for r in ["a.jsonl", "b.jsonl", "sub/c.jsonl.gz", "sub/deeper/d.parquet"]]
    full.insert(4, str(d / "sub/e.txt"))
    assert expand_paths([str(d)]) == full
    assert expand_paths([str(d / "**" / "*.jsonl*")]) == [full[0], full[1], full[2]]
    assert expand_paths([str(d / "sub"), str(d / "a.jsonl")]) == [*full[2:], full[0]]
    assert expand_paths([str(d / "*.jsonl"), str(d)]) == [full[0], full[1], *full[2:]]
    missing = [str(tmp_path / "nothing" / "*.jsonl"), str(tmp_path / "nope.jsonl")]
    assert expand_paths(missing) == missing
    assert [i.reason for p in expand_paths(missing) for i in iter_file(p, "c4")] == [
        "missing_file",
        "missing_file",
    ]


def test_quarantine_lines(tmp_path):
    path = write_mixed(tmp_path, None)
    rejected = [i for i in iter_file(path, "c4", max_chars=MAX) if isinstance(i, Rejected)]
    assert len(rejected) == 10
    lines = [r.quarantine_line() for r in rejected]
    assert all(line.endswith("\n") and line.count("\n") == 1 for line in lines)
    assert [json.loads(line) for line in lines] == [
        {"origin": r.origin, "reason": r.reason, "source": "c4", "excerpt": r.excerpt}
        for r in rejected
    ]
    odd = Rejected("x.jsonl:3", "empty", "books", "\ud800 lone surrogate, Grüße")
    line = odd.quarantine_line()
    line.encode("utf-8")  # a lone surrogate is escaped, so the line can be written as UTF-8
    assert json.loads(line) == {
        "origin": "x.jsonl:3",
        "reason": "empty",
        "source": "books",
        "excerpt": "\ud800 lone surrogate, Grüße",
    }


def test_rows_round_trip(tmp_path):
    items = list(iter_file(write_mixed(tmp_path, None), "c4", max_chars=MAX))
    rows = [to_row(i) for i in items]
    assert {tuple(r) for r in rows} == {
        ("kind", "source", "origin", "text", "meta_json", "reason", "excerpt")
    }
    assert [from_row(r) for r in rows] == items
    assert [from_row(r).meta for r in rows if r["kind"] == "doc"] == [
        i.meta for i in items if isinstance(i, Document)
    ]


# ------------------------------------------------------------------ compression bombs
# Gigabytes of one byte, no newline, in a file of kilobytes, then normal lines. Read in a
# child process that reports its peak RSS while reading and how its records came out.
# Peak RSS is the kernel's VmHWM, which starts afresh with the child's own memory at exec;
# ru_maxrss would not do: Linux carries it over from the forking parent (a test that held
# 700 MB before would hide the child's peak). Before the output of a decompression was
# bounded, reading the zstd file below took 4 GB.

BOMB_GOOD_LINES = 1000
_READ_IN_CHILD = """
import json, sys
from llamaray.data.read import iter_file

def status(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) / 1024

path, max_chars = sys.argv[1], int(sys.argv[2])
before = status("VmRSS")  # after the imports
records = []
for item in iter_file(path, "c4", max_chars=max_chars):
    text = getattr(item, "text", None)
    records.append([item.origin, getattr(item, "reason", "doc"), len(getattr(item, "excerpt", "")),
                    text if text is None or len(text) < 100 else len(text)])
peak = status("VmHWM")
print(json.dumps({"growth_mib": peak - before, "peak_mib": peak, "records": records}))
"""


def write_bomb(path, kind: str, giant_mib: int, lines_after: bool = True) -> None:
    """`giant_mib` MiB of b"a" with no newline, then (lines_after) a newline and
    BOMB_GOOD_LINES normal JSONL records, to `path`: the giant part as 64 MiB gzip members
    or zstd frames (a few KB each) written again and again, which is quick to make and as
    valid a stream as one member."""
    part = compress(b"a" * (64 << 20), kind)
    with open(path, "wb") as f:
        for _ in range(giant_mib // 64):
            f.write(part)
        if lines_after:
            tail = "".join(
                json.dumps({"text": f"good line {i}"}) + "\n" for i in range(BOMB_GOOD_LINES)
            )
            f.write(compress(b"\n" + tail.encode(), kind))


def read_in_child(path, max_chars: int = read.MAX_CHARS) -> dict:
    if not os.path.exists("/proc/self/status"):
        pytest.skip("peak RSS is read from /proc (Linux)")
    out = subprocess.run(
        [sys.executable, "-c", _READ_IN_CHILD, str(path), str(max_chars)],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    return json.loads(out.stdout)


@pytest.mark.slow  # make test only: gigabytes decompressed
@pytest.mark.parametrize(("kind", "gib"), [("zst", 2), ("gz", 1)])
def test_compression_bomb_is_too_long_in_bounded_memory(tmp_path, kind, gib):
    path = tmp_path / f"bomb.jsonl.{kind}"
    write_bomb(path, kind, gib << 10)
    assert path.stat().st_size < (gib << 30) // 500  # at least 500:1
    got = read_in_child(path)
    # The giant line is one too_long record with an excerpt; every line after it is read.
    records = got["records"]
    assert records[0] == [f"{path}:1", "too_long", read.EXCERPT_CHARS, None]
    assert records[1:] == [
        [f"{path}:{i + 2}", "doc", 0, f"good line {i}"] for i in range(BOMB_GOOD_LINES)
    ]
    # Reading may hold one record up to max_line_bytes (97 MiB at the default), never the
    # gigabytes the file holds, nor what one compressed chunk of it expands to.
    assert read.max_line_bytes(read.MAX_CHARS) < 100 << 20
    assert got["growth_mib"] < 160, got["growth_mib"]
    assert got["peak_mib"] < 256, got["peak_mib"]


@pytest.mark.slow  # make test only: gigabytes decompressed
@pytest.mark.parametrize("kind", ["zst", "gz"])
def test_compression_bomb_bound_follows_max_chars(tmp_path, kind):
    """A text file (one document) and a JSONL line, each 256 MiB of one byte, with a small
    max_chars: too_long, read with a few MiB."""
    for name, lines_after in (("bomb.txt", False), ("bomb.jsonl", True)):
        path = tmp_path / f"{name}.{kind}"
        write_bomb(path, kind, 256, lines_after=lines_after)
        got = read_in_child(path, max_chars=100_000)
        assert got["records"][0][:2] == [f"{path}:1", "too_long"]
        assert len(got["records"]) == (1 + BOMB_GOOD_LINES if lines_after else 1)
        assert got["growth_mib"] < 40, (name, got["growth_mib"])


@pytest.mark.parametrize("kind", ["gz", "zst"])
def test_a_decompressed_read_returns_at_most_what_was_asked(tmp_path, kind):
    """2 KB of zstd (or 64 KB of gzip) hold 64 MiB; no read returns more than its `n`."""
    data = b"a" * (64 << 20)
    path = tmp_path / f"bomb.bin.{kind}"
    path.write_bytes(compress(data, kind))
    sizes = []
    with files.open_stream(str(path), "gzip" if kind == "gz" else "zstd") as stream:
        while chunk := stream.read(1 << 20):
            sizes.append(len(chunk))
        assert stream.read() == b""
    assert sum(sizes) == len(data) and max(sizes) == 1 << 20
    with files.open_stream(str(path), "gzip" if kind == "gz" else "zstd") as stream:
        assert len(stream.read()) == files.OUT_CHUNK  # n < 0: one chunk, not the whole


def test_zstd_frame_with_a_huge_window_is_refused(tmp_path):
    """The decoder allocates the window a frame declares: above ZSTD_MAX_WINDOW it refuses."""
    params = zstandard.ZstdCompressionParameters.from_level(3, window_log=27)
    c = zstandard.ZstdCompressor(compression_params=params)  # a stream: no content size
    path = tmp_path / "long.jsonl.zst"
    with open(path, "wb") as f, c.stream_writer(f) as w:
        w.write(b'{"text": "x"}\n' * 1000)
    (item,) = iter_file(str(path), "c4")
    assert (item.origin, item.reason) == (f"{path}:1", "unreadable_file")
    assert "ZSTD_MAX_WINDOW" in item.excerpt
    ok = tmp_path / "ok.jsonl.zst"  # window_log 25: accepted
    params = zstandard.ZstdCompressionParameters.from_level(3, window_log=25)
    c = zstandard.ZstdCompressor(compression_params=params)
    with open(ok, "wb") as f, c.stream_writer(f) as w:
        w.write(b'{"text": "x"}\n' * 1000)
    assert [d.text for d in iter_file(str(ok), "c4")] == ["x"] * 1000
