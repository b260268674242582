"""The training workers' view of a prepared corpus: deterministic, resumable random access.

`llamaray prepare` leaves a corpus directory (local or `s3://bucket/prefix`): `manifest.json`
and, per source and split, Parquet shards whose `tokens` column holds one packed row of
`seq_len + 1` tokens per Parquet row. This module turns that into what a training step needs.

- `CorpusRows` answers "rows `i, j, k` of source `s`" without loading the source. On a
  split's first access its Parquet footers are read (in parallel) and reduced to a compact
  index, two numbers per file: its first row and its row-group size (prepare writes
  groups of `prepare.ROW_GROUP_ROWS` rows, the last one shorter), so a row index maps to
  (file, row group, offset) by arithmetic. The footers themselves are not kept beyond a
  small LRU of `max_footers` (a footer holds metadata per row group; a big corpus has
  millions of groups); a file whose groups are not uniform keeps needing its footer, read
  again when evicted. Only the row groups holding the asked-for rows are read, and a small
  LRU cache, bounded in bytes, keeps recently decoded row groups.
- The row groups one `rows()` call needs are independent reads, on S3 one ranged GET each
  (a round trip of tens of ms): they are fetched and decoded concurrently on
  `read_threads` threads (`DEFAULT_READ_THREADS` on S3), so a step's rows cost a few
  round trips rather than one per row group. Local files are read one group after
  another by default: there a read is CPU (decoding), so threads help only where cores
  are idle (4 threads: ~1.6x the rows/s on an idle 2-core box), and on a training node
  they would take cores from the ranks' own work; `read_threads` opts in
  (docs/benchmarks.md, "Training stream").
- `data.mixed_stream.MixedStream` is the mixture over those rows, per step and rank, and
  `data.prefetch.Prefetcher` reads it ahead in a background thread.

Why index-based random access rather than streaming the shards (e.g. Ray Data's
`streaming_split`): the row a rank trains on at step `t` is a pure function of (corpus,
mixture, seed, rank, world size, `t`). Resuming from a checkpoint at step `t` therefore
needs only `t` (`batches(start_step=t)`), not the state of a streaming pipeline, and it sees
exactly the rows an uninterrupted run would; every rank reads its own deterministic slice,
with no coordinator or shuffle service in the training loop.

The price is read amplification: a row is read by decoding its whole row group, and the
mixture visits each source in a random permutation, so the cache rarely holds a row group
long enough to serve its other rows. Row groups are therefore small (`ROW_GROUP_ROWS`,
chosen by `llamaray.bench.stream`'s measurement of rows/s, local and S3); a corpus written
with other sizes reads the same. `cache_stats()` shows what it costs.

S3 is reached through `llamaray.storage`'s filesystem, configured as in `read.py`
(`AWS_ENDPOINT_URL_S3` or `AWS_ENDPOINT_URL`, `AWS_REGION` or `AWS_DEFAULT_REGION`, the
usual credential chain), and every read (manifest, footers, row groups) follows its retry
policy: a transient S3 error (503 SlowDown, a reset) is retried with backoff, and one that
outlasts the attempts raises `storage.StorageUnavailable` (the training step fails, and
`train.max_failures` restarts it from the last checkpoint) rather than a crash on the first.
"""

from __future__ import annotations

import json
import posixpath
import threading
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pyarrow import fs as pafs

from llamaray.storage import attempts_of, file_info, filesystem, join, open_input, retry

MANIFEST = "manifest.json"
SPLITS = ("train", "validation")
DEFAULT_CACHE_BYTES = 256 * 1024 * 1024
DEFAULT_OPEN_FILES = 16
DEFAULT_FOOTERS = 64
DEFAULT_READ_THREADS = 16
"""Row groups of one `rows()` call read at once from S3 (one ranged GET each)."""
_FOOTER_THREADS = 16  # footers on S3 are one round trip each; fetch a split's in parallel


@dataclass(frozen=True)
class CacheStats:
    """Counters of a `CorpusRows` since it was opened (see `CorpusRows.cache_stats`)."""

    row_groups_read: int
    """`read_row_group` calls: row groups decoded from storage (concurrent ones included,
    each counted once)."""
    hits: int
    """Row groups served from the cache. A call looks all its row groups up before it reads
    the missing ones, so a group is never read again because the same call's reads evicted
    it."""
    footers_read: int
    """Parquet footers read: once per file of a split that was accessed, and again for a
    file reopened after its footer left the `max_footers` LRU."""
    cached_groups: int
    cached_bytes: int
    budget_bytes: int
    cached_footers: int = 0
    """Parsed footers kept (at most `max_footers`); the index itself is two ints a file."""


