"""Where a training run's batches come from: the two data feeds of `run_worker`.

One loop trains both ways; what differs is behind `TrainingFeed`:

- `CorpusFeed` (pretraining): packed rows of a prepared corpus, in the mixture's order
  (`data.mixed_stream.MixedStream`), read ahead in a background thread; every position is a target.
- `InstructionFeed` (finetuning): tokenized instruction/response examples
  (`data.instructions`), held in memory, drawn per step from seeded per-epoch
  permutations; targets are -100 on the prompt and padding, so only responses are learned.

Both are pure functions of (data, seed, step, rank, data-parallel size): a run resumed at
step t reads exactly what an uninterrupted run would, which is all a checkpoint needs to
record about the data. No Ray import.

    >>> feed = open_feed(cfg, corpus_dir, None, proportions)  # doctest: +SKIP
    >>> batches = feed.batches(dp_rank=0, dp=2, start_step=0)  # doctest: +SKIP
    >>> next(batches).micro_batches  # rows, or (inputs, targets) pairs  # doctest: +SKIP
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from llamaray.config import RunConfig
from llamaray.data.instructions import IGNORE_INDEX

MicroBatch = np.ndarray | tuple[np.ndarray, np.ndarray]
"""(B, seq_len + 1) token rows, or an (inputs, targets) pair of (B, T) arrays."""


@dataclass
class StepBatch:
    """One data-parallel rank's share of one optimizer step."""

    micro_batches: list[MicroBatch]
    tokens: int
    """Tokens the whole step (every rank) learns from: batch_tokens for pretraining, the
    response tokens for finetuning. tokens_per_s is this over the step time."""
    computed_tokens: int
    """Positions the whole step runs through the model (padding trimmed): for MFU."""
    fingerprint: int
    """crc32 of this rank's batch, logged as rows_crc: runs can be checked to read the same."""


class TrainingFeed(Protocol):
    vocab_size: int
    """The tokenizer's size: the model's vocabulary unless model.vocab_size says otherwise."""
    tokenizer_path: str | None
    """tokenizer.model (a local path or s3:// URI: fetch it with `storage.local_copy`),
    copied beside the exported model."""

    def batches(self, dp_rank: int, dp: int, start_step: int) -> Iterator[StepBatch]:
        """This rank's batches from `start_step` on; has `close()`."""

    def validation_batches(self, dp_rank: int, dp: int, micro: int) -> dict[str, list]:
        """Held-out sets by name, as this rank's micro-batches. Every rank gets the same
        number of micro-batches per set (a sharded model needs every rank in every forward)."""

    def describe(self) -> str:
        """One line for the start of the run."""


def open_feed(
    cfg: RunConfig,
    corpus_dir: str,
    instructions: dict | None,
    proportions: dict[str, float] | None = None,
) -> TrainingFeed:
    """`InstructionFeed` when the run finetunes (`cfg.finetune`), else `CorpusFeed` with the
    sampling weights the driver resolved (`WorkerSpec.proportions`)."""
    if cfg.finetune is not None:
        if instructions is None:
            raise ValueError("a finetuning run needs its encoded instructions in the WorkerSpec")
        return InstructionFeed(cfg, instructions)
    return CorpusFeed(cfg, corpus_dir, proportions)


class CorpusFeed:
    """Pretraining: rows of the corpus mixture (`MixedStream`), `rows_per_step / dp` per
    rank per step, and the first `data.eval_rows` held-out rows of every source.

    `proportions` are the weights the driver planned with (`mixture.mixture_weights`);
    a run with no driver (in-process, torchrun) applies the same rule here."""

    def __init__(self, cfg: RunConfig, corpus_dir: str, proportions: dict[str, float] | None):
        from llamaray.data.mixed_stream import MixedStream
        from llamaray.data.mixture import mixture_weights
        from llamaray.data.packed_corpus import CorpusRows

        self.cfg = cfg
        self.corpus = CorpusRows.open(corpus_dir)
        if self.corpus.seq_len != cfg.train.seq_len:
            raise ValueError(
                f"train.seq_len={cfg.train.seq_len} but the corpus {corpus_dir} was packed for "
                f"seq_len={self.corpus.seq_len}"
            )
        self.vocab_size = int(self.corpus.manifest["tokenizer"]["vocab_size"])
        self.tokenizer_path = self.corpus.tokenizer_uri  # relative to the corpus
        if proportions is None:
            proportions, _ = mixture_weights(
                cfg.data.proportions, self.corpus.rows_per_source("train")
            )
        self.stream = MixedStream(
            self.corpus,
            token_budget=cfg.train.steps * cfg.batch_tokens,
            proportions=proportions,
            seed=cfg.train.seed,
        )

    def describe(self) -> str:
        return f"corpus {self.corpus.corpus_dir} ({', '.join(self.corpus.source_names)})"

    def batches(self, dp_rank: int, dp: int, start_step: int) -> Iterator[StepBatch]:
        from llamaray.data.prefetch import Prefetcher

        rows = self.stream.batches(dp_rank, dp, self.cfg.rows_per_step, start_step=start_step)
        return Prefetcher(self._steps(rows))

    def _steps(self, rows_per_step: Iterator[np.ndarray]) -> Iterator[StepBatch]:
        micro, tokens = self.cfg.train.micro_batch_size, self.cfg.batch_tokens
        for rows in rows_per_step:
            yield StepBatch(
                [rows[i : i + micro] for i in range(0, len(rows), micro)],
                tokens=tokens,
                computed_tokens=tokens,
                fingerprint=zlib.crc32(rows.tobytes()),
            )

    def validation_batches(self, dp_rank: int, dp: int, micro: int) -> dict[str, list]:
        """Each rank takes an equal slice of every source's held-out rows, so up to dp - 1
        rows per source go unused; a source with fewer rows than dp is left out."""
        from llamaray.data.mixed_stream import validation_rows

        if not self.cfg.data.eval_rows:
            return {}
        out = {}
        for name in self.corpus.source_names:
            rows = validation_rows(self.corpus, name, self.cfg.data.eval_rows)
            per_rank = len(rows) // dp
            if per_rank == 0:
                continue
            mine = rows[dp_rank * per_rank : (dp_rank + 1) * per_rank]
            out[name] = [mine[i : i + micro] for i in range(0, len(mine), micro)]
        return out


