"""Held-out perplexity per corpus source: nats and bits per token, and bits per byte.

Each held-out row of the prepared corpus (`seq_len + 1` packed tokens, documents joined
with bos/eos) is scored as the training loss sees it: every token after the first,
given everything before it in the row. Bits per byte divide the total by the UTF-8 bytes
of the scored tokens' text, so models with different tokenizers compare; bos and eos are
scored tokens that carry no bytes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass
class PerplexityStats:
    nats: float = 0.0
    tokens: int = 0
    bytes: int = 0

    def __add__(self, other: PerplexityStats) -> PerplexityStats:
        return PerplexityStats(
            self.nats + other.nats, self.tokens + other.tokens, self.bytes + other.bytes
        )

    def metrics(self) -> dict[str, float]:
        return {
            "nats_per_token": self.nats / self.tokens,
            "bits_per_token": self.nats / self.tokens / math.log(2),
            "bits_per_byte": self.nats / math.log(2) / max(1, self.bytes),
            "perplexity": math.exp(self.nats / self.tokens),
            "tokens": float(self.tokens),
        }


def heldout_rows(corpus_dir: str, rows_per_source: int) -> dict[str, np.ndarray]:
    """Up to `rows_per_source` validation rows of every source, as the trainers read them."""
    from llamaray.data.mixed_stream import validation_rows
    from llamaray.data.packed_corpus import CorpusRows

    corpus = CorpusRows.open(corpus_dir)
    out = {name: validation_rows(corpus, name, rows_per_source) for name in corpus.source_names}
    return {name: rows for name, rows in out.items() if len(rows)}


def score_rows(lm, rows: np.ndarray) -> PerplexityStats:
    """Total negative log-likelihood, scored tokens and their bytes, over `rows`."""
    pairs = [([int(r[0])], [int(t) for t in r[1:]]) for r in rows]
    results = lm.loglikelihood_tokens(pairs)
    stats = PerplexityStats()
    for (head, scored), result in zip(pairs, results, strict=True):
        stats += PerplexityStats(
            -result.logprob, len(scored), _text_bytes(lm.tokenizer, head, scored)
        )
    return stats


def _text_bytes(tokenizer, head: list[int], scored: list[int]) -> int:
    # Decode with the first token in front and cut its text off: decoding the scored
    # tokens alone would drop the space that a leading "▁piece" stands for.
    whole = tokenizer.decode(head + scored)
    prefix = tokenizer.decode(head)
    text = whole[len(prefix) :] if whole.startswith(prefix) else tokenizer.decode(scored)
    return len(text.encode("utf-8"))
