"""Distributed checkpoints without Ray: DCP save/verify/load of an FSDP-sharded model and its
optimizer, integrity checks, picking the newest complete checkpoint, and the real training
worker stopped and resumed in this process.

Everything runs in one gloo process group of one rank (`ensure_process_group`). A process
has a single default group, so it is created once and never destroyed: any later test in
this process that needs one finds it already there.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from test_feed import write_shard
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor

from llamaray.config import load_config
from llamaray.model import Llama
from llamaray.parallel.fsdp import apply_fsdp
from llamaray.parallel.init import materialize
from llamaray.train import checkpoint as checkpoint_module
from llamaray.train.checkpoint import (
    TRAIN_STATE,
    CheckpointError,
    LocalCheckpoints,
    TrainState,
    load_checkpoint,
    newest_complete,
    restore_latest,
    save_checkpoint,
    step_dir_name,
    step_dirs,
    verify_checkpoint,
)
from llamaray.train.launcher import LocalLauncher
from llamaray.train.optim import build_optimizer
from llamaray.train.step import train_step
from llamaray.train.worker import WorkerSpec, build_parallel_model, run_worker

VOCAB = 64
SEQ_LEN = 16
LR = 1e-2


pytestmark = pytest.mark.usefixtures("process_group")  # tests/conftest.py


# ------------------------------------------------------------------------------ helpers


def build(seed: int = 0, sharded: bool = False):
    """A debug-preset Llama as a worker group of one builds it (the plain model), or
    `sharded` with FSDP2 as larger groups build it (here on a mesh of one rank), and its
    AdamW."""
    cfg = load_config(
        None, ["model.preset=debug", f"train.seq_len={SEQ_LEN}", f"train.seed={seed}"]
    )
    if not sharded:
        model, _mesh = build_parallel_model(cfg, cfg.model.args(VOCAB), torch.device("cpu"))
        return model, build_optimizer(model, LR)
    with torch.device("meta"):
        model = Llama(cfg.model.args(VOCAB))
    apply_fsdp(model, init_device_mesh("cpu", (1,), mesh_dim_names=("dp",))["dp"])
    materialize(model, torch.device("cpu"), seed=seed)
    return model, build_optimizer(model, LR)


def batch(seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (2, SEQ_LEN + 1), generator=g) for _ in range(2)]


def train(model, optimizer, seeds) -> None:
    for seed in seeds:
        assert train_step(model, optimizer, batch(seed), LR).finite


def _local(t):
    t = t.full_tensor() if isinstance(t, DTensor) else t
    return t.detach().clone()


def params(model) -> dict[str, torch.Tensor]:
    return {name: _local(p) for name, p in model.named_parameters()}


def optim_state(model, optimizer) -> dict[str, dict[str, torch.Tensor]]:
    return {
        name: {k: _local(v) for k, v in optimizer.state[p].items()}
        for name, p in model.named_parameters()
    }


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        if isinstance(a[name], dict):
            assert_same(a[name], b[name])
        else:
            assert torch.equal(a[name], b[name]), name


def differs(a: dict, b: dict) -> bool:
    return any(not torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A checkpoint of a model trained 2 steps, with what it holds."""
    directory = tmp_path_factory.mktemp("ckpt") / "step-2"
    model, optimizer = build(seed=0)
    train(model, optimizer, [1, 2])
    state = TrainState(step=2, world_size=1, skipped_steps=1, rows_per_step=4, config_hash="abc")
    save_checkpoint(directory, model, optimizer, state)
    rng_after_save = torch.rand(4)  # the draws a resumed run makes next
    return {
        "dir": directory,
        "state": state,
        "params": params(model),
        "optim": optim_state(model, optimizer),
        "next_params": _after_step(model, optimizer),
        "rng": rng_after_save,
    }


def _after_step(model, optimizer) -> dict[str, torch.Tensor]:
    """The parameters one more step gives (the model is left stepped)."""
    train(model, optimizer, [3])
    return params(model)


@pytest.fixture
def damaged(saved, tmp_path) -> Path:
    """A copy of the saved checkpoint to corrupt."""
    return Path(shutil.copytree(saved["dir"], tmp_path / "copy"))


# ---------------------------------------------------------------------- save/verify/load


def test_checkpoint_layout_and_integrity_record(saved):
    directory = saved["dir"]
    names = {p.name for p in directory.iterdir()}
    assert {".metadata", "rng-0.pt", TRAIN_STATE, "integrity-0.json"} <= names
    assert any(n.startswith("__0_") and n.endswith(".distcp") for n in names)
    assert not [n for n in names if n.endswith(".tmp")]
    record = json.loads((directory / "integrity-0.json").read_text())
    # Every file but the record itself is recorded, with its real size.
    assert set(record) == names - {"integrity-0.json"}
    for name, entry in record.items():
        assert entry["size"] == (directory / name).stat().st_size, name
        assert len(entry["sha256"]) == 64


