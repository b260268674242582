"""A run's checkpoints where Ray Train stored them (a local path or `s3://`), read by
processes that are not its workers: evaluation, the finetuning driver, a finetune's ranks.

On a cluster whose nodes share no disk the driver never downloads a checkpoint for others
to read: it finds and checks one in storage (`newest_stored`: listing, the small JSON
records, and every recorded file's size, no tensor bytes), passes its URI on, and each
process that loads it fetches it onto its own node (`fetched`), where the full check with
digests runs before the tensors are read.

    >>> uri, state = newest_stored("s3://bucket/checkpoints/demo")  # doctest: +SKIP
    >>> with fetched(uri) as step_dir:  # doctest: +SKIP
    ...     model = load_dcp_model(step_dir, cfg)
"""

from __future__ import annotations

import contextlib
import json
import pickle
from collections.abc import Iterator
from pathlib import Path

from llamaray import storage
from llamaray.train.checkpoint import (
    STEP_DIR,
    TRAIN_STATE,
    CheckpointError,
    TrainState,
    verify_checkpoint,
)

DCP_METADATA = ".metadata"


def step_folders(root: str) -> list[tuple[int, str]]:
    """(step, URI) of the `step-NNNNNNNN` folders directly under `root`, newest first;
    [] when `root` does not exist."""
    import pyarrow.fs

    fs, path = storage.filesystem(root)
    infos = fs.get_file_info(pyarrow.fs.FileSelector(path, allow_not_found=True))
    found = [
        (int(m.group(1)), storage.join(root, i.base_name))
        for i in infos
        if i.type == pyarrow.fs.FileType.Directory and (m := STEP_DIR.match(i.base_name))
    ]
    return sorted(found, reverse=True)


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
    for name, info in zip(names, fs.get_file_info([f"{path}/{n}" for n in names]), strict=True):
        if info.type != pyarrow.fs.FileType.File:
            raise CheckpointError(f"{uri}/{name}: missing")
        if info.size != expected[name]:
            raise CheckpointError(
                f"{uri}/{name}: {info.size} bytes, expected {expected[name]} (truncated?)"
            )
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


@contextlib.contextmanager
def fetched(uri: str) -> Iterator[Path]:
    """A local folder holding the checkpoint `uri`: the folder itself when local, else a
    copy on this node's disk, checked in full (sizes and digests), removed on exit."""
    with storage.local_copy(uri) as local:
        if storage.is_s3(uri):
            verify_checkpoint(local)
        yield Path(local)


def model_metadata(uri: str):
    """The DCP metadata (tensor names, shapes, where each is stored) of a checkpoint in
    storage, without its tensors."""
    if not storage.is_s3(uri):
        from torch.distributed.checkpoint import FileSystemReader

        return FileSystemReader(str(uri)).read_metadata()
    # DCP's FileSystemReader unpickles this file; our own checkpoints wrote it, so it is
    # as trusted as the tensors DCP loads from the same folder.
    return pickle.loads(storage.read_bytes(storage.join(uri, DCP_METADATA)))
