"""Corpus-wide duplicate removal: exact duplicates, then near duplicates by MinHash + LSH.

Two stages, both over the `to_row` rows of `llamaray.data.read` (rows of kind "rejected" pass
through untouched):

1. Exact duplicates. `content_hash` keys a document by its text after a light normalization:
   leading and trailing whitespace stripped and every run of (Unicode) whitespace collapsed
   to one space; case and punctuation are kept. Of each group of equal keys the first
   document in `order_key` order is kept; the others become "exact_duplicate".
2. Near duplicates, among the documents left by stage 1. `MinHasher` signs a document by the
   MinHash of its word n-gram shingles; documents that share at least one LSH band are
   candidate pairs, and a candidate pair is an edge when its estimated Jaccard similarity
   (the fraction of equal signature values) is at least `threshold`. Each connected component
   of that graph (union-find) keeps its first document in `order_key` order; the others
   become "near_duplicate". A component is transitive: a document can be dropped as a near
   duplicate of one it is only similar to through a chain of others.

The kept document of a group is the smallest `order_key`: (source, path, line number), so
"a.jsonl:9" comes before "a.jsonl:10" (plain string order would not). The result depends on
the documents only, never on the order of the rows or their split into blocks. Rows are
identified by (source, origin), which `read_corpus` makes unique.

A dropped document becomes a row of kind "rejected" with reason "exact_duplicate" or
"near_duplicate" and the excerpt "duplicate of ORIGIN [SOURCE]" naming the kept document.

LSH bands x rows for `num_perm` permutations come from `lsh_params`: a band's rows all agree
with probability s**rows for documents of Jaccard s, so a pair becomes a candidate with
probability P(s) = 1 - (1 - s**rows)**bands, an S-curve. Candidates are verified, so a false
candidate costs only a comparison, but a missed one is a duplicate kept: `lsh_params` takes
the (bands, rows) whose P(threshold) is at least `min_recall` (0.9) and that, of those, makes
the fewest candidates below the threshold (least area under P(s) on [0, threshold]). For 128
permutations and threshold 0.8 that is 16 bands x 8 rows: P(0.8) = 0.947, P(0.5) = 0.061,
P(0.3) = 0.0010 (the S-curve's midpoint (1/16)**(1/8) is 0.71).

`dedup_rows` is the single-process reference; `dedup_dataset` does the same on Ray Data with
the work in `map_batches` and `groupby` tasks; the driver only holds the duplicates found
(exact duplicates and verified near-duplicate edges), never all the documents.
"""

from __future__ import annotations

import functools
import hashlib
import re
from collections.abc import Iterable

import numpy as np

from llamaray.data.read import to_row
from llamaray.data.records import Rejected

REASONS: dict[str, str] = {
    "exact_duplicate": "the same text, up to whitespace, as the document the excerpt names",
    "near_duplicate": "estimated Jaccard similarity of word n-grams at or above the threshold "
    "to the document the excerpt names (possibly through a chain of others)",
}

THRESHOLD = 0.8
NUM_PERM = 128
NGRAM = 5

MERSENNE_61 = np.uint64((1 << 61) - 1)
_MASK31 = np.uint64((1 << 31) - 1)
_MASK30 = np.uint64((1 << 30) - 1)
_WORD = re.compile(r"\w+")
_CHUNK = 512  # shingles permuted per numpy step: (num_perm, _CHUNK) uint64 temporaries


# --------------------------------------------------------------------------- keys


def content_hash(text: str) -> str:
    """Exact-duplicate key: blake2b-128 (hex) of the text with its whitespace normalized.

    Normalization: strip leading/trailing whitespace and collapse every run of whitespace
    (spaces, tabs, newlines, any Unicode whitespace) into one space. Nothing else changes.
    """
    normalized = " ".join(text.split())
    return hashlib.blake2b(normalized.encode("utf-8", "surrogatepass"), digest_size=16).hexdigest()


def order_key(source: str, origin: str) -> tuple:
    """Sort key deciding which copy is kept: (source, path, line number, origin)."""
    path, sep, line = origin.rpartition(":")
    if sep and line.isdigit():
        return (source, path, int(line), origin)
    return (source, origin, -1, origin)


def _fold61(s: np.ndarray) -> np.ndarray:
    """s mod 2**61-1 for any uint64 s."""
    r = (s & MERSENNE_61) + (s >> np.uint64(61))
    return np.minimum(r, r - MERSENNE_61)  # r - p wraps around (is huge) when r < p


