"""Sample training rows from several sources by proportion, as in the paper's table 1.

Each source has been packed into rows of `seq_len + 1` tokens (see `packing.py`); a row is
the unit of sampling. A row gives `seq_len` training tokens (inputs; the extra token only
supplies the last target), so a token budget buys `token_budget // seq_len` rows.

Three steps, each a pure function of the plan and the seed, in memory and time that follow
the rows of one step, never the budget (a 1.4T-token plan's step 10^8 costs what step 0 does):

1. `plan_mixture` decides how many rows each source contributes: `proportion * budget_rows`,
   rounded by largest remainder so the total is exactly `budget_rows`. A source that needs
   more rows than it has is repeated (epochs > 1); the fractional part of its last epoch is
   a prefix of a fresh permutation, so 2.45 or 0.64 epochs work.
2. `drawn_before` spreads each source's draws evenly over the stream: draw `k` of a source
   drawing `n` rows has key `(k + 1/2) / n`, the sources' draws are merged by key (ties by
   source index), and `drawn_before(plan, p)` counts each source's draws among the first
   `p` of that merge, exactly (integer arithmetic) and in O(sources^2), without building it.
   `draw_rows` maps draw `k` of a source to a row: epoch `k // rows_available`, and within
   it position `k % rows_available` of the epoch's permutation, a keyed Feistel bijection
   on `[0, rows_available)` (`EpochPermutation`) evaluated per draw, never materialized.
3. `global_batch` is step `t`'s rows: each source's draws in
   `[drawn_before(t * rows_per_step), drawn_before((t + 1) * rows_per_step))`, interleaved
   within the step by seeded jittered keys `(k + u_k) / rows_drawn`; `worker_steps` gives
   one data-parallel rank `batch[rank::world_size]` from any step on, so a resumed run sees
   exactly what an uninterrupted one would, and the ranks of a step cover its global batch
   exactly once.

Every step holds each source's share of the step to within a few rows (the merge keeps
every prefix of the stream within `sources / 2 + 2` rows of its target), each source's
draws keep their order across steps, and no row repeats within an epoch. Everything is
deterministic by `seed`; a source's permutations are keyed by `(seed, source name, epoch)`,
so they do not depend on the other sources.
"""

from __future__ import annotations

import functools
import math
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import numpy as np

from llamaray.data.sources import PAPER_MIXTURE

_EPOCH_STREAM = 0
_JITTER_STREAM = 1


@dataclass(frozen=True)
class SourcePlan:
    name: str
    rows_available: int
    """Packed rows the source has."""
    rows_drawn: int
    """Rows the source contributes to the mixture (with repeats when epochs > 1)."""
    target_proportion: float
    """Share of the rows asked for (normalized to sum to 1 over the sources)."""
    realized_proportion: float
    """`rows_drawn / total_rows`."""

    @property
    def epochs(self) -> float:
        """Passes over the source: `rows_drawn / rows_available` (0 for an empty source)."""
        return self.rows_drawn / self.rows_available if self.rows_available else 0.0

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "rows_available": self.rows_available,
            "rows_drawn": self.rows_drawn,
            "epochs": self.epochs,
            "target_proportion": self.target_proportion,
            "realized_proportion": self.realized_proportion,
        }


@dataclass(frozen=True)
class MixturePlan:
    sources: tuple[SourcePlan, ...]
    """One entry per source of `rows_per_source`, in its order; the index is `source_index`."""
    total_rows: int
    """Rows in the mixture: `token_budget // seq_len`."""
    seq_len: int
    token_budget: int
    seed: int
    notes: tuple[str, ...] = field(default=())

    @property
    def source_names(self) -> tuple[str, ...]:
        """Maps `source_index` (column 0 of `global_batch`) to the source name."""
        return tuple(s.name for s in self.sources)

    @property
    def training_tokens(self) -> int:
        """Tokens trained on: `total_rows * seq_len` (at most `token_budget`)."""
        return self.total_rows * self.seq_len

    def source(self, name: str) -> SourcePlan:
        for s in self.sources:
            if s.name == name:
                return s
        raise KeyError(name)

    def to_dict(self) -> dict:
        return {
            "seq_len": self.seq_len,
            "token_budget": self.token_budget,
            "training_tokens": self.training_tokens,
            "total_rows": self.total_rows,
            "seed": self.seed,
            "sources": [s.to_dict() for s in self.sources],
            "notes": list(self.notes),
        }