def test_save_verify_load_round_trip(saved):
    assert verify_checkpoint(saved["dir"]) == saved["state"]
    assert verify_checkpoint(saved["dir"], rank=0) == saved["state"]

    model, optimizer = build(seed=1)  # other weights and no optimizer state yet
    assert differs(params(model), saved["params"])
    torch.manual_seed(12345)
    state = load_checkpoint(saved["dir"], model, optimizer)
    assert state == saved["state"]
    assert_same(params(model), saved["params"])
    assert_same(optim_state(model, optimizer), saved["optim"])
    # The RNG continues where the saved run's did.
    assert torch.equal(torch.rand(4), saved["rng"])
    # And training continues exactly as the saved model would have.
    assert_same(_after_step(model, optimizer), saved["next_params"])
    assert differs(params(model), saved["params"])


@pytest.mark.parametrize("saved_sharded", [False, True], ids=["plain-to-fsdp", "fsdp-to-plain"])
def test_a_checkpoint_moves_between_the_plain_model_and_the_fsdp_sharded_one(
    tmp_path, saved_sharded
):
    """A worker group of one trains the plain model (`worth_sharding`), larger groups shard
    it with FSDP2: a run resized between the two resumes from the other's checkpoint with
    the same parameters, optimizer state and next step."""
    model, optimizer = build(seed=0, sharded=saved_sharded)
    assert any(isinstance(p, DTensor) for p in model.parameters()) == saved_sharded
    train(model, optimizer, [1, 2])
    save_checkpoint(tmp_path / "step-2", model, optimizer, TrainState(step=2, world_size=1))
    expected = params(model), optim_state(model, optimizer), _after_step(model, optimizer)

    other, other_optimizer = build(seed=1, sharded=not saved_sharded)
    assert any(isinstance(p, DTensor) for p in other.parameters()) != saved_sharded
    assert differs(params(other), expected[0])
    load_checkpoint(tmp_path / "step-2", other, other_optimizer)
    assert_same(params(other), expected[0])
    assert_same(optim_state(other, other_optimizer), expected[1])
    assert_same(_after_step(other, other_optimizer), expected[2])


def _truncate(directory: Path) -> str:
    shard = sorted(directory.glob("__0_*.distcp"))[0]
    shard.write_bytes(shard.read_bytes()[:100])
    return shard.name


def _flip_byte(directory: Path) -> str:
    shard = sorted(directory.glob("__0_*.distcp"))[0]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    return shard.name


def _drop(name: str):
    def damage(directory: Path) -> str:
        (directory / name).unlink()
        return name

    return damage


def _garble(name: str, text: str = '{"step": 2, "world_size"'):
    def damage(directory: Path) -> str:
        (directory / name).write_text(text)
        return name

    return damage


@pytest.mark.parametrize(
    ("damage", "says"),
    [
        (_truncate, "truncated"),
        (_flip_byte, "sha256 differs"),
        (_drop("integrity-0.json"), "rank 0 never finished writing"),
        (_drop(TRAIN_STATE), "never completed"),
        (_drop("rng-0.pt"), "missing"),
        (_garble(TRAIN_STATE), "unreadable"),
        (_garble("integrity-0.json"), "unreadable"),
        # Valid JSON of the wrong shape is as unreadable (not a crash in restore_latest).
        (_garble(TRAIN_STATE, "[2, 1]"), "unreadable"),
        (_garble("integrity-0.json", '{"rng-0.pt": 5}'), "unreadable"),
        (_garble("integrity-0.json", '{"rng-0.pt": {"size": 5}}'), "unreadable"),
    ],
    ids=["truncated", "flipped-byte", "no-integrity", "no-state", "no-rng", "bad-state",
         "bad-integrity", "state-list", "integrity-entry-number", "integrity-no-digest"],
)  # fmt: skip
def test_verify_names_the_damaged_file(damaged, damage, says):
    verify_checkpoint(damaged)  # intact before
    name = damage(damaged)
    with pytest.raises(CheckpointError, match=says) as err:
        verify_checkpoint(damaged)
    assert name in str(err.value)


def test_digests_are_checked_by_the_rank_that_wrote_them(damaged):
    """W ranks verify in parallel, each hashing its own files; sizes are checked by all."""
    _flip_byte(damaged)
    assert verify_checkpoint(damaged, rank=1).step == 2  # not rank 1's file
    with pytest.raises(CheckpointError, match="sha256"):
        verify_checkpoint(damaged, rank=0)