class MinHasher:
    """MinHash signatures of word n-gram shingles.

    Words are the runs of Unicode word characters of the lowercased text (punctuation and
    whitespace separate words and are dropped). Shingles are the distinct runs of `ngram`
    consecutive words joined by a space; a document of fewer than `ngram` words is one
    shingle (its words joined), and one of no words at all is one shingle of its
    whitespace-normalized text. Each shingle is hashed to 64 bits (blake2b, 8-byte digest),
    then permuted by `num_perm` universal hashes h(x) = (a*x + b) mod 2**61-1 whose a, b come
    from `seed`; the signature holds each permutation's minimum.
    """

    def __init__(self, num_perm: int = NUM_PERM, ngram: int = NGRAM, seed: int = 0):
        if num_perm < 1 or ngram < 1:
            raise ValueError("num_perm and ngram must be at least 1")
        self.num_perm = num_perm
        self.ngram = ngram
        self.seed = seed
        rng = np.random.default_rng(seed)
        self.a = rng.integers(1, MERSENNE_61, size=(num_perm, 1), dtype=np.uint64)
        self.b = rng.integers(0, MERSENNE_61, size=(num_perm, 1), dtype=np.uint64)
        self._a1, self._a0 = self.a >> np.uint64(31), self.a & _MASK31

    def shingles(self, text: str) -> set[str]:
        words = _WORD.findall(text.lower())
        n = self.ngram
        if len(words) < n:
            return {" ".join(words) if words else " ".join(text.split())}
        return {" ".join(words[i : i + n]) for i in range(len(words) - n + 1)}

    def permute(self, x: np.ndarray) -> np.ndarray:
        """(a*x + b) mod 2**61-1 for uint64 x < 2**61: shape (num_perm, len(x)).

        Exact, without overflow: a and x are split at bit 31 so that each partial product
        fits in 64 bits, and 2**61 = 1 (mod 2**61-1) folds the high parts down.
        """
        x = x[None, :]
        x1, x0 = x >> np.uint64(31), x & _MASK31
        t = self._a0 * x1
        mid = self._a1 * x0
        mid += t  # < 2**62, weight 2**31
        np.multiply(self._a1, x1, out=t)  # < 2**60, weight 2**62 = 2 (mod p)
        t <<= np.uint64(1)
        s = self._a0 * x0  # < 2**62, weight 1
        s += t
        # mid * 2**31 = (mid >> 30) * 2**61 + (mid & (2**30-1)) * 2**31, and 2**61 = 1
        np.right_shift(mid, np.uint64(30), out=t)
        s += t
        mid &= _MASK30
        mid <<= np.uint64(31)
        s += mid
        s += self.b  # s < 2**63 + 2**61 + 2**32: no overflow
        np.right_shift(s, np.uint64(61), out=t)
        s &= MERSENNE_61
        s += t  # <= p + 7
        np.subtract(s, MERSENNE_61, out=t)
        return np.minimum(s, t, out=s)

    def signature(self, text: str) -> np.ndarray:
        """uint64 array of shape (num_perm,), each value below 2**61-1."""
        digests = b"".join(
            hashlib.blake2b(s.encode("utf-8", "surrogatepass"), digest_size=8).digest()
            for s in self.shingles(text)
        )
        x = _fold61(np.frombuffer(digests, dtype="<u8").astype(np.uint64))
        sig = np.full(self.num_perm, MERSENNE_61, dtype=np.uint64)
        for i in range(0, len(x), _CHUNK):
            np.minimum(sig, self.permute(x[i : i + _CHUNK]).min(axis=1), out=sig)
        return sig


def jaccard_estimate(sig_a: np.ndarray, sig_b: np.ndarray) -> float:
    """Fraction of equal signature values: an unbiased estimate of the shingle Jaccard."""
    return float(np.mean(sig_a == sig_b))


def lsh_bands(sig: np.ndarray, bands: int, rows: int) -> list[str]:
    """One key per band: "band index:blake2b-64 hex of the band's values"."""
    if bands * rows > len(sig):
        raise ValueError(f"{bands} bands x {rows} rows need {bands * rows} values, not {len(sig)}")
    raw = np.ascontiguousarray(sig[: bands * rows], dtype="<u8").tobytes()
    width = rows * 8
    return [
        f"{i}:{hashlib.blake2b(raw[i * width : (i + 1) * width], digest_size=8).hexdigest()}"
        for i in range(bands)
    ]


