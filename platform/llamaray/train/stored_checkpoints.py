"""A run's checkpoints where Ray Train stored them (a local path or `s3://`), read by
processes that are not its workers: evaluation, the finetuning driver, a finetune's ranks.

On a cluster whose nodes share no disk nobody downloads a checkpoint: the driver finds and
checks one in storage (`newest_stored`: listing, the small JSON records, every recorded
file's size and the metadata, no tensor bytes) and passes its URI on, and a resuming rank
checks its candidates the same way. Each process that loads it reads the tensors it needs
straight from storage (`dcp_reader`: one ranged read per tensor, retried on transient
errors, so what a rank does not hold, such as the optimizer state when evaluating, is
never fetched and nothing lands on the node's disk). In S3 sizes are checked, not
digests: reading every byte to hash it would fetch the whole checkpoint on every rank.

    >>> uri, state = newest_stored("s3://bucket/checkpoints/demo")  # doctest: +SKIP
    >>> dcp.load(state_dict, storage_reader=dcp_reader(uri))  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import os
import posixpath

from llamaray import storage
from llamaray.train.checkpoint import (
    TRAIN_STATE,
    CheckpointError,
    TrainState,
    check_metadata,
    list_step_folders,
    verify_checkpoint,
)
from llamaray.train.safe_dcp import METADATA_FILE as DCP_METADATA
from llamaray.train.safe_dcp import load_metadata


def step_folders(root: str) -> list[tuple[int, str]]:
    """(step, URI) of the `step-NNNNNNNN` folders directly under `root`, newest first;
    [] when `root` does not exist."""
    fs, path = storage.filesystem(root)
    return [
        (step, storage.join(root, posixpath.basename(found)))
        for step, found in list_step_folders(fs, path)
    ]


def is_step_folder(uri: str) -> bool:
    """Whether `uri` looks like a checkpoint's step folder (its state or DCP metadata)."""
    return storage.exists(storage.join(uri, TRAIN_STATE)) or storage.exists(
        storage.join(uri, DCP_METADATA)
    )


def verify_stored(uri: str) -> TrainState:
    """`verify_checkpoint` for a checkpoint in storage: on S3 the records are read and every
    recorded file's size is checked without fetching the files (their digests are checked
    by `fetched` where they are loaded); a local folder gets the full check."""
    if not storage.is_s3(uri):
        return verify_checkpoint(uri)
    import pyarrow.fs

    try:
        state = TrainState(**json.loads(storage.read_text(storage.join(uri, TRAIN_STATE))))
    except FileNotFoundError:
        raise CheckpointError(f"{uri}: no {TRAIN_STATE} (checkpoint never completed)") from None
    except (ValueError, TypeError) as err:
        raise CheckpointError(f"{uri}/{TRAIN_STATE}: unreadable ({err})") from None
    expected: dict[str, int] = {}
    for r in range(state.world_size):
        record_uri = storage.join(uri, f"integrity-{r}.json")
        try:
            record = json.loads(storage.read_text(record_uri))
            expected |= {name: int(entry["size"]) for name, entry in record.items()}
        except FileNotFoundError:
            raise CheckpointError(
                f"{uri}: rank {r} never finished writing (integrity-{r}.json missing)"
            ) from None
        except (ValueError, TypeError, KeyError, AttributeError) as err:
            raise CheckpointError(f"{record_uri}: unreadable ({err!r})") from None
    fs, path = storage.filesystem(uri)
    names = sorted(expected)
    infos = storage.file_info(fs, [f"{path}/{n}" for n in names])
    for name, info in zip(names, infos, strict=True):
        if info.type != pyarrow.fs.FileType.File:
            raise CheckpointError(f"{uri}/{name}: missing")
        if info.size != expected[name]:
            raise CheckpointError(
                f"{uri}/{name}: {info.size} bytes, expected {expected[name]} (truncated?)"
            )
    metadata_uri = storage.join(uri, DCP_METADATA)
    check_metadata(storage.read_bytes(metadata_uri), metadata_uri)
    return state


def newest_stored(root: str) -> tuple[str, TrainState]:
    """(URI, state) of the newest complete checkpoint under a run's folder `root`;
    CheckpointError naming every candidate's problem when none is complete."""
    problems = []
    for _, uri in step_folders(root):
        try:
            return uri, verify_stored(uri)
        except CheckpointError as err:
            problems.append(str(err))
    raise CheckpointError("; ".join(problems) or f"no step-NNNNNNNN folders under {root}")


def dcp_reader(uri: str):
    """A DCP `StorageReader` for the checkpoint at `uri`: torch's own for a local folder,
    else a `StoredReader` (ranged reads through the storage layer). Neither runs code from
    the checkpoint (`safe_dcp`); pass `safe_dcp.SafeLoadPlanner()` to `dcp.load` with it."""
    if not storage.is_s3(uri):
        from llamaray.train.safe_dcp import SafeFileSystemReader

        return SafeFileSystemReader(str(uri))
    return _stored_reader_class()(uri)


@functools.cache
def _stored_reader_class():
    # Built on first use: importing torch's DCP module is not free for callers that only
    # list or verify checkpoints.
    from torch.distributed.checkpoint.filesystem import FileSystemBase

    from llamaray.train.safe_dcp import SafeFileSystemReader

    class _StoredFiles(FileSystemBase):
        """The read side of DCP's file-system interface over `llamaray.storage`."""

        @contextlib.contextmanager
        def create_stream(self, path, mode):
            if mode != "rb":
                raise ValueError(f"{path}: stored checkpoints are read-only here")
            fs, inner = storage.filesystem(path)
            with storage.open_input(fs, inner) as f:  # reads retried (storage's policy)
                yield f

        def concat_path(self, path, suffix):
            return storage.join(path, suffix)

        def init_path(self, path):
            return os.fspath(path)

        def exists(self, path):
            return storage.exists(path)

        @classmethod
        def validate_checkpoint_id(cls, checkpoint_id) -> bool:
            return storage.is_s3(os.fspath(checkpoint_id))

        def rename(self, path, new_path):
            raise NotImplementedError("stored checkpoints are read-only here")

        mkdir = rm_file = rename

    class StoredReader(SafeFileSystemReader):
        """`safe_dcp`'s reader reading from `s3://` through `llamaray.storage`: each tensor
        is one ranged read of exactly its bytes."""

        def __init__(self, uri: str):
            super().__init__(".")  # a placeholder: torch's local FileSystem resolves paths
            self.fs = _StoredFiles()
            self.path = uri

        def _slice_file(self, file, sinfo):
            file.seek(sinfo.offset)
            return io.BytesIO(file.read(sinfo.length))

        @classmethod
        def validate_checkpoint_id(cls, checkpoint_id) -> bool:
            return storage.is_s3(os.fspath(checkpoint_id))

    return StoredReader


def model_metadata(uri: str):
    """The DCP metadata (tensor names, shapes, where each is stored) of a checkpoint in
    storage, without its tensors; `safe_dcp.UnsafeCheckpoint` when its pickle names
    anything but DCP's own classes."""
    where = storage.join(uri, DCP_METADATA)
    return load_metadata(storage.read_bytes(where), where)
