"""Storage: the one filesystem layer of llamaray (local paths and `s3://bucket/prefix`).

Corpora, run outputs and checkpoints are all read and written through `filesystem`,
`read_bytes`/`write_bytes`, `upload`/`download` and `local_copy` below, with one S3 client
per environment and one retry policy. On a cluster whose nodes share no disk, whatever one
process writes and another reads must be at an `s3://` location.

Where Ray Train keeps a run's checkpoints: a local directory, or an `s3://bucket/prefix`.

For S3 the driver builds one pyarrow `S3FileSystem` (`storage_location`) and hands it to
Ray Train as `RunConfig(storage_filesystem=...)`. Ray Train pickles it into the controller
and every worker (with the checkpoints that `ray.train.get_checkpoint()` returns), so how
it pickles decides what those processes see:

- the S3 settings as the driver resolved them: the endpoint (`AWS_ENDPOINT_URL_S3`, else
  `AWS_ENDPOINT_URL`, as in `llamaray.data.read`), the region (`AWS_REGION`, else
  `AWS_DEFAULT_REGION`) and the retry strategy (`AwsStandardS3RetryStrategy` with
  `S3_MAX_ATTEMPTS` attempts, exponential backoff with jitter, so throttling such as 503
  SlowDown is retried). pyarrow's own pickling keeps the endpoint but drops the retry
  strategy, hence the `S3Storage` subclass;
- credentials come from the AWS chain of each process (environment variables, instance
  profile or web identity, and the SDK's usual shared files), never from the run config.
  When the driver has static credentials in its environment (`AWS_ACCESS_KEY_ID`,
  `AWS_SECRET_ACCESS_KEY`, optionally `AWS_SESSION_TOKEN`), they travel with the
  filesystem and are used by processes that have none in their own environment: Ray Train
  starts its controller and workers with only its own variables, so a driver that joined a
  running cluster (RAY_ADDRESS) would otherwise leave them without any. They are never
  logged, and the filesystem's repr holds none of them.

Uploads: Ray Train's default checkpoint upload is `pyarrow.fs.copy_files`, which drops the
error of closing an object (pyarrow 25: its last part, or the request completing its
multipart upload, failing after all retries), so a checkpoint with a missing object would
be registered as the latest. `upload_directory` (behind the workers' `checkpoint_upload_fn`,
`orchestrate.ray_worker.upload_checkpoint`) closes every object itself, so such an error
fails the report, and checks each object's size before Ray Train registers the checkpoint.

Retries (`retry`, `open_input`): one policy for every S3 access of llamaray. Each request
gets the SDK's retry strategy above. On top of it, every read of a corpus, a shard, a
manifest or a checkpoint file, every listing and every existence check is retried as a
whole, `S3_MAX_ATTEMPTS` times with the same kind of backoff, when it fails with a
transient error (`is_transient`: throttling such as 503 SlowDown, a 5xx or 429, a reset
or cut-off connection). The SDK alone is not enough: pyarrow reads an object range into
a buffer of the range's size, so the error answer to a small ranged GET (a small file, the
end of a file, a Parquet footer or column chunk) overflows it and comes back as a
non-retried "Failed to flush response stream"; 429 and some 502s are not retried either.
A read that still fails after every attempt raises `StorageUnavailable`, never an
`OSError`: the corpus reader records an `OSError` as a bad record ("unreadable_file"),
and a storage outage is not bad data. Permanent errors (not found, access denied, a
corrupt object) are raised at once, as they are. In the worst case, a store that stays
down, the attempts multiply (SDK x ours, several minutes of backoff) before the error.

On a cluster, the endpoint of an S3-compatible store must still be in the job's
environment for everything that is not checkpoints (a corpus on S3 is read by the workers
through `llamaray.data.read`): `ray job submit --runtime-env-json
'{"env_vars": {"AWS_ENDPOINT_URL": "..."}}'`, or the nodes' own environment.
"""

from __future__ import annotations

import contextlib
import functools
import os
import random
import re
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pyarrow.fs

S3_MAX_ATTEMPTS = 8
"""Attempts per S3 request (the first and its retries); backoff grows to 20 s between."""