def candidate_probability(s: float | np.ndarray, bands: int, rows: int):
    """P(two documents of Jaccard s share a band) = 1 - (1 - s**rows)**bands."""
    return 1.0 - (1.0 - np.asarray(s, dtype=float) ** rows) ** bands


@functools.lru_cache(maxsize=64)
def lsh_params(
    num_perm: int = NUM_PERM, threshold: float = THRESHOLD, min_recall: float = 0.9
) -> tuple[int, int]:
    """(bands, rows), bands * rows <= num_perm, for a Jaccard threshold (see module doc).

    Of the splits with candidate_probability(threshold) >= min_recall, the one with the least
    area under the S-curve below the threshold (fewest false candidates); ties go to more
    rows. If none reaches min_recall, the one with the highest recall at the threshold.
    """
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be in (0, 1], not {threshold}")
    s = np.linspace(0.0, threshold, 401)
    best, fallback = None, None
    for rows in range(1, num_perm + 1):
        bands = num_perm // rows
        recall = float(candidate_probability(threshold, bands, rows))
        p = candidate_probability(s, bands, rows)
        false_area = float(np.sum((p[1:] + p[:-1]) * np.diff(s)) / 2)
        if recall >= min_recall and (best is None or false_area <= best[0]):
            best = (false_area, bands, rows)
        if fallback is None or recall >= fallback[0]:
            fallback = (recall, bands, rows)
    _, bands, rows = best if best is not None else fallback
    return bands, rows


@functools.lru_cache(maxsize=8)
def _hasher(num_perm: int, ngram: int, seed: int) -> MinHasher:
    return MinHasher(num_perm, ngram, seed)


# --------------------------------------------------------------------------- shared core


class _UnionFind:
    def __init__(self):
        self.parent: dict = {}

    def find(self, x):
        parent = self.parent
        root = x
        while parent.get(root, root) != root:  # an unseen x is its own root
            root = parent[root]
        while x != root:  # path compression
            parent[x], x = root, parent[x]
        return root

    def union(self, x, y) -> bool:
        self.parent.setdefault(x, x)
        self.parent.setdefault(y, y)
        rx, ry = self.find(x), self.find(y)
        if rx == ry:
            return False
        self.parent[rx] = ry
        return True

    def components(self) -> dict:
        groups: dict = {}
        for x in list(self.parent):
            groups.setdefault(self.find(x), []).append(x)
        return groups


def _exact_dups(members: list[tuple[str, str]]) -> list[tuple[tuple[str, str], tuple[str, str]]]:
    """For one content-hash group of (source, origin): [(duplicate, kept)]."""
    ordered = sorted(set(members), key=lambda m: order_key(*m))
    return [(m, ordered[0]) for m in ordered[1:]]


def _band_edges(
    members: list[tuple[str, str]], sigs: np.ndarray, threshold: float
) -> list[tuple[tuple[str, str], tuple[str, str]]]:
    """For one LSH band bucket: verified edges forming a spanning forest of its members.

    Every pair of the bucket is compared; an edge joins a pair whose estimated Jaccard is at
    least `threshold`. Only edges that join two components are returned: they connect the
    same documents as all the verified edges do, in at most len(members) - 1 rows.
    """
    order = sorted(range(len(members)), key=lambda i: order_key(*members[i]))
    members = [members[i] for i in order]
    sigs = sigs[order]
    uf = _UnionFind()
    edges = []
    for i in range(len(members) - 1):
        similar = np.mean(sigs[i + 1 :] == sigs[i], axis=1) >= threshold
        for j in np.flatnonzero(similar) + i + 1:
            if members[i] != members[j] and uf.union(i, int(j)):
                edges.append((members[i], members[j]))
    return edges


def _near_dups(edges: Iterable[tuple[tuple[str, str], tuple[str, str]]]) -> dict:
    """{duplicate: kept} from verified edges: each component keeps its smallest order_key."""
    uf = _UnionFind()
    for x, y in edges:
        uf.union(x, y)
    out = {}
    for members in uf.components().values():
        kept = min(members, key=lambda m: order_key(*m))
        out.update({m: kept for m in members if m != kept})
    return out


