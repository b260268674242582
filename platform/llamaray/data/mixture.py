"""Sample training rows from several sources by proportion, as in the paper's table 1.

Each source has been packed into rows of `seq_len + 1` tokens (see `packing.py`); a row is
the unit of sampling. A row gives `seq_len` training tokens (inputs; the extra token only
supplies the last target), so a token budget buys `token_budget // seq_len` rows.

Three steps:

1. `plan_mixture` decides how many rows each source contributes: `proportion * budget_rows`,
   rounded by largest remainder so the total is exactly `budget_rows`. A source that needs
   more rows than it has is repeated (epochs > 1); the fractional part of its last epoch is
   a subset of a fresh permutation, so 2.45 or 0.64 epochs work.
2. `mixed_order` turns the plan into the training order, an array of
   `(source_index, row_index)`: each source's draws are whole seeded permutations (one per
   epoch) followed by the prefix of one more, and the sources' draw streams are merged evenly
   spaced (draw `k` of a source drawing `n` rows sits at `(k + u) / n` with seeded jitter
   `u` in [0, 1)), so any window of the stream, even a short run, sees the target mixture.
3. `worker_rows` cuts the order into global batches and gives one data-parallel worker its
   share, from any step on, so a resumed run sees exactly what an uninterrupted one would.

Everything is deterministic by `seed`; each source's permutations and jitter come from a
stream keyed by `(seed, source name)`, so they do not depend on the other sources.
"""

from __future__ import annotations

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
        """Maps `source_index` (column 0 of `mixed_order`) to the source name."""
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


def _rng(seed: int, name: str, *stream: int) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(name.encode()), *stream])


def source_draws(plan: MixturePlan, name: str) -> np.ndarray:
    """The row indices a source contributes, in its draw order (int64).

    Whole seeded permutations of `range(rows_available)`, one per full epoch, then the
    prefix of one more permutation for the fractional epoch: no row repeats within an epoch.
    """
    s = plan.source(name)
    if s.rows_drawn == 0:
        return np.empty(0, dtype=np.int64)
    full, part = divmod(s.rows_drawn, s.rows_available)
    pieces = [
        _rng(plan.seed, name, _EPOCH_STREAM, epoch).permutation(s.rows_available)
        for epoch in range(full + (part > 0))
    ]
    if part:
        pieces[-1] = pieces[-1][:part]
    return np.concatenate(pieces).astype(np.int64, copy=False)


def mixed_order(plan: MixturePlan) -> np.ndarray:
    """The training order: a (total_rows, 2) int64 array of (source_index, row_index).

    Each source's draws keep their order and are spread evenly over the stream: draw `k` of
    a source drawing `n` rows gets position `(k + u_k) / n`, `u_k` seeded uniform in [0, 1),
    and the merged stream is sorted by position (ties by source index). A window of `w`
    consecutive entries then holds about `w * proportion` rows of each source (off by a
    couple of rows at most).
    """
    keys, src, rows = [], [], []
    for index, s in enumerate(plan.sources):
        if s.rows_drawn == 0:
            continue
        n = s.rows_drawn
        jitter = _rng(plan.seed, s.name, _JITTER_STREAM).random(n)
        keys.append((np.arange(n, dtype=np.float64) + jitter) / n)
        src.append(np.full(n, index, dtype=np.int64))
        rows.append(source_draws(plan, s.name))
    key, source_index, row_index = (np.concatenate(a) for a in (keys, src, rows))
    order = np.lexsort((source_index, key))
    return np.stack([source_index[order], row_index[order]], axis=1)


def worker_rows(
    order: np.ndarray, rank: int, world_size: int, rows_per_step: int, start_step: int = 0
) -> Iterator[np.ndarray]:
    """Yield one data-parallel worker's rows, one (rows_per_step // world_size, 2) array a step.

    Step `t`'s global batch is `order[t * rows_per_step : (t + 1) * rows_per_step]`; worker
    `rank` gets `batch[rank::world_size]`, so the ranks together cover each global batch
    exactly once. Starts at step `start_step`, so a resumed run sees exactly the rows an
    uninterrupted run would from that step on. Stops (the iterator ends) after the last full
    global batch: a final partial batch is dropped so every rank runs the same steps.
    `rows_per_step` must be a positive multiple of `world_size`; ValueError otherwise, or
    for a rank outside [0, world_size) or a start_step outside [0, number of steps].
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
    n_steps = len(order) // rows_per_step
    if not 0 <= start_step <= n_steps:
        raise ValueError(f"start_step must be in [0, {n_steps}], got {start_step}")
    return _worker_steps(order, rank, world_size, rows_per_step, start_step, n_steps)


def _worker_steps(
    order: np.ndarray, rank: int, world_size: int, rows_per_step: int, start: int, stop: int
) -> Iterator[np.ndarray]:
    for step in range(start, stop):
        yield order[step * rows_per_step + rank : (step + 1) * rows_per_step : world_size]
