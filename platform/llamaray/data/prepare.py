"""`llamaray prepare`: the paper's data recipe as one Ray Data pipeline.

    read (JSONL/Parquet/text, gz/zst, local or s3://; bad records become rejections)
    -> select (the paper's Wikipedia languages and Stack Exchange sites; `data.select`)
    -> CCNet line dedup of CommonCrawl within each group of shards (`data.source_dedup`)
    -> clean per source (the source's rules, `data.clean`; for CommonCrawl the model steps
       of `data.quality`: fastText language id, KenLM perplexity buckets, the reference
       classifier, each with the model file `quality` names)
    -> dedup per source as the paper (GitHub exact files, Books > 90% overlap;
       `data.source_dedup`), across sources only when `dedup.cross_source` asks
    -> [tokenizer trained on a bounded sample of the cleaned text, unless one is given]
    -> tokenize in an actor pool, hold out documents per source by a hash of their text
    -> pack into rows of seq_len + 1 tokens within each block
    -> Parquet shards partitioned by source and split, quarantine files, a manifest.

Every input record ends as exactly one of: a kept document or a rejection with a reason,
so the manifest's documents in = kept + dropped by reason, per source. Tokens lost to
packing (the unfinished row at the end of each block) are counted too.

Where things go. The corpus is `<output_dir>/<name>`, a local path or `s3://bucket/prefix`
(`data.corpus_layout`). Each build holds the corpus's lock (`data.corpus_lock`: a second
launch fails at once, naming the holder) and writes into a fresh version folder,
`versions/<version>/`, never into an earlier build's; it switches the corpus to it only
when complete, by writing the version's manifest and then the pointer `manifest.json`.
Everything lands in the version folder, written by the process that makes it:
the built-in sample (`sample/`, by the driver, before the read tasks need it), the
quarantine (`quarantine/*.jsonl`, by tasks, up to QUARANTINE_ROWS records a file), the
tokenizer (`tokenizer/tokenizer.model`, by the driver that trained it), the shards
(`shards/source=<s>/split=<t>/<digest>.parquet`, by the tokenize actor that packed
the rows, one file per batch, up to about SHARD_BYTES, so rows never pass through Ray's
object store) and `manifest.json`. The write tasks and actors return what they wrote
(path, source, split, rows) and the manifest is built from those records, never from a
listing; every path in it is relative to the version folder (in the pointer, to the
corpus), so a corpus can be copied or moved and still opens. Only bounded amounts reach
the driver: counts, these records, and the tokenizer's training sample
(`tokenizer_sample_bytes`; the manifest's `tokenizer.trained_on` says how it was taken).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import pyarrow as pa

from llamaray.config import CorpusConfig
from llamaray.console import logger
from llamaray.data.clean import clean_document
from llamaray.data.corpus_layout import (
    MANIFEST,  # noqa: F401 (re-exported: the manifest's name, for readers of a version)
    VERSIONS,
    corpus_digest,
    new_version,
    prune_versions,
    switch_to,
    version_location,
)
from llamaray.data.corpus_layout import corpus_location as _corpus_location
from llamaray.data.corpus_lock import BuildLock
from llamaray.data.files import expand_paths
from llamaray.data.packing import Packer
from llamaray.data.quality import steps as quality_steps
from llamaray.data.read import from_row, read_corpus, to_row
from llamaray.data.records import Document
from llamaray.data.select import select_document
from llamaray.data.source_dedup import document_dedup, line_dedup, manifest_entry
from llamaray.placement import require_shared_state
from llamaray.storage import (
    filesystem,
    is_s3,
    join,
    put_bytes,
    read_bytes,
    upload,
    write_bytes,
)
from llamaray.tokenizer import Tokenizer, train_tokenizer

log = logger("prepare")

# A version's layout, every path relative to its folder `<output_dir>/<name>/versions/<v>`
# (`data.corpus_layout` owns the corpus around it, and MANIFEST's name).
QUARANTINE_DIR = "quarantine"
SHARDS = "shards"
SAMPLE = "sample"
TOKENIZER = "tokenizer/tokenizer.model"
# Trainers read rows in a shuffled mixture order, decoding a whole row group per row
# (`data.packed_corpus`, which indexes files, not groups, and keeps few footers, so in a big
# corpus a random row's file often needs its footer parsed again). Measured by
# `llamaray.bench.stream` (docs/benchmarks.md): decoding favours small groups (32 rows ~1.8x
# the rows/s of 64 from local disk), a footer's parse and size grow as groups shrink (1.5 ms
# and 64 KB, one S3 tail read, for a 128 MiB shard at 32; 2.5 ms and 130 KB at 16); from S3
# the GET's latency, not the group size, sets the pace.
ROW_GROUP_ROWS = 32
# Rows are gathered across blocks into files of about this size (one per source and split
# of a tokenize batch, see _tokenize_batch_rows), so a big corpus has thousands of shards,
# not one per small block.
SHARD_BYTES = 128 << 20
# Text a tokenize actor encodes at once (see TokenizePack._encode).
ENCODE_CHUNK_BYTES = 4 << 20
# Batches per tokenize actor at least, on a corpus too small to fill SHARD_BYTES batches:
# the pool's work is split evenly enough for every actor to stay busy to the end.
BATCHES_PER_ACTOR = 4
# Rejections written per quarantine file (an excerpt is at most 200 characters).
QUARANTINE_ROWS = 100_000


def _rows(batch: dict) -> list[dict]:
    keys = list(batch)
    return [dict(zip(keys, values, strict=True)) for values in zip(*batch.values(), strict=True)]


def _columns(rows: list[dict], keys: list[str]) -> dict[str, list]:
    return {k: [r[k] for r in rows] for k in keys}


# ------------------------------------------------------------------------------- clean


def clean_block(batch: dict, options: dict | None = None) -> dict:
    """Clean one block, document by document (line dedup ran before, over shard groups;
    the per-source document dedup runs after, `data.source_dedup`). `options`: keyword
    arguments per source's cleaner (see `clean_document`)."""
    out = []
    for row in _rows(batch):
        item = from_row(row)
        if isinstance(item, Document):
            item = clean_document(item, options)
        out.append(to_row(item))
    return _columns(out, list(batch))