def _rejected_row(row: dict, reason: str, kept: tuple[str, str]) -> dict[str, str]:
    kept_source, kept_origin = kept
    excerpt = f"duplicate of {kept_origin} [{kept_source}]"
    return to_row(Rejected(row["origin"], reason, row["source"], excerpt))


# --------------------------------------------------------------------------- single process


def dedup_rows(
    rows: list[dict],
    threshold: float = THRESHOLD,
    num_perm: int = NUM_PERM,
    seed: int = 0,
    ngram: int = NGRAM,
) -> tuple[list[dict], list[dict]]:
    """(kept rows, rejected rows) of `to_row` rows, in memory; the reference for Ray.

    Kept rows are the input rows that stay, unchanged and in input order: every row of kind
    "rejected" and every document that is no duplicate. Rejected rows are one new row per
    dropped document (reason "exact_duplicate" or "near_duplicate"), in input order.
    """
    bands, rows_per_band = lsh_params(num_perm, threshold)
    hasher = _hasher(num_perm, ngram, seed)
    docs = [r for r in rows if r["kind"] == "doc"]

    by_hash: dict[str, list[tuple[str, str]]] = {}
    for r in docs:
        by_hash.setdefault(content_hash(r["text"]), []).append((r["source"], r["origin"]))
    decided: dict[tuple[str, str], tuple[str, tuple[str, str]]] = {}
    for members in by_hash.values():
        for dup, kept in _exact_dups(members):
            decided[dup] = ("exact_duplicate", kept)

    sig_of: dict[tuple[str, str], np.ndarray] = {}
    buckets: dict[str, list[tuple[str, str]]] = {}
    for r in docs:
        key = (r["source"], r["origin"])
        if key in decided or key in sig_of:
            continue
        sig_of[key] = hasher.signature(r["text"])
        for band in lsh_bands(sig_of[key], bands, rows_per_band):
            buckets.setdefault(band, []).append(key)
    edges = []
    for members in buckets.values():
        if len(members) > 1:
            sigs = np.stack([sig_of[m] for m in members])
            edges.extend(_band_edges(members, sigs, threshold))
    for dup, kept in _near_dups(edges).items():
        decided[dup] = ("near_duplicate", kept)

    kept_rows, rejected_rows = [], []
    for r in rows:
        decision = decided.get((r["source"], r["origin"])) if r["kind"] == "doc" else None
        if decision is None:
            kept_rows.append(r)
        else:
            rejected_rows.append(_rejected_row(r, *decision))
    return kept_rows, rejected_rows


# --------------------------------------------------------------------------- Ray Data


def dedup_dataset(
    ds,
    threshold: float = THRESHOLD,
    num_perm: int = NUM_PERM,
    seed: int = 0,
    ngram: int = NGRAM,
    num_partitions: int | None = None,
):
    """`ds` with every duplicate document turned into a rejected row; same decisions as
    `dedup_rows`, whatever the blocks and their order.

    Steps: a `map_batches` signs each document (content hash, MinHash signature, band keys);
    a `groupby` on the content hash finds exact duplicates; the remaining documents' band keys
    are exploded into (band key, document) rows and grouped by band key, where each bucket of
    two or more verifies its pairs on the signatures. The driver collects the exact
    duplicates and the verified edges only, runs union-find, and a last `map_batches` over
    `ds` rewrites the dropped documents. The row count does not change.

    `num_partitions` is the hash partitions of each `groupby` (default: the number of blocks
    of the signed documents; Ray's own default, 200, costs seconds on a small dataset).
    """
    import ray  # noqa: F401  (the Dataset methods below need Ray initialized)

    bands, rows_per_band = lsh_params(num_perm, threshold)
    signed = ds.map_batches(
        _sign_batch,
        batch_format="pyarrow",
        fn_kwargs={
            "num_perm": num_perm,
            "ngram": ngram,
            "seed": seed,
            "bands": bands,
            "rows": rows_per_band,
        },
    ).materialize()
    if signed.count() == 0:
        return ds
    partitions = num_partitions or max(1, signed.num_blocks())

    exact = (
        signed.select_columns(["hash", "source", "origin"])
        .groupby("hash", num_partitions=partitions)
        .map_groups(_exact_group, batch_format="pyarrow")
        .take_all()
    )
    decided: dict[tuple[str, str], tuple[str, tuple[str, str]]] = {
        (r["source"], r["origin"]): ("exact_duplicate", (r["kept_source"], r["kept_origin"]))
        for r in exact
    }

    band_rows = signed.map_batches(
        _explode_bands, batch_format="pyarrow", fn_kwargs={"drop": frozenset(decided)}
    )
    edges = (
        band_rows.groupby("band", num_partitions=partitions)
        .map_groups(_band_group, batch_format="pyarrow", fn_kwargs={"threshold": threshold})
        .take_all()
    )
    near = _near_dups(((e["source"], e["origin"]), (e["source2"], e["origin2"])) for e in edges)
    for dup, kept in near.items():
        decided[dup] = ("near_duplicate", kept)

    if not decided:
        return ds
    return ds.map_batches(_apply_batch, batch_format="pyarrow", fn_kwargs={"decided": decided})


