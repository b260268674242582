from __future__ import annotations

import numpy as np
import pytest

from llamaray.data.packing import Packer, pack_documents


def test_rows_are_seq_len_plus_one_with_bos_eos_and_no_padding():
    docs = [[10, 11, 12], [20], [30, 31, 32, 33, 34]]
    rows = pack_documents(docs, seq_len=4, bos_id=1, eos_id=2)
    stream = [1, 10, 11, 12, 2, 1, 20, 2, 1, 30, 31, 32, 33, 34, 2]
    assert rows.shape == (3, 5)
    assert rows.flatten().tolist() == stream[:15]


def test_streaming_equals_all_at_once_and_keeps_the_remainder():
    rng = np.random.default_rng(0)
    docs = [rng.integers(3, 100, rng.integers(1, 40)).tolist() for _ in range(200)]
    whole = pack_documents(docs, seq_len=16, bos_id=1, eos_id=2)
    packer = Packer(16, 1, 2)
    parts = [packer.add(docs[i : i + 7]) for i in range(0, len(docs), 7)]
    streamed = np.concatenate(parts)
    np.testing.assert_array_equal(streamed, whole)
    total = sum(len(d) + 2 for d in docs)
    assert streamed.size + packer.pending == total
    assert packer.pending < 17


def test_bad_seq_len():
    with pytest.raises(ValueError):
        Packer(0, 1, 2)


def test_rows_are_the_joined_stream_cut_every_row_across_batches():
    """Against the definition, in plain Python: bos doc eos of every document, in order,
    joined across batches (empty documents, empty batches, a carry longer than a row's
    share), cut every seq_len + 1 tokens."""
    rng = np.random.default_rng(2)
    for seq_len in (1, 3, 16):
        packer, joined, rows = Packer(seq_len, 1, 2), [], []
        for _ in range(12):
            docs = [rng.integers(3, 99, int(rng.integers(0, 3 * seq_len))).tolist()
                    for _ in range(int(rng.integers(0, 6)))]  # fmt: skip
            joined += [t for doc in docs for t in (1, *doc, 2)]
            lengths = np.array([len(d) for d in docs], dtype=np.int64)
            values = np.array([t for d in docs for t in d], dtype=np.int32)
            rows += packer.add_flat(values, lengths).tolist()
        cut = len(joined) // (seq_len + 1) * (seq_len + 1)
        expected = [joined[i : i + seq_len + 1] for i in range(0, cut, seq_len + 1)]
        assert rows == expected and packer.pending == len(joined) - cut


def test_add_flat_equals_add_including_empty_documents():
    rng = np.random.default_rng(1)
    docs = [rng.integers(3, 50, n).tolist() for n in (5, 0, 17, 1, 0, 30)]
    a, b = Packer(7, 1, 2), Packer(7, 1, 2)
    rows_a = a.add(docs)
    lengths = np.array([len(d) for d in docs])
    rows_b = b.add_flat(np.concatenate([np.array(d, dtype=np.int32) for d in docs]), lengths)
    np.testing.assert_array_equal(rows_a, rows_b)
    assert a.pending == b.pending and rows_a.size + a.pending == sum(lengths) + 2 * len(docs)
