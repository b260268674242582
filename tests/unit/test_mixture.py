from __future__ import annotations

import json
import math
from itertools import islice
from pathlib import Path

import numpy as np
import pytest

from llamaray.data.mixture import (
    EpochPermutation,
    MixturePlan,
    draw_rows,
    drawn_before,
    global_batch,
    mixture_weights,
    plan_mixture,
    steps_of,
    worker_steps,
)
from llamaray.data.sources import PAPER_MIXTURE

SEQ_LEN = 8
ROWS_PER_STEP = 64


def disk_scaled_plan(
    seed: int = 0, budget_rows: int = 500_000, rows_per_gb: int = 100
) -> MixturePlan:
    """Sources sized like the paper's disk sizes (100 rows a GB); at 500k rows the small
    sources need more than one epoch and GitHub less than one (so at 100k rows of 20 a GB)."""
    rows = {name: int(m.disk_gb * rows_per_gb) for name, m in PAPER_MIXTURE.items()}
    return plan_mixture(rows, token_budget=budget_rows * SEQ_LEN, seq_len=SEQ_LEN, seed=seed)


def stream_of(plan: MixturePlan, rows_per_step: int = ROWS_PER_STEP) -> np.ndarray:
    """The whole stream, step after step: (steps * rows_per_step, 2) pairs."""
    return np.concatenate(list(worker_steps(plan, 0, 1, rows_per_step)))


def merged_order_oracle(plan: MixturePlan) -> np.ndarray:
    """The source index of every row of the stream, by sorting every draw's key
    `(k + 1/2) / rows_drawn` as an exact fraction (ties by source index): what
    `drawn_before` counts without building it."""
    from fractions import Fraction

    keys = sorted(
        (Fraction(2 * k + 1, 2 * s.rows_drawn), index)
        for index, s in enumerate(plan.sources)
        for k in range(s.rows_drawn)
    )
    return np.array([index for _key, index in keys], dtype=np.int64)


@pytest.fixture(scope="module")
def plan() -> MixturePlan:
    return disk_scaled_plan()


@pytest.fixture(scope="module")
def streamed() -> MixturePlan:
    """The plan whose whole stream the tests below walk (100k rows: 1562 steps)."""
    return disk_scaled_plan(budget_rows=100_000, rows_per_gb=20)


@pytest.fixture(scope="module")
def order(streamed) -> np.ndarray:
    return stream_of(streamed)


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


def test_stream_matches_plan_and_row_indices_are_valid(streamed, order):
    plan = streamed
    # 100_000 = 1562 steps of 64 and 32 rows dropped.
    assert order.shape == (steps_of(plan, ROWS_PER_STEP) * ROWS_PER_STEP, 2) == (99_968, 2)
    assert order.dtype == np.int64
    counts = np.bincount(order[:, 0], minlength=len(plan.sources))
    want = drawn_before(plan, len(order))
    assert counts.tolist() == list(want)
    full = [s.rows_drawn for s in plan.sources]
    assert sum(want) == len(order) and all(
        0 <= f - w <= 32 for f, w in zip(full, want, strict=True)
    )
    available = np.array([s.rows_available for s in plan.sources])
    assert (order[:, 1] >= 0).all()
    assert (order[:, 1] < available[order[:, 0]]).all()


def test_drawn_before_counts_the_merged_order_exactly():
    """Against the oracle that sorts every key, at every position, for random small plans
    (1 to 7 sources, some with proportion 0, budgets under and over the sources' rows)."""
    rng = np.random.default_rng(0)
    for _ in range(40):
        rows = {f"s{i}": int(rng.integers(1, 40)) for i in range(int(rng.integers(1, 8)))}
        weights = {name: float(rng.choice([0.0, rng.random()])) for name in rows}
        weights[next(iter(rows))] = 1.0
        p = plan_mixture(rows, int(rng.integers(1, 300)), 1, weights, seed=1)
        oracle = merged_order_oracle(p)
        for position in range(p.total_rows + 1):
            want = np.bincount(oracle[:position], minlength=len(p.sources))
            assert list(drawn_before(p, position)) == want.tolist(), (rows, weights, position)


