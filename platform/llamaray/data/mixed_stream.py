"""The training stream over a prepared corpus: the mixture (`mixture.plan_mixture`) of its
train rows, per optimizer step, one rank's share of the global batch
(`mixture.worker_steps`, computed from the step number in memory that follows the rows of a
step, not the budget), fetched from `CorpusRows` with one `rows()` call per source; and
`validation_rows`, the first rows of a source's held-out split, the same every time."""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import numpy as np

from llamaray.data.mixture import MixturePlan, plan_mixture, steps_of, worker_steps
from llamaray.data.packed_corpus import CorpusRows


class MixedStream:
    """The training stream: the mixture of a corpus's train rows, per step and rank.

    `plan` is `plan_mixture(corpus.rows_per_source("train"), token_budget, seq_len,
    proportions, seed)` (proportions None: the paper's, restricted to the sources present);
    a step's rows are `mixture.global_batch(plan, step, rows_per_step)`, pairs of (source
    index into `corpus.source_names`, row index), computed when the step is reached.
    """

    def __init__(
        self,
        corpus: CorpusRows,
        token_budget: int,
        proportions: Mapping[str, float] | None = None,
        seed: int = 0,
    ):
        self.corpus = corpus
        self.plan: MixturePlan = plan_mixture(
            corpus.rows_per_source("train"), token_budget, corpus.seq_len, proportions, seed
        )

    def steps(self, rows_per_step: int) -> int:
        """Optimizer steps in the stream (a final partial global batch is dropped)."""
        return steps_of(self.plan, rows_per_step)

    def batches(
        self, rank: int, world_size: int, rows_per_step: int, start_step: int = 0
    ) -> Iterator[np.ndarray]:
        """This rank's rows, one int64 (rows_per_step // world_size, row_tokens) array a step.

        Step `t` gives rows `global_batch(plan, t, rows_per_step)[rank::world_size]` (see
        `mixture.worker_steps`), starting at `start_step`: a run resumed
        at step `t` gets the same arrays as an uninterrupted one from `t` on. Arguments are
        checked now (ValueError), not at the first `next()`.
        """
        steps = worker_steps(self.plan, rank, world_size, rows_per_step, start_step)
        return self._fetch(steps)

    def _fetch(self, steps: Iterator[np.ndarray]) -> Iterator[np.ndarray]:
        names = self.plan.source_names
        width = self.corpus.row_tokens
        for pairs in steps:
            out = np.empty((len(pairs), width), dtype=np.int64)
            # One rows() call per source a step: its row groups are then read once each.
            for s in np.unique(pairs[:, 0]):
                where = pairs[:, 0] == s
                out[where] = self.corpus.rows(names[s], pairs[where, 1])
            yield out


def validation_rows(corpus: CorpusRows, source: str, max_rows: int) -> np.ndarray:
    """The first `max_rows` rows (fewer if it has fewer) of `source`'s validation split.

    Storage order, so every evaluation of every run scores the same rows.
    """
    if max_rows < 0:
        raise ValueError(f"max_rows must be >= 0, got {max_rows}")
    n = min(max_rows, corpus.rows_per_source("validation")[source])
    return corpus.rows(source, np.arange(n, dtype=np.int64), split="validation")
