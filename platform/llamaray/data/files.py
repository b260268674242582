"""Where corpus files are and how their bytes come out: local paths and `s3://` keys,
globs and prefixes listed, gzip and zstandard decompressed as a stream (truncation noticed).
`data.read` parses what comes out."""

from __future__ import annotations

import contextlib
import fnmatch
import glob
import os
import zlib

_RAW_CHUNK = 1 << 18  # compressed bytes a read from storage
OUT_CHUNK = 1 << 20
"""Most decompressed bytes one `read` returns, whatever the compression ratio: a 2 KB zstd
frame of one repeated byte holds 64 MiB, and a 256 KiB chunk of it gigabytes."""
ZSTD_MAX_WINDOW = 1 << 25
"""Largest zstd window (history) accepted: 32 MiB, what levels 1-20 use at most. The
decoder allocates the window a frame declares; `--long` or `--ultra -21/-22` frames, up to
128 MiB, are refused ("unreadable_file") rather than let a file decide our memory."""


@contextlib.contextmanager
def open_stream(path: str, compression: str | None, s3=None):
    """A binary stream with `.read(n)`, decompressed; truncation raises EOFError.

    A read returns at most `n` bytes (`OUT_CHUNK` for n < 0), so memory follows `n`, not
    the compression ratio. An `s3://` object is read through `llamaray.storage.open_input`
    (transient S3 errors retried, `StorageUnavailable` once they persist)."""
    from llamaray.storage import open_input

    with contextlib.ExitStack() as stack:
        if is_s3(path):
            s3, key = s3_path(path, s3)
            try:
                raw = stack.enter_context(open_input(s3, key))
            except FileNotFoundError:
                raise FileNotFoundError(f"No such file: {path}") from None
        else:
            raw = stack.enter_context(open(path, "rb"))
        if compression == "gzip":
            yield _GzipReader(raw)
        elif compression == "zstd":
            yield _ZstdReader(raw)
        else:
            yield raw


class _GzipReader:
    """Streaming gzip with a bounded output per read (zlib's `max_length`) that notices
    truncation (EOFError). Concatenated members are read in turn, and zero padding after a
    member is skipped as gzip(1) does. (`gzip.GzipFile.read` drops the data it decompressed
    when a truncation error ends a read: this does not.)"""

    def __init__(self, raw):
        self._raw = raw
        self._obj = None
        self._pending = b""  # compressed input not yet given to zlib
        self._full = False  # the last read filled its limit: zlib may hold more output

    def read(self, n: int = -1) -> bytes:
        """Up to `n` decompressed bytes (`OUT_CHUNK` for n < 0); b"" at the end."""
        limit = n if n and n > 0 else OUT_CHUNK
        while True:
            if not self._pending and not self._full:
                self._pending = self._raw.read(_RAW_CHUNK)
                if not self._pending:
                    if self._obj is not None:
                        raise EOFError("gzip stream ended before the end of its last member")
                    return b""
            if self._obj is None:
                self._pending = self._pending.lstrip(b"\x00")
                if not self._pending:
                    continue
                self._obj = zlib.decompressobj(16 + zlib.MAX_WBITS)
            out = self._obj.decompress(self._pending, limit)
            self._full = len(out) == limit
            if self._obj.eof:
                self._pending, self._obj, self._full = self._obj.unused_data, None, False
            else:
                self._pending = self._obj.unconsumed_tail
            if out:
                return out


class _ZstdReader:
    """Streaming zstandard with a bounded output per read, that notices truncation.

    zstandard's `decompressobj` has no output bound, so its `stream_reader` decodes (a read
    returns at most what was asked); but that reader ends cleanly on a truncated frame, so
    `_ZstdFrames` walks the frame and block headers of the compressed bytes as they go by
    and says, at the end, whether the input stopped between frames. Concatenated and
    skippable frames are read in turn."""

    def __init__(self, raw):
        import zstandard

        self._frames = _ZstdFrames()
        self._reader = zstandard.ZstdDecompressor(max_window_size=ZSTD_MAX_WINDOW).stream_reader(
            _Tap(raw, self._frames.feed), read_size=_RAW_CHUNK, read_across_frames=True
        )

    def read(self, n: int = -1) -> bytes:
        """Up to `n` decompressed bytes (`OUT_CHUNK` for n < 0); b"" at the end."""
        import zstandard

        try:
            out = self._reader.read(n if n and n > 0 else OUT_CHUNK)
        except zstandard.ZstdError as e:
            if "too much memory" in str(e):
                raise zstandard.ZstdError(
                    f"{e}: its window is over the {ZSTD_MAX_WINDOW >> 20} MiB accepted "
                    "(llamaray.data.files.ZSTD_MAX_WINDOW); recompress without --long/--ultra"
                ) from None
            raise
        if not out and not self._frames.complete():
            raise EOFError("zstd stream ended before the end of its last frame")
        return out