def test_wrong_train_state_fields_are_unreadable(damaged):
    (damaged / TRAIN_STATE).write_text(json.dumps({"step": 2, "world_size": 1, "bogus": 1}))
    with pytest.raises(CheckpointError, match=f"{TRAIN_STATE}: unreadable"):
        verify_checkpoint(damaged)


# ----------------------------------------------------------------- a directory of steps


def _save_steps(root: Path, steps, keep: int = 3) -> tuple[LocalCheckpoints, dict]:
    """Train a model, saving after each of `steps`; the parameters each save holds."""
    checkpoints = LocalCheckpoints(root, keep=keep)
    model, optimizer = build(seed=0)
    held = {}
    for step in steps:
        train(model, optimizer, [step])
        final = checkpoints.save(model, optimizer, TrainState(step=step, world_size=1))
        assert final == root / step_dir_name(step)
        held[step] = params(model)
    return checkpoints, held


def test_restore_latest_skips_a_truncated_newest_checkpoint(tmp_path):
    checkpoints, held = _save_steps(tmp_path, [2, 4, 6])
    assert [p.name for p in step_dirs(tmp_path)] == ["step-00000006", "step-00000004",
                                                     "step-00000002"]  # fmt: skip
    _truncate(tmp_path / step_dir_name(6))

    model, optimizer = build(seed=1)
    messages: list[str] = []
    state = restore_latest(checkpoints.candidates(), model, optimizer, messages.append)
    assert state is not None and state.step == 4
    assert_same(params(model), held[4])
    assert len(messages) == 2, messages
    assert "skipping" in messages[0] and "step-00000006" in messages[0]
    assert "truncated" in messages[0]  # why: the shard's size differs from the record
    assert "step-00000004" in messages[1] and "step 4" in messages[1]


def test_newest_complete_passes_over_damaged_candidates_and_names_them(tmp_path):
    _save_steps(tmp_path, [2, 4, 6])
    _truncate(tmp_path / step_dir_name(6))
    step_dir, state = newest_complete(step_dirs(tmp_path))
    assert step_dir == tmp_path / step_dir_name(4) and state.step == 4
    (tmp_path / step_dir_name(4) / TRAIN_STATE).unlink()
    (tmp_path / step_dir_name(2) / "integrity-0.json").unlink()
    with pytest.raises(CheckpointError) as err:
        newest_complete(step_dirs(tmp_path))
    for step in (6, 4, 2):
        assert step_dir_name(step) in str(err.value)
    with pytest.raises(CheckpointError, match="no step-NNNNNNNN folders"):
        newest_complete([])


def test_restore_latest_refuses_to_start_over_when_every_checkpoint_is_damaged(tmp_path):
    checkpoints, _ = _save_steps(tmp_path, [2, 4])
    _truncate(tmp_path / step_dir_name(4))
    (tmp_path / step_dir_name(2) / "integrity-0.json").unlink()

    model, optimizer = build(seed=1)
    before = params(model)
    with pytest.raises(CheckpointError) as refused:
        restore_latest(checkpoints.candidates(), model, optimizer, lambda _: None)
    message = str(refused.value)
    assert "train.start_over_if_damaged" in message
    assert f"{tmp_path / step_dir_name(4)}" in message and "truncated" in message
    assert f"{tmp_path / step_dir_name(2)}" in message and "never finished writing" in message
    assert_same(params(model), before)

    # Asked for explicitly: the damaged ones are named, and training starts from scratch.
    messages: list[str] = []
    assert restore_latest(checkpoints.candidates(), model, optimizer, messages.append,
                          start_over_if_damaged=True) is None  # fmt: skip
    assert_same(params(model), before)
    assert [m.split(":")[0] for m in messages[:2]] == [
        f"skipping checkpoint {tmp_path / step_dir_name(4)}",
        f"skipping checkpoint {tmp_path / step_dir_name(2)}",
    ]
    assert "starting from step 0" in messages[2]
    # No checkpoint directory at all: a new run, nothing to refuse.
    empty = LocalCheckpoints(tmp_path / "none")
    assert restore_latest(empty.candidates(), model, optimizer, messages.append) is None


def test_restore_latest_skips_a_candidate_that_cannot_be_fetched(tmp_path, saved):
    def unreachable() -> Path:
        raise OSError("connection refused")

    model, optimizer = build(seed=1)
    messages: list[str] = []
    candidates = [unreachable, lambda: saved["dir"]]
    state = restore_latest(candidates, model, optimizer, messages.append)
    assert state == saved["state"]
    assert "connection refused" in messages[0]


