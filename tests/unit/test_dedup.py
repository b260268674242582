"""Exact and MinHash near-duplicate removal, single process (`dedup_rows`), no Ray."""

import random

import numpy as np
import pytest

from llamaray.data.dedup import (
    MERSENNE_61,
    MinHasher,
    candidate_probability,
    content_hash,
    dedup_rows,
    jaccard_estimate,
    lsh_bands,
    lsh_params,
    order_key,
)
from llamaray.data.read import to_row
from llamaray.data.records import Document, Rejected

VOCAB = [f"w{i}" for i in range(5000)]


def words(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [rng.choice(VOCAB) for _ in range(n)]


def doc(text: str, origin: str, source: str = "c4") -> dict:
    return to_row(Document(text, source, origin, {"n": 1}))


def changed(ws: list[str], positions: list[int]) -> list[str]:
    out = list(ws)
    for p in positions:
        out[p] = f"changed{p}"
    return out


def keys(rows):
    return sorted((r["source"], r["origin"]) for r in rows)


# --------------------------------------------------------------------------- hashing


def test_permute_is_exact_modular_arithmetic():
    h = MinHasher(num_perm=16, seed=3)
    p = (1 << 61) - 1
    rng = np.random.default_rng(0)
    x = np.concatenate(
        [rng.integers(0, p, size=200, dtype=np.uint64), np.array([0, 1, p - 1], np.uint64)]
    )
    got = h.permute(x)
    assert got.shape == (16, len(x))
    for k in range(16):
        a, b = int(h.a[k, 0]), int(h.b[k, 0])
        assert [int(v) for v in got[k]] == [(a * int(v) + b) % p for v in x]


@pytest.mark.parametrize("target", [0.9, 0.5, 0.1])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_signature_estimates_shingle_jaccard(target, seed):
    h = MinHasher(seed=seed)
    n = 400
    # B is A shifted by k distinct tokens: J = (n - 4 - k) / (n - 4 + k) for 5-gram shingles.
    k = round((n - 4) * (1 - target) / (1 + target))
    tokens = [f"t{i}" for i in range(n + k)]
    a, b = " ".join(tokens[:n]), " ".join(tokens[k : k + n])
    sa, sb = h.shingles(a), h.shingles(b)
    true = len(sa & sb) / len(sa | sb)
    assert abs(true - target) < 0.01
    sig_a, sig_b = h.signature(a), h.signature(b)
    assert sig_a.dtype == np.uint64 and sig_a.shape == (128,)
    assert (sig_a < MERSENNE_61).all()
    assert abs(jaccard_estimate(sig_a, sig_b) - true) <= 0.1


def test_shingles_lowercase_strip_punctuation_and_short_documents():
    h = MinHasher(ngram=3)
    assert h.shingles("The cat, the HAT.") == {"the cat the", "cat the hat"}
    assert h.shingles("Hello,   World!") == {"hello world"}
    assert h.shingles("  ... !!  ") == {"... !!"}
    assert np.array_equal(h.signature("Hello world"), h.signature("hello, WORLD!"))
    assert not np.array_equal(h.signature("Hello world"), h.signature("hello there"))


def test_signature_is_deterministic_per_seed():
    text = " ".join(words(300, 1))
    assert np.array_equal(MinHasher(seed=5).signature(text), MinHasher(seed=5).signature(text))
    assert not np.array_equal(MinHasher(seed=5).signature(text), MinHasher(seed=6).signature(text))


def test_content_hash_normalizes_whitespace_only():
    base = content_hash("Hello world.\nSecond line")
    assert content_hash("  Hello   world.\r\n\tSecond  line \n") == base
    assert content_hash("Hello world.\u00a0Second line") == base  # Unicode whitespace too
    assert content_hash("hello world.\nSecond line") != base
    assert content_hash("Hello world. Second line!") != base
    assert len(base) == 32 and int(base, 16) >= 0


def test_lsh_params_and_bands():
    assert lsh_params(128, 0.8) == (16, 8)
    assert candidate_probability(0.8, 16, 8) > 0.9
    assert candidate_probability(0.5, 16, 8) < 0.1
    bands, rows = lsh_params(256, 0.5)
    assert bands * rows <= 256 and candidate_probability(0.5, bands, rows) >= 0.9
    sig = MinHasher().signature(" ".join(words(100, 2)))
    keys_ = lsh_bands(sig, 16, 8)
    assert len(keys_) == 16 and [k.split(":")[0] for k in keys_] == [str(i) for i in range(16)]
    other = sig.copy()
    other[8 * 5 + 3] += np.uint64(1)  # one value of band 5
    other_keys = lsh_bands(other, 16, 8)
    diff = [i for i in range(16) if keys_[i] != other_keys[i]]
    assert diff == [5]
    with pytest.raises(ValueError):
        lsh_bands(sig, 17, 8)


def test_order_key_is_natural_on_line_numbers():
    assert order_key("c4", "a.jsonl:9") < order_key("c4", "a.jsonl:10")
    assert order_key("arxiv", "z.jsonl:1") < order_key("c4", "a.jsonl:1")
    assert order_key("c4", "a.jsonl:2") < order_key("c4", "b.jsonl:1")


# --------------------------------------------------------------------------- dedup_rows


def test_exact_duplicates_with_whitespace_differences():
    text = " ".join(words(120, 3))
    rows = [
        doc("  " + text.replace(" ", "\n", 5) + "\n", "web/b.jsonl:4", "c4"),
        doc(text, "web/a.jsonl:10", "c4"),
        doc(text.replace(" ", "   "), "web/a.jsonl:9", "c4"),
        doc(text, "wiki.parquet:1", "wikipedia"),
        doc(" ".join(words(120, 4)), "web/a.jsonl:1", "c4"),
    ]
    kept, rejected = dedup_rows(rows)
    assert keys(kept) == [("c4", "web/a.jsonl:1"), ("c4", "web/a.jsonl:9")]
    assert keys(rejected) == [
        ("c4", "web/a.jsonl:10"),
        ("c4", "web/b.jsonl:4"),
        ("wikipedia", "wiki.parquet:1"),
    ]
    for r in rejected:
        assert r["kind"] == "rejected"
        assert r["reason"] == "exact_duplicate"
        assert r["excerpt"] == "duplicate of web/a.jsonl:9 [c4]"
        assert r["text"] == "" and r["meta_json"] == ""


def test_near_duplicate_caught_and_different_document_kept():
    ws = words(200, 7)
    near = changed(ws, [20, 90, 160])
    h = MinHasher()
    assert jaccard_estimate(h.signature(" ".join(ws)), h.signature(" ".join(near))) >= 0.8
    rows = [
        doc(" ".join(near), "b.jsonl:1", "c4"),
        doc(" ".join(ws), "a.jsonl:3", "c4"),
        doc(" ".join(words(200, 8)), "a.jsonl:1", "c4"),
        # Same topic words, but heavily rewritten: far below the threshold.
        doc(" ".join(changed(ws, list(range(0, 200, 4)))), "a.jsonl:2", "c4"),
    ]
    kept, rejected = dedup_rows(rows)
    assert keys(kept) == [("c4", "a.jsonl:1"), ("c4", "a.jsonl:2"), ("c4", "a.jsonl:3")]
    assert len(rejected) == 1
    assert rejected[0]["origin"] == "b.jsonl:1"
    assert rejected[0]["reason"] == "near_duplicate"
    assert rejected[0]["excerpt"] == "duplicate of a.jsonl:3 [c4]"


def test_kept_is_smallest_source_then_origin():
    ws = words(150, 9)
    rows = [
        doc(" ".join(changed(ws, [10])), "x.jsonl:10", "wikipedia"),
        doc(" ".join(changed(ws, [70])), "y.jsonl:2", "c4"),
        doc(" ".join(changed(ws, [130])), "x.jsonl:9", "c4"),
        doc(" ".join(ws), "x.jsonl:1", "wikipedia"),
    ]
    kept, rejected = dedup_rows(rows)
    assert keys(kept) == [("c4", "x.jsonl:9")]
    assert {r["reason"] for r in rejected} == {"near_duplicate"}
    assert {r["excerpt"] for r in rejected} == {"duplicate of x.jsonl:9 [c4]"}


def test_short_documents_compare_whole_text():
    rows = [
        doc("Hello, World!", "a.jsonl:2"),
        doc("hello world", "a.jsonl:1"),
        doc("hello there", "a.jsonl:3"),
    ]
    kept, rejected = dedup_rows(rows)
    assert keys(kept) == [("c4", "a.jsonl:1"), ("c4", "a.jsonl:3")]
    assert [(r["origin"], r["reason"]) for r in rejected] == [("a.jsonl:2", "near_duplicate")]


def test_rejected_input_rows_pass_through_unchanged():
    text = " ".join(words(80, 11))
    bad = to_row(Rejected("a.jsonl:5", "malformed_json", "c4", text[:50]))
    rows = [doc(text, "a.jsonl:1"), bad, doc(text, "a.jsonl:2"), dict(bad, origin="a.jsonl:6")]
    kept, rejected = dedup_rows(rows)
    assert kept == [rows[0], bad, rows[3]]
    assert [r["origin"] for r in rejected] == ["a.jsonl:2"]


def planted_rows(seed: int = 0) -> tuple[list[dict], set[tuple[str, str]]]:
    rng = random.Random(seed)
    rows, dups = [], set()
    for i in range(30):
        ws = words(rng.randint(60, 150), 1000 + i)
        rows.append(doc(" ".join(ws), f"f{i % 3}.jsonl:{i + 1}", rng.choice(["c4", "books"])))
        if i % 4 == 0:
            rows.append(doc(" ".join(ws) + "\n", f"g.jsonl:{i + 1}", "wikipedia"))
            dups.add(("wikipedia", f"g.jsonl:{i + 1}"))
        if i % 5 == 0:
            rows.append(doc(" ".join(changed(ws, [5])), f"h.jsonl:{i + 1}", "wikipedia"))
            dups.add(("wikipedia", f"h.jsonl:{i + 1}"))
    return rows, dups


def test_deterministic_regardless_of_row_order():
    rows, dups = planted_rows()
    kept, rejected = dedup_rows(rows)
    assert set(keys(rejected)) == dups
    assert len(kept) + len(rejected) == len(rows)
    expected = (keys(kept), sorted((r["origin"], r["reason"], r["excerpt"]) for r in rejected))
    for seed in range(3):
        shuffled = list(rows)
        random.Random(seed).shuffle(shuffled)
        k, r = dedup_rows(shuffled)
        assert (keys(k), sorted((x["origin"], x["reason"], x["excerpt"]) for x in r)) == expected
