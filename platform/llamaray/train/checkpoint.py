"""Distributed checkpoints: torch.distributed.checkpoint (DCP) shards plus a small JSON
state, with integrity records so a truncated or half-written checkpoint is never loaded.

A checkpoint directory holds, for a run of W ranks:

    .metadata, __{r}_0.distcp     DCP: each rank's shards of the model and optimizer state
    rng-{r}.pt                    each rank's RNG states
    train_state.json              step, skipped steps, world size, data position (rank 0)
    integrity-{r}.json            size and sha256 of every file rank r wrote (written last)

The directory may be assembled from W rank-local directories (Ray Train uploads each
worker's directory into the same storage folder) or written by all ranks into one shared
folder. It is complete only when `train_state.json` and all W integrity records are there
and every recorded file has its size and digest. Loading picks the newest complete
candidate; all ranks agree on it (one all-reduce per candidate), since a rank that loaded
a different step than its peers would train a model no one saved.

DCP reshards on load, so a run saved by W ranks resumes on any other number of ranks.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from llamaray import storage
from llamaray.train.safe_dcp import METADATA_FILE, SafeLoadPlanner, load_metadata

TRAIN_STATE = "train_state.json"
STEP_DIR = re.compile(r"^step-(\d+)$")


@dataclass
class TrainState:
    step: int
    """Optimizer steps completed; the data stream resumes at this step."""
    world_size: int
    skipped_steps: int = 0
    """Steps not applied because the loss or gradient norm was not finite."""
    rows_per_step: int = 0
    config_hash: str = ""
    extra: dict = field(default_factory=dict)


class CheckpointError(RuntimeError):
    """A checkpoint directory that is incomplete or corrupt; the message says which file."""


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _own_files(directory: Path, rank: int) -> list[Path]:
    """The files rank `rank` wrote: its DCP shard files and RNG state, and for rank 0 the
    DCP metadata and the train state."""
    names = [p for p in directory.glob(f"__{rank}_*.distcp")] + [directory / f"rng-{rank}.pt"]
    if rank == 0:
        names += [directory / METADATA_FILE, directory / TRAIN_STATE]
    return sorted(p for p in names if p.exists())


@dataclass
class StagedCheckpoint:
    """One rank's part of a checkpoint held apart from the live model and optimizer: what
    a write reads while training goes on (`stage_checkpoint`, `write_checkpoint`)."""

    state_dict: dict
    """{"model": ..., "optim": ...}: DCP state dicts (DTensor shards on this rank)."""
    rng: dict[str, torch.Tensor]
    train_state: dict
    """`asdict(TrainState)` at the step saved."""


def stage_checkpoint(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    state: TrainState,
    copy: bool = True,
) -> StagedCheckpoint:
    """This rank's checkpoint state; with `copy`, a copy in host memory (pinned when the
    model is on a GPU) that later optimizer steps do not change: the only part of an
    asynchronous checkpoint that blocks training. `copy=False` references the live
    tensors, for a write that finishes before the next step (`save_checkpoint`)."""
    from torch.distributed.checkpoint.staging import StateDictStager

    state_dict = {
        "model": get_model_state_dict(model),
        "optim": get_optimizer_state_dict(model, optimizer),
    }
    if copy:
        on_gpu = any(p.is_cuda for p in model.parameters())
        state_dict = StateDictStager(pin_memory=on_gpu).stage(state_dict)
    rng = {k: v.clone() for k, v in _rng_state().items()}
    return StagedCheckpoint(state_dict, rng, json.loads(json.dumps(asdict(state))))


def write_checkpoint(directory: str | Path, staged: StagedCheckpoint, process_group=None) -> None:
    """Write this rank's part of a staged checkpoint into `directory` (collective over
    `process_group`, the default group when None: every rank calls).

    `directory` may be rank-local or shared. The integrity record is written after
    everything else, so a rank that dies mid-write leaves a checkpoint that reads as
    incomplete.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rank = dist.get_rank()
    dcp.save(staged.state_dict, checkpoint_id=str(directory), process_group=process_group)
    torch.save(staged.rng, directory / f"rng-{rank}.pt")
    if rank == 0:
        (directory / TRAIN_STATE).write_text(json.dumps(staged.train_state, indent=2))
    record = {
        p.name: {"size": p.stat().st_size, "sha256": _sha256(p)}
        for p in _own_files(directory, rank)
    }
    tmp = directory / f".integrity-{rank}.json.tmp"
    tmp.write_text(json.dumps(record, indent=2))
    tmp.replace(directory / f"integrity-{rank}.json")


def save_checkpoint(
    directory: str | Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    state: TrainState,
) -> None:
    """Write this rank's part of a checkpoint into `directory` now (collective: every rank
    calls); `checkpoint_writer.CheckpointWriter` writes one in the background instead."""
    write_checkpoint(directory, stage_checkpoint(model, optimizer, state, copy=False))