def test_restore_latest_refuses_to_start_over_when_storage_failed(tmp_path):
    def unreachable() -> Path:
        raise OSError("503 SlowDown")

    model, optimizer = build(seed=1)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(CheckpointError, match="refusing to start from step 0"):
        restore_latest([unreachable], model, optimizer, lambda _: None)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_local_checkpoints_keep_the_newest_and_ignore_partial_writes(tmp_path):
    # A save that crashed before its rename, and a stale partial of a step about to be saved.
    crashed = tmp_path / (step_dir_name(9) + ".partial")
    crashed.mkdir()
    (crashed / "__0_0.distcp").write_bytes(b"half")
    stale = tmp_path / (step_dir_name(3) + ".partial")
    stale.mkdir()
    (stale / "leftover").write_text("x")

    checkpoints, _ = _save_steps(tmp_path, [1, 2, 3, 4], keep=2)
    assert [p.name for p in step_dirs(tmp_path)] == ["step-00000004", "step-00000003"]
    assert [fetch() for fetch in checkpoints.candidates()] == [
        tmp_path / step_dir_name(4),
        tmp_path / step_dir_name(3),
    ]
    assert not (tmp_path / step_dir_name(1)).exists()
    assert not (tmp_path / step_dir_name(2)).exists()
    assert not stale.exists() and not (tmp_path / step_dir_name(3) / "leftover").exists()
    assert crashed.exists()  # left alone, but never offered
    assert verify_checkpoint(tmp_path / step_dir_name(3)).step == 3


# ------------------------------------------------------------- the worker, in process


def write_token_corpus(root: Path, train_rows: int = 300, val_rows: int = 16) -> Path:
    """A prepared corpus (prepare.py's layout) of random tokens below VOCAB: two sources."""
    rng = np.random.default_rng(0)
    width = SEQ_LEN + 1
    sources = {}
    for name in ("commoncrawl", "c4"):
        splits = {}
        for split, n in (("train", train_rows), ("validation", val_rows)):
            rel = f"shards/source={name}/split={split}/part-0.parquet"
            write_shard(root / rel, rng.integers(0, VOCAB, (n, width)), False, width)
            splits[split] = {"documents": n, "tokens": n * width, "rows": n,
                             "packed_tokens": n * width, "files": [rel]}  # fmt: skip
        sources[name] = {"paths": [], "kept": n, "dropped": {}, "documents_in": n,
                         "splits": splits}  # fmt: skip
    manifest = {
        "name": "tokens",
        "config": {},
        "config_hash": "0",
        # Training uses only the size; the file is copied beside an exported model if it
        # exists, and here it does not.
        "tokenizer": {"path": str(root / "tokenizer" / "tokenizer.model"), "vocab_size": VOCAB},
        "seq_len": SEQ_LEN,
        "row_tokens": width,
        "sources": sources,
        "skipped_steps": {},
        "quarantine": "quarantine.jsonl",
    }
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_token_corpus(tmp_path_factory.mktemp("tokens"))


STEPS = 6


def run(corpus: Path, root: Path, *overrides: str):
    """The worker in this process, with its checkpoints in the run's folder, as Ray Train
    keeps them (`<root>/checkpoints/inproc`)."""
    cfg = run_config(root, *overrides)
    launcher = LocalLauncher(cfg.run_uri, keep=cfg.train.keep_checkpoints)
    spec = WorkerSpec(config=cfg.model_dump(), corpus_dir=str(corpus), run_dir=str(root / "run"))
    result = run_worker(spec, launcher)
    return result, launcher


def run_config(root: Path, *overrides: str):
    return load_config(
        None,
        [
            "name=inproc",
            f"output_dir={root}",
            "model.preset=debug",
            "tracking.enabled=false",
            "tracking.export_hf=false",
            "data.eval_rows=8",
            "optimizer.lr=3e-3",
            "optimizer.warmup_steps=2",
            f"train.steps={STEPS}",
            f"train.seq_len={SEQ_LEN}",
            f"train.batch_tokens={4 * SEQ_LEN}",  # 4 rows: 2 micro-batches of 2
            "train.micro_batch_size=2",
            "train.num_workers=1",
            "train.device=cpu",
            "train.checkpoint_every=2",
            "train.log_every=1",
            *overrides,
        ],
    )


def by_step(reports: list[dict]) -> dict[int, dict]:
    steps = [r["step"] for r in reports]
    assert len(steps) == len(set(steps)), steps  # each step reported once
    return {r["step"]: r for r in reports}


@pytest.fixture(scope="module")
def uninterrupted(corpus, tmp_path_factory):
    return run(corpus, tmp_path_factory.mktemp("run-a"))


