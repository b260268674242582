"""Read corpus files into `Document`s, turning every bad record into a `Rejected`.

Formats, chosen by suffix (case-insensitive), after an optional compression suffix
(`.gz` gzip, `.zst`/`.zstd` zstandard, both decompressed as a stream):

- JSONL (`.jsonl`, `.json`, `.ndjson`) in RedPajama's shape, one `{"text": ..., "meta": {...}}`
  object a line. Origin "path:line", 1-based. Blank lines hold no record and are skipped
  (they still count for line numbers).
- Parquet (`.parquet`, `.pq`): a `text` column and an optional `meta` column (a struct, or a
  JSON string), read batch by batch. Origin "path:row", 1-based. Parquet compresses itself: a
  compressed suffix on a Parquet file is "unsupported_format".
- Plain text (`.txt`, `.text`): the whole file is ONE document (origin "path:1"); a blank line
  does not separate documents. It is held in memory only while it stays within `max_chars`:
  a longer file is "too_long" and the rest of it is not read.

`max_chars` is the config's `corpus.max_document_chars` (default `MAX_CHARS`). Files are
streamed in 1 MiB chunks of decompressed bytes, never loaded whole, whatever their size or
compression ratio (`files.open_stream` bounds each read's output, so a compression bomb
costs time, not memory). JSONL holds one line at a time; a line over
`max_line_bytes(max_chars)` = `12 * max_chars + 1 MiB` bytes is "too_long" without being
parsed or held (no text within `max_chars` needs more bytes, even fully
`\\uXXXX`-escaped, unless its meta is over 1 MiB); its excerpt is the line's first bytes,
and the lines after it are read as usual. So reading holds at most about
`max_line_bytes(max_chars)` of one record (97 MiB at the default), plus a chunk.

Paths are local or `s3://bucket/key` (`llamaray.storage`'s S3 filesystem and its retry
policy; `AWS_ENDPOINT_URL_S3` or `AWS_ENDPOINT_URL`, `AWS_REGION` or `AWS_DEFAULT_REGION`,
credentials from the usual AWS chain).

Bad input never raises (unless `strict=True`) and is never lost: each bad record becomes one
`Rejected` with one of the reason keys of `REASONS`. A store that is down is not bad input:
listings and reads retry transient S3 errors (`llamaray.storage.retry`), and one that
outlasts the retries raises `llamaray.storage.StorageUnavailable` instead of rejecting.
"""

from __future__ import annotations

import codecs
import contextlib
import json
import os
import zlib
from collections.abc import Iterator
from typing import Any

from llamaray.config import MAX_DOCUMENT_CHARS
from llamaray.data.files import exists, expand_paths, is_s3, open_stream, s3_path
from llamaray.data.records import Document, Rejected
from llamaray.storage import open_input

REASONS: dict[str, str] = {
    "missing_file": "the path does not exist (origin path:0)",
    "unsupported_format": "the suffix is none of JSONL, Parquet or text (origin path:0)",
    "unreadable_file": "any other read error (I/O, corrupt compression or Parquet); "
    "the excerpt holds the error",
    "truncated_compression": "a .gz/.zst stream ends early; the records before it are kept",
    "invalid_utf8": "the line (or text file) is not valid UTF-8, or holds lone surrogates",
    "malformed_json": "the line is not valid JSON",
    "missing_text": 'no "text" string in the record (or no text column)',
    "empty": "the text is empty or whitespace only",
    "too_long": "the text is longer than max_chars characters (corpus.max_document_chars), or "
    "its JSONL line is longer than max_line_bytes(max_chars) bytes (not parsed, not held)",
}

MAX_CHARS = MAX_DOCUMENT_CHARS
EXCERPT_CHARS = 200
_CHUNK = 1 << 20
_JSONL = (".jsonl", ".json", ".ndjson")
_PARQUET = (".parquet", ".pq")
_TEXT = (".txt", ".text")
_COMPRESSION = {".gz": "gzip", ".zst": "zstd", ".zstd": "zstd"}


class CorpusError(ValueError):
    """A bad record met in strict mode; the message starts with "path:line: reason"."""


# --------------------------------------------------------------------------- reading


