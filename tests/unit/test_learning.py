"""The model learns real text: held-out loss falls well below what token statistics give.

Trained by the loop production runs (`train.worker.run_worker`, here with the in-process
`LocalLauncher`: one gloo rank, no Ray) on a corpus made by `prepare`'s own tokenize+pack
step (`TokenizePack`: documents held out by a hash of their text) and shard writer, and
read back with the trainers' reader (`data.packed_corpus.CorpusRows`).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pytest

from llamaray.config import load_config
from llamaray.data.packed_corpus import CorpusRows
from llamaray.data.prepare import MANIFEST, TOKENIZER, TokenizePack, write_shards
from llamaray.data.sample_text import iter_texts, write_stdlib_sample
from llamaray.storage import filesystem
from llamaray.tokenizer import train_tokenizer
from llamaray.train.launcher import LocalLauncher, ensure_process_group
from llamaray.train.worker import WorkerSpec, run_worker

VOCAB = 1024
SEQ_LEN = 64
SOURCE = "prose"  # not a paper source: the worker weighs it by its rows (all of them)


def text_corpus(root: Path) -> Path:
    """The standard-library sample as one source, tokenized, packed and held out by
    `prepare`'s TokenizePack (one block) and written by its `write_shards`."""
    paths = list(write_stdlib_sample(root / "sample", 1_000_000).values())
    tok = train_tokenizer(paths, root / "tok", vocab_size=VOCAB)
    corpus = root / "corpus"
    (corpus / TOKENIZER).parent.mkdir(parents=True)
    (corpus / TOKENIZER).write_bytes(tok.path.read_bytes())
    texts = list(iter_texts(paths))
    packed = TokenizePack(tok, validation_fraction=0.05, seed=0, seq_len=SEQ_LEN)(
        {"text": texts, "source": [SOURCE] * len(texts)}
    )
    fs, base = filesystem(str(corpus))
    records = write_shards(packed, fs, base).to_pylist()
    stats = packed.filter(pc.equal(packed["kind"], "stats")).to_pylist()
    splits = {}
    for split in ("train", "validation"):
        files = [r for r in records if r["split"] == split]
        counted = [s for s in stats if s["split"] == split]
        rows = sum(r["rows"] for r in files)
        splits[split] = {
            "documents": sum(s["n_docs"] for s in counted),
            "tokens": sum(s["n_tokens"] for s in counted),
            "rows": rows,
            "packed_tokens": rows * (SEQ_LEN + 1),
            "files": [r["path"] for r in files],
        }
    manifest = {
        "name": "learning", "config": {}, "config_hash": "0",
        "tokenizer": {"path": TOKENIZER, "vocab_size": VOCAB},
        "seq_len": SEQ_LEN, "row_tokens": SEQ_LEN + 1, "skipped_steps": {},
        "sources": {SOURCE: {"paths": [], "kept": len(texts), "dropped": {},
                             "documents_in": len(texts), "splits": splits}},
    }  # fmt: skip
    (corpus / MANIFEST).write_text(json.dumps(manifest))
    return corpus


def all_rows(corpus: Path, split: str) -> np.ndarray:
    rows = CorpusRows.open(str(corpus))
    return rows.rows(SOURCE, np.arange(rows.rows_per_source(split)[SOURCE]), split)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return text_corpus(tmp_path_factory.mktemp("learning"))


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
def test_loss_falls_below_unigram_and_bigram_baselines(corpus, tmp_path):
    train, val = all_rows(corpus, "train"), all_rows(corpus, "validation")
    cfg = load_config(None, [
        "name=learning", f"output_dir={tmp_path}", "tracking.enabled=false",
        "model.preset=debug", "model.dim=128", "model.n_heads=4",
        "train.seq_len=64", "train.batch_tokens=1024", "train.micro_batch_size=16",
        "train.num_workers=1", "train.device=cpu", "train.steps=300", "train.log_every=1",
        "train.checkpoint_every=0", f"data.eval_rows={len(val)}",
        "optimizer.lr=3e-3", "optimizer.warmup_steps=20",
    ])  # fmt: skip
    ensure_process_group()  # one gloo rank, never destroyed (see tests/unit/test_checkpoint.py)
    launcher = LocalLauncher(tmp_path / "checkpoints")
    result = run_worker(WorkerSpec(cfg.model_dump(), str(corpus), cfg.run_uri), launcher)
    assert (result.step, result.stopped, result.skipped_steps) == (300, None, 0)
    h1, h2 = unigram_entropy(train), bigram_cross_entropy(train, val)
    assert h2 < h1  # sanity of the baselines themselves (about 4.2 < 5.8 nats)
    first = np.mean([r["loss"] for r in launcher.reports[:5]])
    assert first > h1  # it starts knowing nothing (about ln 1024 = 6.9)
    val_loss = result.last[f"val_loss/{SOURCE}"]
    assert val_loss < 0.7 * h1
    assert val_loss < h2 - 0.3  # only context beyond one token gets here