def test_worker_trains_and_checkpoints(uninterrupted, tmp_path_factory):
    result, launcher = uninterrupted
    assert (result.step, result.skipped_steps, result.stopped) == (STEPS, 0, None)
    reports = by_step(launcher.reports)
    assert sorted(reports) == list(range(1, STEPS + 1))
    losses = [reports[s]["loss"] for s in range(1, STEPS + 1)]
    assert all(math.isfinite(x) for x in losses)
    assert len({reports[s]["rows_crc"] for s in reports}) == STEPS  # new rows every step
    assert "val_loss" in result.last and math.isfinite(result.last["val_loss"])
    root = Path(launcher.checkpoints.root)
    assert [p.name for p in step_dirs(root)] == ["step-00000006", "step-00000004",
                                                 "step-00000002"]  # fmt: skip
    state = verify_checkpoint(root / step_dir_name(STEPS))
    assert (state.step, state.world_size, state.rows_per_step) == (STEPS, 1, 4)


def test_stopped_and_resumed_worker_matches_the_uninterrupted_run(corpus, uninterrupted, tmp_path):
    expected = by_step(uninterrupted[1].reports)
    first, launcher = run(corpus, tmp_path, "train.stop_at_step=3")
    assert (first.step, first.stopped) == (3, None)
    assert [p.name for p in step_dirs(tmp_path / "checkpoints" / "inproc")] == ["step-00000003",
                                                                     "step-00000002"]  # fmt: skip
    before = by_step(launcher.reports)
    assert sorted(before) == [1, 2, 3]

    second, launcher = run(corpus, tmp_path)  # a relaunch: a new launcher on the same dir
    assert (second.step, second.stopped) == (STEPS, None)
    after = by_step(launcher.reports)
    assert sorted(after) == [4, 5, 6]  # resumed from step 3, not from the start
    for step, report in (before | after).items():
        for key in ("loss", "grad_norm", "lr", "rows_crc"):
            assert report[key] == expected[step][key], (step, key)  # bit for bit
    assert second.last["val_loss"] == uninterrupted[0].last["val_loss"]
    assert [p.name for p in step_dirs(tmp_path / "checkpoints" / "inproc")] == [
        "step-00000006",
        "step-00000004",
        "step-00000003",
    ]


def test_a_relaunch_that_changes_the_course_is_refused_naming_each_change(corpus, tmp_path):
    from llamaray.config import ConfigError
    from llamaray.orchestrate.pretrain import COURSE_TAG, record_course_changes
    from llamaray.train.course import relaunch_changes, trajectory

    run(corpus, tmp_path, "train.stop_at_step=3")
    run_dir = tmp_path / "checkpoints" / "inproc"
    saved = json.loads((run_dir / step_dir_name(3) / TRAIN_STATE).read_text())
    assert (saved["extra"]["course"]["train.steps"], saved["extra"]["course"]["train.seed"]) \
        == (str(STEPS), "0")  # fmt: skip

    # The driver's check, before any cluster work: every change named; layout and run
    # control (workers, logging, checkpoint cadence) are not changes of course.
    changed = run_config(tmp_path, "train.seed=1", f"train.steps={STEPS + 2}",
                         "train.log_every=2", "train.checkpoint_every=3")  # fmt: skip
    with pytest.raises(ConfigError) as refused:
        relaunch_changes(changed, trajectory(changed, None))
    message = str(refused.value)
    assert "train.seed: 0 -> 1" in message and f"train.steps: {STEPS} -> {STEPS + 2}" in message
    assert "log_every" not in message and "checkpoint_every" not in message
    assert "step 3" in message  # which checkpoint's course it compared with
    # A corpus with other contents is another course, wherever it is stored.
    same = run_config(tmp_path)
    with pytest.raises(ConfigError, match=r"data\.corpus: null -> 0123abcd"):
        relaunch_changes(same, trajectory(same, "0123abcd"))
    assert relaunch_changes(same, trajectory(same, None)) == []

    # The workers' own check (torchrun has no driver): refused before any step.
    with pytest.raises(ConfigError, match=r"train\.seed: 0 -> 1"):
        run(corpus, tmp_path, "train.seed=1")
    assert [p.name for p in step_dirs(run_dir)] == ["step-00000003", "step-00000002"]

    # On purpose: listed in train.allow_changes, the run goes on and says so.
    on_purpose = (f"train.steps={STEPS + 2}", "train.allow_changes=[train.steps]")
    allowed = run_config(tmp_path, *on_purpose)
    changes = relaunch_changes(allowed, trajectory(allowed, None))
    assert changes == [f"train.steps: {STEPS} -> {STEPS + 2}"]
    result, launcher = run(corpus, tmp_path, *on_purpose)
    assert result.step == STEPS + 2 and sorted(by_step(launcher.reports))[0] == 4
    # ... and the new course is the one later launches are held to.
    assert relaunch_changes(run_config(tmp_path, f"train.steps={STEPS + 2}"), trajectory(
        run_config(tmp_path, f"train.steps={STEPS + 2}"), None)) == []  # fmt: skip
    typo = run_config(tmp_path, f"train.steps={STEPS + 2}", "train.allow_changes=[train.log_every]")
    with pytest.raises(ConfigError, match=r"train\.allow_changes: train\.log_every not a"):
        relaunch_changes(typo, trajectory(typo, None))

    # Recorded in the run's MLflow run.
    from llamaray import tracking

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id, _ = tracking.open_run(uri, "course", "inproc")
    record_course_changes(uri, run_id, changes)
    record_course_changes(uri, run_id, ["train.seed: 0 -> 1"])
    tags = tracking.client(uri).get_run(run_id).data.tags
    assert tags[COURSE_TAG] == f"train.steps: {STEPS} -> {STEPS + 2}; train.seed: 0 -> 1"