def iter_file(
    path: str,
    source: str,
    *,
    strict: bool = False,
    max_chars: int = MAX_CHARS,
    s3: Any = None,
) -> Iterator[Document | Rejected]:
    """Stream the documents of one file, and a `Rejected` for each bad record.

    With `strict=True`, raise `CorpusError` at the first bad record instead. `s3`: the
    pyarrow filesystem for `s3://` paths (None: `llamaray.storage`'s, from this process's
    environment); `read_corpus` passes the driver's, so workers need no AWS settings of
    their own.
    """
    for item in _iter_file(path, source, max_chars, s3):
        if strict and isinstance(item, Rejected):
            detail = f": {item.excerpt[:120]!r}" if item.excerpt else ""
            raise CorpusError(f"{item.origin}: {item.reason}{detail}")
        yield item


def _iter_file(path: str, source: str, max_chars: int, s3) -> Iterator[Document | Rejected]:
    fmt, compression = _format_of(path)
    try:
        if fmt is None or (fmt == "parquet" and compression):
            if not exists(path, s3):
                raise FileNotFoundError(path)
            yield Rejected(f"{path}:0", "unsupported_format", source, os.path.basename(path))
        elif fmt == "parquet":
            yield from _iter_parquet(path, source, max_chars, s3)
        else:
            with open_stream(path, compression, s3) as stream:
                if fmt == "jsonl":
                    yield from _iter_jsonl(stream, path, source, max_chars)
                else:
                    yield from _iter_text(stream, path, source, max_chars)
    except _ReadError as e:  # raised mid-file, after the records before it
        yield _rejection(e.origin, source, e.__cause__)
    except Exception as e:  # opening the file
        if not _is_read_error(e):
            raise
        yield _rejection(f"{path}:0", source, e)


class _ReadError(Exception):
    def __init__(self, origin: str):
        self.origin = origin


def _is_read_error(e: BaseException) -> bool:
    import pyarrow as pa

    return isinstance(e, OSError | EOFError | zlib.error | pa.ArrowException) or (
        type(e).__name__ == "ZstdError"
    )


def _rejection(origin: str, source: str, e: BaseException | None) -> Rejected:
    if isinstance(e, FileNotFoundError):
        return Rejected(origin.rsplit(":", 1)[0] + ":0", "missing_file", source, str(e))
    if isinstance(e, EOFError):
        return Rejected(origin, "truncated_compression", source, str(e))
    return Rejected(origin, "unreadable_file", source, f"{type(e).__name__}: {e}")


def _format_of(path: str) -> tuple[str | None, str | None]:
    name = path.lower()
    compression = None
    for suffix, kind in _COMPRESSION.items():
        if name.endswith(suffix):
            compression, name = kind, name[: -len(suffix)]
            break
    if name.endswith(_JSONL):
        return "jsonl", compression
    if name.endswith(_PARQUET):
        return "parquet", compression
    if name.endswith(_TEXT):
        return "text", compression
    return None, compression


def max_line_bytes(max_chars: int) -> int:
    """The longest JSONL line (bytes, without its newline) that may hold a text of
    `max_chars` characters: 12 bytes a character (a surrogate pair escaped as two
    `\\uXXXX`) plus 1 MiB for the rest of the record. A longer line is "too_long"."""
    return 12 * max_chars + _CHUNK


def _iter_jsonl(stream, path: str, source: str, max_chars: int) -> Iterator[Document | Rejected]:
    lineno = 0
    lines = _iter_lines(stream.read, max_line_bytes(max_chars))
    while True:
        try:
            line, overflow = next(lines)
        except StopIteration:
            return
        except Exception as e:
            if not _is_read_error(e):
                raise
            raise _ReadError(f"{path}:{lineno + 1}") from e
        lineno += 1
        origin = f"{path}:{lineno}"
        if overflow:
            head = line[: EXCERPT_CHARS * 4].decode("utf-8", "replace")[:EXCERPT_CHARS]
            yield Rejected(origin, "too_long", source, head)
            continue
        if lineno == 1 and line.startswith(codecs.BOM_UTF8):
            line = line[len(codecs.BOM_UTF8) :]
        try:
            s = line.decode("utf-8")
        except UnicodeDecodeError:
            yield Rejected(origin, "invalid_utf8", source, _excerpt_bytes(line))
            continue
        if not s.strip():
            continue
        try:
            record = json.loads(s)
        except (ValueError, RecursionError):
            yield Rejected(origin, "malformed_json", source, s[:EXCERPT_CHARS])
            continue
        text = record.get("text") if isinstance(record, dict) else None
        if not isinstance(text, str):
            yield Rejected(origin, "missing_text", source, s[:EXCERPT_CHARS])
            continue
        yield _document(text, record.get("meta"), source, origin, max_chars)