def mixture_weights(
    configured: Mapping[str, float] | None, rows: Mapping[str, int]
) -> tuple[dict[str, float], list[str]]:
    """The sampling weight of every source of a corpus: the one rule for it. The driver
    applies it once, logs the plan it gives and passes the weights to every worker
    (`WorkerSpec.proportions`), so what is trained is what was planned.

    `configured` (`data.proportions`) when given, else the paper's table 1; when no source
    is in the table (a corpus of only `prose`, say), every source is weighed by its
    training rows. A source with no training rows is left out (with a warning) when its
    weight comes from the default; a configured weight for it is an error, since that
    mixture could not be realized. Returns (weights for every source of `rows`, warnings).
    Raises ValueError naming `data.proportions`.

    >>> mixture_weights(None, {"prose": 30, "code": 10})
    ({'prose': 30.0, 'code': 10.0}, [])
    >>> mixture_weights(None, {"c4": 5, "prose": 10})[0]
    {'c4': 0.15, 'prose': 0.0}
    """
    if configured is not None:
        empty = [n for n, w in configured.items() if w > 0 and rows.get(n, 0) == 0]
        if empty:
            raise ValueError(
                f"data.proportions: source(s) {', '.join(empty)} have no training rows"
            )
        return {n: float(configured.get(n, 0.0)) for n in rows}, []
    warnings = []
    weights = {n: PAPER_MIXTURE[n].proportion if n in PAPER_MIXTURE else 0.0 for n in rows}
    outside = [n for n in rows if n not in PAPER_MIXTURE]
    if not any(weights.values()):
        weights = {n: float(r) for n, r in rows.items()}
    elif outside:
        warnings.append(
            f"source(s) {', '.join(outside)} are not in the paper's table 1 and get no "
            "weight; set data.proportions to include them"
        )
    for name, n_rows in rows.items():
        if n_rows == 0 and weights[name] > 0:
            warnings.append(f"source {name} has no training rows; left out of the mixture")
            weights[name] = 0.0
    if not any(weights.values()):
        raise ValueError("data.proportions: the corpus has no training rows in any source")
    return weights, warnings