@dataclass
class _SplitIndex:
    """Where each row of one (source, split) lives: O(files), not O(row groups)."""

    paths: list[str]
    """Filesystem paths of the split's files, in manifest order."""
    file_starts: np.ndarray
    """First row of each file, then the split's row count (int64, files + 1)."""
    group_rows: np.ndarray
    """Rows per row group of each file when all but its last group have that many and the
    last no more (what prepare writes); 0 for a file laid out otherwise (int64)."""


class CorpusRows:
    """Random access to the packed rows of a prepared corpus, local or on S3.

    Use `CorpusRows.open(corpus_dir)`. `rows()` is thread-safe (calls are serialized: a
    prefetch thread and a validation pass may share one instance); within a call its row
    groups are read on up to `read_threads` threads. Pickling keeps only the directory,
    manifest and settings (no handle, cache or thread pool), so a copy sent to another
    process reopens its files there. `close()` (or a `with` block) closes the open file
    handles and stops the read threads; reading again reopens and restarts them.
    """

    def __init__(
        self,
        corpus_dir: str | Path,
        manifest: Mapping[str, Any],
        *,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
        max_open_files: int = DEFAULT_OPEN_FILES,
        max_footers: int = DEFAULT_FOOTERS,
        read_threads: int | None = None,
    ):
        if cache_bytes < 0:
            raise ValueError(f"cache_bytes must be >= 0, got {cache_bytes}")
        if max_open_files < 1:
            raise ValueError(f"max_open_files must be >= 1, got {max_open_files}")
        if max_footers < 0:
            raise ValueError(f"max_footers must be >= 0, got {max_footers}")
        if read_threads is not None and read_threads < 1:
            raise ValueError(f"read_threads must be >= 1, got {read_threads}")
        self.corpus_dir = str(corpus_dir)
        self._manifest = dict(manifest)
        _check_manifest(self._manifest, self.corpus_dir)
        self.cache_bytes = cache_bytes
        self.max_open_files = max_open_files
        self.max_footers = max_footers
        self._fs, self._root = _filesystem(self.corpus_dir)
        self._read_threads = read_threads  # as given, for pickling: a copy decides anew
        self.read_threads = read_threads or (
            1 if isinstance(self._fs, pafs.LocalFileSystem) else DEFAULT_READ_THREADS
        )
        self._pool: ThreadPoolExecutor | None = None  # started by the first concurrent read
        self._lock = threading.RLock()
        self._indexes: dict[tuple[str, str], _SplitIndex] = {}
        self._cache: OrderedDict[tuple[str, int, int], np.ndarray] = OrderedDict()
        self._footers: OrderedDict[str, pq.FileMetaData] = OrderedDict()
        self._cached_bytes = 0
        # Open shard handles and their footers; a handle serves concurrent reads (ReadAt).
        self._handles: OrderedDict[str, tuple[Any, pq.FileMetaData]] = OrderedDict()
        self._row_groups_read = self._hits = self._footers_read = 0

    @classmethod
    def open(
        cls,
        corpus_dir: str | Path,
        *,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
        max_open_files: int = DEFAULT_OPEN_FILES,
        max_footers: int = DEFAULT_FOOTERS,
        read_threads: int | None = None,
    ) -> CorpusRows:
        """Read `corpus_dir/manifest.json`; no shard is touched until rows are asked for.

        `cache_bytes` bounds the decoded row groups kept in memory; `max_open_files` the
        shard handles kept open (a big corpus has more shards than a process has fds);
        `max_footers` the parsed Parquet footers kept beyond the open files' own;
        `read_threads` the row groups of a call read at once (default: 1 for a local
        directory, `DEFAULT_READ_THREADS` on S3).
        """
        fs, root = _filesystem(str(corpus_dir))
        path = posixpath.join(root, MANIFEST)
        if file_info(fs, path).type == pafs.FileType.NotFound:
            raise FileNotFoundError(f"no {MANIFEST} in {corpus_dir} (not a prepared corpus?)")
        with open_input(fs, path) as f:
            manifest = json.loads(f.read())
        return cls(
            corpus_dir,
            manifest,
            cache_bytes=cache_bytes,
            max_open_files=max_open_files,
            max_footers=max_footers,
            read_threads=read_threads,
        )

    # ----------------------------------------------------------------------- manifest

    @property
    def manifest(self) -> dict:
        return self._manifest

    @property
    def seq_len(self) -> int:
        return int(self._manifest["seq_len"])

    @property
    def row_tokens(self) -> int:
        """Tokens per row: `seq_len + 1` (the extra one is the last target)."""
        return int(self._manifest["row_tokens"])

    @property
    def tokenizer_uri(self) -> str:
        """The corpus's tokenizer.model, local path or `s3://` URI (`tokenizer_location`)."""
        return tokenizer_location(self.corpus_dir, self._manifest)

    @property
    def source_names(self) -> tuple[str, ...]:
        """The sources in manifest order (the order `MixedStream` indexes them by)."""
        return tuple(self._manifest["sources"])

    def rows_per_source(self, split: str = "train") -> dict[str, int]:
        """Rows of each source in `split`, as the manifest records them."""
        _check_split(split)
        return {
            name: int(entry["splits"][split]["rows"])
            for name, entry in self._manifest["sources"].items()
        }

    # ---------------------------------------------------------------------------- rows

    def rows(self, source: str, indices: Any, split: str = "train") -> np.ndarray:
        """Rows `indices` of `source`'s `split`: an int64 array (len(indices), row_tokens).

        In the order of `indices`; repeats are allowed. Reads only the row groups holding
        them (each at most once per call; on S3 concurrently). IndexError, naming source,
        split and the valid range, for an index outside it (negative ones included: no
        wrap-around, which would hide an off-by-one). ValueError if the split's files
        disagree with the manifest.
        """
        idx = self._check_indices(source, split, indices)
        out = np.empty((len(idx), self.row_tokens), dtype=np.int64)
        if not len(idx):
            return out
        with self._lock:
            index = self._index(source, split)
            file = np.searchsorted(index.file_starts, idx, side="right") - 1
            local = idx - index.file_starts[file]
            group, offset = self._groups_of(index, file, local)
            # Visit each needed row group once, in storage order, copying all its rows out:
            # the cached ones first, then the others as they are read.
            key = file * (int(local.max()) + 1) + group
            by_group = np.argsort(key, kind="stable")
            cuts = np.flatnonzero(np.diff(key[by_group])) + 1
            cache_key = f"{source}/{split}"
            missing = []
            for positions in np.split(by_group, cuts):
                f, g = int(file[positions[0]]), int(group[positions[0]])
                block = self._cached((cache_key, f, g))
                if block is None:
                    missing.append((f, g, positions))
                else:
                    out[positions] = block[offset[positions]]
            for (f, g, positions), block in self._read_groups(index, missing):
                out[positions] = block[offset[positions]]
                self._keep_group((cache_key, f, g), block)
        return out

    def cache_stats(self) -> CacheStats:
        with self._lock:
            return CacheStats(
                row_groups_read=self._row_groups_read,
                hits=self._hits,
                footers_read=self._footers_read,
                cached_groups=len(self._cache),
                cached_bytes=self._cached_bytes,
                budget_bytes=self.cache_bytes,
                cached_footers=len(self._footers),
            )

    def close(self) -> None:
        """Close the open shard handles and stop the read threads (the cache and the
        footers are kept)."""
        with self._lock:
            if self._pool is not None:
                self._pool.shutdown()
                self._pool = None
            while self._handles:
                _path, (handle, _md) = self._handles.popitem(last=False)
                handle.close()

    def __enter__(self) -> CorpusRows:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __getstate__(self) -> dict:
        return {
            "corpus_dir": self.corpus_dir,
            "manifest": self._manifest,
            "cache_bytes": self.cache_bytes,
            "max_open_files": self.max_open_files,
            "max_footers": self.max_footers,
            "read_threads": self._read_threads,
        }

    def __setstate__(self, state: dict) -> None:
        self.__init__(
            state["corpus_dir"],
            state["manifest"],
            cache_bytes=state["cache_bytes"],
            max_open_files=state["max_open_files"],
            max_footers=state.get("max_footers", DEFAULT_FOOTERS),
            read_threads=state.get("read_threads"),
        )

    def __repr__(self) -> str:
        return f"CorpusRows({self.corpus_dir!r}, sources={list(self.source_names)})"

    # ------------------------------------------------------------------------ internals

    def _split_entry(self, source: str, split: str) -> dict:
        _check_split(split)
        sources = self._manifest["sources"]
        if source not in sources:
            raise KeyError(
                f"source {source!r} is not in corpus {self.corpus_dir}; "
                f"it has: {', '.join(sources) or '(none)'}"
            )
        return sources[source]["splits"][split]

    def _check_indices(self, source: str, split: str, indices: Any) -> np.ndarray:
        n = int(self._split_entry(source, split)["rows"])
        idx = np.asarray(indices)
        if idx.ndim != 1:
            raise ValueError(f"indices must be 1-D, got shape {idx.shape}")
        if idx.size == 0:
            return np.empty(0, dtype=np.int64)
        if idx.dtype.kind not in "iu":
            raise TypeError(f"indices must be integers, got dtype {idx.dtype}")
        lo, hi = idx.min(), idx.max()
        if lo < 0 or hi >= n:
            bad = lo if lo < 0 else hi
            raise IndexError(
                f"row {int(bad)} out of range for source {source!r} split {split!r}: "
                f"valid rows are [0, {n})"
            )
        return idx.astype(np.int64, copy=False)

    def _index(self, source: str, split: str) -> _SplitIndex:
        key = (source, split)
        if key not in self._indexes:
            self._indexes[key] = self._build_index(source, split)
        return self._indexes[key]

    def _build_index(self, source: str, split: str) -> _SplitIndex:
        entry = self._split_entry(source, split)
        files = list(entry["files"])
        paths = [self._path(f) for f in files]
        threads = max(1, min(_FOOTER_THREADS, len(paths)))
        with ThreadPoolExecutor(threads) as pool:
            metadata = list(pool.map(self._footer, paths))
        self._footers_read += len(paths)
        counts = [md.num_rows for md in metadata]
        if sum(counts) != int(entry["rows"]):
            listing = ", ".join(f"{f}: {c}" for f, c in zip(files, counts, strict=True))
            raise ValueError(
                f"source {source!r} split {split!r}: the manifest says {entry['rows']} rows "
                f"but its files hold {sum(counts)} ({listing}); the corpus directory is "
                "incomplete or was modified after prepare"
            )
        for path, md in zip(paths, metadata, strict=True):
            self._keep_footer(path, md)
        return _SplitIndex(
            paths=paths,
            file_starts=np.concatenate([[0], np.cumsum(counts, dtype=np.int64)]),
            group_rows=np.array([_uniform_group_rows(md) for md in metadata], dtype=np.int64),
        )

    def _groups_of(
        self, index: _SplitIndex, file: np.ndarray, local: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """(row group within its file, offset within the group) of rows `local` of `file`."""
        size = index.group_rows[file]
        uniform = size > 0
        group = np.zeros_like(local)
        offset = local.copy()
        group[uniform] = local[uniform] // size[uniform]
        offset[uniform] = local[uniform] % size[uniform]
        for f in np.unique(file[~uniform]):  # files laid out otherwise: from their footer
            rows = np.flatnonzero(file == f)
            md = self._footer_of(index.paths[f])
            counts = [md.row_group(g).num_rows for g in range(md.num_row_groups)]
            starts = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])
            # `side="right"` skips empty groups: a row belongs to the last group starting at
            # or before it.
            group[rows] = np.searchsorted(starts, local[rows], side="right") - 1
            offset[rows] = local[rows] - starts[group[rows]]
        return group, offset

    def _keep_footer(self, path: str, md: pq.FileMetaData) -> None:
        self._footers[path] = md
        self._footers.move_to_end(path)
        while len(self._footers) > self.max_footers:
            self._footers.popitem(last=False)

    def _footer_of(self, path: str) -> pq.FileMetaData:
        md = self._footers.get(path)
        if md is None:
            md = self._footer(path)
            self._footers_read += 1
        self._keep_footer(path, md)
        return md

    def _path(self, relative: str) -> str:
        return posixpath.join(self._root, relative.replace("\\", "/"))

    def _footer(self, path: str) -> pq.FileMetaData:
        md = retry(
            lambda: pq.read_metadata(path, filesystem=self._fs),
            f"reading the footer of {path}",
            attempts_of(self._fs),
        )
        schema = md.schema.to_arrow_schema()
        index = schema.get_field_index("tokens")
        if index < 0:
            raise ValueError(f"{path}: no 'tokens' column (columns: {', '.join(schema.names)})")
        t = schema.field(index).type
        if not _is_token_list(t):
            raise ValueError(f"{path}: 'tokens' is {t}, not a list of integers")
        if pa.types.is_fixed_size_list(t) and t.list_size != self.row_tokens:
            raise ValueError(
                f"{path}: rows of {t.list_size} tokens, the manifest says "
                f"row_tokens={self.row_tokens}"
            )
        return md

    def _cached(self, key: tuple[str, int, int]) -> np.ndarray | None:
        block = self._cache.get(key)
        if block is not None:
            self._cache.move_to_end(key)
            self._hits += 1
        return block

    def _keep_group(self, key: tuple[str, int, int], block: np.ndarray) -> None:
        if block.nbytes <= self.cache_bytes:  # one bigger than the budget is not kept
            self._cache[key] = block
            self._cached_bytes += block.nbytes
            while self._cached_bytes > self.cache_bytes:
                _key, old = self._cache.popitem(last=False)
                self._cached_bytes -= old.nbytes

    def _read_groups(
        self, index: _SplitIndex, wanted: list[tuple[int, int, np.ndarray]]
    ) -> Iterator[tuple[tuple[int, int, np.ndarray], np.ndarray]]:
        """Each of `wanted` ((file, row group, positions), in storage order) with its
        decoded block, in that order. The files are opened a batch of at most
        `max_open_files` at a time, so a handle stays open until its batch's reads are done
        while the open handles stay within the bound."""
        batch: list[tuple[int, int, np.ndarray]] = []
        files: list[str] = []
        for item in wanted:
            path = index.paths[item[0]]
            if not files or files[-1] != path:  # storage order: a file's groups are together
                if len(files) == self.max_open_files:
                    yield from self._read_batch(index, batch, files)
                    batch, files = [], []
                files.append(path)
            batch.append(item)
        if batch:
            yield from self._read_batch(index, batch, files)

    def _read_batch(
        self, index: _SplitIndex, batch: list[tuple[int, int, np.ndarray]], paths: list[str]
    ) -> Iterator[tuple[tuple[int, int, np.ndarray], np.ndarray]]:
        readers = self._open_files(paths)
        attempts = attempts_of(self._fs)

        def read(item: tuple[int, int, np.ndarray]) -> np.ndarray:
            f, g, _positions = item
            path = index.paths[f]
            handle, metadata = readers[path]
            # A ParquetFile of its own per read (no footer is read: it is given); they share
            # the handle, whose positional reads (ranged GETs on S3) may run concurrently.
            # pyarrow's S3 file is stateless between reads: a read that failed on a
            # transient error is simply asked again (storage's retry policy).
            pf = pq.ParquetFile(handle, metadata=metadata)
            table = retry(
                lambda: pf.read_row_group(g, columns=["tokens"]),
                f"reading row group {g} of {path}",
                attempts,
            )
            return _decode(table, path, metadata.row_group(g).num_rows, self.row_tokens)

        for item, block in zip(batch, self._map(read, batch), strict=True):
            self._row_groups_read += 1
            yield item, block

    def _open_files(self, paths: list[str]) -> dict[str, tuple[Any, pq.FileMetaData]]:
        """(handle, footer) of each of `paths` (at most `max_open_files`), opening those
        not open (concurrently) and closing the least recently used others beyond the
        bound. A kept footer is reused: it saves a read per reopen."""
        closed = [p for p in paths if p not in self._handles]
        kept = {p: self._footers.get(p) for p in closed}
        attempts = attempts_of(self._fs)

        def open_file(path: str) -> tuple[Any, pq.FileMetaData]:
            metadata = kept[path] or self._footer(path)
            handle = retry(lambda: self._fs.open_input_file(path), f"opening {path}", attempts)
            return handle, metadata

        for path, (handle, metadata) in zip(closed, self._map(open_file, closed), strict=True):
            if kept[path] is None:
                self._footers_read += 1
            self._keep_footer(path, metadata)
            self._handles[path] = (handle, metadata)
        for path in paths:
            self._handles.move_to_end(path)
        while len(self._handles) > self.max_open_files:
            _path, (old, _md) = self._handles.popitem(last=False)
            old.close()
        return {p: self._handles[p] for p in paths}

    def _map(self, fn: Callable[[Any], Any], items: Iterable[Any]) -> Iterator[Any]:
        """`map(fn, items)`, on the read threads when there are several: results in the
        order of `items`, at most two per thread started ahead of the one consumed (bounds
        the decoded blocks held at once). On an error, or when the consumer stops, the reads
        not started are cancelled and the running ones waited for, so none outlives the
        call (a later `close()` may close their handles)."""
        if self.read_threads == 1:
            yield from map(fn, items)
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(
                self.read_threads, thread_name_prefix="llamaray-corpus-read"
            )
        pending: deque = deque()
        try:
            for item in items:
                pending.append(self._pool.submit(fn, item))
                if len(pending) >= 2 * self.read_threads:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()
            wait(pending)