_CREDENTIALS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
_CHUNK = 8 << 20


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def storage_location(storage: str) -> tuple[str, pyarrow.fs.FileSystem | None]:
    """(storage_path, storage_filesystem) for Ray Train's RunConfig: for `s3://bucket/prefix`,
    ("bucket/prefix", an `S3Storage`); for a local path, (its absolute path, None). Other
    URIs (gs://, ...) are left to Ray Train and pyarrow's defaults."""
    if is_s3(storage):
        return storage[len("s3://") :].rstrip("/"), S3Storage.from_env()
    if "://" in storage:
        return storage, None
    return str(Path(storage).resolve()), None


class S3Storage(pyarrow.fs.S3FileSystem):
    """pyarrow's S3 filesystem that keeps its retry strategy, and the driver's environment
    credentials, across pickling (see the module docstring)."""

    def __init__(
        self,
        endpoint: str | None = None,
        region: str | None = None,
        max_attempts: int = S3_MAX_ATTEMPTS,
        forwarded: dict[str, str] | None = None,
    ):
        own = _env_credentials()
        credentials = own or forwarded or {}
        kwargs = {}
        if credentials and not own:  # this process's own AWS chain wins when it has keys
            kwargs = {
                "access_key": credentials["AWS_ACCESS_KEY_ID"],
                "secret_key": credentials["AWS_SECRET_ACCESS_KEY"],
                "session_token": credentials.get("AWS_SESSION_TOKEN"),
            }
        if endpoint:
            kwargs["endpoint_override"] = endpoint
        if region:
            kwargs["region"] = region
        super().__init__(
            retry_strategy=pyarrow.fs.AwsStandardS3RetryStrategy(max_attempts=max_attempts),
            **kwargs,
        )
        self._settings = (endpoint, region, max_attempts)
        self._forwarded = dict(forwarded or own)

    @classmethod
    def from_env(cls, max_attempts: int | None = None) -> S3Storage:
        env = os.environ
        return cls(
            env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL") or None,
            env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or None,
            max_attempts or S3_MAX_ATTEMPTS,
        )

    def __reduce__(self):
        return (_rebuild, (*self._settings, self._forwarded))

    def __repr__(self) -> str:
        endpoint, region, attempts = self._settings
        return (
            f"S3Storage(endpoint={endpoint or 'AWS'}, region={region or 'auto'}, "
            f"max_attempts={attempts})"
        )

    __str__ = __repr__

    @property
    def max_attempts(self) -> int:
        return self._settings[2]

    @property
    def endpoint(self) -> str | None:
        return self._settings[0]


def _rebuild(endpoint, region, max_attempts, forwarded) -> S3Storage:
    return S3Storage(endpoint, region, max_attempts, forwarded)


def _env_credentials() -> dict[str, str]:
    env = {k: os.environ[k] for k in _CREDENTIALS if os.environ.get(k)}
    return env if "AWS_ACCESS_KEY_ID" in env and "AWS_SECRET_ACCESS_KEY" in env else {}


# ------------------------------------------------------------------ the retry policy
# Transient S3 errors, as pyarrow words them ("AWS Error <TYPE> ..." or "AWS Error UNKNOWN
# (HTTP status <code>) ..."): what an S3 client should retry. Anything else (not found,
# access denied, invalid arguments, a local disk's error) is permanent.
_TRANSIENT_TYPES = frozenset(
    {
        "SLOW_DOWN",
        "THROTTLING",
        "SERVICE_UNAVAILABLE",
        "INTERNAL_FAILURE",  # a 500, and pyarrow's unreadable error answer to a small GET
        "NETWORK_CONNECTION",  # reset, refused, cut off mid-body
        "REQUEST_TIMEOUT",
    }
)
_AWS_ERROR = re.compile(r"AWS Error ([A-Z_]+)(?: \(HTTP status (\d+)\))?")
RETRY_BASE_DELAY_S = 0.1
"""The first backoff between two attempts of a read (then doubled each time, with jitter)."""
RETRY_MAX_DELAY_S = 20.0


class StorageUnavailable(RuntimeError):
    """An S3 access that kept failing with transient errors through every attempt of the
    retry policy. Not an OSError on purpose: the data may be fine; what failed is the store
    (see the module docstring)."""


