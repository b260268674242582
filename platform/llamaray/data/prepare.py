"""`llamaray prepare`: the paper's data recipe as one Ray Data pipeline.

    read (JSONL/Parquet/text, gz/zst, local or s3://; bad records become rejections)
    -> clean per source (CCNet line dedup within each block, then the source's rules)
    -> exact + near-duplicate removal across the whole corpus
    -> [tokenizer trained on the cleaned text, unless one is given]
    -> tokenize in an actor pool, hold out documents per source by a hash of their origin
    -> pack into rows of seq_len + 1 tokens within each block
    -> Parquet shards partitioned by source and split, a quarantine file, a manifest.

Every input record ends as exactly one of: a kept document or a rejection with a reason,
so the manifest's documents in = kept + dropped by reason, per source. Tokens lost to
packing (the unfinished row at the end of each block) are counted too.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import pyarrow as pa

from llamaray.config import CorpusConfig
from llamaray.data.clean import DEDUPLICATORS, clean_document
from llamaray.data.clean.commoncrawl import skipped_steps
from llamaray.data.packing import Packer
from llamaray.data.read import QuarantineWriter, from_row, read_corpus, to_row
from llamaray.data.records import Document
from llamaray.tokenizer import Tokenizer, train_tokenizer

MANIFEST = "manifest.json"
QUARANTINE = "quarantine.jsonl"
SHARDS = "shards"
# Trainers read rows in a shuffled mixture order, one row group at a time (`data.feed`):
# 64 rows (512 KiB at seq_len 2048) keeps a random read small without a huge footer.
ROW_GROUP_ROWS = 64


def _say(msg: str) -> None:
    print(f"[prepare] {msg}", file=sys.stderr, flush=True)


def _rows(batch: dict) -> list[dict]:
    keys = list(batch)
    return [dict(zip(keys, values, strict=True)) for values in zip(*batch.values(), strict=True)]


def _columns(rows: list[dict], keys: list[str]) -> dict[str, list]:
    return {k: [r[k] for r in rows] for k in keys}


# ------------------------------------------------------------------------------- clean


def clean_block(batch: dict, options: dict | None = None) -> dict:
    """Clean one block. CommonCrawl line dedup is stateful over the block, which plays the
    role of CCNet's shard; whole-corpus duplicates are removed later, across blocks.
    `options`: keyword arguments per source's cleaner (see `clean_document`)."""
    rows = _rows(batch)
    line_dedup = DEDUPLICATORS["commoncrawl"]()
    out = []
    for row in rows:
        item = from_row(row)
        if isinstance(item, Document):
            if item.source == "commoncrawl":
                item = line_dedup.apply(item)
            if isinstance(item, Document):
                item = clean_document(item, options)
        out.append(to_row(item))
    return _columns(out, list(batch))


# ---------------------------------------------------------------------------- tokenize