def verify_checkpoint(directory: str | Path, rank: int | None = None) -> TrainState:
    """Check a checkpoint directory is complete; return its TrainState or raise
    CheckpointError naming the first problem.

    Every recorded file's size is checked; digests are checked for the files `rank` wrote
    (all files when `rank` is None), so W ranks verifying in parallel each hash 1/W of it.
    """
    directory = Path(directory)
    state_file = directory / TRAIN_STATE
    if not state_file.is_file():
        raise CheckpointError(f"{directory}: no {TRAIN_STATE} (checkpoint never completed)")
    try:
        state = TrainState(**json.loads(state_file.read_text()))
    except (ValueError, TypeError) as err:
        raise CheckpointError(f"{state_file}: unreadable ({err})") from None
    for r in range(state.world_size):
        record_file = directory / f"integrity-{r}.json"
        if not record_file.is_file():
            raise CheckpointError(
                f"{directory}: rank {r} never finished writing ({record_file.name} missing)"
            )
        try:
            record = {
                name: (int(entry["size"]), str(entry["sha256"]))
                for name, entry in json.loads(record_file.read_text()).items()
            }
        except (ValueError, TypeError, KeyError, AttributeError) as err:
            # Valid JSON of another shape too: restore_latest skips only CheckpointError.
            raise CheckpointError(f"{record_file}: unreadable ({err!r})") from None
        for name, (expected_size, expected_sha256) in record.items():
            path = directory / name
            if not path.is_file():
                raise CheckpointError(f"{path}: missing")
            size = path.stat().st_size
            if size != expected_size:
                raise CheckpointError(
                    f"{path}: {size} bytes, expected {expected_size} (truncated?)"
                )
            if (rank is None or rank == r) and _sha256(path) != expected_sha256:
                raise CheckpointError(f"{path}: sha256 differs from the one recorded at save")
    check_metadata((directory / METADATA_FILE).read_bytes(), str(directory / METADATA_FILE))
    return state


def check_metadata(data: bytes, where: str) -> None:
    """CheckpointError unless `data` is DCP metadata that `safe_dcp.load_metadata` reads:
    a `.metadata` whose pickle would run code is damage like any other, found before a
    load is attempted."""
    try:
        load_metadata(data, where)
    except Exception as err:  # any unpickling failure: the file is not DCP metadata
        raise CheckpointError(f"{where}: not DCP metadata ({err})") from None


def verify_location(location: str | Path, rank: int) -> TrainState:
    """`verify_checkpoint` for a checkpoint on this machine (rank `rank` checks its own
    files' digests); for one in S3, `stored_checkpoints.verify_stored` (every file's size
    and the metadata, read in place: nothing is downloaded)."""
    if storage.is_s3(os.fspath(location)):
        from llamaray.train.stored_checkpoints import verify_stored

        return verify_stored(os.fspath(location))
    return verify_checkpoint(location, rank)


def load_checkpoint(
    location: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer
) -> TrainState:
    """Load a verified checkpoint into the (sharded) model and optimizer; collective.

    `location` is a folder on this machine or in S3. From S3 each rank reads only the byte
    ranges of the tensors it holds (`stored_checkpoints.dcp_reader`), straight into
    memory: no rank downloads the checkpoint, so nothing is left on the node's disk and
    no byte is fetched twice by one rank."""
    from llamaray.train.stored_checkpoints import dcp_reader

    uri = os.fspath(location)
    state = TrainState(**json.loads(storage.read_text(storage.join(uri, TRAIN_STATE))))
    state_dict = {
        "model": get_model_state_dict(model),
        "optim": get_optimizer_state_dict(model, optimizer),
    }
    dcp.load(state_dict, storage_reader=dcp_reader(uri), planner=SafeLoadPlanner())
    set_model_state_dict(model, state_dict["model"])
    set_optimizer_state_dict(model, optimizer, state_dict["optim"])
    rng_uri = storage.join(uri, f"rng-{dist.get_rank()}.pt")
    # RNG streams are per rank; on another world size the old ones do not map to new ranks.
    if state.world_size == dist.get_world_size() and storage.exists(rng_uri):
        _set_rng_state(torch.load(io.BytesIO(storage.read_bytes(rng_uri)), weights_only=True))
    return state


