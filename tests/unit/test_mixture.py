from __future__ import annotations

import json
import math
from itertools import islice
from pathlib import Path

import numpy as np
import pytest

from llamaray.data.mixture import (
    MixturePlan,
    mixed_order,
    mixture_weights,
    plan_mixture,
    source_draws,
    worker_rows,
)
from llamaray.data.sources import PAPER_MIXTURE

SEQ_LEN = 8


def disk_scaled_plan(seed: int = 0, budget_rows: int = 500_000) -> MixturePlan:
    """Sources sized like the paper's disk sizes (100 rows a GB); at 500k rows the small
    sources need more than one epoch and GitHub less than one."""
    rows = {name: int(m.disk_gb * 100) for name, m in PAPER_MIXTURE.items()}
    return plan_mixture(rows, token_budget=budget_rows * SEQ_LEN, seq_len=SEQ_LEN, seed=seed)


@pytest.fixture(scope="module")
def plan() -> MixturePlan:
    return disk_scaled_plan()


@pytest.fixture(scope="module")
def order(plan) -> np.ndarray:
    return mixed_order(plan)


def test_budget_rows_count_seq_len_tokens_and_total_is_exact():
    rows = {"a": 10, "b": 10, "c": 10}
    p = plan_mixture(
        rows, token_budget=100 * 16 + 15, seq_len=16, proportions=dict.fromkeys(rows, 1)
    )
    assert p.total_rows == 100
    assert p.training_tokens == 1600
    # 100 / 3 each: largest remainder hands the one leftover row to the first source.
    assert [s.rows_drawn for s in p.sources] == [34, 33, 33]


def test_paper_mixture_proportions_and_epochs(plan):
    assert plan.total_rows == 500_000
    assert sum(s.rows_drawn for s in plan.sources) == plan.total_rows
    assert plan.source_names == tuple(PAPER_MIXTURE)
    for s in plan.sources:
        target = PAPER_MIXTURE[s.name].proportion
        assert s.target_proportion == pytest.approx(target, abs=1e-12)
        assert abs(s.realized_proportion - target) <= 0.01 * target, s.name
        assert s.epochs == pytest.approx(s.rows_drawn / s.rows_available)
    assert plan.source("github").epochs < 1
    for name in ("wikipedia", "books", "arxiv", "stackexchange"):
        assert plan.source(name).epochs > 1, name


def test_paper_epochs_are_reproduced_from_budget_share_over_size():
    budget_rows = 1_000_000
    rows = {name: round(m.proportion * budget_rows / m.epochs) for name, m in PAPER_MIXTURE.items()}
    p = plan_mixture(rows, token_budget=budget_rows * SEQ_LEN, seq_len=SEQ_LEN)
    for s in p.sources:
        assert abs(s.epochs - PAPER_MIXTURE[s.name].epochs) < 0.01, s.name
    assert abs(p.source("wikipedia").epochs - 2.45) < 0.01
    assert abs(p.source("github").epochs - 0.64) < 0.01


def test_order_matches_plan_and_row_indices_are_valid(plan, order):
    assert order.shape == (plan.total_rows, 2)
    assert order.dtype == np.int64
    counts = np.bincount(order[:, 0], minlength=len(plan.sources))
    assert counts.tolist() == [s.rows_drawn for s in plan.sources]
    available = np.array([s.rows_available for s in plan.sources])
    assert (order[:, 1] >= 0).all()
    assert (order[:, 1] < available[order[:, 0]]).all()


def test_epochs_are_permutations_and_the_partial_epoch_has_no_duplicates(plan, order):
    for index, s in enumerate(plan.sources):
        draws = order[order[:, 0] == index, 1]
        # The stream keeps each source's draw order.
        np.testing.assert_array_equal(draws, source_draws(plan, s.name))
        full, part = divmod(s.rows_drawn, s.rows_available)
        for epoch in range(full):
            chunk = draws[epoch * s.rows_available : (epoch + 1) * s.rows_available]
            np.testing.assert_array_equal(np.sort(chunk), np.arange(s.rows_available))
        tail = draws[full * s.rows_available :]
        assert len(tail) == part
        assert len(np.unique(tail)) == part, s.name
    # Each epoch is a fresh permutation, not the first one repeated.
    wiki = plan.source("wikipedia")
    draws = source_draws(plan, "wikipedia")
    n = wiki.rows_available
    assert not np.array_equal(draws[:n], draws[n : 2 * n])
    assert not np.array_equal(draws[: len(draws) - 2 * n], draws[2 * n :])