def is_transient(error: BaseException) -> bool:
    """True for an S3 error worth retrying: throttling (503 SlowDown, 429), a 5xx, a reset
    or cut-off connection. False for everything else, 404 and 403 included.

    >>> is_transient(OSError("AWS Error SLOW_DOWN during GetObject operation: ..."))
    True
    >>> is_transient(OSError("AWS Error ACCESS_DENIED during HeadObject operation: ..."))
    False
    """
    if not isinstance(error, OSError) or isinstance(error, FileNotFoundError):
        return False
    match = _AWS_ERROR.search(str(error))
    if match is None:
        return False
    kind, status = match.groups()
    return kind in _TRANSIENT_TYPES or (
        status is not None and (status == "429" or status.startswith("5"))
    )


def retry_delay(attempt: int) -> float:
    """Seconds to wait after failed attempt number `attempt` (1-based): exponential, capped
    at RETRY_MAX_DELAY_S, with jitter so that many readers throttled together spread out."""
    cap = min(RETRY_MAX_DELAY_S, RETRY_BASE_DELAY_S * 2 ** (attempt - 1))
    return cap * random.uniform(0.5, 1.0)


def retry(call, what: str, attempts: int = S3_MAX_ATTEMPTS, on_retry=None):
    """`call()`, again after a backoff while it raises a transient error (`is_transient`),
    at most `attempts` times in all; then `StorageUnavailable` naming `what`. Other errors
    propagate at once. `on_retry()`, if given, runs before each new attempt."""
    for attempt in range(1, attempts + 1):
        try:
            return call()
        except OSError as e:
            if not is_transient(e):
                raise
            if attempt == attempts:
                raise StorageUnavailable(
                    f"{what}: S3 failed {attempts} times in a row with transient errors, "
                    f"the last: {e}. The data was not marked bad; run again when the store "
                    "answers (llamaray.storage.S3_MAX_ATTEMPTS sets the attempts)"
                ) from e
            time.sleep(retry_delay(attempt))
            if on_retry is not None:
                on_retry()
    raise ValueError(f"attempts must be >= 1, got {attempts}")


def attempts_of(fs: pyarrow.fs.FileSystem) -> int:
    """The attempts `retry` makes on `fs`: an `S3Storage`'s own, S3_MAX_ATTEMPTS for another
    S3 filesystem, 1 (no retry) for a local one."""
    if isinstance(fs, S3Storage):
        return fs.max_attempts
    return S3_MAX_ATTEMPTS if isinstance(fs, pyarrow.fs.S3FileSystem) else 1


def file_info(fs: pyarrow.fs.FileSystem, path_or_selector):
    """`fs.get_file_info(...)` under the retry policy (a HEAD, or a listing)."""
    where = getattr(path_or_selector, "base_dir", path_or_selector)
    return retry(lambda: fs.get_file_info(path_or_selector), f"listing {where}", attempts_of(fs))


def open_input(fs: pyarrow.fs.FileSystem, path: str):
    """A seekable binary file for reading `path` on `fs` whose reads follow the retry
    policy: on S3 a `RetryingFile`, locally pyarrow's own file. FileNotFoundError if there
    is nothing at `path`. Hand it to `pyarrow.parquet.ParquetFile` or read it with
    `.read(n)`; close it (or use `with`)."""
    if attempts_of(fs) == 1:
        return fs.open_input_file(path)
    return RetryingFile(fs, path)


