"""Books: Project Gutenberg boilerplate removal and book-level near-duplicate removal.

LLaMA (Touvron et al. 2023, section 2.1): "We perform deduplication at the book level,
removing books with more than 90% content overlap." Content overlap here is the Jaccard
similarity of the books' word 5-gram sets, estimated with MinHash (128 permutations) and
confirmed exactly on the candidates.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from collections.abc import Iterable, Iterator

import numpy as np

from llamaray.data.records import Document, Rejected

REASONS: tuple[str, ...] = ("books_near_duplicate",)

# --- Project Gutenberg header and footer -----------------------------------------------------

# PG-19 (Rae et al. 2019), one of the paper's two book sets, is Gutenberg with these removed;
# raw Gutenberg texts carry a license header and footer around the markers.
_PG_START = re.compile(
    r"^\*{3}\s*START OF (?:THE|THIS) PROJECT GUTENBERG E-?BOOK.*$", re.IGNORECASE | re.MULTILINE
)
_PG_END = re.compile(
    r"^\*{3}\s*END OF (?:THE|THIS) PROJECT GUTENBERG E-?BOOK.*$", re.IGNORECASE | re.MULTILINE
)


def strip_gutenberg_boilerplate(text: str) -> str:
    """The text between Gutenberg's "*** START OF ..." and "*** END OF ..." lines, if present."""
    if start := _PG_START.search(text):
        text = text[start.end() :]
    if end := _PG_END.search(text):
        text = text[: end.start()]
    return text.strip()


def clean(doc: Document) -> Document:
    """Per-book cleaning; deduplication is stateful (`BookDeduplicator`)."""
    text = strip_gutenberg_boilerplate(doc.text)
    return doc if text == doc.text else dataclasses.replace(doc, text=text)


# --- near-duplicate removal ------------------------------------------------------------------

SHINGLE_WORDS = 5  # word 5-grams
NUM_PERM = 128  # MinHash permutations: the estimate's std is sqrt(J(1-J)/128) ~ 0.027 at 0.9
MAX_OVERLAP = 0.9  # LLaMA: remove books "with more than 90% content overlap"
# Pairs whose MinHash estimate reaches this are checked exactly: 0.8 is ~3.7 standard
# deviations below 0.9, so a true > 0.9 pair is practically never missed.
CANDIDATE_OVERLAP = 0.8
# LSH banding, 32 bands of 4 rows: a pair at Jaccard 0.8 shares a band with probability
# 1 - (1 - 0.8**4)**32 > 0.99999999, at 0.1 with probability 0.003.
BANDS, ROWS = 32, 4


def candidate_threshold(max_overlap: float) -> float:
    """The MinHash estimate from which a pair is checked exactly: 0.1 (~3.7 standard deviations
    of a 128-permutation estimate) below the threshold, so a pair over it is practically never
    missed."""
    return max(0.0, max_overlap - 0.1)