class InstructionFeed:
    """Finetuning: per step `rows_per_step` examples (`train.batch_tokens / train.seq_len`),
    each epoch a seeded permutation of the training examples (a remainder smaller than a
    step is skipped that epoch); rank r takes every dp-th of them. Micro-batches are padded
    only to their longest example, rounded up to a multiple of 8 x the tensor-parallel
    degree (sequence parallelism splits the sequence over tp ranks)."""

    VALIDATION = "responses"

    def __init__(self, cfg: RunConfig, payload: dict[str, Any]):
        from llamaray.data.instructions import EncodedInstructions

        self.cfg = cfg
        self.train = EncodedInstructions.from_dict(payload["train"])
        self.validation = EncodedInstructions.from_dict(payload["validation"])
        self.vocab_size = int(payload["vocab_size"])
        self.tokenizer_path = payload.get("tokenizer_path")
        self.multiple = math.lcm(8, cfg.parallel.tensor)
        if len(self.train) < cfg.rows_per_step:
            raise ValueError(
                f"{len(self.train)} training examples cannot fill one step of "
                f"{cfg.rows_per_step} (train.batch_tokens / train.seq_len)"
            )

    def describe(self) -> str:
        epochs = self.cfg.train.steps * self.cfg.rows_per_step / len(self.train)
        return (
            f"{len(self.train)} instructions ({epochs:.1f} epochs), {len(self.validation)} held out"
        )

    def batches(self, dp_rank: int, dp: int, start_step: int) -> Iterator[StepBatch]:
        return self._steps(dp_rank, dp, start_step)

    def _steps(self, dp_rank: int, dp: int, start_step: int) -> Iterator[StepBatch]:
        from llamaray.data.instructions import batch_indices

        cfg, micro = self.cfg, self.cfg.train.micro_batch_size
        response = self.train.response_tokens
        for step in range(start_step, cfg.train.steps):
            chosen = batch_indices(len(self.train), cfg.rows_per_step, step, cfg.train.seed)
            computed = 0
            for rank in range(dp):  # every rank's padded widths, for the MFU count
                for part in _chunks(chosen[rank::dp], micro):
                    computed += len(part) * self._width(part)
            mine = chosen[dp_rank::dp]
            yield StepBatch(
                [self.train.micro_batch(part, self.multiple) for part in _chunks(mine, micro)],
                tokens=int(response[chosen].sum()),
                computed_tokens=computed,
                fingerprint=zlib.crc32(np.ascontiguousarray(mine).tobytes()),
            )

    def _width(self, part: np.ndarray) -> int:
        width = max(1, int(self.train.lengths[part].max()) - 1)
        return min(self.train.seq_len, -(-width // self.multiple) * self.multiple)

    def validation_batches(self, dp_rank: int, dp: int, micro: int) -> dict[str, list]:
        """Every held-out example counts: the set is cut into dp contiguous slices of
        ceil(n / dp), the short ones filled with all-ignored rows (they add nothing to the
        loss or its token count), so every rank runs the same forwards."""
        n = len(self.validation)
        if n == 0:
            return {}
        per_rank = -(-n // dp)
        mine = np.arange(dp_rank * per_rank, (dp_rank + 1) * per_rank)
        mine[mine >= n] = -1
        return {self.VALIDATION: [self._padded(part) for part in _chunks(mine, micro)]}

    def _padded(self, part: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        real, filler = part[part >= 0], int((part < 0).sum())
        if len(real):
            inputs, targets = self.validation.micro_batch(real, self.multiple)
        else:
            inputs = targets = np.zeros((0, self.multiple), dtype=np.int64)
        if not filler:
            return inputs, targets
        blank = np.zeros((filler, inputs.shape[1]), dtype=np.int64)
        ignored = np.full_like(blank, IGNORE_INDEX)
        return np.concatenate([inputs, blank]), np.concatenate([targets, ignored])


def _chunks(items: np.ndarray, size: int) -> list[np.ndarray]:
    return [items[i : i + size] for i in range(0, len(items), size)]