def _iter_text(stream, path: str, source: str, max_chars: int) -> Iterator[Document | Rejected]:
    origin = f"{path}:1"
    decoder = codecs.getincrementaldecoder("utf-8")("strict")
    parts: list[str] = []
    n_chars = 0
    raw_head = b""
    try:
        while True:
            chunk = stream.read(_CHUNK)
            if len(raw_head) < EXCERPT_CHARS * 4:
                raw_head += chunk[: EXCERPT_CHARS * 4]
            try:
                part = decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError:
                yield Rejected(origin, "invalid_utf8", source, _excerpt_bytes(raw_head))
                return
            parts.append(part)
            n_chars += len(part)
            if n_chars > max_chars:
                head = _head(parts, EXCERPT_CHARS + 1).removeprefix("\ufeff")
                yield Rejected(origin, "too_long", source, head[:EXCERPT_CHARS])
                return
            if not chunk:
                break
    except Exception as e:
        if not _is_read_error(e):
            raise
        raise _ReadError(origin) from e
    text = "".join(parts).removeprefix("\ufeff")
    yield _document(text, None, source, origin, max_chars)


def _document(text: str, meta: Any, source: str, origin: str, max_chars: int):
    if not text.strip():
        return Rejected(origin, "empty", source, text[:EXCERPT_CHARS])
    if len(text) > max_chars:
        return Rejected(origin, "too_long", source, text[:EXCERPT_CHARS])
    try:
        text.encode("utf-8")  # JSON can escape lone surrogates, which no UTF-8 sink takes
    except UnicodeEncodeError:
        return Rejected(origin, "invalid_utf8", source, _excerpt_str(text))
    return Document(text, source, origin, _as_meta(meta))


def _iter_parquet(path: str, source: str, max_chars: int, s3=None) -> Iterator[Document | Rejected]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    with contextlib.ExitStack() as stack:
        if is_s3(path):
            fs, key = s3_path(path, s3)
            f = stack.enter_context(open_input(fs, key))  # reads retried as storage says
        else:
            f = path
        pf = pq.ParquetFile(f)
        names = pf.schema_arrow.names
        n_rows = pf.metadata.num_rows
        if "text" not in names:
            for row in range(1, n_rows + 1):
                yield Rejected(f"{path}:{row}", "missing_text", source, "no text column")
            return
        # Text is read as bytes and decoded here: pyarrow's own decoding raises on bad UTF-8.
        as_bytes = _binary_type(pf.schema_arrow.field("text").type)
        columns = ["text", "meta"] if "meta" in names else ["text"]
        row = 0
        batches = pf.iter_batches(batch_size=256, columns=columns)
        while True:
            try:
                batch = next(batches)
            except StopIteration:
                return
            except Exception as e:
                if not _is_read_error(e):
                    raise
                raise _ReadError(f"{path}:{row + 1}") from e
            texts = batch.column("text")
            if pa.types.is_dictionary(texts.type):
                texts = texts.dictionary_decode()
            texts = texts.cast(as_bytes).to_pylist() if as_bytes else [None] * len(texts)
            metas = _pylist(batch.column("meta")) if "meta" in columns else [None] * len(texts)
            for text, meta in zip(texts, metas, strict=True):
                row += 1
                origin = f"{path}:{row}"
                if text is None:
                    yield Rejected(origin, "missing_text", source, "")
                    continue
                try:
                    decoded = text.decode("utf-8")
                except UnicodeDecodeError:
                    yield Rejected(origin, "invalid_utf8", source, _excerpt_bytes(text))
                    continue
                yield _document(decoded, meta, source, origin, max_chars)


def _binary_type(t):
    """The binary type a text column of type `t` is read as; None if it holds no text."""
    import pyarrow as pa

    if pa.types.is_dictionary(t):
        t = t.value_type
    if pa.types.is_string(t) or pa.types.is_binary(t):
        return pa.binary()
    if pa.types.is_large_string(t) or pa.types.is_large_binary(t):
        return pa.large_binary()
    if pa.types.is_string_view(t) or pa.types.is_binary_view(t):
        return pa.binary_view()
    return None


def _pylist(column) -> list:
    try:
        return column.to_pylist()
    except UnicodeDecodeError:  # a meta string that is not UTF-8: keep the others
        out = []
        for i in range(len(column)):
            try:
                out.append(column[i].as_py())
            except UnicodeDecodeError:
                out.append({"meta_error": "invalid_utf8"})
        return out


