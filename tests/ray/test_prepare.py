"""`prepare_corpus` end to end on the shared local Ray cluster, with bad input planted."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest

from llamaray.config import CorpusConfig, load_config
from llamaray.data.prepare import heldout, load_rows, prepare_corpus
from llamaray.data.sample_text import write_stdlib_sample

pytestmark = pytest.mark.ray

SENTENCE = "The quick brown fox jumps over the lazy dog near the river bank today."


def c4_doc(i: int) -> str:
    return "\n".join(f"{SENTENCE} Line {w} of page {i} has enough words here." for w in range(6))


def write_jsonl(path, records, *, raw_lines=()):
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
        for line in raw_lines:
            f.write(line + "\n")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("prepare")
    sample = write_stdlib_sample(root / "sample", 400_000)
    code = [json.loads(line) for line in sample["code"].read_text().splitlines()][:20]
    github = [dict(r, meta={"license": "MIT"}) for r in code]
    github.append(dict(code[0], meta={"license": "GPL-3.0"}))  # -> github_license
    github.append(dict(code[1], meta={"license": "MIT"}))  # exact duplicate of a kept file
    write_jsonl(root / "github.jsonl", github)
    c4 = [{"text": c4_doc(i)} for i in range(12)]
    c4.append({"text": c4_doc(99) + "\nlorem ipsum dolor sit amet."})  # -> c4_lorem_ipsum
    write_jsonl(root / "c4.jsonl", c4, raw_lines=['{"text": "unterminated', '{"meta": {}}'])
    prose_lines = sample["prose"].read_text().splitlines()
    with gzip.open(root / "prose.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write("\n".join(prose_lines) + "\n")
        f.write(json.dumps({"text": "   "}) + "\n")  # -> empty
    expected_in = {
        "github": len(github),
        "c4": len(c4) + 2,
        "prose": len(prose_lines) + 1 + 1,  # + the missing file
    }
    cfg = load_config(
        None,
        [
            f"output_dir={root / 'out'}",
            "name=t",
            f"sources.github=[{root / 'github.jsonl'}]",
            f"sources.c4=[{root / 'c4.jsonl'}]",
            f"sources.prose=[{root / 'prose.jsonl.gz'}, {root / 'missing.jsonl'}]",
            "tokenizer.vocab_size=600",
            "seq_len=32",
            "validation_fraction=0.1",
            "tokenize_actors=1",
        ],
        schema=CorpusConfig,
    )
    manifest = prepare_corpus(cfg)
    return manifest, expected_in, root / "out" / "t"


def test_every_record_is_accounted_for(corpus):
    manifest, expected_in, _ = corpus
    for name, n_in in expected_in.items():
        s = manifest["sources"][name]
        assert s["documents_in"] == n_in, name
        assert s["kept"] + sum(s["dropped"].values()) == n_in, name
        kept_tokenized = s["splits"]["train"]["documents"] + s["splits"]["validation"]["documents"]
        assert kept_tokenized == s["kept"], name


def test_drop_reasons_per_source(corpus):
    manifest, _, out = corpus
    src = manifest["sources"]
    assert src["github"]["dropped"].get("github_license") == 1
    assert (
        src["github"]["dropped"].get("exact_duplicate", 0)
        + src["github"]["dropped"].get("github_exact_duplicate", 0)
        >= 1
    )
    assert src["c4"]["dropped"].get("c4_lorem_ipsum") == 1
    assert src["c4"]["dropped"].get("malformed_json") == 1
    assert src["c4"]["dropped"].get("missing_text") == 1
    assert src["prose"]["dropped"].get("empty") == 1
    assert src["prose"]["dropped"].get("missing_file") == 1
    quarantined = (out / manifest["quarantine"]).read_text().splitlines()
    total_dropped = sum(sum(s["dropped"].values()) for s in src.values())
    assert len(quarantined) == total_dropped
    first = json.loads(quarantined[0])
    assert {"origin", "reason", "source", "excerpt"} <= set(first)
    assert any(json.loads(q)["origin"].endswith("missing.jsonl:0") for q in quarantined)


def test_shards_hold_packed_rows_of_the_vocabulary(corpus):
    manifest, _, out = corpus
    vocab = manifest["tokenizer"]["vocab_size"]
    for name, s in manifest["sources"].items():
        rows = load_rows(out, name, "train")
        assert rows.shape == (s["splits"]["train"]["rows"], 33)
        assert rows.dtype == np.int32
        assert rows.min() >= 0 and rows.max() < vocab
        # Packing keeps every token except each block's unfinished row.
        split = s["splits"]["train"]
        assert split["packed_tokens"] <= split["tokens"] + 2 * split["documents"]
        assert split["packed_tokens"] > 0.8 * (split["tokens"] + 2 * split["documents"])
    prose_rows = load_rows(out, "prose", "train")
    assert (prose_rows == 1).any() and (prose_rows == 2).any()  # bos and eos between documents
    assert manifest["sources"]["prose"]["splits"]["validation"]["rows"] > 0


def test_heldout_split_is_deterministic_and_near_the_fraction():
    origins = [f"file.jsonl:{i}" for i in range(20_000)]
    picked = [heldout(o, 0.1, 0) for o in origins]
    assert picked == [heldout(o, 0.1, 0) for o in origins]
    assert 0.09 < np.mean(picked) < 0.11
    assert picked != [heldout(o, 0.1, 1) for o in origins]
