"""The Ray Train side of a worker: `train_loop_per_worker` and the `Launcher` that maps
checkpoints and metrics onto Ray Train's storage and reporting.

Checkpoints: each worker copies its state to host memory, then writes its DCP shards into
a local temporary directory in the background (`train.checkpoint_writer`) and calls
`ray.train.report(checkpoint=..., checkpoint_upload_mode=ASYNC)`; Ray Train uploads every
worker's directory into one storage folder `step-NNNNNNNN` (local or S3) in its upload
thread and registers the checkpoint only after all workers' uploads finish, so a
checkpoint whose write failed is never the latest. Training goes on meanwhile. On
resume, `ray.train.get_checkpoint()` names the newest registered one; our integrity check
still runs, and an incomplete one falls back to the older step folders beside it. A
checkpoint in S3 is read in place, each rank fetching only the byte ranges it loads
(`train.checkpoint.load_checkpoint`): no worker downloads it to its node's disk.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import asdict
from functools import partial
from pathlib import Path

import ray.train
from ray.train import Checkpoint, CheckpointUploadMode

from llamaray.storage import adopt_s3, upload_directory
from llamaray.train.checkpoint import (
    STEP_DIR,
    CheckpointError,
    TrainState,
    list_step_folders,
    stage_checkpoint,
    step_dir_name,
    write_checkpoint,
)
from llamaray.train.worker import WorkerSpec, run_worker


def train_loop_per_worker(config: dict) -> None:
    _quiet_report_logs()
    # The run's outputs (exported model, fault markers) and an s3:// corpus are read and
    # written with the S3 settings the driver resolved, like the checkpoints.
    adopt_s3(ray.train.get_context().get_storage().storage_filesystem)
    result = run_worker(WorkerSpec(**config), RayLauncher())
    # The final report carries the outcome to the driver's `Result.metrics`.
    ray.train.report(result.last | {"stopped": result.stopped or "", "done": True})


def _quiet_report_logs() -> None:
    """Ray Train 2.60 logs every report's full metrics dict at INFO from each worker, on a
    logger named by its file path (so LoggingConfig does not reach it); our own progress
    lines say the same once. Best effort: the module is private and may move."""
    try:
        from ray.train.v2._internal.execution import context
    except ImportError:
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)


class RayLauncher:
    def __init__(self) -> None:
        from llamaray.train.checkpoint_writer import CheckpointWriter

        self.writer = CheckpointWriter()
        self._uploaded: Future | None = None

    def checkpoint_candidates(self) -> Iterator[Callable[[], Path]]:
        latest = ray.train.get_checkpoint()
        if latest is None:
            return
        yield lambda: _location(latest)
        for older in _older_siblings(latest):
            yield lambda older=older: _location(older)

    def save_checkpoint(
        self, model, optimizer, state: TrainState, metrics: dict, background: bool = True
    ) -> None:
        """Stage this rank's state and hand the checkpoint to Ray Train. With `background`
        the local write (`CheckpointWriter`), the upload and the report run in Ray's upload
        thread (`CheckpointUploadMode.ASYNC`); the step waits only for the staging and the
        ranks' agreement on the folder name. Ray Train registers the checkpoint once every
        rank's upload is done; a failed write or upload fails the worker (Ray raises it in
        the training thread) and is never registered."""
        self.wait_for_checkpoints()
        tmp = tempfile.mkdtemp(prefix="llamaray-ckpt-")
        staged = stage_checkpoint(model, optimizer, state, copy=background)
        if background:
            written = self.writer.submit(partial(_write_into, tmp), staged)
        else:
            write_checkpoint(tmp, staged)
            written = None
        uploaded: Future = Future()

        def upload(checkpoint: Checkpoint, dir_name: str) -> Checkpoint:
            try:
                if written is not None:
                    written.result()  # the write's error fails the upload, so the worker
                stored = upload_checkpoint(checkpoint, dir_name)
            except BaseException as err:
                uploaded.set_exception(err)
                raise
            uploaded.set_result(stored)
            return stored

        self._uploaded = uploaded
        ray.train.report(
            metrics | {"checkpoint_step": state.step, "train_state": asdict(state)},
            checkpoint=Checkpoint.from_directory(tmp),
            checkpoint_dir_name=step_dir_name(state.step),
            checkpoint_upload_mode=(
                CheckpointUploadMode.ASYNC if background else CheckpointUploadMode.SYNC
            ),
            delete_local_checkpoint_after_upload=True,
            # Ray's default upload (pyarrow copy_files) ignores errors raised when an
            # object is closed, so a failed upload could be registered as complete.
            checkpoint_upload_fn=upload,
        )

    def report(self, metrics: dict) -> None:
        # Queued behind an upload in flight rather than waiting for it (or for the
        # controller to take the result): the training thread only meets the barrier.
        ray.train.report(metrics, checkpoint_upload_mode=CheckpointUploadMode.ASYNC)

    def log(self, metrics: dict) -> None:
        """Nothing to do: rank 0's metrics go to MLflow (`tracking.MetricLogger`)."""

    def wait_for_checkpoints(self) -> None:
        """Until the last checkpoint is written and uploaded (Ray Train registers it once
        every rank's report is in)."""
        self.writer.wait()
        if self._uploaded is not None:
            self._uploaded.result()