def test_more_skipped_steps_than_allowed_stop_the_run(corpus, tmp_path):
    """train.max_skipped_steps=1: the second skipped step ends the run there, saying why."""
    result, launcher = run(
        corpus, tmp_path, "faults.nan_at_steps=[2,4]", "train.max_skipped_steps=1"
    )
    assert (result.step, result.skipped_steps) == (4, 2)
    assert "2 steps skipped for non-finite values" in result.stopped
    assert "train.max_skipped_steps=1" in result.stopped and "at step 4" in result.stopped
    assert sorted(by_step(launcher.reports)) == [1, 2, 3, 4]  # nothing trained after it


# ---------------------------------------------- checkpoints written in the background


class HeldWrites(LocalLauncher):
    """A LocalLauncher whose checkpoint writes wait for `release` (set by the test) before
    they start: the writes the training step must not wait for."""

    def __init__(self, root):
        super().__init__(root)
        self.release = threading.Event()
        inner = self.checkpoints.write

        def held(staged, process_group=None):
            if not self.release.wait(timeout=60):
                raise TimeoutError("the write was never released")
            return inner(staged, process_group)

        self.checkpoints.write = held


def test_a_background_checkpoint_holds_its_step_while_training_goes_on(tmp_path):
    model, optimizer = build(seed=0)
    train(model, optimizer, [1, 2])
    at_step_2 = params(model), optim_state(model, optimizer)
    launcher = HeldWrites(tmp_path)
    state = TrainState(step=2, world_size=1, rows_per_step=4)

    launcher.save_checkpoint(model, optimizer, state, {}, background=True)
    # Returned with the write not even started: the step was blocked only for the staging.
    assert launcher.writer.busy and step_dirs(tmp_path) == []
    train(model, optimizer, [3, 4])  # the live state moves on
    state.step = 4  # and so does the train state the caller holds
    assert differs(params(model), at_step_2[0])
    launcher.release.set()
    launcher.wait_for_checkpoints()

    assert [p.name for p in step_dirs(tmp_path)] == ["step-00000002"]
    assert verify_checkpoint(tmp_path / "step-00000002").step == 2
    fresh, fresh_optimizer = build(seed=1)
    load_checkpoint(tmp_path / "step-00000002", fresh, fresh_optimizer)
    assert_same(params(fresh), at_step_2[0])
    assert_same(optim_state(fresh, fresh_optimizer), at_step_2[1])


def test_a_failed_background_write_keeps_the_last_good_checkpoint_and_fails_the_run(
    corpus, tmp_path, monkeypatch
):
    real_write = checkpoint_module.write_checkpoint

    def disk_full_at_step_4(directory, staged, process_group=None):
        if staged.train_state["step"] == 4:
            Path(directory).mkdir(parents=True, exist_ok=True)
            (Path(directory) / "__0_0.distcp").write_bytes(b"half a shard")
            raise OSError(28, "No space left on device")
        return real_write(directory, staged, process_group)

    monkeypatch.setattr(checkpoint_module, "write_checkpoint", disk_full_at_step_4)
    with pytest.raises(OSError, match="No space left"):
        run(corpus, tmp_path)  # checkpoints every 2 steps: the write of step 4 fails
    root = Path(run_config(tmp_path).run_uri)
    assert [p.name for p in step_dirs(root)] == ["step-00000002"]
    assert verify_checkpoint(root / "step-00000002").step == 2


class CountingLauncher(LocalLauncher):
    """Counts the collective calls (reports, checkpoints) against the logged steps."""

    def __init__(self, root, keep):
        super().__init__(root, keep)
        self.collective: list[tuple[str, int]] = []

    def save_checkpoint(self, model, optimizer, state, metrics, background=False):
        self.collective.append(("checkpoint", metrics["step"]))
        super().save_checkpoint(model, optimizer, state, metrics, background)

    def report(self, metrics):
        self.collective.append(("report", metrics["step"]))
        super().report(metrics)