class RetryingFile:
    """An S3 object open for reading whose `read`s retry transient errors (`retry`) at the
    same offset, so a reader that already used the bytes before the failure goes on where
    it was. pyarrow's S3 file is stateless between reads (each is one ranged GET), so a
    retry is a new GET of the same range. Duck-types a binary file (read, seek, tell, size,
    close) for `pyarrow.PythonFile`, which is how Parquet reads it."""

    def __init__(self, fs: pyarrow.fs.FileSystem, path: str):
        self._fs, self._path = fs, path
        self._attempts = attempts_of(fs)
        self._file = retry(lambda: fs.open_input_file(path), f"opening {path}", self._attempts)
        self._size = self._file.size()
        self._pos = 0
        self.closed = False

    def read(self, n: int = -1) -> bytes:
        n = self._size - self._pos if n is None or n < 0 else min(n, self._size - self._pos)
        if n <= 0:
            return b""

        def attempt() -> bytes:
            self._file.seek(self._pos)
            return self._file.read(n)

        data = retry(attempt, f"reading {self._path} at byte {self._pos}", self._attempts)
        self._pos += len(data)
        return data

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self._pos, os.SEEK_END: self._size}[whence]
        if base + offset < 0:
            raise ValueError(f"negative seek position {base + offset}")
        self._pos = base + offset
        return self._pos

    def tell(self) -> int:
        return self._pos

    def size(self) -> int:
        return self._size

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def writable(self) -> bool:
        return False

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._file.close()

    def __enter__(self) -> RetryingFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"RetryingFile({self._path!r}, attempts={self._attempts})"


# ------------------------------------------------------------------ one filesystem layer
# Every read and write of a corpus, a run's outputs or a checkpoint goes through these, so a
# path means the same thing to every process: a local path on one machine (or a shared
# mount), `s3://bucket/prefix` on a cluster whose nodes share no disk.
# Bytes travel as they are: pyarrow's streams default to compression="detect", which
# would gzip a `.gz` object a second time on write (and unzip it on read) on S3 only.


def filesystem(uri: str | os.PathLike) -> tuple[pyarrow.fs.FileSystem, str]:
    """(filesystem, path inside it) for a local path or `s3://bucket/key`. S3 gets the one
    `S3Storage` of this process's environment (endpoint, region, retries), made once.

    >>> fs, path = filesystem("/tmp/x/../y")
    >>> type(fs).__name__, path
    ('LocalFileSystem', '/tmp/y')
    """
    uri = os.fspath(uri)
    if is_s3(uri):
        return _ADOPTED_S3 or _s3_from_env(*_s3_env()), uri[len("s3://") :].rstrip("/")
    if "://" in uri:
        raise ValueError(f"{uri}: only local paths and s3:// are supported")
    return pyarrow.fs.LocalFileSystem(), str(Path(uri).resolve())


_ADOPTED_S3: S3Storage | None = None


def adopt_s3(fs: pyarrow.fs.FileSystem | None) -> None:
    """Use `fs`, the driver's `S3Storage` as Ray Train hands it to every training worker
    (the run's storage filesystem), for every s3:// access of this process. A worker then
    reaches the S3 the driver resolved (endpoint, region, retries, and the driver's
    environment credentials when the worker has none), as its checkpoints already do;
    its own environment may lack the endpoint. Anything but an `S3Storage` is ignored."""
    global _ADOPTED_S3
    if isinstance(fs, S3Storage):
        _ADOPTED_S3 = fs


def _s3_env() -> tuple:
    env = os.environ
    # The key id and profile are in the cache key only so a changed environment gets a new
    # client (tests switch endpoints and credentials within one process).
    return (
        env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL") or None,
        env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or None,
        env.get("AWS_ACCESS_KEY_ID"),
        env.get("AWS_PROFILE"),
    )


@functools.lru_cache(maxsize=8)
def _s3_from_env(endpoint, region, _key_id, _profile) -> S3Storage:
    return S3Storage(endpoint, region)


S3_ENDPOINT_VARIABLES = (
    "AWS_ENDPOINT_URL_S3",
    "AWS_ENDPOINT_URL",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
)


def s3_endpoint_env() -> dict[str, str]:
    """The S3 endpoint and region variables set in this process, for the `runtime_env` of
    Ray actors and tasks a driver starts, so they reach the same S3 as the driver. No
    credentials: a runtime_env is visible in the cluster's job records."""
    return {k: os.environ[k] for k in S3_ENDPOINT_VARIABLES if os.environ.get(k)}


def join(uri: str | os.PathLike, *parts: str) -> str:
    """`uri` with `parts` appended by "/" (S3 keys) or as path parts (local).

    >>> join("s3://b/corpus/", "shards", "a.parquet")
    's3://b/corpus/shards/a.parquet'
    """
    uri = os.fspath(uri)
    if is_s3(uri):
        return "/".join([uri.rstrip("/"), *(p.strip("/") for p in parts)])
    return str(Path(uri, *parts))


