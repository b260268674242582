"""Pack tokenized documents into fixed rows of `seq_len + 1` tokens, with no padding.

Documents are joined as `bos doc eos bos doc eos ...` and the stream is cut every
`seq_len + 1` tokens: a row gives `seq_len` inputs and the same tokens shifted by one as
targets. A document may span rows; the model learns document boundaries from bos/eos,
as in the paper's setup. The packer is streaming: a partial row waits for the next batch
of documents, so memory stays at one row whatever the corpus size.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np


class Packer:
    """Stateful packer; feed documents with `add`, collect full rows as they complete.

    >>> p = Packer(seq_len=3, bos_id=1, eos_id=2)
    >>> p.add([[7, 8], [9]]).tolist()
    [[1, 7, 8, 2]]
    >>> p.pending
    3
    """

    def __init__(self, seq_len: int, bos_id: int, eos_id: int, dtype=np.int32):
        if seq_len <= 0:
            raise ValueError(f"seq_len must be positive, got {seq_len}")
        self.row_len = seq_len + 1
        self.bos_id, self.eos_id, self.dtype = bos_id, eos_id, dtype
        self._carry = np.empty(0, dtype=dtype)

    @property
    def pending(self) -> int:
        """Tokens waiting for the next row."""
        return len(self._carry)

    def add(self, docs: Iterable[Iterable[int]]) -> np.ndarray:
        """Append documents; return the completed rows as an (n, seq_len + 1) array."""
        arrays = [np.asarray(doc, dtype=self.dtype).reshape(-1) for doc in docs]
        lengths = np.fromiter((len(a) for a in arrays), dtype=np.int64, count=len(arrays))
        values = np.concatenate(arrays) if arrays else np.empty(0, dtype=self.dtype)
        return self.add_flat(values, lengths)

    def add_flat(self, values: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """`add` for documents given as one flat token array and their lengths (the layout
        of an Arrow list column), with no per-token Python work."""
        n_docs, carried = len(lengths), len(self._carry)
        stream = np.empty(carried + len(values) + 2 * n_docs, dtype=self.dtype)
        stream[:carried] = self._carry
        # Document i's bos sits after the i earlier documents' tokens and 2 i bos/eos.
        bos = carried + np.concatenate(([0], np.cumsum(lengths)[:-1])) + 2 * np.arange(n_docs)
        eos = bos + lengths + 1
        # The tokens fill every other place, in order: one masked copy, where a scatter
        # through per-token indices built three int64 arrays of the batch's length
        # (0.79 s of a 10 s tokenize+pack batch of 12.8M tokens).
        is_token = np.ones(len(stream), dtype=bool)
        is_token[:carried] = False
        is_token[bos] = is_token[eos] = False
        stream[is_token] = values
        stream[bos], stream[eos] = self.bos_id, self.eos_id
        n_rows = len(stream) // self.row_len
        cut = n_rows * self.row_len
        self._carry = stream[cut:].copy()  # not a view that keeps the whole batch alive
        return stream[:cut].reshape(n_rows, self.row_len)


def pack_documents(
    docs: Iterable[Iterable[int]], seq_len: int, bos_id: int, eos_id: int, chunk: int = 1024
) -> np.ndarray:
    """Pack a whole collection at once; the final partial row is dropped."""
    packer = Packer(seq_len, bos_id, eos_id)
    rows = [packer.add(batch) for batch in _batched(docs, chunk)]
    return np.concatenate(rows) if rows else np.empty((0, seq_len + 1), dtype=np.int32)


def _batched(items: Iterable, n: int) -> Iterator[list]:
    batch: list = []
    for item in items:
        batch.append(item)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch
