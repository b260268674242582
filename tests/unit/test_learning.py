"""The model learns real text: held-out loss falls well below what token statistics give."""

from __future__ import annotations

import numpy as np
import pytest

from llamaray.config import load_config
from llamaray.data.local import prepare_rows
from llamaray.data.sample_text import iter_texts, write_stdlib_sample
from llamaray.tokenizer import train_tokenizer
from llamaray.train.loop import train_local

VOCAB = 1024


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    root = tmp_path_factory.mktemp("learning")
    paths = list(write_stdlib_sample(root / "corpus", 1_000_000).values())
    tok = train_tokenizer(paths, root / "tok", vocab_size=VOCAB)
    return prepare_rows(iter_texts(paths), tok, seq_len=64, validation_fraction=0.05, seed=0)


def unigram_entropy(train: np.ndarray) -> float:
    counts = np.bincount(train[:, 1:].ravel(), minlength=VOCAB).astype(float)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def bigram_cross_entropy(train: np.ndarray, val: np.ndarray) -> float:
    """Held-out loss of an add-one-smoothed bigram model: the best a model that ignores
    all context beyond the current token can roughly do."""
    counts = np.ones((VOCAB, VOCAB))
    np.add.at(counts, (train[:, :-1].ravel(), train[:, 1:].ravel()), 1)
    probs = counts / counts.sum(1, keepdims=True)
    return float(-np.log(probs[val[:, :-1].ravel(), val[:, 1:].ravel()]).mean())


@pytest.mark.slow  # 300 training steps
def test_loss_falls_below_unigram_and_bigram_baselines(rows):
    train, val = rows
    cfg = load_config(None, [
        "model.preset=debug", "model.dim=128", "model.n_heads=4",
        "train.seq_len=64", "train.batch_tokens=1024", "train.micro_batch_size=16",
        "train.steps=300", "train.log_every=100",
        "optimizer.lr=3e-3", "optimizer.warmup_steps=20",
    ])  # fmt: skip
    result = train_local(cfg, train, val, vocab_size=VOCAB)
    h1, h2 = unigram_entropy(train), bigram_cross_entropy(train, val)
    assert h2 < h1  # sanity of the baselines themselves (about 4.2 < 5.8 nats)
    first = np.mean([r["loss"] for r in result.history[:5]])
    assert first > h1  # it starts knowing nothing (about ln 1024 = 6.9)
    assert result.val_loss < 0.7 * h1
    assert result.val_loss < h2 - 0.3  # only context beyond one token gets here
    assert result.skipped_steps == 0