def select_block(batch: dict, wikipedia_languages: tuple, stackexchange_sites: tuple) -> dict:
    """The paper's source selection on one block (`data.select.select_document`)."""
    out = []
    for row in _rows(batch):
        if row["kind"] == "doc" and row["source"] in ("wikipedia", "stackexchange"):
            row = to_row(
                select_document(
                    from_row(row),
                    wikipedia_languages=frozenset(wikipedia_languages),
                    stackexchange_sites=frozenset(stackexchange_sites),
                )
            )
        out.append(row)
    return _columns(out, list(batch))


# ---------------------------------------------------------------------------- tokenize


def heldout(key: str, fraction: float, seed: int) -> bool:
    """Deterministic per-document split, keyed by the document's text: the same document
    is held out in every run, wherever its file is stored (a key holding the file's path
    would move documents between splits when the raw data moves to S3)."""
    if fraction <= 0:
        return False
    digest = hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest()
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
        lengths, values = self._encode(texts)
        starts = np.concatenate(([0], np.cumsum(lengths)))
        groups: dict[tuple[str, str], list[int]] = defaultdict(list)
        for i, (source, text) in enumerate(zip(batch["source"], texts, strict=True)):
            split = "validation" if heldout(text, self.fraction, self.seed) else "train"
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

    def _encode(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Token counts and all tokens of `texts` as one flat int32 array. Encoded
        ENCODE_CHUNK_BYTES of text at a time: sentencepiece returns Python ints (about 36
        bytes each), so a whole large batch at once would hold gigabytes of them."""
        lengths, values = [], []
        for chunk in _chunks_of_bytes(texts, ENCODE_CHUNK_BYTES):
            # One thread per actor: the pool scales across cores, threads would oversubscribe them.
            ids = self.tokenizer.encode_batch(chunk, num_threads=1)
            counts = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
            lengths.append(counts)
            flat = itertools.chain.from_iterable(ids)
            values.append(np.fromiter(flat, np.int32, count=int(counts.sum())))
        if not lengths:
            return np.empty(0, np.int64), np.empty(0, np.int32)
        return np.concatenate(lengths), np.concatenate(values)


def _chunks_of_bytes(texts: list[str], limit: int):
    """`texts` in consecutive runs of about `limit` characters (at least one text each)."""
    start, size = 0, 0
    for i, text in enumerate(texts):
        size += len(text)
        if size >= limit:
            yield texts[start : i + 1]
            start, size = i + 1, 0
    if start < len(texts):
        yield texts[start:]


class TokenizePackWrite(TokenizePack):
    """`TokenizePack` that writes its rows itself: each batch's packed rows become one
    Parquet file per (source, split) (`write_shards`), straight from the actor to the
    output, and the actor returns only what it wrote and counted: one row per (source,
    split) of the batch with the file (`path`, empty when the batch completed no row),
    `rows`, `n_docs` and `n_tokens`. The rows never enter Ray's object store, so they are
    not copied through it, held there (spilled to disk on a big corpus) and read back by a
    separate write stage.

    Each batch is packed on its own (no carry from the actor's previous batch), so a
    batch's files depend only on its documents, not on which actor ran which batches
    before it. The batches are set by the corpus's size and, for a corpus of under
    BATCHES_PER_ACTOR x SHARD_BYTES / 2 of text per actor, by the pool's largest size
    (`_tokenize_batch_rows`): the same corpus on the same cluster gives the same shards. A batch
    drops its last unfinished row per (source, split), at most one row in about
    SHARD_BYTES / 2 of text, and the manifest's token counts show it."""

    def __init__(self, tokenizer: Tokenizer, validation_fraction: float, seed: int, seq_len: int,
                 fs, root: str):  # fmt: skip
        super().__init__(tokenizer, validation_fraction, seed, seq_len)
        self.fs, self.root = fs, root

    def __call__(self, batch: dict) -> pa.Table:
        self.packers = {}
        packed = super().__call__(batch)
        written = {
            (r["source"], r["split"]): r
            for r in write_shards(packed, self.fs, self.root).to_pylist()
        }
        stats = of_kind(packed, "stats").select(["source", "split", "n_docs", "n_tokens"])
        out = []
        for s in stats.to_pylist():
            record = written.get((s["source"], s["split"]), {"path": "", "rows": 0})
            out.append({**s, "path": record["path"], "rows": record["rows"]})
        return pa.Table.from_pylist(out, _WRITTEN)


_WRITTEN = pa.schema(
    [
        ("source", pa.string()),
        ("split", pa.string()),
        ("n_docs", pa.int64()),
        ("n_tokens", pa.int64()),
        ("path", pa.string()),
        ("rows", pa.int64()),
    ]
)


def of_kind(table: pa.Table, kind: str) -> pa.Table:
    """Rows of one kind, filtered in Arrow (a Python filter would box every token)."""
    import pyarrow.compute as pc

    return table.filter(pc.equal(table["kind"], kind))


# ---------------------------------------------------------------------------- pipeline


def corpus_location(cfg: CorpusConfig) -> str:
    """Where `cfg` puts its corpus: `<output_dir>/<name>`, a local path made absolute or an
    `s3://` URI (`data.corpus_layout.corpus_location`)."""
    return _corpus_location(cfg.output_dir, cfg.name)


def prepare_corpus(cfg: CorpusConfig) -> dict:
    """Run the pipeline on the running Ray cluster into a new version of the corpus and
    switch to it; return the corpus's manifest (its paths relative to the corpus), which
    is also written. `data.corpus_lock.CorpusLocked` when another launch is preparing it;
    `ConfigError` naming the settings when CommonCrawl's quality models are not all given
    (`check_models`)."""
    check_models(cfg)
    if "commoncrawl" in cfg.sources:
        # The model files are opened by cleaning tasks on any node: local ones only where
        # every node sees the driver's disk.
        require_shared_state(quality_steps.model_paths(cfg.quality), None)
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


def check_models(cfg: CorpusConfig) -> None:
    """With a commoncrawl source, its quality models must be set and their files there,
    unless `quality.allow_missing_models` (`data.quality.steps.check_models`); a
    `ConfigError` names each setting. Drivers call it before starting Ray."""
    if "commoncrawl" in cfg.sources:
        quality_steps.check_models(cfg.quality)


def _run(cfg: CorpusConfig) -> dict:
    corpus = corpus_location(cfg)
    version = new_version()
    with BuildLock(corpus, version) as lock:
        log.info(f"building version {version} of corpus {corpus}")
        manifest = _build(cfg, version_location(corpus, version))
        manifest["version"] = version
        manifest["digest"] = corpus_digest(manifest)
        lock.check()  # a build whose lock was taken over must not switch
        pointer = _pointer(manifest, f"{VERSIONS}/{version}", sample=not cfg.sources)
        switch_to(corpus, version, manifest, pointer)
        pruned = prune_versions(corpus, keep=None)  # incomplete ones: runs may read the rest
    log.info(_summary(manifest))
    log.info(f"corpus {corpus} is now version {version} (digest {manifest['digest']})")
    if pruned:
        log.info(f"removed incomplete version(s): {', '.join(pruned)}")
    return pointer


def _pointer(manifest: dict, prefix: str, *, sample: bool) -> dict:
    """The corpus's `manifest.json`: the version's manifest with every path into the
    version made relative to the corpus (`<prefix>/...`) and `version_path` = `prefix`.
    `sample`: the sources are the built-in sample, inside the version."""
    pointer = json.loads(json.dumps(manifest))
    pointer["version_path"] = prefix
    pointer["tokenizer"]["path"] = f"{prefix}/{manifest['tokenizer']['path']}"
    for entry in pointer["sources"].values():
        if sample:
            entry["paths"] = [f"{prefix}/{p}" for p in entry["paths"]]
        for split in entry["splits"].values():
            split["files"] = [f"{prefix}/{f}" for f in split["files"]]
    for f in pointer["quarantine"]["files"]:
        f["path"] = f"{prefix}/{f['path']}"
    return pointer


def _build(cfg: CorpusConfig, out: str) -> dict:
    """The pipeline, writing everything into the version folder `out`; its manifest."""
    from ray.data.expressions import col

    start = time.perf_counter()
    # The driver's filesystem goes to every write task: it pickles with the S3 settings the
    # driver resolved (storage.S3Storage), so the nodes need none of their own.
    fs, root = filesystem(out)
    sources = cfg.sources or _demo_sources(cfg, out)

    log.info(f"reading {len(sources)} source(s): {', '.join(sources)}")
    # Listed once, here: the read tasks get these files, and line dedup's shard groups are
    # made of them in this order.
    files = {name: expand_paths(patterns) for name, patterns in sources.items()}
    ds = read_corpus(files, strict=cfg.strict, max_chars=cfg.max_document_chars, expand=False)
    if {"wikipedia", "stackexchange"} & set(sources):
        ds = ds.map_batches(
            select_block,
            fn_kwargs={
                "wikipedia_languages": tuple(cfg.wikipedia_languages),
                "stackexchange_sites": tuple(cfg.stackexchange_sites),
            },
            batch_size=None,
        )
    ds, lines_removed = line_dedup(ds, cfg.dedup, files)
    ds = ds.map_batches(
        clean_block,
        fn_kwargs={"options": _clean_options(cfg)},
        batch_size=None,
    )  # fmt: skip
    ds = document_dedup(ds.materialize(), cfg.dedup, list(sources), cfg.seed).materialize()

    counts = _count_outcomes(ds)
    quarantine = _write_quarantine(ds, fs, root)
    log.info(
        f"cleaned and deduplicated: {quarantine['records']} record(s) rejected, see "
        f"{join(out, QUARANTINE_DIR)}"
    )
    # An Arrow predicate, not a Python function called on every row.
    docs = ds.filter(expr=col("kind") == "doc").select_columns(["source", "origin", "text"])

    tokenizer, tokenizer_entry = _tokenizer(cfg, docs, out)
    token_counts, shard_records = tokenize_and_write(
        docs,
        tokenizer,
        validation_fraction=cfg.validation_fraction,
        seed=cfg.seed,
        seq_len=cfg.seq_len,
        actors=cfg.tokenize_actors,
        fs=fs,
        root=root,
        # The text's size, not the records': those hold the input's paths, and the batches
        # (so the shards and the corpus's digest) must not depend on where the input is.
        docs_bytes=int(docs.map_batches(_text_bytes, batch_format="pyarrow").sum("bytes") or 0),
        n_docs=sum(c["kept"] for c in counts.values()),
    )
    manifest = _manifest(cfg, sources, out, counts, token_counts, shard_records, tokenizer_entry)
    for name, entry in manifest["sources"].items():
        entry["dedup"] = manifest_entry(
            cfg.dedup, name, entry["dropped"], lines_removed.get(name, 0)
        )
        if name == "commoncrawl":
            entry["quality"] = quality_steps.manifest_entry(
                cfg.quality, entry["dropped"], _bucket_counts(ds, cfg)
            )
        if name == "wikipedia":
            entry["selection"] = {"wikipedia_languages": list(cfg.wikipedia_languages)}
        elif name == "stackexchange":
            entry["selection"] = {"stackexchange_sites": list(cfg.stackexchange_sites)}
    manifest["quarantine"] = quarantine
    manifest["elapsed_s"] = round(time.perf_counter() - start, 2)
    return manifest


def _bucket_counts(ds, cfg: CorpusConfig) -> dict[str, int]:
    """Kept CommonCrawl pages per perplexity bucket (their `meta["ccnet"]["bucket"]`), when
    the perplexity step ran; only the counts reach the driver."""
    from ray.data.expressions import col

    if cfg.quality.perplexity_model is None:
        return {}
    pages = ds.filter(expr=(col("kind") == "doc") & (col("source") == "commoncrawl"))
    buckets = pages.map_batches(_bucket_of, batch_format="pyarrow")
    return {r["bucket"]: r["count()"] for r in buckets.groupby("bucket").count().take_all()}


def _bucket_of(batch: pa.Table) -> pa.Table:
    metas = batch["meta_json"].to_pylist()
    found = [json.loads(m).get("ccnet", {}).get("bucket", "") if m else "" for m in metas]
    return pa.table({"bucket": pa.array(found, pa.string())})


def _clean_options(cfg: CorpusConfig) -> dict:
    """The per-source cleaners' options (`clean_document`): CommonCrawl's quality models and
    thresholds, GitHub's accepted licenses."""
    licenses = list(cfg.github_extra_licenses)
    if not cfg.sources and "PSF-2.0" not in licenses:
        # The built-in sample is the standard library, PSF-licensed by construction; a
        # config with real sources keeps the paper's MIT/BSD/Apache unless it asks.
        licenses.append("PSF-2.0")
    q = cfg.quality
    models = [q.lid_model, q.perplexity_model, q.perplexity_tokenizer, q.perplexity_cutoffs,
              q.reference_model]  # fmt: skip
    # Models on S3 are read by the cleaning tasks with the driver's S3 settings.
    s3 = filesystem("s3://models")[0] if any(m and is_s3(m) for m in models) else None
    return {
        "github": {"extra_licenses": tuple(licenses)},
        "commoncrawl": {"quality": q, "s3": s3},
    }


def decide_rows(cfg: CorpusConfig, files: dict[str, list[str]]) -> tuple[list[dict], dict]:
    """What `_build` decides, in one process: the `to_row` rows left after read, select,
    line dedup, clean and the document dedup, and the lines removed per source. The
    reference the Ray pipeline is tested against (tests/ray/test_dedup_ray.py); it holds
    the whole corpus in memory, so it is for small corpora. `files`: source -> its files
    (`expand_paths`), in order."""
    from llamaray.data import source_dedup as sd
    from llamaray.data.dedup import dedup_rows
    from llamaray.data.read import iter_file

    rows = []
    for source, paths in files.items():
        for path in paths:
            for item in iter_file(
                path, source, strict=cfg.strict, max_chars=cfg.max_document_chars
            ):
                if isinstance(item, Document):
                    item = select_document(
                        item,
                        wikipedia_languages=frozenset(cfg.wikipedia_languages),
                        stackexchange_sites=frozenset(cfg.stackexchange_sites),
                    )
                rows.append(to_row(item))
    dedup, lines_removed = cfg.dedup, {}
    for source, paths in files.items():
        rules = dedup.sources.get(source)
        if dedup.enabled and rules is not None and rules.lines:
            groups = sd.shard_groups(list(paths), rules.line_group_shards)
            rows, lines_removed[source] = sd.line_dedup_rows(rows, source, groups)
    options = _clean_options(cfg)
    rows = [
        to_row(clean_document(item, options)) if isinstance(item := from_row(r), Document) else r
        for r in rows
    ]
    for source in files if dedup.enabled else ():
        rules = dedup.sources.get(source)
        if rules is not None and rules.exact:
            rows = sd.exact_dedup_rows(rows, source)
        if rules is not None and rules.overlap is not None:
            rows = sd.overlap_dedup_rows(rows, source, rules.overlap, cfg.seed)
    if dedup.enabled and dedup.cross_source:
        kept, dropped = dedup_rows(rows, threshold=dedup.near_threshold, seed=cfg.seed)
        rows = kept + dropped
    return rows, lines_removed


def outcomes(rows: list[dict]) -> dict[str, dict]:
    """Per source: documents_in, kept, dropped by reason (as the manifest counts them)."""
    counts: dict[str, dict] = defaultdict(lambda: {"kept": 0, "dropped": {}})
    for r in rows:
        entry = counts[r["source"]]
        if r["kind"] == "doc":
            entry["kept"] += 1
        else:
            entry["dropped"][r["reason"]] = entry["dropped"].get(r["reason"], 0) + 1
    for entry in counts.values():
        entry["documents_in"] = entry["kept"] + sum(entry["dropped"].values())
    return dict(counts)


def tokenize_and_write(
    docs, tokenizer: Tokenizer, *, validation_fraction: float, seed: int, seq_len: int,
    actors: int | None, fs, root: str, docs_bytes: int, n_docs: int,
) -> tuple[dict[tuple[str, str], dict], list[dict]]:  # fmt: skip
    """Tokenize, hold out, pack and write the documents `docs` (source, text) in the
    `TokenizePackWrite` actor pool; return the documents and tokens per (source, split)
    and the records of the shards written. Only those small records reach the driver.
    `docs_bytes` and `n_docs`, about the size and number of the documents (a materialized
    dataset's metadata gives them at no cost), size the batches (`_tokenize_batch_rows`)."""
    pool = _actor_pool(actors)
    batch_rows = _tokenize_batch_rows(docs_bytes, n_docs, pool.max_size or 1)
    # One block a batch: an actor task takes a whole block, so blocks bigger than a batch
    # would leave actors idle while one works through a block batch by batch. Materialized
    # first (a copy of the text, not of the rows): a task stage feeding the pool would wait
    # for CPUs the actors hold on a cluster the pool fills.
    # Strict: every block but the last holds exactly batch_rows, whatever blocks the read
    # made, so the batches (and the shards) are the same for a local and an S3 input.
    docs = docs.repartition(target_num_rows_per_block=batch_rows, strict=True).materialize()
    written = docs.map_batches(
        TokenizePackWrite,
        fn_constructor_kwargs={
            "tokenizer": tokenizer,  # pickles with its model bytes, not a local path
            "validation_fraction": validation_fraction,
            "seed": seed,
            "seq_len": seq_len,
            "fs": fs,
            "root": root,
        },
        compute=pool,
        batch_format="numpy",
        batch_size=batch_rows,
        # In order: the records come back in order anyway, and an actor then works
        # through its batches as the input holds them.
        allow_out_of_order_execution=False,
    ).take_all()
    token_counts: dict[tuple[str, str], dict] = defaultdict(lambda: {"documents": 0, "tokens": 0})
    for r in written:
        entry = token_counts[(r["source"], r["split"])]
        entry["documents"] += r["n_docs"]
        entry["tokens"] += r["n_tokens"]
    files = [{k: r[k] for k in ("path", "source", "split", "rows")} for r in written if r["path"]]
    return dict(token_counts), files


def _tokenize_batch_rows(docs_bytes: int, n_docs: int, actors: int) -> int:
    """Documents per tokenize batch: about SHARD_BYTES / 2 of text, or less where the
    corpus is too small to give every actor BATCHES_PER_ACTOR batches of that size. Each
    batch writes its own shard files, so this sets their size: text packs into about 1.2
    times its size of int32 rows (3 to 4 bytes of text a token)."""
    if n_docs <= 0 or docs_bytes <= 0:
        return 1
    target = min(SHARD_BYTES // 2, docs_bytes // (BATCHES_PER_ACTOR * actors))
    return max(1, round(target / (docs_bytes / n_docs)))


def _actor_pool(size: int | None):
    """The tokenize actor pool: `size` actors, or (None) from 1 up to the cluster's CPUs; an
    autoscaling cluster with no CPUs yet gets a pool Ray Data grows as nodes join."""
    import ray
    from ray.data import ActorPoolStrategy

    if size:
        return ActorPoolStrategy(size=size)
    cpus = int(ray.cluster_resources().get("CPU", 0))
    return ActorPoolStrategy(min_size=1, max_size=cpus if cpus >= 1 else None)


def _demo_sources(cfg: CorpusConfig, out: str) -> dict[str, list[str]]:
    from llamaray.data.sample_text import write_stdlib_sample

    log.info("no sources configured: building the standard-library sample (code as github)")
    # Written into the output, where the read tasks on any node find it.
    sample = write_stdlib_sample(join(out, SAMPLE), int(cfg.sample_mb * 1e6), cfg.seed)
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


# ------------------------------------------------------------------------ write tasks
# Each runs in a Ray task on whichever node holds its batch, writes straight to the output
# (local path or S3) and returns a small record of what it wrote; the manifest is built
# from these records, never from a listing.

_RECORD = pa.schema(
    [("path", pa.string()), ("source", pa.string()), ("split", pa.string()), ("rows", pa.int64())]
)


def _digest(*parts: bytes) -> str:
    h = hashlib.blake2b(digest_size=16)
    for part in parts:
        h.update(len(part).to_bytes(8, "little"))
        h.update(part)
    return h.hexdigest()


def write_quarantine_block(batch: pa.Table, fs, root: str) -> pa.Table:
    """The rejections of one batch -> `quarantine/<digest>.jsonl`; returns its record
    (path relative to the corpus, rows = records). Named by content: a retried task
    rewrites the same file."""
    rejected = of_kind(batch, "rejected")
    if not rejected.num_rows:
        return _RECORD.empty_table()
    data = "".join(from_row(r).quarantine_line() for r in rejected.to_pylist()).encode()
    relative = f"{QUARANTINE_DIR}/{_digest(data)}.jsonl"
    put_bytes(fs, f"{root}/{relative}", data)
    return pa.Table.from_pylist(
        [{"path": relative, "source": "", "split": "", "rows": rejected.num_rows}], _RECORD
    )


def _write_quarantine(ds, fs, root: str) -> dict:
    from ray.data.expressions import col

    records = (
        ds.filter(expr=col("kind") == "rejected")
        .map_batches(
            write_quarantine_block,
            fn_kwargs={"fs": fs, "root": root},
            batch_format="pyarrow",
            batch_size=QUARANTINE_ROWS,
        )
        .take_all()
    )
    files = sorted(({"path": r["path"], "records": r["rows"]} for r in records), key=_by_path)
    return {"records": sum(f["records"] for f in files), "files": files}


def _by_path(entry: dict) -> str:
    return entry["path"]


def write_shards(batch: pa.Table, fs, root: str) -> pa.Table:
    """The packed rows of one batch -> one Parquet file per (source, split) at
    `shards/source=<s>/split=<t>/<digest>.parquet` (row groups of `ROW_GROUP_ROWS` rows);
    returns a record per file (path relative to the corpus, source, split, rows). Named by
    content, so the same input gives the same files, and a retried task the same file."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    rows = of_kind(batch, "row")
    records = []
    keys = zip(rows["source"].to_pylist(), rows["split"].to_pylist(), strict=True)
    for source, split in sorted(set(keys)):
        mask = pc.and_(pc.equal(rows["source"], source), pc.equal(rows["split"], split))
        part = rows.filter(mask).select(["tokens"])
        tokens = part["tokens"].combine_chunks().flatten()
        name = _digest(source.encode(), split.encode(), np.asarray(tokens).tobytes())
        relative = f"{SHARDS}/source={source}/split={split}/{name}.parquet"
        sink = pa.BufferOutputStream()
        pq.write_table(part, sink, row_group_size=ROW_GROUP_ROWS)
        put_bytes(fs, f"{root}/{relative}", sink.getvalue().to_pybytes())
        records.append({"path": relative, "source": source, "split": split, "rows": len(part)})
    return pa.Table.from_pylist(records, _RECORD)


# -------------------------------------------------------------------------- tokenizer


def _text_bytes(batch: pa.Table) -> pa.Table:
    import pyarrow.compute as pc

    return pa.table({"bytes": pc.binary_length(batch["text"]).cast(pa.int64())})


def _tokenizer(cfg: CorpusConfig, docs, out: str) -> tuple[Tokenizer, dict]:
    """The corpus's tokenizer, saved at `tokenizer/tokenizer.model` in the corpus, and its
    manifest entry. A given one (`tokenizer.path`, local or s3://) is copied in, so the
    corpus is whole wherever it is moved; otherwise one is trained on the driver on a
    seeded random sample of at most `tokenizer_sample_bytes` of the cleaned text."""
    target = join(out, TOKENIZER)
    if cfg.tokenizer.path:
        model = read_bytes(cfg.tokenizer.path)
        write_bytes(target, model)
        tokenizer = Tokenizer.from_bytes(model, target)
        entry = {"copied_from": cfg.tokenizer.path, "sha256": hashlib.sha256(model).hexdigest()}
    else:
        tokenizer, entry = _train_tokenizer(cfg, docs, out)
    return tokenizer, {"path": TOKENIZER, "vocab_size": tokenizer.vocab_size, **entry}


def _train_tokenizer(cfg: CorpusConfig, docs, out: str) -> tuple[Tokenizer, dict]:
    total = int(docs.map_batches(_text_bytes, batch_format="pyarrow").sum("bytes") or 0)
    limit = cfg.tokenizer_sample_bytes
    fraction = min(1.0, limit / total) if total else 1.0
    # Only a bounded sample crosses to the driver: random_sample with a seed keeps the same
    # rows on every run of the same input.
    sample = docs if fraction >= 1.0 else docs.random_sample(fraction, seed=cfg.seed)
    n_docs = n_bytes = 0
    with tempfile.TemporaryDirectory(prefix="llamaray-tokenizer-") as tmp:
        text_file = Path(tmp) / "train.txt"
        with text_file.open("w", encoding="utf-8") as f:
            for batch in sample.select_columns(["text"]).iter_batches(batch_format="pyarrow"):
                for text in batch["text"].to_pylist():
                    f.write(text + "\n")
                    n_docs += 1
                    n_bytes += len(text.encode("utf-8"))
        how = f"a {fraction:.3g} sample, " if fraction < 1.0 else ""
        log.info(
            f"training a {cfg.tokenizer.vocab_size}-piece tokenizer on {how}{n_docs} "
            f"document(s), {n_bytes / 1e6:.1f} MB of the cleaned text"
        )
        trained = train_tokenizer(
            [text_file], Path(tmp) / "tokenizer", vocab_size=cfg.tokenizer.vocab_size
        )
        model = _portable(trained.path.read_bytes())
        write_bytes(join(out, TOKENIZER), model)
        upload(trained.path.with_suffix(".vocab"), join(out, "tokenizer", "tokenizer.vocab"))
    entry = {
        "sha256": hashlib.sha256(model).hexdigest(),
        "trained_on": {
            "documents": n_docs,
            "bytes": n_bytes,
            "corpus_bytes": total,
            "sampled": fraction < 1.0,
            "fraction": fraction,
            "seed": cfg.seed,
            "limit_bytes": limit,
            "how": "the whole cleaned text"
            if fraction >= 1.0
            else "Ray Data random_sample(fraction, seed) of the cleaned documents",
        },
    }
    return Tokenizer.from_bytes(model, join(out, TOKENIZER)), entry


def _portable(model: bytes) -> bytes:
    """A trained model without the trainer's scratch path in its spec (`model_prefix`): the
    same text gives the same bytes on every run, and the file names no folder of the
    driver's disk."""
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model)
    proto.trainer_spec.model_prefix = "tokenizer"
    return proto.SerializeToString()


# --------------------------------------------------------------------------- manifest


def _manifest(cfg, sources, out: str, counts, token_counts, shard_records, tokenizer) -> dict:
    """The manifest; every path in it that points into the corpus is relative to it."""
    files: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for r in shard_records:
        files[(r["source"], r["split"])].append(r)
    per_source: dict[str, dict] = {}
    for name in sources:
        entry = counts.get(name, {"kept": 0, "dropped": {}, "documents_in": 0})
        splits = {}
        for split in ("train", "validation"):
            written = sorted(files.get((name, split), []), key=_by_path)
            n_rows = sum(r["rows"] for r in written)
            tok = token_counts.get((name, split), {"documents": 0, "tokens": 0})
            splits[split] = {
                "documents": tok["documents"],
                "tokens": tok["tokens"],
                "rows": n_rows,
                "packed_tokens": n_rows * (cfg.seq_len + 1),
                "files": [r["path"] for r in written],
            }
        paths = [_relative(p, out) for p in sources[name]]
        per_source[name] = {"paths": paths, **entry, "splits": splits}
    config_json = cfg.model_dump_json()
    return {
        "name": cfg.name,
        "config": json.loads(config_json),
        "config_hash": hashlib.sha256(config_json.encode()).hexdigest()[:16],
        "tokenizer": tokenizer,
        "seq_len": cfg.seq_len,
        "row_tokens": cfg.seq_len + 1,
        "sources": per_source,
        # CommonCrawl's model steps that did not run (quality.allow_missing_models), and why.
        "skipped_steps": quality_steps.skipped(cfg.quality) if "commoncrawl" in sources else {},
    }


def _relative(path: str, out: str) -> str:
    """A source path inside the corpus (the built-in sample) relative to it; others as given."""
    prefix = out.rstrip("/") + "/"
    return path[len(prefix) :] if path.startswith(prefix) else path


def _summary(manifest: dict) -> str:
    lines = [f"{'source':14} {'in':>8} {'kept':>8} {'dropped':>8} {'train tok':>10} {'rows':>7}"]
    for name, s in manifest["sources"].items():
        lines.append(
            f"{name:14} {s['documents_in']:8} {s['kept']:8} {sum(s['dropped'].values()):8} "
            f"{s['splits']['train']['tokens']:10} {s['splits']['train']['rows']:7}"
        )
    return "\n".join(lines)