def test_each_source_keeps_its_draw_order_and_epochs_are_permutations(streamed, order):
    plan = streamed
    assert plan.source("github").epochs < 1 < plan.source("wikipedia").epochs
    for index, s in enumerate(plan.sources):
        draws = order[order[:, 0] == index, 1]
        # The stream holds the source's draws 0, 1, 2, ... in order across the steps.
        np.testing.assert_array_equal(draws, draw_rows(plan, index, 0, len(draws)))
        full, part = divmod(s.rows_drawn, s.rows_available)
        for epoch in range(full):
            chunk = draw_rows(plan, index, epoch * s.rows_available, (epoch + 1) * s.rows_available)
            np.testing.assert_array_equal(np.sort(chunk), np.arange(s.rows_available))
        tail = draw_rows(plan, index, full * s.rows_available, s.rows_drawn)
        assert len(tail) == part
        assert len(np.unique(tail)) == part, s.name
    # Each epoch is a fresh permutation, not the first one repeated.
    wiki = plan.source_names.index("wikipedia")
    n = plan.sources[wiki].rows_available
    draws = draw_rows(plan, wiki, 0, plan.sources[wiki].rows_drawn)
    assert not np.array_equal(draws[:n], draws[n : 2 * n])
    assert not np.array_equal(draws[: len(draws) - 2 * n], draws[2 * n :])


@pytest.mark.parametrize("n", [1, 2, 3, 5, 16, 17, 255, 256, 257, 1000, 4099])
def test_epoch_permutation_is_a_bijection_for_any_size(n):
    perm = EpochPermutation(n, seed=7, name="books")
    epochs = np.repeat(np.arange(4), n)
    rows = perm(epochs, np.tile(np.arange(n), 4)).reshape(4, n)
    for epoch in range(4):
        np.testing.assert_array_equal(np.sort(rows[epoch]), np.arange(n))
    if n >= 16:  # shuffled, and each epoch differently
        assert not np.array_equal(rows[0], np.arange(n))
        assert not np.array_equal(rows[0], rows[1])
    # Random access: any positions, in any order, give the same rows.
    picks = np.random.default_rng(n).integers(0, n, 50)
    np.testing.assert_array_equal(perm(np.full(50, 2), picks), rows[2][picks])
    # Keyed by seed and name.
    if n >= 16:
        assert not np.array_equal(
            EpochPermutation(n, 8, "books")(epochs[:n], np.arange(n)), rows[0]
        )
        assert not np.array_equal(EpochPermutation(n, 7, "c4")(epochs[:n], np.arange(n)), rows[0])


def test_deterministic_by_seed(order):
    head = order[: 50 * ROWS_PER_STEP]
    again = disk_scaled_plan(seed=0, budget_rows=100_000, rows_per_gb=20)
    other = disk_scaled_plan(seed=1, budget_rows=100_000, rows_per_gb=20)
    again_head = np.concatenate(list(islice(worker_steps(again, 0, 1, ROWS_PER_STEP), 50)))
    np.testing.assert_array_equal(again_head, head)
    other_head = np.concatenate(list(islice(worker_steps(other, 0, 1, ROWS_PER_STEP), 50)))
    assert other_head.shape == head.shape
    assert not np.array_equal(other_head[:, 0], head[:, 0])
    assert not np.array_equal(other_head[:, 1], head[:, 1])


def test_every_step_holds_each_sources_share_within_a_few_rows(streamed, order):
    plan = streamed
    """Every prefix of whole steps holds each source's quota to within the merge's bound,
    `(sources / 2) * share + 3 / 2` rows, and so every step to twice that; in practice a
    step is within 3 rows of its quota (of 64: 43 from commoncrawl, 1.3 from arxiv)."""
    steps = order[:, 0].reshape(-1, ROWS_PER_STEP)
    for index, s in enumerate(plan.sources):
        share = s.rows_drawn / plan.total_rows
        per_step = (steps == index).sum(axis=1)
        assert np.abs(per_step - ROWS_PER_STEP * share).max() < 3, s.name
        prefix = np.cumsum(per_step) - ROWS_PER_STEP * share * np.arange(1, len(steps) + 1)
        assert np.abs(prefix).max() <= len(plan.sources) / 2 * share + 1.5, s.name