def heldout(origin: str, fraction: float, seed: int) -> bool:
    """Deterministic per-document split: the same document is held out in every run."""
    if fraction <= 0:
        return False
    digest = hashlib.blake2b(f"{seed}:{origin}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64 < fraction


class TokenizePack:
    """Actor-pool UDF: documents -> packed rows of seq_len + 1 tokens, in one pass.

    Each actor keeps one `Packer` per (source, split), so a document that does not fill a
    row continues into the next batch's; only an actor's last unfinished row per (source,
    split) is lost, and the manifest shows it. Besides the rows (kind "row") it emits one
    row per (source, split) and batch with the documents and tokens seen (kind "stats").
    """

    def __init__(self, tokenizer: Tokenizer, validation_fraction: float, seed: int, seq_len: int):
        self.tokenizer, self.fraction, self.seed = tokenizer, validation_fraction, seed
        self.seq_len = seq_len
        self.packers: dict[tuple[str, str], Packer] = {}

    def __call__(self, batch: dict) -> pa.Table:
        texts = [str(t) for t in batch["text"]]
        # One thread per actor: the pool scales across cores, threads would oversubscribe them.
        ids = self.tokenizer.encode_batch(texts, num_threads=1)
        lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
        values = np.fromiter(itertools.chain.from_iterable(ids), np.int32, count=lengths.sum())
        starts = np.concatenate(([0], np.cumsum(lengths)))
        groups: dict[tuple[str, str], list[int]] = defaultdict(list)
        for i, (source, origin) in enumerate(zip(batch["source"], batch["origin"], strict=True)):
            split = "validation" if heldout(str(origin), self.fraction, self.seed) else "train"
            groups[(str(source), split)].append(i)
        kinds, sources, splits, n_docs, n_tokens, rows = [], [], [], [], [], []
        for key, members in sorted(groups.items()):
            idx = np.asarray(members)
            group_values = np.concatenate([values[starts[i] : starts[i + 1]] for i in idx])
            packer = self.packers.setdefault(
                key, Packer(self.seq_len, self.tokenizer.bos_id, self.tokenizer.eos_id)
            )
            packed = packer.add_flat(group_values, lengths[idx])
            count = len(packed) + 1
            kinds += ["row"] * len(packed) + ["stats"]
            sources += [key[0]] * count
            splits += [key[1]] * count
            n_docs += [0] * len(packed) + [len(idx)]
            n_tokens += [0] * len(packed) + [int(lengths[idx].sum())]
            rows += [packed, np.zeros((1, self.seq_len + 1), dtype=np.int32)]
        width = self.seq_len + 1
        tokens = np.concatenate(rows) if rows else np.empty((0, width), dtype=np.int32)
        return pa.table(
            {
                "kind": pa.array(kinds, pa.string()),
                "source": pa.array(sources, pa.string()),
                "split": pa.array(splits, pa.string()),
                "n_docs": pa.array(n_docs, pa.int64()),
                "n_tokens": pa.array(n_tokens, pa.int64()),
                "tokens": pa.FixedSizeListArray.from_arrays(pa.array(tokens.ravel()), width),
            }
        )


def of_kind(table: pa.Table, kind: str) -> pa.Table:
    """Rows of one kind, filtered in Arrow (a Python filter would box every token)."""
    import pyarrow.compute as pc

    return table.filter(pc.equal(table["kind"], kind))


# ---------------------------------------------------------------------------- pipeline


def prepare_corpus(cfg: CorpusConfig) -> dict:
    """Run the pipeline on the running Ray cluster; return the manifest (also written)."""
    import ray.data
    from ray.data.context import ShuffleStrategy

    ctx = ray.data.DataContext.get_current()
    saved = ctx.execution_options.preserve_order, ctx.shuffle_strategy
    ctx.execution_options.preserve_order = True  # same input, same shards, every run
    # Ray 2.60's hash-shuffle groupby failed here concatenating a partition that received no
    # rows (schema-less empty table) and spends ~10 s starting its actors; the sort-based
    # shuffle does neither.
    ctx.shuffle_strategy = ShuffleStrategy.SORT_SHUFFLE_PULL_BASED
    try:
        return _run(cfg)
    finally:
        ctx.execution_options.preserve_order, ctx.shuffle_strategy = saved


def _run(cfg: CorpusConfig) -> dict:
    start = time.perf_counter()
    out = Path(cfg.output_dir).resolve() / cfg.name
    out.mkdir(parents=True, exist_ok=True)
    sources = cfg.sources or _demo_sources(cfg, out)
    licenses = list(cfg.github_extra_licenses)
    if not cfg.sources and "PSF-2.0" not in licenses:
        # The built-in sample is the standard library, PSF-licensed by construction; a
        # config with real sources keeps the paper's MIT/BSD/Apache unless it asks.
        licenses.append("PSF-2.0")

    _say(f"reading {len(sources)} source(s): {', '.join(sources)}")
    ds = read_corpus(sources, strict=cfg.strict)
    ds = ds.map_batches(
        clean_block,
        fn_kwargs={"options": {"github": {"extra_licenses": tuple(licenses)}}},
        batch_size=None,
    )  # fmt: skip
    if cfg.dedup.enabled:
        from llamaray.data.dedup import dedup_dataset

        ds = dedup_dataset(ds, threshold=cfg.dedup.near_threshold, seed=cfg.seed)
    ds = ds.materialize()

    counts = _count_outcomes(ds)
    n_rejected = _write_quarantine(ds, out / QUARANTINE)
    _say(f"cleaned and deduplicated: {n_rejected} record(s) rejected, see {out / QUARANTINE}")
    docs = ds.filter(lambda r: r["kind"] == "doc").select_columns(["source", "origin", "text"])

    tokenizer = _tokenizer(cfg, docs, out)
    packed = docs.map_batches(
        TokenizePack,
        fn_constructor_kwargs={
            "tokenizer": tokenizer,
            "validation_fraction": cfg.validation_fraction,
            "seed": cfg.seed,
            "seq_len": cfg.seq_len,
        },
        concurrency=cfg.tokenize_actors,
        batch_format="numpy",
    ).materialize()
    stats = packed.map_batches(of_kind, fn_args=("stats",), batch_format="pyarrow")
    token_counts = _sum_tokens(stats)
    shards = out / SHARDS
    packed.map_batches(of_kind, fn_args=("row",), batch_format="pyarrow").select_columns(
        ["source", "split", "tokens"]
    ).write_parquet(str(shards), partition_cols=["source", "split"], row_group_size=ROW_GROUP_ROWS)
    manifest = _manifest(cfg, sources, counts, token_counts, shards, tokenizer, out)
    manifest["elapsed_s"] = round(time.perf_counter() - start, 2)
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2))
    _say(_summary(manifest))
    _say(f"manifest: {out / MANIFEST}")
    return manifest


def _demo_sources(cfg: CorpusConfig, out: Path) -> dict[str, list[str]]:
    from llamaray.data.sample_text import write_stdlib_sample

    _say("no sources configured: building the standard-library sample (code as github)")
    sample = write_stdlib_sample(out / "sample", int(cfg.sample_mb * 1e6), cfg.seed)
    # Code gets the GitHub rules; its PSF license is accepted for the sample (see _run).
    return {"github": [str(sample["code"])], "prose": [str(sample["prose"])]}