def test_only_checkpoints_and_validations_wait_on_other_ranks(corpus, tmp_path):
    cfg = run_config(tmp_path, "train.eval_every=3", "train.checkpoint_every=4")
    launcher = CountingLauncher(cfg.run_uri, cfg.train.keep_checkpoints)
    spec = WorkerSpec(config=cfg.model_dump(), corpus_dir=str(corpus), run_dir=str(tmp_path))
    run_worker(spec, launcher)
    assert sorted(by_step(launcher.reports)) == list(range(1, STEPS + 1))  # logged: every step
    # Collective: the start (the step resumed from), the validation at 3 for Tune, the
    # checkpoints (4, and the last).
    assert launcher.collective == [
        ("report", 0), ("report", 3), ("checkpoint", 4), ("checkpoint", 6)
    ]  # fmt: skip
    assert "val_loss" in by_step(launcher.reports)[3]


def test_nan_step_is_skipped_and_parameters_stay_finite(corpus, uninterrupted, tmp_path):
    result, launcher = run(corpus, tmp_path, "faults.nan_at_steps=[2]")
    assert (result.step, result.skipped_steps, result.stopped) == (STEPS, 1, None)
    reports = by_step(launcher.reports)
    assert math.isnan(reports[2]["loss"])
    assert all(math.isfinite(reports[s]["loss"]) for s in (1, 3, 4, 5, 6))
    assert reports[6]["skipped_steps"] == 1
    reference = by_step(uninterrupted[1].reports)
    assert reports[1]["loss"] == reference[1]["loss"]
    assert reports[3]["loss"] != reference[3]["loss"]  # step 2's update really was dropped

    # The final checkpoint: finite weights, and Adam stepped 5 times, not 6.
    model, optimizer = build(seed=1)
    state = restore_latest(
        LocalCheckpoints(tmp_path / "checkpoints" / "inproc").candidates(), model, optimizer, print
    )
    assert (state.step, state.skipped_steps) == (STEPS, 1)
    assert all(torch.isfinite(p).all() for p in params(model).values())
    steps = {float(s["step"]) for s in optim_state(model, optimizer).values()}
    assert steps == {STEPS - 1.0}


# ------------------------------------------------------------- checkpoints never run code