def plan_mixture(
    rows_per_source: Mapping[str, int],
    token_budget: int,
    seq_len: int,
    proportions: Mapping[str, float] | None = None,
    seed: int = 0,
) -> MixturePlan:
    """Decide how many rows each source contributes for `token_budget` training tokens.

    `proportions` are relative weights (normalized to sum 1); by default the paper's table 1,
    restricted to the sources present and renormalized. A source of `rows_per_source` with no
    proportion gets 0 (noted in `notes`). Raises ValueError, naming the field or source, for
    a non-positive `seq_len`, a budget under one row, a negative row count or seed, a
    negative or non-finite proportion, proportions summing to 0, a proportion for a source
    not in `rows_per_source`, or a source with 0 rows but a positive proportion.
    """
    if seq_len <= 0:
        raise ValueError(f"seq_len must be positive, got {seq_len}")
    if seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")
    total_rows = token_budget // seq_len
    if total_rows <= 0:
        raise ValueError(
            f"token_budget {token_budget} is less than one row of seq_len={seq_len} tokens"
        )
    if not rows_per_source:
        raise ValueError("rows_per_source is empty")
    for name, n in rows_per_source.items():
        if n < 0:
            raise ValueError(f"rows_per_source[{name!r}] is negative: {n}")

    notes: list[str] = [
        f"a row counts seq_len={seq_len} training tokens; "
        f"{total_rows} rows = token_budget {token_budget} // seq_len"
    ]
    if proportions is None:
        weights = {
            name: PAPER_MIXTURE[name].proportion if name in PAPER_MIXTURE else 0.0
            for name in rows_per_source
        }
        missing = [name for name in PAPER_MIXTURE if name not in rows_per_source]
        if sum(weights.values()) <= 0:
            raise ValueError(
                "proportions: none given and no source of rows_per_source is in the paper's "
                f"mixture ({', '.join(PAPER_MIXTURE)})"
            )
        if missing:
            notes.append(
                "paper proportions restricted to the sources present and renormalized; "
                f"absent: {', '.join(missing)}"
            )
        else:
            notes.append("paper proportions (Touvron et al. 2023, table 1)")
    else:
        unknown = [name for name in proportions if name not in rows_per_source]
        if unknown:
            raise ValueError(
                f"proportions name sources not in rows_per_source: {', '.join(unknown)}"
            )
        weights = {name: float(proportions.get(name, 0.0)) for name in rows_per_source}
        for name, w in weights.items():
            if not math.isfinite(w) or w < 0:
                raise ValueError(f"proportions[{name!r}] must be finite and >= 0, got {w}")
        if sum(weights.values()) <= 0:
            raise ValueError("proportions must sum to more than 0")
    unweighted = [name for name, w in weights.items() if w == 0]
    if unweighted:
        notes.append(f"sources with proportion 0 (not drawn): {', '.join(unweighted)}")
    for name, w in weights.items():
        if w > 0 and rows_per_source[name] == 0:
            raise ValueError(f"source {name!r} has 0 rows but proportion {w}")

    total_weight = sum(weights.values())
    shares = {name: w / total_weight for name, w in weights.items()}
    drawn = _largest_remainder(shares, total_rows)
    sources = tuple(
        SourcePlan(
            name=name,
            rows_available=int(rows_per_source[name]),
            rows_drawn=drawn[name],
            target_proportion=shares[name],
            realized_proportion=drawn[name] / total_rows,
        )
        for name in rows_per_source
    )
    return MixturePlan(sources, total_rows, seq_len, token_budget, seed, tuple(notes))


def _largest_remainder(shares: Mapping[str, float], total: int) -> dict[str, int]:
    """Round `share * total` so the parts sum to `total`; ties go to the earlier source."""
    quotas = {name: share * total for name, share in shares.items()}
    counts = {name: math.floor(q) for name, q in quotas.items()}
    by_remainder = sorted(
        (name for name in shares if shares[name] > 0),
        key=lambda name: -(quotas[name] - counts[name]),
    )
    left = total - sum(counts.values())
    if left >= 0:
        for name in by_remainder[:left]:
            counts[name] += 1
    else:  # float shares summing a hair over 1: take back from the smallest remainders
        for name in [n for n in reversed(by_remainder) if counts[n] > 0][:-left]:
            counts[name] -= 1
    return counts


