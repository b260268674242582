"""In-process corpus preparation for one machine: tokenize, pack, split.

The Ray Data pipeline does the same at scale; this path serves the demo, the tests and
anyone with a corpus that fits in memory.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator

import numpy as np

from llamaray.data.packing import Packer
from llamaray.tokenizer import Tokenizer


def tokenize_documents(
    texts: Iterable[str], tokenizer: Tokenizer, batch_size: int = 256
) -> Iterator[list[int]]:
    """Encode documents in batches (SentencePiece threads over each batch)."""
    batch: list[str] = []
    for text in texts:
        batch.append(text)
        if len(batch) == batch_size:
            yield from tokenizer.encode_batch(batch)
            batch = []
    if batch:
        yield from tokenizer.encode_batch(batch)


def prepare_rows(
    texts: Iterable[str],
    tokenizer: Tokenizer,
    seq_len: int,
    validation_fraction: float = 0.02,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Packed (n, seq_len + 1) training rows and held-out rows, split at random by seed."""
    packer = Packer(seq_len, tokenizer.bos_id, tokenizer.eos_id)
    chunks, n_docs, n_tokens = [], 0, 0
    for tokens in tokenize_documents(texts, tokenizer):
        n_docs += 1
        n_tokens += len(tokens) + 2
        chunks.append(packer.add([tokens]))
    rows = np.concatenate(chunks) if chunks else np.empty((0, seq_len + 1), dtype=np.int32)
    order = np.random.default_rng(seed).permutation(len(rows))
    n_val = round(len(rows) * validation_fraction)
    if validation_fraction > 0 and len(rows) > 1:
        n_val = max(1, n_val)
    print(
        f"packed {n_docs} documents, {n_tokens} tokens into {len(rows)} rows of {seq_len}+1 "
        f"({n_val} held out)",
        file=sys.stderr,
    )
    return rows[order[n_val:]], rows[order[:n_val]]