def _schema(**fields):
    import pyarrow as pa

    return pa.schema(list(fields.items()))


def _sign_batch(batch, *, num_perm: int, ngram: int, seed: int, bands: int, rows: int):
    import pyarrow as pa

    hasher = _hasher(num_perm, ngram, seed)
    out: dict[str, list] = {"source": [], "origin": [], "hash": [], "sig": [], "bands": []}
    kinds = batch.column("kind").to_pylist()
    texts = batch.column("text").to_pylist()
    sources = batch.column("source").to_pylist()
    origins = batch.column("origin").to_pylist()
    for kind, text, source, origin in zip(kinds, texts, sources, origins, strict=True):
        if kind != "doc":
            continue
        sig = hasher.signature(text)
        out["source"].append(source)
        out["origin"].append(origin)
        out["hash"].append(content_hash(text))
        out["sig"].append(sig.astype("<u8").tobytes())
        out["bands"].append(lsh_bands(sig, bands, rows))
    schema = _schema(
        source=pa.string(),
        origin=pa.string(),
        hash=pa.string(),
        sig=pa.binary(),
        bands=pa.list_(pa.string()),
    )
    return pa.table(out, schema=schema)


def _exact_group(group):
    import pyarrow as pa

    members = list(
        zip(group.column("source").to_pylist(), group.column("origin").to_pylist(), strict=True)
    )
    dups = _exact_dups(members) if len(members) > 1 else []
    schema = _schema(
        source=pa.string(), origin=pa.string(), kept_source=pa.string(), kept_origin=pa.string()
    )
    return pa.table(
        {
            "source": [d[0] for d, _ in dups],
            "origin": [d[1] for d, _ in dups],
            "kept_source": [k[0] for _, k in dups],
            "kept_origin": [k[1] for _, k in dups],
        },
        schema=schema,
    )


def _explode_bands(batch, *, drop: frozenset):
    import pyarrow as pa

    out: dict[str, list] = {"band": [], "source": [], "origin": [], "sig": []}
    cols = [batch.column(c).to_pylist() for c in ("source", "origin", "sig", "bands")]
    for source, origin, sig, bands in zip(*cols, strict=True):
        if (source, origin) in drop:
            continue
        for band in bands:
            out["band"].append(band)
            out["source"].append(source)
            out["origin"].append(origin)
            out["sig"].append(sig)
    schema = _schema(band=pa.string(), source=pa.string(), origin=pa.string(), sig=pa.binary())
    return pa.table(out, schema=schema)


def _band_group(group, *, threshold: float):
    import pyarrow as pa

    edges = []
    if group.num_rows > 1:
        members = list(
            zip(
                group.column("source").to_pylist(),
                group.column("origin").to_pylist(),
                strict=True,
            )
        )
        sigs = np.stack([np.frombuffer(s, dtype="<u8") for s in group.column("sig").to_pylist()])
        edges = _band_edges(members, sigs, threshold)
    schema = _schema(
        source=pa.string(), origin=pa.string(), source2=pa.string(), origin2=pa.string()
    )
    return pa.table(
        {
            "source": [x[0] for x, _ in edges],
            "origin": [x[1] for x, _ in edges],
            "source2": [y[0] for _, y in edges],
            "origin2": [y[1] for _, y in edges],
        },
        schema=schema,
    )


def _apply_batch(batch, *, decided: dict):
    import pyarrow as pa

    rows = batch.to_pylist()
    out = []
    for r in rows:
        decision = decided.get((r["source"], r["origin"])) if r["kind"] == "doc" else None
        out.append(r if decision is None else _rejected_row(r, *decision))
    return pa.Table.from_pylist(out, schema=batch.schema)