def restore_latest(
    candidates: Iterable[Callable[[], Path]],
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    log: Callable[[str], None],
    start_over_if_damaged: bool = False,
) -> TrainState | None:
    """Load the newest complete checkpoint among `candidates` (newest first, each a callable
    giving its location: a local directory or an `s3://` URI). Every rank
    must pass the same candidates in the same order. Returns None when there is none.

    An incomplete or corrupt checkpoint is passed over for an older one. When candidates
    exist but none loads, this raises CheckpointError naming each one and its damage:
    starting from step 0 over a run's checkpoints would silently throw the run away (and
    so would a storage error, after its retries). With `start_over_if_damaged` (the
    user's explicit `train.start_over_if_damaged`) damaged checkpoints are passed over and
    None is returned; a storage error still refuses, since the checkpoints may be fine.
    """
    rank = dist.get_rank()
    fetch_failed = torch.zeros(1, dtype=torch.int32)
    damage: list[str] = []
    for index, fetch in enumerate(candidates):
        directory, problem = None, ""
        try:
            directory = fetch()
            verify_location(directory, rank)
        except CheckpointError as err:
            problem = str(err)
        except (OSError, storage.StorageUnavailable) as err:
            problem = f"could not be read from storage: {err}"
            fetch_failed[0] = 1
        ok = torch.tensor([0 if problem else 1], dtype=torch.int32)
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
        if ok.item():
            state = load_checkpoint(directory, model, optimizer)
            log(f"resumed from {directory} at step {state.step}")
            return state
        where = directory or f"candidate {index} (newest first)"
        problem = problem or "incomplete on another rank"
        damage.append(f"{where}: {problem}")
        log(f"skipping checkpoint {where}: {problem}")
    dist.all_reduce(fetch_failed, op=dist.ReduceOp.MAX)
    if fetch_failed.item():
        raise CheckpointError(
            "no checkpoint could be loaded and at least one could not be fetched from "
            "storage; refusing to start from step 0 (see the messages above)"
        )
    if damage and not start_over_if_damaged:
        raise CheckpointError(
            "every checkpoint of this run is damaged, so it cannot resume; refusing to start "
            "from step 0 over them. Set train.start_over_if_damaged=true to train from "
            "scratch anyway. Candidates (newest first):\n"
            + "\n".join(f"  {line}" for line in damage)
        )
    if damage:
        log(f"starting from step 0: all {len(damage)} checkpoint(s) are damaged and "
            "train.start_over_if_damaged is set")  # fmt: skip
    return None


# ------------------------------------------------------------------ a directory of steps


def list_step_folders(fs, path: str) -> list[tuple[int, str]]:
    """(step, path) of the `step-NNNNNNNN` folders directly under `path` on the pyarrow
    file system `fs` (local, S3, or the one Ray Train stores a run with), newest first;
    [] when `path` does not exist. The one listing of a run's checkpoints."""
    import pyarrow.fs

    infos = fs.get_file_info(pyarrow.fs.FileSelector(path, allow_not_found=True))
    found = [
        (int(m.group(1)), info.path)
        for info in infos
        if info.type == pyarrow.fs.FileType.Directory and (m := STEP_DIR.match(info.base_name))
    ]
    return sorted(found, reverse=True)


def step_dirs(root: str | Path) -> list[Path]:
    """`root/step-NNNNNNNN` directories on this machine, newest first."""
    import pyarrow.fs

    root = Path(root).absolute()
    return [Path(p) for _, p in list_step_folders(pyarrow.fs.LocalFileSystem(), str(root))]


def newest_complete(candidates: Iterable[Path]) -> tuple[Path, TrainState]:
    """The first of `candidates` (newest first) that passes `verify_checkpoint`, with its
    state; CheckpointError naming every candidate's problem when none does. Candidates are
    taken one at a time, so a generator can fetch each only when it is needed."""
    problems = []
    for directory in candidates:
        try:
            return Path(directory), verify_checkpoint(directory)
        except CheckpointError as err:
            problems.append(str(err))
    raise CheckpointError("; ".join(problems) or "no step-NNNNNNNN folders")


class LocalCheckpoints:
    """Checkpoints in a directory every rank can see (one machine, or a shared file
    system): used when training runs without Ray Train (in-process, torchrun).

    Ranks write into `step-N.partial/`; after a barrier rank 0 renames it to `step-N/`,
    so a directory named like a step is always a finished write, and prunes to `keep`.
    """

    def __init__(self, root: str | Path, keep: int = 3):
        self.root, self.keep = Path(root), keep

    def candidates(self) -> Iterator[Callable[[], Path]]:
        for path in step_dirs(self.root):
            yield lambda path=path: path

    def save(self, model, optimizer, state: TrainState) -> Path:
        """Write a checkpoint of `state.step` now (collective)."""
        return self.write(stage_checkpoint(model, optimizer, state, copy=False))

    def write(self, staged: StagedCheckpoint, process_group=None) -> Path:
        """Write a staged checkpoint (collective over `process_group`): into
        `step-N.partial/`, then renamed to `step-N/` once every rank is done."""
        final = self.root / step_dir_name(staged.train_state["step"])
        partial = final.with_name(final.name + ".partial")
        if dist.get_rank() == 0:
            shutil.rmtree(partial, ignore_errors=True)
        dist.barrier(group=process_group)
        write_checkpoint(partial, staged, process_group)
        dist.barrier(group=process_group)
        if dist.get_rank() == 0:
            shutil.rmtree(final, ignore_errors=True)
            os.replace(partial, final)
            for old in step_dirs(self.root)[self.keep :]:
                shutil.rmtree(old, ignore_errors=True)
        dist.barrier(group=process_group)
        return final


def _rng_state() -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