def tokenizer_location(corpus_dir: str | Path, manifest: Mapping[str, Any]) -> str:
    """Where the corpus's tokenizer.model is: the manifest's `tokenizer.path` relative to
    `corpus_dir` (a local path or `s3://` prefix), so a corpus that was copied or moved
    still finds its tokenizer. An absolute path or URI (manifests written before paths
    were relative) is returned as it is. Load it with `Tokenizer.open`.

    >>> tokenizer_location("s3://b/corpus", {"tokenizer": {"path": "tokenizer/tokenizer.model"}})
    's3://b/corpus/tokenizer/tokenizer.model'
    """
    path = str(manifest["tokenizer"]["path"])
    if "://" in path or posixpath.isabs(path) or Path(path).is_absolute():
        return path
    return join(str(corpus_dir), *path.replace("\\", "/").split("/"))


def _filesystem(corpus_dir: str) -> tuple[pafs.FileSystem, str]:
    """(pyarrow filesystem, root path in it) for a local directory or an s3:// prefix."""
    return filesystem(corpus_dir)


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")


def _check_manifest(manifest: Mapping[str, Any], where: str) -> None:
    for key in ("seq_len", "row_tokens", "sources"):
        if key not in manifest:
            raise ValueError(f"{where}/{MANIFEST}: no {key!r}")
    if int(manifest["row_tokens"]) != int(manifest["seq_len"]) + 1:
        raise ValueError(
            f"{where}/{MANIFEST}: row_tokens={manifest['row_tokens']} is not "
            f"seq_len + 1 = {int(manifest['seq_len']) + 1}"
        )
    for name, entry in manifest["sources"].items():
        for split in SPLITS:
            part = entry.get("splits", {}).get(split)
            if part is None or "rows" not in part or "files" not in part:
                raise ValueError(f"{where}/{MANIFEST}: source {name!r} has no {split} rows/files")