def test_deterministic_by_seed(plan, order):
    np.testing.assert_array_equal(mixed_order(disk_scaled_plan(seed=0)), order)
    other = mixed_order(disk_scaled_plan(seed=1))
    assert other.shape == order.shape
    assert not np.array_equal(other[:, 0], order[:, 0])
    assert not np.array_equal(other[:, 1], order[:, 1])


def test_every_window_of_1000_rows_is_close_to_the_mixture(plan, order):
    window = 1000
    for index, s in enumerate(plan.sources):
        hits = np.concatenate([[0], np.cumsum(order[:, 0] == index)])
        per_window = (hits[window:] - hits[:-window]) / window
        worst = np.abs(per_window - s.target_proportion).max()
        assert worst < 0.01, (s.name, worst)


def test_a_plain_shuffle_would_fail_the_window_check(plan, order):
    """The window bound above is tight enough to tell even spacing from a shuffle."""
    shuffled = order[np.random.default_rng(0).permutation(len(order))]
    cc = plan.source_names.index("commoncrawl")
    hits = np.concatenate([[0], np.cumsum(shuffled[:, 0] == cc)])
    per_window = (hits[1000:] - hits[:-1000]) / 1000
    assert np.abs(per_window - plan.source("commoncrawl").target_proportion).max() >= 0.01


@pytest.mark.parametrize("world_size", [1, 4])
def test_resume_sees_exactly_the_uninterrupted_rows(order, world_size):
    rows_per_step, k = 64, 37
    n_steps = len(order) // rows_per_step
    for rank in range(world_size):
        full = list(worker_rows(order, rank, world_size, rows_per_step))
        assert len(full) == n_steps
        head = list(islice(worker_rows(order, rank, world_size, rows_per_step), k))
        tail = list(worker_rows(order, rank, world_size, rows_per_step, start_step=k))
        assert len(head) + len(tail) == n_steps
        np.testing.assert_array_equal(np.concatenate(head + tail), np.concatenate(full))