def _write_into(directory: str, staged, process_group) -> None:
    write_checkpoint(directory, staged, process_group)


def upload_checkpoint(checkpoint: Checkpoint, checkpoint_dir_name: str) -> Checkpoint:
    """`ray.train.report(..., checkpoint_upload_fn=upload_checkpoint)`: the checkpoint's
    local directory into the run's storage folder `checkpoint_dir_name` through
    `llamaray.storage.upload_directory`, raising if any object failed (see `storage`'s
    docstring). Storage that is not S3 gets Ray Train's own upload, whose local copies do
    report their errors."""
    import pyarrow.fs

    storage = ray.train.get_context().get_storage()
    fs = storage.storage_filesystem
    if not isinstance(fs, pyarrow.fs.S3FileSystem):
        return storage.persist_current_checkpoint(checkpoint, checkpoint_dir_name)
    if not isinstance(checkpoint.filesystem, pyarrow.fs.LocalFileSystem):
        raise ValueError(f"expected a checkpoint in a local directory, got {checkpoint}")
    destination = storage.build_checkpoint_path_from_name(checkpoint_dir_name)
    upload_directory(checkpoint.path, fs, destination)
    return Checkpoint(path=destination, filesystem=fs)


def _location(checkpoint: Checkpoint) -> Path | str:
    """Where the checkpoint is, for `restore_latest`: its folder on a local file system,
    else its `s3://` URI, read in place (only the byte ranges this rank loads; nothing is
    downloaded to the node's disk). Reads go through `llamaray.storage`, with the S3
    settings this worker adopted from the run's storage and its retry policy."""
    import pyarrow.fs

    if isinstance(checkpoint.filesystem, pyarrow.fs.LocalFileSystem):
        return Path(checkpoint.path)
    if not isinstance(checkpoint.filesystem, pyarrow.fs.S3FileSystem):
        raise CheckpointError(  # a named refusal in restore_latest, not a crashed rank
            f"{checkpoint.path}: checkpoints on {type(checkpoint.filesystem).__name__} are "
            "not supported (a local path or s3://)"
        )
    return "s3://" + checkpoint.path.lstrip("/")


def _older_siblings(latest: Checkpoint) -> list[Checkpoint]:
    """Step folders next to `latest` with a lower step, newest first."""
    fs, path = latest.filesystem, latest.path.rstrip("/")
    parent, name = path.rsplit("/", 1)
    match = STEP_DIR.match(name)
    if match is None:
        return []
    step = int(match.group(1))
    return [Checkpoint(path=p, filesystem=fs) for s, p in list_step_folders(fs, parent) if s < step]
