"""`prepare`'s tokenize actor writing its own shards (`TokenizePackWrite`): the rows it
writes are exactly a plain reference packing of the same documents (encode each text,
join as bos doc eos, cut every seq_len + 1 tokens per source and split, each batch on its
own), whatever the encode chunking; its records count every document and token."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from llamaray.data import prepare
from llamaray.data.prepare import (
    TokenizePackWrite,
    _chunks_of_bytes,
    _tokenize_batch_rows,
    heldout,
)
from llamaray.data.sample_text import iter_texts, write_stdlib_sample
from llamaray.storage import filesystem
from llamaray.tokenizer import train_tokenizer

SEQ_LEN = 63
FRACTION = 0.2


@pytest.fixture(scope="module")
def docs_and_tokenizer(tmp_path_factory):
    root = tmp_path_factory.mktemp("tokenize-write")
    sample = write_stdlib_sample(root / "sample", 300_000)
    tok = train_tokenizer(list(sample.values()), root / "tok", vocab_size=600)
    docs = [(source, text) for source, path in sample.items() for text in iter_texts([path])]
    return docs, tok


def reference_rows(docs, tok, n_batches: int) -> dict[tuple[str, str], np.ndarray]:
    """Plain Python: per batch, every document's tokens between bos and eos, streamed per
    (source, split) in input order and cut into rows, the unfinished row dropped; the
    batches' rows in batch order."""
    width = SEQ_LEN + 1
    rows: dict[tuple[str, str], list[np.ndarray]] = {}
    for part in np.array_split(np.arange(len(docs)), n_batches):
        streams: dict[tuple[str, str], list[int]] = {}
        for source, text in (docs[i] for i in part):
            split = "validation" if heldout(text, FRACTION, 0) else "train"
            tokens = [tok.bos_id, *tok.encode(text), tok.eos_id]
            streams.setdefault((source, split), []).extend(tokens)
        for key, s in streams.items():
            cut = np.array(s[: len(s) // width * width], dtype=np.int32).reshape(-1, width)
            rows.setdefault(key, []).append(cut)
    return {key: np.concatenate(parts) for key, parts in rows.items()}


def run_actor(docs, tok, out, n_batches: int) -> list[dict]:
    fs, root = filesystem(str(out))
    actor = TokenizePackWrite(tok, FRACTION, 0, SEQ_LEN, fs, root)
    records = []
    for part in np.array_split(np.arange(len(docs)), n_batches):
        batch = {
            "source": np.array([docs[i][0] for i in part], dtype=object),
            "text": np.array([docs[i][1] for i in part], dtype=object),
        }
        records += actor(batch).to_pylist()
    return records


@pytest.mark.parametrize("chunk_bytes", [prepare.ENCODE_CHUNK_BYTES, 20_000])
def test_written_rows_are_the_reference_packing(docs_and_tokenizer, tmp_path, monkeypatch,
                                                chunk_bytes):  # fmt: skip
    docs, tok = docs_and_tokenizer
    monkeypatch.setattr(prepare, "ENCODE_CHUNK_BYTES", chunk_bytes)
    records = run_actor(docs, tok, tmp_path / "out", n_batches=3)
    expected = reference_rows(docs, tok, n_batches=3)
    for (source, split), rows in expected.items():
        mine = [r for r in records if (r["source"], r["split"]) == (source, split)]
        # Batch order: each batch's file holds that batch's rows.
        files = [r["path"] for r in mine if r["path"]]
        written = [
            pq.read_table(tmp_path / "out" / f)["tokens"].to_numpy(zero_copy_only=False)
            for f in files
        ]
        got = np.stack(np.concatenate(written)) if written else np.empty((0, SEQ_LEN + 1))
        assert np.array_equal(got, rows), (source, split)
        assert sum(r["rows"] for r in mine) == len(rows)
        assert sum(r["n_docs"] for r in mine) == sum(
            1 for s, t in docs if s == source and heldout(t, FRACTION, 0) == (split != "train")
        )
        assert sum(r["n_tokens"] for r in mine) == sum(
            len(tok.encode(t)) for s, t in docs
            if s == source and heldout(t, FRACTION, 0) == (split != "train")
        )  # fmt: skip
    assert len(expected) == 4  # code and prose, train and validation


def test_chunks_of_bytes_keep_every_text_in_order():
    texts = ["a" * n for n in (5, 1, 9, 3, 3, 20, 2)]
    chunks = list(_chunks_of_bytes(texts, 8))
    assert [t for c in chunks for t in c] == texts
    assert chunks == [texts[:3], texts[3:6], texts[6:]]
    assert list(_chunks_of_bytes([], 8)) == []


def test_batches_fill_shards_or_spread_a_small_corpus_over_the_pool():
    # A big corpus: SHARD_BYTES / 2 of text a batch.
    assert _tokenize_batch_rows(10**12, 10**8, 2) == round(prepare.SHARD_BYTES / 2 / 10_000)
    # A small one: BATCHES_PER_ACTOR batches per actor.
    n = _tokenize_batch_rows(200_000_000, 20_000, 2)
    assert n == 20_000 // (prepare.BATCHES_PER_ACTOR * 2)
    assert _tokenize_batch_rows(0, 0, 2) == 1