def exists(uri: str | os.PathLike) -> bool:
    fs, path = filesystem(uri)
    return file_info(fs, path).type != pyarrow.fs.FileType.NotFound


def read_bytes(uri: str | os.PathLike) -> bytes:
    fs, path = filesystem(uri)
    try:
        with open_input(fs, path) as f:
            return f.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"{os.fspath(uri)} does not exist") from None


def write_bytes(uri: str | os.PathLike, data: bytes) -> None:
    """Write one file whole; on S3 the object appears only once complete. Parent folders
    are made as needed."""
    put_bytes(*filesystem(uri), data)


def put_bytes(fs: pyarrow.fs.FileSystem, path: str, data: bytes) -> None:
    """`write_bytes` on a filesystem already resolved: for a Ray task given the driver's
    (`filesystem(uri)` pickles with its S3 settings, so the task needs none of its own)."""
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    if isinstance(fs, pyarrow.fs.LocalFileSystem):
        # Write beside, then rename: a reader never sees half a file.
        tmp = f"{path}.tmp-{os.getpid()}-{threading.get_ident()}"
        Path(tmp).write_bytes(data)
        os.replace(tmp, path)
        return
    with fs.open_output_stream(path, compression=None) as out:
        out.write(data)


def read_text(uri: str | os.PathLike) -> str:
    return read_bytes(uri).decode("utf-8")


def write_text(uri: str | os.PathLike, text: str) -> None:
    write_bytes(uri, text.encode("utf-8"))


def list_files(uri: str | os.PathLike) -> list[str]:
    """Files under `uri` (recursively), as paths relative to it, sorted; [] when absent."""
    fs, root = filesystem(uri)
    selector = pyarrow.fs.FileSelector(root, recursive=True, allow_not_found=True)
    infos = file_info(fs, selector)
    return sorted(
        i.path[len(root) :].lstrip("/") for i in infos if i.type == pyarrow.fs.FileType.File
    )


def delete_tree(uri: str | os.PathLike) -> None:
    """Remove `uri` and everything under it; nothing happens when it is absent."""
    fs, path = filesystem(uri)
    info = file_info(fs, path)
    if info.type == pyarrow.fs.FileType.Directory:
        fs.delete_dir(path)
    elif info.type == pyarrow.fs.FileType.File:
        fs.delete_file(path)


def upload(local: str | os.PathLike, uri: str | os.PathLike) -> None:
    """A local file, or a folder with everything under it, to `uri` (local or S3), with
    every object closed and checked (`upload_directory`)."""
    local = Path(local)
    if local.is_dir():
        fs, path = filesystem(uri)
        upload_directory(local, fs, path)
    else:
        write_bytes(uri, local.read_bytes())


def download(uri: str | os.PathLike, local: str | os.PathLike) -> Path:
    """A file, or a folder with everything under it, from `uri` to the local path `local`;
    returns `local`. Raises FileNotFoundError naming `uri` when nothing is there."""
    fs, path = filesystem(uri)
    local = Path(local)
    info = file_info(fs, path)
    if info.type == pyarrow.fs.FileType.File:
        # Streamed into a temporary beside `local`, renamed when whole: a model of several
        # GB is never held in memory, and a reader never sees half a file.
        local.parent.mkdir(parents=True, exist_ok=True)
        partial = local.with_name(f".{local.name}.{os.getpid()}.partial")
        try:
            with open_input(fs, path) as f, partial.open("wb") as out:
                while chunk := f.read(_CHUNK):
                    out.write(chunk)
            os.replace(partial, local)
        finally:
            partial.unlink(missing_ok=True)
        return local
    if info.type != pyarrow.fs.FileType.Directory:
        raise FileNotFoundError(f"{os.fspath(uri)} does not exist")
    for relative in list_files(uri):
        target = local / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        with open_input(fs, f"{path}/{relative}") as f, target.open("wb") as out:
            while chunk := f.read(_CHUNK):
                out.write(chunk)
    return local