class _RunsCode:
    """Unpickling this writes `marker`: what a tampered checkpoint could do to its reader."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('ran')",)


def _tamper_metadata(directory: Path, marker: Path) -> None:
    """Hide a `_RunsCode` in the checkpoint's DCP metadata and recompute the integrity
    record, as someone who can write the folder could."""
    import pickle

    metadata = pickle.loads((directory / ".metadata").read_bytes())  # our own, trusted
    metadata.planner_data = _RunsCode(marker)
    (directory / ".metadata").write_bytes(pickle.dumps(metadata))
    record_file = directory / "integrity-0.json"
    record = json.loads(record_file.read_text())
    record[".metadata"] = {
        "size": (directory / ".metadata").stat().st_size,
        "sha256": hashlib.sha256((directory / ".metadata").read_bytes()).hexdigest(),
    }
    record_file.write_text(json.dumps(record))


@pytest.fixture
def tampered(saved, tmp_path) -> tuple[Path, Path]:
    """(a run folder whose only checkpoint has code in its metadata, the marker it writes)"""
    run = tmp_path / "storage" / "tampered-run"
    step = Path(shutil.copytree(saved["dir"], run / step_dir_name(2)))
    marker = tmp_path / "code-ran"
    _tamper_metadata(step, marker)
    return step, marker


def test_a_tampered_metadata_file_would_run_code_under_plain_pickle(tampered, tmp_path):
    # The control for the tests below: the file really is an attack, and it passes the
    # size and digest checks, so only how it is unpickled stands in its way.
    import pickle

    step, marker = tampered
    pickle.loads((step / ".metadata").read_bytes())
    assert marker.read_text() == "ran"


def test_resume_refuses_a_checkpoint_whose_metadata_runs_code(tampered):
    step, marker = tampered
    model, optimizer = build(seed=1)
    with pytest.raises(CheckpointError) as refused:
        restore_latest([lambda: step], model, optimizer, lambda _: None)
    assert ".metadata: not DCP metadata" in str(refused.value)
    assert "builtins.exec" in str(refused.value)
    # Loading it without verifying first is refused too (the reader itself is restricted;
    # DCP raises its CheckpointException, a BaseException).
    with pytest.raises(BaseException, match=r"builtins\.exec"):
        load_checkpoint(step, model, optimizer)
    assert not marker.exists()


def test_eval_and_finetune_refuse_a_checkpoint_whose_metadata_runs_code(tampered):
    from llamaray.config import ConfigError
    from llamaray.eval.checkpoint import load_dcp_model, run_target
    from llamaray.finetune.base import FinetuneBase, base_shapes, resolve_base
    from llamaray.train.safe_dcp import UnsafeCheckpoint

    step, marker = tampered
    storage_root = step.parent.parent
    cfg = load_config(None, ["model.preset=debug", f"storage={storage_root}",
                             "name=tampered-run"])  # fmt: skip
    with pytest.raises(CheckpointError, match=r"builtins\.exec"):
        run_target(cfg)  # `llamaray eval --run tampered-run`
    with pytest.raises(UnsafeCheckpoint, match=r"builtins\.exec"):
        load_dcp_model(step, cfg)  # a step folder named directly
    finetune = load_config(None, [
        "model.preset=debug", f"storage={storage_root}", "name=ft",
        "finetune.train_file=x.jsonl", f"finetune.base={step}", "optimizer.lr=1e-5",
    ])  # fmt: skip
    with pytest.raises(ConfigError, match=r"builtins\.exec"):
        resolve_base(finetune)  # the finetune driver, before any Ray work
    with pytest.raises(UnsafeCheckpoint, match=r"builtins\.exec"):
        base_shapes(FinetuneBase("checkpoint", str(step), "tampered-run", 2), VOCAB)
    assert not marker.exists()


def test_metadata_may_name_only_dcp_data_and_files_inside_the_checkpoint(saved):
    import pickle

    from torch.distributed.checkpoint.filesystem import FileSystemWriter

    from llamaray.train.safe_dcp import UnsafeCheckpoint, load_metadata

    data = (saved["dir"] / ".metadata").read_bytes()
    assert load_metadata(data).state_dict_metadata  # the real thing loads
    # Classes the DCP modules import or define for other uses are not metadata.
    for other in (FileSystemWriter, torch.Tensor, Path):
        with pytest.raises(UnsafeCheckpoint, match="never holds"):
            load_metadata(pickle.dumps(other))
    # Nor may an item be read from outside the checkpoint's folder.
    for outside in ("../other-run/__0_0.distcp", "/etc/passwd"):
        metadata = pickle.loads(data)
        info = next(iter(metadata.storage_data.values()))
        info.relative_path = outside
        with pytest.raises(UnsafeCheckpoint, match="outside it"):
            load_metadata(pickle.dumps(metadata))


def test_byte_entries_are_read_without_running_code(tmp_path):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

    from llamaray.train.safe_dcp import SafeFileSystemReader, SafeLoadPlanner

    marker = tmp_path / "code-ran"
    dcp.save({"extra": _RunsCode(marker)}, checkpoint_id=str(tmp_path / "ckpt"))
    with pytest.raises(BaseException, match=r"Weights only load failed|Unsupported global"):
        dcp.load({"extra": None}, storage_reader=SafeFileSystemReader(str(tmp_path / "ckpt")),
                 planner=SafeLoadPlanner())  # fmt: skip
    assert not marker.exists()
    # torch's default planner would have run it (the control).
    dcp.load({"extra": None}, storage_reader=SafeFileSystemReader(str(tmp_path / "ckpt")),
             planner=DefaultLoadPlanner())  # fmt: skip
    assert marker.read_text() == "ran"


# ------------------------------------------------------------------- resuming from S3


def test_resume_from_s3_reads_in_place_each_byte_once_through_transient_errors(
    saved, s3_client, tmp_path, monkeypatch
):
    """A checkpoint in S3 is verified and loaded without a download: nothing lands on the
    disk, the shard's bytes are fetched once, and throttled reads are retried."""
    import tempfile

    from llamaray import storage
    from s3_faults import FaultyS3

    s3_client.create_bucket(Bucket="resume")
    uri = "s3://resume/run/" + step_dir_name(2)
    storage.upload(saved["dir"], uri)
    proxy = FaultyS3(s3_client.meta.endpoint_url)
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))  # where a download would go
    (tmp_path / "tmp").mkdir()
    tempfile.tempdir = None  # re-read TMPDIR
    # The first GET of every object is throttled, as S3 does under load.
    proxy.reset(lambda method, key, query, n: (503, "SlowDown", False)
                if method == "GET" and n == 1 else None)  # fmt: skip
    try:
        model, optimizer = build(seed=1)
        state = restore_latest([lambda: uri], model, optimizer, lambda _: None)
    finally:
        proxy.close()
        tempfile.tempdir = None
    assert state == saved["state"]
    assert_same(params(model), saved["params"])
    assert_same(optim_state(model, optimizer), saved["optim"])
    assert list((tmp_path / "tmp").iterdir()) == []
    shard = "/resume/run/step-00000002/__0_0.distcp"
    assert proxy.faults(503, "GET")[shard] == 1  # throttled, and retried
    assert proxy.bytes_read[shard] == (saved["dir"] / "__0_0.distcp").stat().st_size