def test_ranks_cover_each_global_batch_exactly_once():
    order = np.stack([np.zeros(1000, dtype=np.int64), np.arange(1000)], axis=1)
    world_size, rows_per_step = 4, 32
    per_rank = [list(worker_rows(order, r, world_size, rows_per_step)) for r in range(world_size)]
    n_steps = 1000 // rows_per_step
    assert all(len(steps) == n_steps for steps in per_rank)
    for step in range(n_steps):
        batch = np.empty((rows_per_step, 2), dtype=np.int64)
        for rank in range(world_size):
            part = per_rank[rank][step]
            assert part.shape == (rows_per_step // world_size, 2)
            batch[rank::world_size] = part
        np.testing.assert_array_equal(
            batch, order[step * rows_per_step : (step + 1) * rows_per_step]
        )
    # The final partial batch (1000 % 32 = 8 rows) is dropped.
    seen = np.concatenate([np.concatenate(steps) for steps in per_rank])[:, 1]
    assert sorted(seen.tolist()) == list(range(n_steps * rows_per_step))


def test_default_proportions_renormalize_over_present_sources():
    p = plan_mixture({"wikipedia": 100, "books": 100}, token_budget=1000 * SEQ_LEN, seq_len=SEQ_LEN)
    assert [s.target_proportion for s in p.sources] == pytest.approx([0.5, 0.5])
    assert [s.rows_drawn for s in p.sources] == [500, 500]
    assert any("renormalized" in note and "commoncrawl" in note for note in p.notes)
    d = p.to_dict()
    assert d["total_rows"] == 1000 and d["seed"] == 0
    assert d["sources"][0]["name"] == "wikipedia"
    assert d["sources"][0]["epochs"] == pytest.approx(5.0)


def test_sources_with_zero_proportion_are_not_drawn():
    p = plan_mixture({"a": 10, "b": 10}, token_budget=50, seq_len=1, proportions={"a": 1.0}, seed=3)
    assert [s.rows_drawn for s in p.sources] == [50, 0]
    assert (mixed_order(p)[:, 0] == 0).all()


@pytest.mark.parametrize(
    ("rows", "proportions", "match"),
    [
        ({"c4": 10, "github": 0}, None, "'github'"),
        ({"a": 10, "b": 10}, {"a": 1.0, "b": -0.5}, r"proportions\['b'\]"),
        ({"a": 10, "b": 10}, {"a": float("nan")}, r"proportions\['a'\]"),
        ({"a": 10, "b": 10}, {"a": 0.0, "b": 0.0}, "proportions must sum"),
        ({"a": 10}, {"a": 1.0, "zzz": 1.0}, "zzz"),
        ({"a": 10}, None, "proportions"),
        ({"a": -1}, {"a": 1.0}, r"rows_per_source\['a'\]"),
    ],
)
def test_plan_errors_name_the_source_or_field(rows, proportions, match):
    with pytest.raises(ValueError, match=match):
        plan_mixture(rows, token_budget=1000, seq_len=8, proportions=proportions)


def test_plan_errors_on_budget_and_seq_len():
    with pytest.raises(ValueError, match="token_budget"):
        plan_mixture({"c4": 10}, token_budget=7, seq_len=8)
    with pytest.raises(ValueError, match="seq_len"):
        plan_mixture({"c4": 10}, token_budget=7, seq_len=0)
    with pytest.raises(ValueError, match="seed"):
        plan_mixture({"c4": 10}, token_budget=80, seq_len=8, seed=-1)


def test_worker_rows_errors_name_the_argument():
    order = np.zeros((100, 2), dtype=np.int64)
    with pytest.raises(ValueError, match="rows_per_step"):
        worker_rows(order, 0, 4, 10)
    with pytest.raises(ValueError, match="rank"):
        worker_rows(order, 4, 4, 8)
    with pytest.raises(ValueError, match="world_size"):
        worker_rows(order, 0, 0, 8)
    with pytest.raises(ValueError, match="start_step"):
        worker_rows(order, 0, 4, 8, start_step=13)
    assert list(worker_rows(order, 0, 4, 8, start_step=12)) == []


# ------------------------------------------- the weights: one rule, planned once, streamed


def test_weights_default_to_the_paper_and_leave_other_sources_out_with_a_warning():
    weights, warnings = mixture_weights(None, {"c4": 10, "github": 5, "prose": 7})
    assert weights == {"c4": PAPER_MIXTURE["c4"].proportion,
                       "github": PAPER_MIXTURE["github"].proportion, "prose": 0.0}  # fmt: skip
    assert len(warnings) == 1 and "prose" in warnings[0] and "data.proportions" in warnings[0]


def test_weights_of_a_corpus_outside_the_paper_follow_its_rows():
    assert mixture_weights(None, {"prose": 30, "code": 10}) == ({"prose": 30.0, "code": 10.0}, [])


def test_a_paper_source_with_no_rows_is_left_out():
    weights, warnings = mixture_weights(None, {"c4": 10, "arxiv": 0})
    assert weights == {"c4": PAPER_MIXTURE["c4"].proportion, "arxiv": 0.0}
    assert warnings == ["source arxiv has no training rows; left out of the mixture"]


def test_configured_weights_are_kept_and_an_empty_weighted_source_is_an_error():
    assert mixture_weights({"prose": 2}, {"prose": 5, "c4": 3}) == ({"prose": 2.0, "c4": 0.0}, [])
    with pytest.raises(ValueError, match=r"data\.proportions: source\(s\) c4 have no training"):
        mixture_weights({"c4": 1.0}, {"prose": 5, "c4": 0})
    with pytest.raises(ValueError, match="no training rows in any source"):
        mixture_weights(None, {"prose": 0})


CORPUS_SEQ = 16
VOCAB = 512
STEPS = 4


def write_corpus(root: Path, train_rows: dict[str, int], tokenizer: bool = False) -> Path:
    """A prepared corpus (prepare.py's layout, tokenizer path relative to the corpus) of
    random tokens; with a real SentencePiece tokenizer of VOCAB pieces if `tokenizer`."""
    from test_feed import write_shard

    from llamaray.data.sample_text import write_stdlib_sample
    from llamaray.tokenizer import train_tokenizer

    if tokenizer:
        text = list(write_stdlib_sample(root / "text", 200_000).values())
        train_tokenizer(text, root / "tokenizer", vocab_size=VOCAB)
    rng = np.random.default_rng(0)
    width = CORPUS_SEQ + 1
    sources = {}
    for name, n_train in train_rows.items():
        splits = {}
        for split, n in (("train", n_train), ("validation", 8)):
            rel = f"shards/source={name}/split={split}/part-0.parquet"
            write_shard(root / rel, rng.integers(0, VOCAB, (n, width)), False, width)
            splits[split] = {"documents": n, "tokens": n * width, "rows": n,
                             "packed_tokens": n * width, "files": [rel]}  # fmt: skip
        sources[name] = {"paths": [], "kept": n_train, "dropped": {}, "documents_in": n_train,
                         "splits": splits}  # fmt: skip
    manifest = {
        "name": "mixture", "config": {}, "config_hash": "0",
        "tokenizer": {"path": "tokenizer/tokenizer.model", "vocab_size": VOCAB},
        "seq_len": CORPUS_SEQ, "row_tokens": width, "sources": sources,
        "skipped_steps": {}, "quarantine": "quarantine.jsonl",
    }  # fmt: skip
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def run_config(root: Path, *overrides: str):
    from llamaray.config import load_config

    return load_config(
        None,
        [
            "name=mixture",
            f"output_dir={root}",
            f"storage={root / 'storage'}",
            "model.preset=debug",
            "tracking.enabled=false",
            "data.eval_rows=4",
            f"train.steps={STEPS}",
            f"train.seq_len={CORPUS_SEQ}",
            f"train.batch_tokens={4 * CORPUS_SEQ}",
            "train.micro_batch_size=2",
            "train.num_workers=1",
            "train.device=cpu",
            "train.checkpoint_every=2",
            *overrides,
        ],
    )


@pytest.fixture(scope="module")
def prose_corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("prose"), {"prose": 40}, tokenizer=True)