@contextlib.contextmanager
def local_copy(uri: str | os.PathLike) -> Iterator[Path]:
    """A local path holding `uri`: the path itself when local, else a temporary download
    removed on exit (for libraries that only open local files, such as SentencePiece)."""
    if not is_s3(os.fspath(uri)):
        yield Path(uri)
        return
    with tempfile.TemporaryDirectory(prefix="llamaray-fetch-") as tmp:
        yield download(uri, Path(tmp) / os.fspath(uri).rstrip("/").rsplit("/", 1)[-1])


def upload_directory(local: str | Path, fs: pyarrow.fs.FileSystem, destination: str) -> None:
    """Copy the files under `local` to `destination` on `fs` one object at a time, closing
    each explicitly (its errors raise, unlike in `pyarrow.fs.copy_files`), then check that
    every object is there with its size. Files go in the order they were written, so the
    record a writer finishes with (a rank's integrity-{r}.json) is the last to land."""
    local = Path(local)
    fs.create_dir(destination)
    sizes = {}
    files = [p for p in local.rglob("*") if p.is_file()]
    for path in sorted(files, key=lambda p: (p.stat().st_mtime_ns, p.as_posix())):
        key = f"{destination}/{path.relative_to(local).as_posix()}"
        if isinstance(fs, pyarrow.fs.LocalFileSystem):  # S3 has no folders to make
            fs.create_dir(key.rsplit("/", 1)[0], recursive=True)
        with path.open("rb") as source, fs.open_output_stream(key, compression=None) as out:
            while chunk := source.read(_CHUNK):
                out.write(chunk)
        sizes[key] = path.stat().st_size
    for (key, size), info in zip(sizes.items(), fs.get_file_info(list(sizes)), strict=True):
        if info.type != pyarrow.fs.FileType.File or info.size != size:
            found = f"{info.size} bytes" if info.type == pyarrow.fs.FileType.File else "nothing"
            raise OSError(f"{key}: {found} in storage after the upload of {size} bytes")


# --------------------------------------------------------------- create only if absent
# A separate primitive for leases (`llamaray.data.corpus_lock`), apart from the retry policy
# above: pyarrow has no conditional write, so S3 goes through boto3 here.


def create_exclusive(uri: str | os.PathLike, data: bytes) -> bool:
    """Write `uri` whole only if nothing is there: True when this call created it, False
    when something already was. Of competing callers exactly one gets True.

    Local (and NFS): a complete temporary file is hard-linked to the name, which fails when
    the name exists, so a reader never sees a half-written file. S3: one PutObject with
    `If-None-Match: *` (AWS S3 since 2024, moto 5, MinIO); a store that ignores the header
    overwrites instead, which a caller notices by reading its token back. A PutObject
    retried after a lost response is answered 412 although the first attempt created the
    object: the caller's read-back tells the two apart.

    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as d:
    ...     create_exclusive(f"{d}/lock", b"a"), create_exclusive(f"{d}/lock", b"b")
    (True, False)
    """
    uri = os.fspath(uri)
    if is_s3(uri):
        return _s3_create_exclusive(uri, data)
    _fs, path = filesystem(uri)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}-{threading.get_ident()}"
    Path(tmp).write_bytes(data)
    try:
        os.link(tmp, path)
    except FileExistsError:
        return False
    finally:
        os.unlink(tmp)
    return True


def _s3_create_exclusive(uri: str, data: bytes) -> bool:
    import boto3
    from botocore.config import Config
    from botocore.exceptions import ClientError

    endpoint, region, _key_id, _profile = _s3_env()
    client = boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name=region,
        config=Config(retries={"max_attempts": S3_MAX_ATTEMPTS, "mode": "standard"}),
    )
    bucket, _, key = uri[len("s3://") :].partition("/")
    try:
        client.put_object(Bucket=bucket, Key=key, Body=data, IfNoneMatch="*")
    except ClientError as err:
        # 412: the object exists; 409: a concurrent conditional write to the key won.
        if err.response.get("Error", {}).get("Code") in (
            "PreconditionFailed",
            "ConditionalRequestConflict",
        ):
            return False
        raise
    return True