_U64 = np.uint64
_M1, _M2 = _U64(0xBF58476D1CE4E5B9), _U64(0x94D049BB133111EB)
_P = _U64(0x100000001B3)  # FNV-1a 64-bit prime, as the rolling-hash multiplier


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer: a bijective 64-bit hash, applied elementwise (wrapping)."""
    x = x ^ (x >> _U64(30))
    x = x * _M1
    x = x ^ (x >> _U64(27))
    x = x * _M2
    return x ^ (x >> _U64(31))


def _word_hash(word: str) -> int:
    return int.from_bytes(hashlib.blake2b(word.encode(), digest_size=8).digest(), "little")


def shingles(text: str, n: int = SHINGLE_WORDS) -> np.ndarray:
    """Sorted unique 64-bit hashes of the text's word n-grams (lowercased \\w+ words).

    A text of fewer than n words is one shingle; a text without words has none.
    """
    words = re.findall(r"\w+", text.lower())
    if not words:
        return np.empty(0, dtype=_U64)
    table = {w: _word_hash(w) for w in set(words)}
    ids = np.fromiter((table[w] for w in words), dtype=_U64, count=len(words))
    count = max(len(ids) - n + 1, 1)
    h = np.zeros(count, dtype=_U64)
    for k in range(min(n, len(ids))):
        h = h * _P + ids[k : k + count]
    return np.unique(_mix(h))


def exact_jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """|A ∩ B| / |A ∪ B| of two sorted unique hash arrays."""
    if a.size == 0 and b.size == 0:
        return 1.0
    inter = np.intersect1d(a, b, assume_unique=True).size
    return inter / (a.size + b.size - inter)


class MinHasher:
    """128 seeded hash functions; a set's signature is its minimum under each."""

    def __init__(self, num_perm: int = NUM_PERM, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.seeds = rng.integers(0, 2**64 - 1, size=num_perm, dtype=_U64, endpoint=True)

    def signature(self, shingle_hashes: np.ndarray, chunk: int = 16) -> np.ndarray:
        if shingle_hashes.size == 0:
            return np.full(self.seeds.size, np.iinfo(_U64).max, dtype=_U64)
        parts = [
            _mix(shingle_hashes[None, :] ^ self.seeds[i : i + chunk, None]).min(axis=1)
            for i in range(0, self.seeds.size, chunk)
        ]
        return np.concatenate(parts)


def estimated_jaccard(sig_a: np.ndarray, sig_b: np.ndarray) -> float:
    """The fraction of MinHash positions that agree: an unbiased estimate of Jaccard."""
    return float(np.mean(sig_a == sig_b))


class BookDeduplicator:
    """Keeps a book unless its 5-gram Jaccard with an already kept book exceeds 0.9.

    Candidates come from an LSH index over the kept books' MinHash signatures; those whose
    estimate reaches 0.8 are compared exactly on their shingle sets (kept in memory: 8 bytes
    per distinct 5-gram per kept book, about 0.5 GB per thousand novels). With
    `exact_check=False` the shingle sets are not kept and the estimate alone decides.
    Books without words are kept and not indexed.
    """

    def __init__(
        self,
        max_overlap: float = MAX_OVERLAP,
        *,
        candidate_overlap: float = CANDIDATE_OVERLAP,
        num_perm: int = NUM_PERM,
        bands: int = BANDS,
        seed: int = 0,
        exact_check: bool = True,
        reason: str = "books_near_duplicate",
    ) -> None:
        if num_perm % bands:
            raise ValueError(f"num_perm={num_perm} is not a multiple of bands={bands}")
        self.max_overlap = max_overlap
        self.candidate_overlap = min(candidate_overlap, candidate_threshold(max_overlap))
        self.reason = reason
        self.exact_check = exact_check
        self.bands = bands
        self.rows = num_perm // bands
        self.hasher = MinHasher(num_perm, seed)
        self.signatures: list[np.ndarray] = []
        self.shingle_sets: list[np.ndarray] = []
        self.index: dict[tuple[int, bytes], list[int]] = {}

    def _band_keys(self, sig: np.ndarray) -> list[tuple[int, bytes]]:
        return [(b, sig[b * self.rows : (b + 1) * self.rows].tobytes()) for b in range(self.bands)]

    def _match(self, sh: np.ndarray, sig: np.ndarray) -> tuple[int, float] | None:
        candidates = sorted({i for key in self._band_keys(sig) for i in self.index.get(key, ())})
        for i in candidates:
            estimate = estimated_jaccard(sig, self.signatures[i])
            if estimate < self.candidate_overlap:
                continue
            overlap = exact_jaccard(sh, self.shingle_sets[i]) if self.exact_check else estimate
            if overlap > self.max_overlap:
                return i, overlap
        return None

    def apply(self, doc: Document) -> Document | Rejected:
        sh = shingles(doc.text)
        if sh.size == 0:
            return doc
        sig = self.hasher.signature(sh)
        if self._match(sh, sig) is not None:
            return Rejected.of(doc, self.reason)
        n = len(self.signatures)
        self.signatures.append(sig)
        self.shingle_sets.append(sh if self.exact_check else np.empty(0, dtype=_U64))
        for key in self._band_keys(sig):
            self.index.setdefault(key, []).append(n)
        return doc

    def process(self, docs: Iterable[Document | Rejected]) -> Iterator[Document | Rejected]:
        """Dedups books in order (the first of a near-duplicate group is kept)."""
        for doc in docs:
            yield doc if isinstance(doc, Rejected) else self.apply(doc)
