"""Per-source deduplication, as the paper does it: each source on its own, by its own rule.

LLaMA (Touvron et al. 2023, section 2.1) names one rule per source, and none for the others:

- `lines` (CommonCrawl): CCNet's line-level dedup (Wenzek et al. 2020, section 3.2; cc_net
  `dedup.py`, `deduplicate_two_pass`). Lines are normalized (`clean.commoncrawl.
  normalize_line`) and hashed; every copy of a line that occurs more than once within a group
  of shards is removed, the first copy too, and a document left without content is dropped
  ("cc_all_lines_duplicate"). CCNet's shard is an input file here; `line_group_shards` files
  (in the source's listed order) form a group, as CCNet's `mine.py` groups `hash_in_mem` (50)
  shards' hashes. It runs before the per-document rules, as in CCNet.
- `exact` (GitHub): "we deduplicate the resulting dataset at the file level, with exact
  matches" (section 2.1). Key: SHA-256 of the cleaned file (`clean.github.file_key`).
  Dropped: "github_exact_duplicate".
- `overlap` (Books): "removing books with more than 90% content overlap" (section 2.1).
  Content overlap is the Jaccard similarity of the documents' word 5-gram sets; candidate
  pairs come from MinHash LSH (`clean.books`), each is checked exactly, and in `order_key`
  order a document is dropped when it overlaps more than the threshold with one kept before
  it ("books_near_duplicate"). RedPajama-v1 used SimHash on 6-grams for the same rule; a
  Jaccard checked exactly makes the 90% line exact.

Other sources (C4, Wikipedia, ArXiv, Stack Exchange) get none unless configured
(`CorpusConfig.dedup.sources`), and nothing is deduplicated across sources unless
`dedup.cross_source` asks (`data.dedup`, off by default): a Wikipedia article quoted on a
crawled page stays in both.

Each rule has a single-process reference (`*_rows`, over `read.to_row` rows, with the
`clean` package's `LineDeduplicator`, `ExactFileDeduplicator` and `BookDeduplicator`) and a
Ray Data version (`*_dataset`) that decides the same, whatever the blocks: hashes and
signatures are partitioned across tasks by `groupby` (by line hash, file hash, LSH band),
and the driver holds only what was found (candidate and duplicate pairs), never the
documents or the hash sets. Rows that are not documents of the source pass through.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping

import numpy as np

from llamaray.config import DedupConfig, SourceDedupConfig
from llamaray.data.clean.books import (
    BANDS,
    NUM_PERM,
    BookDeduplicator,
    MinHasher,
    candidate_threshold,
    estimated_jaccard,
    exact_jaccard,
    shingles,
)
from llamaray.data.clean.commoncrawl import LineDeduplicator, line_hashes, remove_lines
from llamaray.data.clean.github import ExactFileDeduplicator, file_key
from llamaray.data.dedup import order_key
from llamaray.data.read import from_row, to_row
from llamaray.data.records import Rejected

ORIGINS: dict[str, str] = {
    "lines": "CCNet (Wenzek et al. 2020, section 3.2), as LLaMA section 2.1 applies it to "
    "CommonCrawl: every copy of a line repeated within a shard group is removed",
    "exact": "LLaMA section 2.1 (GitHub): file-level dedup with exact matches",
    "overlap": "LLaMA section 2.1 (Books): documents with more than the threshold of content "
    "overlap (word 5-gram Jaccard) are removed; RedPajama-v1 did the same with SimHash",
    "cross_source": "not in the paper: exact + MinHash near-dedup across all sources "
    "(data.dedup), on request only",
}
"""Where each rule comes from, for the manifest."""


def reason_of(step: str, source: str) -> str:
    """The rejection reason of `step` on `source`: "cc_all_lines_duplicate" (lines on
    commoncrawl; "<source>_all_lines_duplicate" elsewhere), "<source>_exact_duplicate",
    "<source>_near_duplicate" (so "github_exact_duplicate", "books_near_duplicate")."""
    if step == "lines":
        return (
            "cc_all_lines_duplicate" if source == "commoncrawl" else f"{source}_all_lines_duplicate"
        )
    return {"exact": f"{source}_exact_duplicate", "overlap": f"{source}_near_duplicate"}[step]


def steps_of(rules: SourceDedupConfig) -> list[str]:
    """The rules configured for one source, in the order they run."""
    return [
        step
        for step, on in (
            ("lines", rules.lines),
            ("exact", rules.exact),
            ("overlap", rules.overlap is not None),
        )
        if on
    ]


def shard_groups(files: list[str], group_shards: int) -> dict[str, int]:
    """Each input file's shard group: files in their listed order, `group_shards` a group
    (0: one group). CCNet's `mine.py`: shard i uses the hashes of group i // hash_in_mem."""
    return {path: (i // group_shards if group_shards else 0) for i, path in enumerate(files)}


def origin_path(origin: str) -> str:
    """The file of a "path:line" origin."""
    return origin.rpartition(":")[0]


def manifest_entry(
    cfg: DedupConfig, source: str, dropped: Mapping[str, int], lines_removed: int = 0
) -> dict:
    """What deduplication ran on `source` and what it removed, for the manifest."""
    rules = cfg.sources.get(source, SourceDedupConfig())
    steps = []
    for step in steps_of(rules) if cfg.enabled else []:
        reason = reason_of(step, source)
        entry = {"step": step, "origin": ORIGINS[step], "reason": reason}
        if step == "lines":
            entry["line_group_shards"] = rules.line_group_shards
            entry["lines_removed"] = lines_removed
        if step == "overlap":
            entry["max_overlap"] = rules.overlap
        entry["documents_removed"] = int(dropped.get(reason, 0))
        steps.append(entry)
    if cfg.enabled and cfg.cross_source:
        removed = sum(int(dropped.get(r, 0)) for r in ("exact_duplicate", "near_duplicate"))
        steps.append(
            {"step": "cross_source", "origin": ORIGINS["cross_source"],
             "near_threshold": cfg.near_threshold, "documents_removed": removed}
        )  # fmt: skip
    return {"steps": steps, "cross_source": bool(cfg.enabled and cfg.cross_source)}


# ----------------------------------------------------------------- single process


def _docs_of(rows: list[dict], source: str) -> list[int]:
    return [i for i, r in enumerate(rows) if r["kind"] == "doc" and r["source"] == source]


def line_dedup_rows(
    rows: list[dict], source: str, groups: Mapping[str, int]
) -> tuple[list[dict], int]:
    """`rows` with CCNet's line dedup applied to `source`'s documents, group by group
    (`groups`: file -> shard group); and the lines removed. The reference for
    `line_dedup_dataset`."""
    members: dict[int, list[int]] = defaultdict(list)
    for i in _docs_of(rows, source):
        members[groups.get(origin_path(rows[i]["origin"]), -1)].append(i)
    out, removed = list(rows), 0
    for idx in members.values():
        dedup = LineDeduplicator(reason_of("lines", source))
        for i, item in zip(idx, dedup.process(from_row(rows[i]) for i in idx), strict=True):
            out[i] = to_row(item)
        removed += dedup.lines_removed
    return out, removed


def _in_order(rows: list[dict], source: str) -> list[int]:
    return sorted(_docs_of(rows, source), key=lambda i: order_key(source, rows[i]["origin"]))


def exact_dedup_rows(rows: list[dict], source: str) -> list[dict]:
    """`rows` with `source`'s exact duplicates rejected, the first in `order_key` order kept."""
    out = list(rows)
    dedup = ExactFileDeduplicator(reason_of("exact", source))
    for i in _in_order(rows, source):
        out[i] = to_row(dedup.apply(from_row(rows[i])))
    return out


def overlap_dedup_rows(
    rows: list[dict], source: str, max_overlap: float, seed: int = 0
) -> list[dict]:
    """`rows` with `source`'s documents of more than `max_overlap` content overlap with an
    earlier kept one (in `order_key` order) rejected; `BookDeduplicator` decides."""
    out = list(rows)
    dedup = BookDeduplicator(max_overlap, seed=seed, reason=reason_of("overlap", source))
    for i in _in_order(rows, source):
        out[i] = to_row(dedup.apply(from_row(rows[i])))
    return out


# ----------------------------------------------------------------------- Ray Data


def _is_source_doc(source: str):
    from ray.data.expressions import col

    return (col("kind") == "doc") & (col("source") == source)


def _not_source_doc(source: str):
    from ray.data.expressions import col

    return (col("kind") != "doc") | (col("source") != source)


def _partitions(ds) -> int:
    # Ray's default (200 partitions) costs seconds on a small corpus.
    return max(1, ds.num_blocks())


def line_dedup_dataset(ds, source: str, groups: Mapping[str, int]):
    """CCNet line dedup of `source`'s documents on Ray Data: (dataset, lines removed).

    1. Each document's distinct line hashes with their count in it, keyed by shard group
       (map_batches); 2. grouped by (group, hash), the hashes seen more than once in the
       group come back with the documents holding them (groupby: the hash set is
       partitioned by hash across tasks); 3. those (document, hash) rows meet their
       documents in a groupby on the origin, which removes the lines. Same result as
       `line_dedup_rows`.

    Step 2 calls Python once per distinct (group, hash). An Arrow hash aggregate and a
    join back instead (`groupby(...).sum` + `Dataset.join`) measured slower here: 36.2 s
    against 25.4 s for `prepare` of 480k lines on 2 cores (docs/benchmarks.md).
    """
    docs = ds.filter(expr=_is_source_doc(source)).materialize()
    if docs.count() == 0:
        return ds, 0
    keys = docs.map_batches(_line_keys, batch_format="pyarrow", fn_kwargs={"groups": dict(groups)})
    repeated = (
        keys.groupby(["group", "hash"], num_partitions=_partitions(docs))
        .map_groups(_repeated_in_group, batch_format="pyarrow")
        .materialize()
    )
    if repeated.count() == 0:
        return ds, 0
    lines_removed = int(repeated.sum("n"))
    schema = docs.schema().base_schema
    tagged = docs.map_batches(_with_hash_column, batch_format="pyarrow")
    marks = repeated.map_batches(
        _as_mark_rows, batch_format="pyarrow", fn_kwargs={"schema": schema}
    )
    cleaned = (
        tagged.union(marks)
        .groupby("origin", num_partitions=_partitions(docs))
        .map_groups(
            _remove_marked_lines,
            batch_format="pyarrow",
            fn_kwargs={"reason": reason_of("lines", source), "schema": schema},
        )
    )
    rest = ds.filter(expr=_not_source_doc(source))
    return rest.union(cleaned), lines_removed


# Line hashes are unsigned 64-bit; they travel as int64 (the same bits): Ray Data's
# aggregations turn uint64 values past 2**63 into Python objects they cannot sort.
_TWO_63, _TWO_64 = 1 << 63, 1 << 64


def _line_keys(batch, *, groups: dict):
    import pyarrow as pa

    out: dict[str, list] = {"group": [], "hash": [], "origin": [], "n": []}
    for origin, text in zip(
        batch.column("origin").to_pylist(), batch.column("text").to_pylist(), strict=True
    ):
        counts: dict[int, int] = defaultdict(int)
        for h in line_hashes(text):
            if h is not None:
                counts[h] += 1
        group = groups.get(origin_path(origin), -1)
        for h, n in counts.items():
            out["group"].append(group)
            out["hash"].append(h - _TWO_64 if h >= _TWO_63 else h)  # as int64: see below
            out["origin"].append(origin)
            out["n"].append(n)
    schema = pa.schema(
        [("group", pa.int64()), ("hash", pa.int64()), ("origin", pa.string()), ("n", pa.int64())]
    )
    return pa.table(out, schema=schema)


def _repeated_in_group(group):
    """One (group, hash): its (origin, hash, n) rows when the line occurs twice or more."""
    import pyarrow.compute as pc

    if pc.sum(group["n"]).as_py() < 2:
        return group.slice(0, 0).select(["origin", "hash", "n"])
    return group.select(["origin", "hash", "n"])


def _with_hash_column(batch):
    import pyarrow as pa

    return batch.append_column("hash", pa.array(np.zeros(batch.num_rows, np.int64)))


def _as_mark_rows(batch, *, schema):
    import pyarrow as pa

    n = batch.num_rows
    columns = {}
    for field in schema:
        if field.name == "origin":
            columns["origin"] = batch["origin"]
        elif field.name == "kind":
            columns["kind"] = pa.array(["line"] * n, pa.string())
        else:
            columns[field.name] = pa.array([""] * n, field.type)
    columns["hash"] = batch["hash"]
    return pa.table(columns)


def _remove_marked_lines(group, *, reason: str, schema):
    """One origin's document row and its repeated lines' rows -> the document, deduplicated."""
    import pyarrow as pa

    kinds = group["kind"].to_pylist()
    hashes = group["hash"].to_pylist()
    repeated = {h % _TWO_64 for k, h in zip(kinds, hashes, strict=True) if k == "line"}
    rows = []
    for row in group.select(schema.names).to_pylist():
        if row["kind"] != "doc":
            continue
        item = from_row(row)
        if repeated:
            item, _ = remove_lines(item, repeated, reason)
        rows.append(to_row(item))
    return pa.Table.from_pylist(rows, schema=schema)


def _decide(ds, decided: dict[str, str], source: str):
    """`ds` with `source`'s documents named in `decided` (origin -> reason) rejected."""
    if not decided:
        return ds
    return ds.map_batches(
        _apply_decisions, batch_format="pyarrow", fn_kwargs={"decided": decided, "source": source}
    )


def _apply_decisions(batch, *, decided: dict, source: str):
    import pyarrow as pa

    out = []
    for row in batch.to_pylist():
        reason = (
            decided.get(row["origin"]) if row["kind"] == "doc" and row["source"] == source else None
        )
        out.append(row if reason is None else to_row(Rejected.of(from_row(row), reason)))
    return pa.Table.from_pylist(out, schema=batch.schema)


def exact_dedup_dataset(ds, source: str):
    """Exact file dedup of `source`'s documents on Ray Data (groupby on the file key); the
    first in `order_key` order is kept. Same decisions as `exact_dedup_rows`."""
    docs = ds.filter(expr=_is_source_doc(source)).materialize()
    if docs.count() == 0:
        return ds
    dups = (
        docs.map_batches(_file_keys, batch_format="pyarrow")
        .groupby("key", num_partitions=_partitions(docs))
        .map_groups(_later_copies, batch_format="pyarrow", fn_kwargs={"source": source})
        .take_all()
    )
    reason = reason_of("exact", source)
    return _decide(ds, {r["origin"]: reason for r in dups}, source)


def _file_keys(batch):
    import pyarrow as pa

    texts = batch.column("text").to_pylist()
    return pa.table(
        {"key": pa.array([file_key(t) for t in texts], pa.binary()), "origin": batch["origin"]}
    )


def _later_copies(group, *, source: str):
    import pyarrow as pa

    origins = sorted(set(group["origin"].to_pylist()), key=lambda o: order_key(source, o))
    return pa.table({"origin": pa.array(origins[1:], pa.string())})


def overlap_dedup_dataset(ds, source: str, max_overlap: float, seed: int = 0):
    """Near-duplicate removal of `source`'s documents on Ray Data, deciding as
    `overlap_dedup_rows`: MinHash signatures and LSH band keys per document (map_batches);
    candidate pairs within each band bucket (groupby on the band, estimate >= the candidate
    threshold); each candidate pair's overlap checked exactly on both shingle sets (a
    groupby on the pair brings them together); then, on the driver, which holds only the
    pairs, a document overlapping more than `max_overlap` with a kept one earlier in
    `order_key` order is dropped."""
    docs = ds.filter(expr=_is_source_doc(source)).materialize()
    if docs.count() == 0:
        return ds
    candidate = candidate_threshold(max_overlap)
    pairs = (
        docs.map_batches(_band_rows, batch_format="pyarrow", fn_kwargs={"seed": seed})
        .groupby("band", num_partitions=_partitions(docs))
        .map_groups(_candidate_pairs, batch_format="pyarrow", fn_kwargs={"candidate": candidate})
        .take_all()
    )
    unique = sorted({(p["a"], p["b"]) for p in pairs})
    if not unique:
        return ds
    pair_of: dict[str, list[int]] = defaultdict(list)
    for i, (a, b) in enumerate(unique):
        pair_of[a].append(i)
        pair_of[b].append(i)
    checked = (
        docs.map_batches(
            _shingle_rows, batch_format="pyarrow", fn_kwargs={"pair_of": dict(pair_of)}
        )
        .groupby("pair", num_partitions=_partitions(docs))
        .map_groups(_exact_overlap, batch_format="pyarrow")
        .take_all()
    )
    edges = [unique[r["pair"]] for r in checked if r["overlap"] > max_overlap]
    reason = reason_of("overlap", source)
    return _decide(ds, {o: reason for o in greedy_drops(edges, source)}, source)


def greedy_drops(edges: Iterable[tuple[str, str]], source: str) -> set[str]:
    """The documents a keep-the-first pass drops, given the pairs over the threshold: in
    `order_key` order, a document is dropped when it has an edge to a document kept before
    it (as `BookDeduplicator` does, streaming in that order)."""
    neighbours: dict[str, set[str]] = defaultdict(set)
    for a, b in edges:
        neighbours[a].add(b)
        neighbours[b].add(a)
    kept: set[str] = set()
    dropped: set[str] = set()
    for doc in sorted(neighbours, key=lambda o: order_key(source, o)):
        if neighbours[doc] & kept:
            dropped.add(doc)
        else:
            kept.add(doc)
    return dropped


def _band_rows(batch, *, seed: int):
    import pyarrow as pa

    hasher = MinHasher(NUM_PERM, seed)
    rows = NUM_PERM // BANDS
    out: dict[str, list] = {"band": [], "origin": [], "sig": []}
    for origin, text in zip(
        batch.column("origin").to_pylist(), batch.column("text").to_pylist(), strict=True
    ):
        sh = shingles(text)
        if sh.size == 0:  # no words: kept and never compared, as BookDeduplicator does
            continue
        sig = hasher.signature(sh)
        raw = sig.astype("<u8").tobytes()
        for b in range(BANDS):
            out["band"].append(b.to_bytes(2, "little") + raw[b * rows * 8 : (b + 1) * rows * 8])
            out["origin"].append(origin)
            out["sig"].append(raw)
    schema = pa.schema([("band", pa.binary()), ("origin", pa.string()), ("sig", pa.binary())])
    return pa.table(out, schema=schema)


def _candidate_pairs(group, *, candidate: float):
    import pyarrow as pa

    origins = group["origin"].to_pylist()
    a_out, b_out = [], []
    if len(origins) > 1:
        sigs = [np.frombuffer(s, dtype="<u8") for s in group["sig"].to_pylist()]
        for i in range(len(origins)):
            for j in range(i + 1, len(origins)):
                if origins[i] != origins[j] and estimated_jaccard(sigs[i], sigs[j]) >= candidate:
                    a, b = sorted((origins[i], origins[j]))
                    a_out.append(a)
                    b_out.append(b)
    return pa.table({"a": pa.array(a_out, pa.string()), "b": pa.array(b_out, pa.string())})


def _shingle_rows(batch, *, pair_of: dict):
    import pyarrow as pa

    out: dict[str, list] = {"pair": [], "origin": [], "shingles": []}
    for origin, text in zip(
        batch.column("origin").to_pylist(), batch.column("text").to_pylist(), strict=True
    ):
        pairs = pair_of.get(origin)
        if not pairs:
            continue
        raw = shingles(text).astype("<u8").tobytes()
        for p in pairs:
            out["pair"].append(p)
            out["origin"].append(origin)
            out["shingles"].append(raw)
    schema = pa.schema([("pair", pa.int64()), ("origin", pa.string()), ("shingles", pa.binary())])
    return pa.table(out, schema=schema)


def _exact_overlap(group):
    import pyarrow as pa

    sets = [np.frombuffer(s, dtype="<u8") for s in group["shingles"].to_pylist()]
    overlap = exact_jaccard(sets[0], sets[1]) if len(sets) == 2 else 0.0
    return pa.table(
        {"pair": group["pair"].slice(0, 1), "overlap": pa.array([overlap], pa.float64())}
    )


# ------------------------------------------------------------------- the two passes


def line_dedup(
    ds, cfg: DedupConfig, files: Mapping[str, list[str]]
) -> tuple[object, dict[str, int]]:
    """Line dedup (before cleaning) of every source configured with `lines`; the dataset and
    the lines removed per source."""
    removed: dict[str, int] = {}
    if not cfg.enabled:
        return ds, removed
    todo = [s for s in files if (rules := cfg.sources.get(s)) is not None and rules.lines]
    if todo:
        ds = ds.materialize()  # read once: each step below takes the dataset twice
    for source in todo:
        groups = shard_groups(list(files[source]), cfg.sources[source].line_group_shards)
        ds, removed[source] = line_dedup_dataset(ds, source, groups)
        ds = ds.materialize()
    return ds, removed


def document_dedup(ds, cfg: DedupConfig, sources: Iterable[str], seed: int):
    """Exact and overlap dedup (after cleaning) of each source as configured, then the
    cross-source pass when `cfg.cross_source`."""
    if not cfg.enabled:
        return ds
    for source in sources:
        rules = cfg.sources.get(source)
        if rules is None:
            continue
        if rules.exact:
            ds = exact_dedup_dataset(ds, source).materialize()
        if rules.overlap is not None:
            ds = overlap_dedup_dataset(ds, source, rules.overlap, seed).materialize()
    if cfg.cross_source:
        from llamaray.data.dedup import dedup_dataset

        ds = dedup_dataset(ds, threshold=cfg.near_threshold, seed=seed).materialize()
    return ds


__all__ = [
    "ORIGINS",
    "document_dedup",
    "exact_dedup_dataset",
    "exact_dedup_rows",
    "greedy_drops",
    "line_dedup",
    "line_dedup_dataset",
    "line_dedup_rows",
    "manifest_entry",
    "overlap_dedup_dataset",
    "overlap_dedup_rows",
    "reason_of",
    "shard_groups",
]
