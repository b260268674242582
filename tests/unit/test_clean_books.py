"""Books: Gutenberg boilerplate and book-level near-duplicate removal (5-gram MinHash)."""

import numpy as np
import pytest

from llamaray.data.clean import BookDeduplicator, clean_document
from llamaray.data.clean.books import (
    MinHasher,
    estimated_jaccard,
    exact_jaccard,
    shingles,
    strip_gutenberg_boilerplate,
)
from llamaray.data.records import Document, Rejected

VOCAB = [f"w{i}" for i in range(3000)]


def book_words(seed: int, n: int = 4000) -> list[str]:
    rng = np.random.default_rng(seed)
    return [VOCAB[i] for i in rng.integers(0, len(VOCAB), n)]


def edited(words: list[str], fraction: float, seed: int = 99) -> list[str]:
    """A copy with `fraction` of the words replaced by words from outside the vocabulary."""
    rng = np.random.default_rng(seed)
    out = list(words)
    for i in rng.choice(len(words), int(len(words) * fraction), replace=False):
        out[i] = f"edit{i}"
    return out


def book(words: list[str], origin: str) -> Document:
    return Document(" ".join(words), "books", origin)


def test_gutenberg_header_and_footer_are_removed():
    text = (
        "The Project Gutenberg eBook of Emma\nLicense blah.\n"
        "*** START OF THE PROJECT GUTENBERG EBOOK EMMA ***\n\nEMMA\n\nChapter I\n\n"
        "*** END OF THE PROJECT GUTENBERG EBOOK EMMA ***\nMore license text."
    )
    assert strip_gutenberg_boilerplate(text) == "EMMA\n\nChapter I"
    out = clean_document(Document(text, "books", "pg:1"))
    assert isinstance(out, Document)
    assert out.text == "EMMA\n\nChapter I"
    plain = Document("Chapter I\n\nIt was a dark night.", "books", "pg:2")
    assert clean_document(plain) is plain


def test_shingles_are_case_insensitive_word_5_grams():
    assert shingles("a b c d e f").size == 2
    assert np.array_equal(shingles("A b, c d E!"), shingles("a B c d e"))
    assert not np.array_equal(shingles("a b c d e"), shingles("a b c d f"))
    assert shingles("a b c").size == 1  # shorter than 5 words: one shingle
    assert shingles("!!! ???").size == 0
    assert shingles("x y z x y z x y z").size == 3  # repeated 5-grams counted once


def test_minhash_estimates_jaccard():
    a = book_words(1)
    b = edited(a, 0.02)
    sh_a, sh_b = shingles(" ".join(a)), shingles(" ".join(b))
    hasher = MinHasher(seed=0)
    estimate = estimated_jaccard(hasher.signature(sh_a), hasher.signature(sh_b))
    assert estimate == pytest.approx(exact_jaccard(sh_a, sh_b), abs=0.1)
    assert np.array_equal(hasher.signature(sh_a), MinHasher(seed=0).signature(sh_a))
    assert not np.array_equal(hasher.signature(sh_a), MinHasher(seed=1).signature(sh_a))


def test_near_duplicates_over_90_percent_are_rejected_and_others_kept():
    original = book_words(1)
    near = edited(original, 0.005)  # ~2.5% of the 5-grams change: Jaccard ~0.95
    mid = edited(original, 0.015)  # ~7% change: Jaccard ~0.86
    other = book_words(2)
    sh = shingles(" ".join(original))
    assert exact_jaccard(sh, shingles(" ".join(near))) > 0.9
    assert 0.8 < exact_jaccard(sh, shingles(" ".join(mid))) <= 0.9

    dedup = BookDeduplicator()
    docs = [
        book(original, "b:1"),
        book(original, "b:2"),
        book(near, "b:3"),
        book(mid, "b:4"),
        book(other, "b:5"),
        Rejected("b:6", "malformed_json"),
    ]
    out = list(dedup.process(docs))
    assert out[0] is docs[0]
    assert [o.reason for o in out[1:3]] == ["books_near_duplicate"] * 2
    assert (out[1].origin, out[2].origin, out[1].source) == ("b:2", "b:3", "books")
    assert out[3] is docs[3]
    assert out[4] is docs[4]
    assert out[5] is docs[5]
    assert len(dedup.signatures) == 3  # only kept books are indexed


def test_estimate_only_mode_keeps_no_shingle_sets():
    original = book_words(3)
    dedup = BookDeduplicator(exact_check=False)
    assert isinstance(dedup.apply(book(original, "b:1")), Document)
    assert isinstance(dedup.apply(book(edited(original, 0.005), "b:2")), Rejected)
    assert isinstance(dedup.apply(book(book_words(4), "b:3")), Document)
    assert all(s.size == 0 for s in dedup.shingle_sets)


def test_books_without_words_are_kept_and_not_indexed():
    dedup = BookDeduplicator()
    blank = Document("*** *** ***", "books", "b:1")
    assert dedup.apply(blank) is blank
    assert dedup.apply(blank) is blank
    assert dedup.signatures == []


def test_bands_must_divide_permutations():
    with pytest.raises(ValueError, match="multiple of bands"):
        BookDeduplicator(num_perm=100, bands=32)