class _Tap:
    """`raw`, with every byte read from it also handed to `see`."""

    def __init__(self, raw, see):
        self._raw, self._see = raw, see

    def read(self, n: int = -1) -> bytes:
        data = self._raw.read(n)
        self._see(data)
        return data


_ZSTD_MAGIC = 0xFD2FB528
_ZSTD_SKIPPABLE = range(0x184D2A50, 0x184D2A60)


class _ZstdFrames:
    """Where a zstd stream is, from its headers alone (RFC 8878): fed the compressed bytes in
    order, `complete()` says whether they end between two frames. Block contents are
    skipped, not decoded: a few Python steps per block of up to 128 KiB of output.
    Bytes that are not a frame stop the walk (the decoder reports those)."""

    def __init__(self):
        self._state = "magic"
        self._need = 4  # header bytes wanted for `_state`
        self._header = bytearray()
        self._skip = 0  # content bytes to pass over before `_state`
        self._checksum = False

    def complete(self) -> bool:
        """True when the input so far ends exactly between frames (or was not zstd)."""
        return self._state == "lost" or (
            self._state == "magic" and not self._header and not self._skip
        )

    def feed(self, data: bytes) -> None:
        i, n = 0, len(data)
        while i < n and self._state != "lost":
            if self._skip:
                step = min(self._skip, n - i)
                self._skip -= step
                i += step
                continue
            take = min(self._need - len(self._header), n - i)
            self._header += data[i : i + take]
            i += take
            if len(self._header) == self._need:
                header = bytes(self._header)
                self._header.clear()
                self._parse(header)

    def _goto(self, state: str, need: int, skip: int = 0) -> None:
        self._state, self._need, self._skip = state, need, skip

    def _parse(self, header: bytes) -> None:
        value = int.from_bytes(header, "little")
        if self._state == "magic":
            if value == _ZSTD_MAGIC:
                self._goto("descriptor", 1)
            elif value in _ZSTD_SKIPPABLE:
                self._goto("skippable", 4)
            else:
                self._state = "lost"
        elif self._state == "skippable":
            self._goto("magic", 4, skip=value)
        elif self._state == "descriptor":
            fcs, single = value >> 6, (value >> 5) & 1
            self._checksum = bool(value & 0x04)
            rest = (0 if single else 1) + (0, 1, 2, 4)[value & 3]
            rest += ((1 if single else 0), 2, 4, 8)[fcs]
            self._goto("block", 3, skip=rest)
        elif self._state == "block":
            last, kind, size = value & 1, (value >> 1) & 3, value >> 3
            if kind == 3:  # reserved
                self._state = "lost"
                return
            content = 1 if kind == 1 else size
            if not last:
                self._goto("block", 3, skip=content)
            else:
                self._goto("magic", 4, skip=content + (4 if self._checksum else 0))


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

        from llamaray.storage import file_info

        s3, key = s3_path(path, s3)
        return file_info(s3, key).type != pafs.FileType.NotFound
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

    from llamaray.storage import file_info

    s3, key = s3_path(pattern)
    magic = glob.has_magic(key)
    try:
        if magic:
            first = min(key.index(c) for c in "*?[" if c in key)
            base = key[:first].rsplit("/", 1)[0]
        else:
            base = key.rstrip("/")
            if file_info(s3, base).type == pafs.FileType.File:
                return [pattern]
        selector = pafs.FileSelector(base, recursive=True, allow_not_found=True)
        infos = file_info(s3, selector)
    except OSError:
        # A permanent error (no such bucket, access denied): iter_file reports the pattern
        # itself. A transient one that outlasted the retries is StorageUnavailable, which
        # propagates: a listing the store did not answer is not a missing file.
        return []
    paths = sorted(i.path for i in infos if i.type == pafs.FileType.File)
    if magic:  # fnmatch's "*" also crosses "/"
        paths = [p for p in paths if fnmatch.fnmatchcase(p, key)]
    return ["s3://" + p for p in paths]