def test_a_corpus_outside_the_paper_trains_end_to_end(prose_corpus, tmp_path):
    """The driver weighs a prose-only corpus by rows; the worker must train on that plan
    (it used to replan from the raw data.proportions and fail: no paper source)."""
    import torch

    from llamaray.data.packed_corpus import CorpusRows
    from llamaray.model import Llama
    from llamaray.orchestrate.pretrain import plan_data
    from llamaray.storage import local_copy
    from llamaray.train.launcher import LocalLauncher, ensure_process_group
    from llamaray.train.outputs import model_uri
    from llamaray.train.worker import WorkerSpec, run_worker

    ensure_process_group()  # one gloo rank, never destroyed (see tests/unit/test_checkpoint.py)
    cfg = run_config(tmp_path)
    assert cfg.data.proportions is None
    weights, plan = plan_data(cfg, CorpusRows.open(str(prose_corpus)).manifest)
    assert weights == {"prose": 40.0} and plan.source("prose").rows_drawn == plan.total_rows
    spec = WorkerSpec(cfg.model_dump(), str(prose_corpus), cfg.run_uri, proportions=weights)
    result = run_worker(spec, LocalLauncher(tmp_path / "checkpoints"))
    assert (result.step, result.stopped) == (STEPS, None)
    assert math.isfinite(result.last["loss"]) and math.isfinite(result.last["val_loss"])

    # The export is in the run's storage, with the corpus tokenizer (a relative path) beside it.
    exported = model_uri(cfg.run_uri)
    assert exported == str(tmp_path / "storage" / "mixture" / "hf")
    with local_copy(exported) as folder:
        assert (Path(folder) / "tokenizer.model").read_bytes() == (
            prose_corpus / "tokenizer" / "tokenizer.model"
        ).read_bytes()
        model = Llama.from_pretrained(folder)
    assert model.args.vocab_size == VOCAB
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert not (tmp_path / "mixture").exists()  # nothing under output_dir/<name>


@pytest.fixture(scope="module")
def mixed_corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("mixed"), {"c4": 30, "prose": 50, "books": 20})


@pytest.mark.parametrize("proportions", [None, {"c4": 1.0, "prose": 3.0}, {"c4": 1.0}])
def test_the_worker_streams_the_plan_the_driver_logged(proportions, mixed_corpus):
    from llamaray.data.packed_corpus import CorpusRows
    from llamaray.orchestrate.pretrain import plan_data
    from llamaray.train.batches import CorpusFeed

    corpus = mixed_corpus
    overrides = [f"data.proportions={json.dumps(proportions)}"] if proportions else []
    cfg = run_config(corpus, *overrides)
    weights, plan = plan_data(cfg, CorpusRows.open(str(corpus)).manifest)
    for given in (weights, None):  # from the driver, or the same rule with no driver
        feed = CorpusFeed(cfg, str(corpus), given)
        assert feed.stream.plan == plan
        assert np.array_equal(feed.stream.order, mixed_order(plan))
    drawn = {s.name: s.rows_drawn for s in plan.sources}
    if proportions is None:
        assert drawn["prose"] == 0 and drawn["c4"] > 0 and drawn["books"] > 0
    else:
        assert all(drawn[n] == 0 for n in drawn if n not in proportions)