@pytest.mark.parametrize("window", [1000, 5000])
def test_every_window_of_rows_is_close_to_the_mixture(streamed, order, window):
    plan = streamed
    for index, s in enumerate(plan.sources):
        hits = np.concatenate([[0], np.cumsum(order[:, 0] == index)])
        per_window = (hits[window:] - hits[:-window]) / window
        worst = np.abs(per_window - s.target_proportion).max()
        assert worst < 0.01, (s.name, worst)


def test_a_plain_shuffle_would_fail_the_window_check(streamed, order):
    plan = streamed
    """The window bound above is tight enough to tell even spacing from a shuffle."""
    shuffled = order[np.random.default_rng(0).permutation(len(order))]
    cc = plan.source_names.index("commoncrawl")
    hits = np.concatenate([[0], np.cumsum(shuffled[:, 0] == cc)])
    per_window = (hits[1000:] - hits[:-1000]) / 1000
    assert np.abs(per_window - plan.source("commoncrawl").target_proportion).max() >= 0.01


def test_step_is_a_pure_function_of_plan_seed_and_step(streamed, order):
    """Any step computed on its own equals the same step of the stream iterated from 0."""
    plan = streamed
    rng = np.random.default_rng(3)
    for step in [0, 1, steps_of(plan, ROWS_PER_STEP) - 1, *rng.integers(0, 1562, 20)]:
        np.testing.assert_array_equal(
            global_batch(plan, int(step), ROWS_PER_STEP),
            order[step * ROWS_PER_STEP : (step + 1) * ROWS_PER_STEP],
        )
    # Within a step the sources are interleaved, not in blocks.
    assert not (np.diff(global_batch(plan, 5, ROWS_PER_STEP)[:, 0]) >= 0).all()


@pytest.mark.parametrize("world_size", [1, 4])
def test_resume_sees_exactly_the_uninterrupted_rows(world_size):
    small = disk_scaled_plan(budget_rows=5_000)
    n_steps = steps_of(small, ROWS_PER_STEP)
    for rank in range(world_size):
        full = list(worker_steps(small, rank, world_size, ROWS_PER_STEP))
        assert len(full) == n_steps == 78
        for k in (1, 37, n_steps - 1, n_steps):
            head = list(islice(worker_steps(small, rank, world_size, ROWS_PER_STEP), k))
            tail = list(worker_steps(small, rank, world_size, ROWS_PER_STEP, start_step=k))
            assert len(head) + len(tail) == n_steps
            np.testing.assert_array_equal(np.concatenate(head + tail), np.concatenate(full))