def _uniform_group_rows(md: pq.FileMetaData) -> int:
    """The rows of a file's row groups when all but the last have that many and the last
    at most as many (then a row's group is `row // size`), else 0."""
    counts = [md.row_group(g).num_rows for g in range(md.num_row_groups)]
    if not counts or counts[0] == 0:
        return 0
    size = counts[0]
    if all(c == size for c in counts[:-1]) and 0 < counts[-1] <= size:
        return size
    return 0


def _is_token_list(t: pa.DataType) -> bool:
    listy = pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)
    return listy and pa.types.is_integer(t.value_type)


def _decode(table: pa.Table, path: str, expected_rows: int, width: int) -> np.ndarray:
    """A row group's `tokens` as a read-only (rows, width) array of the stored int type."""
    import pyarrow.compute as pc

    column = table.column("tokens").combine_chunks()
    if len(column) != expected_rows:
        raise ValueError(f"{path}: row group has {len(column)} rows, its footer {expected_rows}")
    if column.null_count:
        raise ValueError(f"{path}: {column.null_count} null row(s) in 'tokens'")
    lengths = pc.list_value_length(column).to_numpy(zero_copy_only=False)
    if len(lengths) and (lengths != width).any():
        bad = int(lengths[lengths != width][0])
        raise ValueError(f"{path}: a row of {bad} tokens, the manifest says row_tokens={width}")
    values = column.flatten().to_numpy(zero_copy_only=False)
    block = values.reshape(len(column), width)
    block.flags.writeable = False  # shared through the cache: callers get copies
    return block