def _count_outcomes(ds) -> dict[str, dict]:
    table = ds.groupby(["source", "kind", "reason"]).count().take_all()
    counts: dict[str, dict] = defaultdict(lambda: {"kept": 0, "dropped": {}})
    for row in table:
        entry = counts[row["source"]]
        n = row["count()"]
        if row["kind"] == "doc":
            entry["kept"] += n
        else:
            entry["dropped"][row["reason"]] = entry["dropped"].get(row["reason"], 0) + n
    for entry in counts.values():
        entry["documents_in"] = entry["kept"] + sum(entry["dropped"].values())
    return dict(counts)


def _write_quarantine(ds, path: Path) -> int:
    path.unlink(missing_ok=True)
    with QuarantineWriter(path) as writer:
        for row in ds.filter(lambda r: r["kind"] == "rejected").iter_rows():
            writer.write(from_row(row))
        return writer.count


def _tokenizer(cfg: CorpusConfig, docs, out: Path) -> Tokenizer:
    if cfg.tokenizer.path:
        return Tokenizer(cfg.tokenizer.path)
    text_file = out / "tokenizer" / "train.txt"
    text_file.parent.mkdir(parents=True, exist_ok=True)
    with text_file.open("w", encoding="utf-8") as f:
        for row in docs.iter_rows():
            f.write(row["text"] + "\n")
    _say(f"training a {cfg.tokenizer.vocab_size}-piece tokenizer on the cleaned text")
    tokenizer = train_tokenizer([text_file], out / "tokenizer", vocab_size=cfg.tokenizer.vocab_size)
    text_file.unlink()
    return tokenizer


def _sum_tokens(stats) -> dict[tuple[str, str], dict]:
    from ray.data.aggregate import Sum

    rows = stats.groupby(["source", "split"]).aggregate(Sum("n_docs"), Sum("n_tokens")).take_all()
    return {
        (r["source"], r["split"]): {"documents": r["sum(n_docs)"], "tokens": r["sum(n_tokens)"]}
        for r in rows
    }


def _manifest(cfg, sources, counts, token_counts, shards: Path, tokenizer, out: Path) -> dict:
    import pyarrow.parquet as pq

    per_source: dict[str, dict] = {}
    for name in sources:
        entry = counts.get(name, {"kept": 0, "dropped": {}, "documents_in": 0})
        splits = {}
        for split in ("train", "validation"):
            part = shards / f"source={name}" / f"split={split}"
            files = sorted(str(p.relative_to(out)) for p in part.glob("*.parquet"))
            n_rows = sum(pq.ParquetFile(out / f).metadata.num_rows for f in files)
            tok = token_counts.get((name, split), {"documents": 0, "tokens": 0})
            splits[split] = {
                "documents": tok["documents"],
                "tokens": tok["tokens"],
                "rows": n_rows,
                "packed_tokens": n_rows * (cfg.seq_len + 1),
                "files": files,
            }
        per_source[name] = {"paths": sources[name], **entry, "splits": splits}
    config_json = cfg.model_dump_json()
    return {
        "name": cfg.name,
        "config": json.loads(config_json),
        "config_hash": hashlib.sha256(config_json.encode()).hexdigest()[:16],
        "tokenizer": {"path": str(tokenizer.path), "vocab_size": tokenizer.vocab_size},
        "seq_len": cfg.seq_len,
        "row_tokens": cfg.seq_len + 1,
        "sources": per_source,
        "skipped_steps": skipped_steps() if "commoncrawl" in sources else {},
        "quarantine": QUARANTINE,
    }


def _summary(manifest: dict) -> str:
    lines = [f"{'source':14} {'in':>8} {'kept':>8} {'dropped':>8} {'train tok':>10} {'rows':>7}"]
    for name, s in manifest["sources"].items():
        lines.append(
            f"{name:14} {s['documents_in']:8} {s['kept']:8} {sum(s['dropped'].values()):8} "
            f"{s['splits']['train']['tokens']:10} {s['splits']['train']['rows']:7}"
        )
    return "\n".join(lines)


def load_rows(corpus_dir: str | Path, source: str, split: str = "train") -> np.ndarray:
    """Packed (n, seq_len + 1) int32 rows of one source and split, from a prepared corpus."""
    import pyarrow.parquet as pq

    corpus_dir = Path(corpus_dir)
    manifest = json.loads((corpus_dir / MANIFEST).read_text())
    width = manifest["row_tokens"]
    files = manifest["sources"][source]["splits"][split]["files"]
    if not files:
        return np.empty((0, width), dtype=np.int32)
    column = pa.concat_arrays(
        [
            c
            for f in files
            for c in pq.read_table(corpus_dir / f, columns=["tokens"])["tokens"].chunks
        ]
    )
    return np.asarray(column.flatten(), dtype=np.int32).reshape(-1, width)