def _iter_lines(read, max_line_bytes: int) -> Iterator[tuple[bytes, bool]]:
    """Yield (line without "\\n", too_long). A line over `max_line_bytes` comes as
    (its first bytes, True): once it is known to be too long, the pieces read so far are
    dropped and the rest of it is counted, not kept, so no more than `max_line_bytes` plus
    one chunk is ever held, however long the line.

    An error from `read` propagates after every complete line before it was yielded; the
    partial line at that point is dropped.
    """
    pieces: list[bytes] = []
    size = 0
    head: bytes | None = None  # the excerpt, once the line is known to be too long
    while chunk := read(_CHUNK):
        split = chunk.split(b"\n")
        last = len(split) - 1
        for i, piece in enumerate(split):
            size += len(piece)
            if head is None:
                pieces.append(piece)
                if size > max_line_bytes:
                    head, pieces = _head(pieces, EXCERPT_CHARS * 4), []
            if i < last:
                if head is None:
                    line = (pieces[0] if len(pieces) == 1 else b"".join(pieces), False)
                else:
                    line = (head, True)
                pieces, size, head = [], 0, None  # freed before the consumer parses the line
                yield line
    if size:
        yield (b"".join(pieces), False) if head is None else (head, True)


def _head(pieces: list, n: int):
    """The first `n` items (bytes or characters) of the concatenation of `pieces`, without
    concatenating them all."""
    out = pieces[0][:0] if pieces else b""
    for piece in pieces:
        out += piece[: n - len(out)]
        if len(out) >= n:
            break
    return out


def _excerpt_bytes(b: bytes) -> str:
    return b[: EXCERPT_CHARS * 4].decode("utf-8", "replace")[:EXCERPT_CHARS]


def _excerpt_str(s: str) -> str:
    return s[:EXCERPT_CHARS].encode("utf-8", "replace").decode("utf-8")


def _as_meta(meta: Any) -> dict:
    if meta is None:
        return {}
    if isinstance(meta, dict):
        return meta
    if isinstance(meta, str):
        try:
            parsed = json.loads(meta)
        except (ValueError, RecursionError):
            parsed = None
        if isinstance(parsed, dict):
            return parsed
    return {"meta": meta}


# --------------------------------------------------------------------------- Ray Data


def to_row(item: Document | Rejected) -> dict[str, str]:
    """The flat row `read_corpus` emits for a document or a rejection."""
    if isinstance(item, Document):
        meta_json = json.dumps(item.meta, default=str) if item.meta else ""
        return {
            "kind": "doc",
            "source": item.source,
            "origin": item.origin,
            "text": item.text,
            "meta_json": meta_json,
            "reason": "",
            "excerpt": "",
        }
    return {
        "kind": "rejected",
        "source": item.source,
        "origin": item.origin,
        "text": "",
        "meta_json": "",
        "reason": item.reason,
        "excerpt": _excerpt_str(item.excerpt),
    }


def from_row(row: dict) -> Document | Rejected:
    """Inverse of `to_row`."""
    if row["kind"] == "doc":
        meta = json.loads(row["meta_json"]) if row["meta_json"] else {}
        return Document(row["text"], row["source"], row["origin"], meta)
    return Rejected(row["origin"], row["reason"], row["source"], row["excerpt"])


def read_corpus(
    sources: dict[str, list[str]],
    *,
    strict: bool = False,
    max_chars: int = MAX_CHARS,
    expand: bool = True,
):
    """A Ray Dataset of `to_row` rows for every file of every source, one file per task.

    `sources` maps a source name to its path patterns (see `expand_paths`, run here on the
    driver), or with `expand=False` to its files as `expand_paths` listed them already.
    Each file is streamed by `iter_file` inside `flat_map`, so a large file is emitted
    block by block rather than materialized. S3 files are opened with the driver's
    S3 filesystem (`llamaray.storage.filesystem`: its endpoint, region and retries, and the
    driver's environment credentials for workers that have none of their own), pickled
    into each task.
    """
    import ray

    from llamaray.storage import filesystem

    items = [
        {"source": source, "path": path}
        for source, patterns in sources.items()
        for path in (expand_paths(patterns) if expand else patterns)
    ]
    if not items:
        raise ValueError("read_corpus: no sources or no path patterns given")
    s3 = filesystem("s3://x")[0] if any(is_s3(i["path"]) for i in items) else None
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    return ds.flat_map(_file_rows, fn_kwargs={"strict": strict, "max_chars": max_chars, "s3": s3})


def _file_rows(item: dict, *, strict: bool, max_chars: int, s3=None) -> Iterator[dict[str, str]]:
    records = iter_file(item["path"], item["source"], strict=strict, max_chars=max_chars, s3=s3)
    for record in records:
        yield to_row(record)
