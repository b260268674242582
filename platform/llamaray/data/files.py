"""Where corpus files are and how their bytes come out: local paths and `s3://` keys,
globs and prefixes listed, gzip and zstandard decompressed as a stream (truncation noticed).
`data.read` parses what comes out."""

from __future__ import annotations

import contextlib
import fnmatch
import glob
import os
import zlib

_RAW_CHUNK = 1 << 18  # compressed bytes a read; kept small as output can be 10x


@contextlib.contextmanager
def open_stream(path: str, compression: str | None, s3=None):
    """A binary stream with `.read(n)`, decompressed; truncation raises EOFError."""
    with contextlib.ExitStack() as stack:
        if is_s3(path):
            from pyarrow import fs as pafs

            s3, key = s3_path(path, s3)
            if s3.get_file_info(key).type == pafs.FileType.NotFound:
                raise FileNotFoundError(f"No such file: {path}")
            raw = stack.enter_context(s3.open_input_stream(key, compression=None))
        else:
            raw = stack.enter_context(open(path, "rb"))
        yield _Decompressed(raw, compression) if compression else raw


class _Decompressed:
    """Streaming gzip or zstandard reader that notices truncation (raises EOFError).

    Concatenated gzip members and zstd frames are read in turn. (`gzip.GzipFile.read` drops
    the data it decompressed when a truncation error ends a read, and zstandard's
    `stream_reader` returns a clean EOF on a truncated frame: neither does here.)
    """

    def __init__(self, raw, kind: str):
        self._raw = raw
        self._kind = kind
        self._obj = None
        if kind == "zstd":
            import zstandard

            self._dctx = zstandard.ZstdDecompressor()

    def _new(self):
        if self._kind == "gzip":
            return zlib.decompressobj(16 + zlib.MAX_WBITS)
        return self._dctx.decompressobj()

    def read(self, n: int = -1) -> bytes:
        """The next decompressed piece (its size follows the input, not `n`); b"" at the end."""
        while data := self._raw.read(_RAW_CHUNK):
            out = []
            while data:
                if self._obj is None:
                    if self._kind == "gzip":  # gzip(1) tolerates zero padding after a member
                        data = data.lstrip(b"\x00")
                        if not data:
                            break
                    self._obj = self._new()
                out.append(self._obj.decompress(data))
                if self._obj.eof:
                    data, self._obj = self._obj.unused_data, None
                else:
                    data = b""
            if result := b"".join(out):
                return result
        if self._obj is not None:
            raise EOFError(f"{self._kind} stream ended before the end of its last frame")
        return b""


def is_s3(path: str) -> bool:
    return path.startswith("s3://")


def s3_path(path: str, s3=None):
    """(`s3`, or else the S3 filesystem of `llamaray.storage`, "bucket/key") for
    "s3://bucket/key"."""
    from llamaray.storage import filesystem

    if s3 is not None:
        return s3, path[len("s3://") :].rstrip("/")
    return filesystem(path)


def exists(path: str, s3=None) -> bool:
    if is_s3(path):
        from pyarrow import fs as pafs

        s3, key = s3_path(path, s3)
        return s3.get_file_info(key).type != pafs.FileType.NotFound
    return os.path.exists(path)


def expand_paths(patterns: list[str]) -> list[str]:
    """Files named by local globs (`**` recursive), directories and `s3://` prefixes.

    Directories and prefixes are listed recursively; each pattern's files are sorted, the
    patterns keep their order, and a file named twice is listed once. A pattern that matches
    nothing is returned as is, so `iter_file` reports it as "missing_file".
    """
    out: dict[str, None] = {}
    for pattern in patterns:
        found = _expand_s3(pattern) if is_s3(pattern) else _expand_local(pattern)
        for path in found or [pattern]:
            out.setdefault(path, None)
    return list(out)


def _expand_local(pattern: str) -> list[str]:
    matches = glob.glob(pattern, recursive=True) if glob.has_magic(pattern) else [pattern]
    files: set[str] = set()
    for m in matches:
        if os.path.isdir(m):
            for root, _dirs, names in os.walk(m):
                files.update(os.path.join(root, n) for n in names)
        elif os.path.exists(m):
            files.add(m)
    return sorted(files)


def _expand_s3(pattern: str) -> list[str]:
    from pyarrow import fs as pafs

    s3, key = s3_path(pattern)
    magic = glob.has_magic(key)
    try:
        if magic:
            first = min(key.index(c) for c in "*?[" if c in key)
            base = key[:first].rsplit("/", 1)[0]
        else:
            base = key.rstrip("/")
            if s3.get_file_info(base).type == pafs.FileType.File:
                return [pattern]
        selector = pafs.FileSelector(base, recursive=True, allow_not_found=True)
        infos = s3.get_file_info(selector)
    except OSError:
        return []  # iter_file reports the pattern itself
    paths = sorted(i.path for i in infos if i.type == pafs.FileType.File)
    if magic:  # fnmatch's "*" also crosses "/"
        paths = [p for p in paths if fnmatch.fnmatchcase(p, key)]
    return ["s3://" + p for p in paths]