def test_ranks_cover_each_global_batch_exactly_once():
    p = plan_mixture({"a": 600, "b": 400}, token_budget=1000, seq_len=1, seed=2,
                     proportions={"a": 0.6, "b": 0.4})  # fmt: skip
    world_size, rows_per_step = 4, 32
    per_rank = [list(worker_steps(p, r, world_size, rows_per_step)) for r in range(world_size)]
    n_steps = 1000 // rows_per_step
    assert all(len(steps) == n_steps for steps in per_rank)
    for step in range(n_steps):
        batch = np.empty((rows_per_step, 2), dtype=np.int64)
        for rank in range(world_size):
            part = per_rank[rank][step]
            assert part.shape == (rows_per_step // world_size, 2)
            batch[rank::world_size] = part
        np.testing.assert_array_equal(batch, global_batch(p, step, rows_per_step))
    # One epoch of each source: every row exactly once, the final partial batch (1000 % 32
    # = 8 rows) dropped.
    seen = np.concatenate([np.concatenate(steps) for steps in per_rank])
    assert len(seen) == n_steps * rows_per_step
    assert len({(int(s), int(r)) for s, r in seen}) == len(seen)


def test_small_sources_cover_every_row_once_per_full_epoch():
    p = plan_mixture({"tiny": 7, "small": 13, "big": 101}, token_budget=3 * 7 * 13 * 11,
                     seq_len=1, proportions={"tiny": 1, "small": 1, "big": 1}, seed=4)  # fmt: skip
    order = stream_of(p, rows_per_step=11)
    for index, s in enumerate(p.sources):
        draws = order[order[:, 0] == index, 1]
        for epoch in range(len(draws) // s.rows_available):
            chunk = draws[epoch * s.rows_available : (epoch + 1) * s.rows_available]
            assert sorted(chunk.tolist()) == list(range(s.rows_available)), (s.name, epoch)
    assert p.source("tiny").epochs == 143 and p.source("big").epochs > 9


def test_a_paper_scale_step_costs_memory_of_one_step_not_the_budget():
    """1.4T tokens at seq_len 2048 (~684M rows): step 10^5 of 2048 rows, the last step, and
    step 10^8 of 4 rows, in well under a MB (the materialized order was 16 bytes a row
    held, 11 GB, and 90 at peak)."""
    import tracemalloc

    rows = {name: int(m.disk_gb * 1e6) for name, m in PAPER_MIXTURE.items()}
    big = plan_mixture(rows, token_budget=1_400_000_000_000, seq_len=2048, seed=0)
    assert big.total_rows == 683_593_750
    tracemalloc.start()
    try:
        batch = global_batch(big, 100_000, 2048)
        last = global_batch(big, steps_of(big, 2048) - 1, 2048)
        tiny_steps = global_batch(big, 10**8, 4)  # step 10^8 of 4-row steps
        _current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20, peak
    assert batch.shape == last.shape == (2048, 2) and tiny_steps.shape == (4, 2)
    counts = np.bincount(batch[:, 0], minlength=7)
    for index, s in enumerate(big.sources):
        assert abs(counts[index] - 2048 * s.realized_proportion) <= 2, s.name


def test_sources_with_zero_proportion_are_not_drawn():
    p = plan_mixture({"a": 10, "b": 10}, token_budget=50, seq_len=1, proportions={"a": 1.0}, seed=3)
    assert [s.rows_drawn for s in p.sources] == [50, 0]
    assert (stream_of(p, rows_per_step=5)[:, 0] == 0).all()


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


def test_worker_steps_errors_name_the_argument():
    p = plan_mixture({"a": 10}, token_budget=100, seq_len=1, proportions={"a": 1})
    with pytest.raises(ValueError, match="rows_per_step"):
        worker_steps(p, 0, 4, 10)
    with pytest.raises(ValueError, match="rank"):
        worker_steps(p, 4, 4, 8)
    with pytest.raises(ValueError, match="world_size"):
        worker_steps(p, 0, 0, 8)
    with pytest.raises(ValueError, match="start_step"):
        worker_steps(p, 0, 4, 8, start_step=13)
    assert list(worker_steps(p, 0, 4, 8, start_step=12)) == []
    with pytest.raises(ValueError, match="rows_per_step"):
        steps_of(p, 0)
    with pytest.raises(ValueError, match="step must be in"):
        global_batch(p, 12, 8)
    with pytest.raises(ValueError, match="position"):
        drawn_before(p, 101)
    with pytest.raises(ValueError, match="draws"):
        draw_rows(p, 0, 5, 101)
    with pytest.raises(ValueError, match="n > 0"):
        EpochPermutation(0, 0, "a")


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
        first = next(feed.stream.batches(0, 1, cfg.rows_per_step))
        want = global_batch(plan, 0, cfg.rows_per_step)
        names = feed.corpus.source_names
        for row, (s, r) in zip(first, want, strict=True):
            np.testing.assert_array_equal(row, feed.corpus.rows(names[s], [r])[0])
    drawn = {s.name: s.rows_drawn for s in plan.sources}
    if proportions is None:
        assert drawn["prose"] == 0 and drawn["c4"] > 0 and drawn["books"] > 0
    else:
        assert all(drawn[n] == 0 for n in drawn if n not in proportions)