FEISTEL_ROUNDS = 6
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _mix64(z: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer on a uint64 array (wrapping arithmetic): a bijective hash."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


class EpochPermutation:
    """The row order of each epoch of one source: for epoch `e`, a bijection of
    `[0, n)` keyed by `(seed, source name, e)`, evaluated per index in O(1) memory.

    A Feistel network of `FEISTEL_ROUNDS` rounds permutes `[0, 2^b)`, the smallest power of
    two holding `n` (halves of `b // 2` and `b - b // 2` bits, swapping sides each round);
    an output `>= n` is fed through again (cycle walking), which stays a bijection of
    `[0, n)` and takes under two passes on average, since `2^b < 2n`.
    """

    def __init__(self, n: int, seed: int, name: str):
        if n <= 0:
            raise ValueError(f"a permutation needs n > 0 rows, got {n}")
        self.n = n
        bits = max(2, (n - 1).bit_length())
        self._halves = (bits // 2, bits - bits // 2)  # (left, right) bits
        seeds = np.random.SeedSequence([seed, zlib.crc32(name.encode()), _EPOCH_STREAM])
        self._round_keys = seeds.generate_state(FEISTEL_ROUNDS, dtype=np.uint64)

    def __call__(self, epochs: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """Row at `positions[i]` of epoch `epochs[i]`'s permutation (int64 arrays)."""
        # Each epoch's rounds are keyed by the source's round keys and a hash of the epoch.
        epoch_key = _mix64(np.asarray(epochs, dtype=np.int64).astype(np.uint64) * _GOLDEN)
        x = np.asarray(positions, dtype=np.int64).astype(np.uint64)
        n = np.uint64(self.n)
        x = self._network(x, epoch_key)
        outside = np.flatnonzero(x >= n)
        while len(outside):
            x[outside] = self._network(x[outside], epoch_key[outside])
            outside = outside[x[outside] >= n]
        return x.astype(np.int64)

    def _network(self, x: np.ndarray, epoch_key: np.ndarray) -> np.ndarray:
        a, b = self._halves
        left, right = x >> np.uint64(b), x & np.uint64((1 << b) - 1)
        for key in self._round_keys:  # (left: a bits, right: b bits) -> (right, left ^ F(right))
            left, right = right, left ^ (_mix64(right ^ epoch_key ^ key) & np.uint64((1 << a) - 1))
            a, b = b, a
        return (left << np.uint64(b)) | right


@functools.lru_cache(maxsize=64)
def _permutation(n: int, seed: int, name: str) -> EpochPermutation:
    return EpochPermutation(n, seed, name)


def draw_rows(plan: MixturePlan, source: int, start: int, stop: int) -> np.ndarray:
    """Row indices of draws `[start, stop)` of source `source` (int64, in draw order).

    Draw `k` is row `perm_e(k % rows_available)` of epoch `e = k // rows_available`, so
    each full epoch is a permutation of the source's rows and the fractional last epoch
    the prefix of a fresh one: no row repeats within an epoch.
    """
    s = plan.sources[source]
    if not 0 <= start <= stop <= s.rows_drawn:
        raise ValueError(f"draws [{start}, {stop}) outside [0, {s.rows_drawn}) of {s.name}")
    if start == stop:
        return np.empty(0, dtype=np.int64)
    epochs, positions = np.divmod(np.arange(start, stop, dtype=np.int64), s.rows_available)
    return _permutation(s.rows_available, plan.seed, s.name)(epochs, positions)


def drawn_before(plan: MixturePlan, position: int) -> tuple[int, ...]:
    """Draws of each source among the stream's first `position` rows (they sum to it).

    The stream merges the sources' draws by key `(k + 1/2) / rows_drawn` (ties by source
    index). The `position`-th key is within `sources / 2` rows of `position / total_rows`,
    so each source's count is within `sources / 2 + 2` of its quota
    `position * rows_drawn / total_rows`: start every source that far below its quota and
    take the smallest next keys until `position` are taken. Exact: keys are compared as
    integers, `(2a + 1) * n_b < (2b + 1) * n_a`.
    """
    if not 0 <= position <= plan.total_rows:
        raise ValueError(f"position must be in [0, {plan.total_rows}], got {position}")
    drawn = [s.rows_drawn for s in plan.sources]
    slack = (len(drawn) + 1) // 2 + 2
    taken = [max(0, position * n // plan.total_rows - slack) for n in drawn]
    for _ in range(position - sum(taken)):
        best = -1
        for s, n in enumerate(drawn):
            if taken[s] < n and (
                best < 0 or (2 * taken[s] + 1) * drawn[best] < (2 * taken[best] + 1) * n
            ):
                best = s
        taken[best] += 1
    return tuple(taken)


def steps_of(plan: MixturePlan, rows_per_step: int) -> int:
    """Optimizer steps in the stream: a final partial global batch is dropped."""
    if rows_per_step <= 0:
        raise ValueError(f"rows_per_step must be positive, got {rows_per_step}")
    return plan.total_rows // rows_per_step


def global_batch(plan: MixturePlan, step: int, rows_per_step: int) -> np.ndarray:
    """Step `step`'s global batch: a (rows_per_step, 2) int64 array of
    (source_index, row_index). Which draws of each source are in it is fixed by
    `drawn_before`; within the step they are ordered by a seeded jittered key, draw `k` of
    a source drawing `n` at `(k + u_k) / n` with `u_k` uniform in [0, 1) keyed by
    `(seed, source, k)`, so the sources stay evenly interleaved (a window of the stream, or
    one rank's share of the step, holds about the mixture) in an order that depends on the
    seed, and each source's draws stay in draw order. Costs O(rows_per_step) whatever the
    step or the budget."""
    n_steps = steps_of(plan, rows_per_step)
    if not 0 <= step < n_steps:
        raise ValueError(f"step must be in [0, {n_steps}), got {step}")
    first = drawn_before(plan, step * rows_per_step)
    last = drawn_before(plan, (step + 1) * rows_per_step)
    sources, rows, keys = [], [], []
    for index, (a, b) in enumerate(zip(first, last, strict=True)):
        if a == b:
            continue
        s = plan.sources[index]
        draws = np.arange(a, b, dtype=np.int64)
        sources.append(np.full(b - a, index, dtype=np.int64))
        rows.append(draw_rows(plan, index, a, b))
        keys.append((draws + _jitter(plan.seed, s.name, draws)) / s.rows_drawn)
    source, key = np.concatenate(sources), np.concatenate(keys)
    order = np.lexsort((source, key))
    return np.stack([source[order], np.concatenate(rows)[order]], axis=1)


def _jitter(seed: int, name: str, draws: np.ndarray) -> np.ndarray:
    """A uniform [0, 1) per draw of a source, keyed by `(seed, name, draw)`."""
    bits = _mix64(draws.astype(np.uint64) * _GOLDEN ^ _jitter_key(seed, name)) >> np.uint64(11)
    return bits.astype(np.float64) * 2.0**-53


@functools.lru_cache(maxsize=64)
def _jitter_key(seed: int, name: str) -> np.uint64:
    seeds = np.random.SeedSequence([seed, zlib.crc32(name.encode()), _JITTER_STREAM])
    return seeds.generate_state(1, dtype=np.uint64)[0]


def worker_steps(
    plan: MixturePlan, rank: int, world_size: int, rows_per_step: int, start_step: int = 0
) -> Iterator[np.ndarray]:
    """Yield one data-parallel worker's rows, one (rows_per_step // world_size, 2) array a step.

    Worker `rank` gets `global_batch(plan, t, rows_per_step)[rank::world_size]` for steps
    `t = start_step, ...`, so the ranks together cover each global batch exactly once and
    a resumed run sees exactly the rows an uninterrupted run would from that step on. Stops
    after the last full global batch. `rows_per_step` must be a positive multiple of
    `world_size`; ValueError otherwise, or for a rank outside [0, world_size) or a
    start_step outside [0, number of steps].
    """
    if world_size <= 0:
        raise ValueError(f"world_size must be positive, got {world_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    if rows_per_step <= 0 or rows_per_step % world_size:
        raise ValueError(
            f"rows_per_step must be a positive multiple of world_size={world_size}, "
            f"got {rows_per_step}"
        )
    n_steps = steps_of(plan, rows_per_step)
    if not 0 <= start_step <= n_steps:
        raise ValueError(f"start_step must be in [0, {n_steps}], got {start_step}")
    return _worker_steps(plan, rank, world_size, rows_per_step, start_step, n_steps)


def _worker_steps(
    plan: MixturePlan, rank: int, world_size: int, rows_per_step: int, start: int, stop: int
) -> Iterator[np.ndarray]:
    for step in range(start, stop):
        yield global_batch(plan, step, rows_per_step)[rank::world_size]
