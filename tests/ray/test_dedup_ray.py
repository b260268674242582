"""`dedup_dataset` on Ray Data decides exactly as the single-process `dedup_rows`."""

import random

import pytest
import ray
from ray.data.context import ShuffleStrategy

from llamaray.data.dedup import dedup_dataset, dedup_rows, order_key
from llamaray.data.read import to_row
from llamaray.data.records import Document, Rejected

pytestmark = pytest.mark.ray

SOURCES = ["c4", "wikipedia", "books", "github"]


def corpus(seed: int = 0) -> tuple[list[dict], dict[tuple[str, str], str]]:
    """~200 rows: distinct documents, planted exact and near duplicates across sources, and
    rejected rows. Returns the rows and the expected {(source, origin): reason} of the dropped.
    """
    rng = random.Random(seed)
    vocab = [f"v{i}" for i in range(3000)]
    rows, expected = [], {}
    line = iter(range(1, 10_000))

    def add(text, group):
        source = rng.choice(SOURCES)
        origin = f"{source}/part-{rng.randint(0, 2)}.jsonl:{next(line)}"
        rows.append(to_row(Document(text, source, origin, {"seed": seed})))
        group.append(((source, origin), " ".join(text.split())))

    for i in range(120):
        ws = [rng.choice(vocab) for _ in range(rng.randint(200, 300))]
        group = []
        add(" ".join(ws), group)
        if i % 6 == 0:  # exact: other whitespace
            add("\n " + "  ".join(ws) + "\t", group)
        if i % 5 == 0:  # near: two words changed, far apart: Jaccard >= 0.9
            near = list(ws)
            near[3], near[-4] = "edited", "again"
            add(" ".join(near), group)
        if i % 15 == 0:  # an exact copy of the near copy, and a second near copy
            add(" ".join(near), group)
            near2 = list(ws)
            near2[len(ws) // 2] = "middle"
            add(" ".join(near2), group)
        # The group keeps its smallest key; each text's other copies are exact duplicates,
        # and each other text's first copy a near duplicate.
        first_of_text = {}
        for key, text in sorted(group, key=lambda g: order_key(*g[0])):
            if text in first_of_text:
                expected[key] = "exact_duplicate"
            else:
                first_of_text[text] = key
        kept = min(first_of_text.values(), key=lambda k: order_key(*k))
        expected.update({k: "near_duplicate" for k in first_of_text.values() if k != kept})
    for i in range(10):
        bad = Rejected(f"bad.jsonl:{i + 1}", "malformed_json", rng.choice(SOURCES), "{oops")
        rows.append(to_row(bad))
    # A rejected row sharing a document's (source, origin): untouched.
    rows.append(to_row(Rejected(rows[0]["origin"], "too_long", rows[0]["source"], "x")))
    return rows, expected


def summary(rows):
    docs = sorted((r["source"], r["origin"]) for r in rows if r["kind"] == "doc")
    rejected = sorted(
        (r["source"], r["origin"], r["reason"], r["excerpt"]) for r in rows if r["kind"] != "doc"
    )
    return docs, rejected


@pytest.fixture(scope="module")
def data():
    rows, planted = corpus()
    kept, dropped = dedup_rows(rows)
    return rows, planted, kept, dropped


def test_reference_finds_the_planted_duplicates(data):
    rows, planted, kept, dropped = data
    assert 180 <= len(rows) <= 260
    assert {(r["source"], r["origin"]): r["reason"] for r in dropped} == planted
    assert len(kept) + len(dropped) == len(rows)


@pytest.fixture
def shuffle_strategy(request):
    """Ray's default hash shuffle costs ~10 s of actor start-up a run; the sort shuffle ~1 s."""
    ctx = ray.data.DataContext.get_current()
    saved = ctx.shuffle_strategy
    if request.param:
        ctx.shuffle_strategy = ShuffleStrategy[request.param]
    try:
        yield ctx.shuffle_strategy
    finally:
        ctx.shuffle_strategy = saved


@pytest.mark.parametrize(
    "num_blocks,row_order_seed,shuffle_strategy",
    [(8, None, None), (3, 1, "SORT_SHUFFLE_PULL_BASED"), (13, 2, "SORT_SHUFFLE_PULL_BASED")],
    indirect=["shuffle_strategy"],
)
def test_dedup_dataset_matches_dedup_rows(data, num_blocks, row_order_seed, shuffle_strategy):
    rows, planted, kept, dropped = data
    items = list(rows)
    if row_order_seed is not None:
        random.Random(row_order_seed).shuffle(items)
    ds = ray.data.from_items(items, override_num_blocks=num_blocks)
    out = dedup_dataset(ds).take_all()

    assert len(out) == len(rows)
    assert sorted(out[0].keys()) == sorted(rows[0].keys())
    want_docs, want_rejected = summary(kept + dropped)
    got_docs, got_rejected = summary(out)
    assert got_docs == want_docs
    assert got_rejected == want_rejected
    assert {
        (r["source"], r["origin"]): r["reason"] for r in out if r["reason"].endswith("_duplicate")
    } == planted
    # Kept documents and the input's own rejected rows come out unchanged.
    by_key = {(r["kind"], r["source"], r["origin"], r["reason"]): r for r in out}
    for r in kept:
        assert by_key[(r["kind"], r["source"], r["origin"], r["reason"])] == r
    assert sum(r["kind"] == "rejected" and r["reason"] == "malformed_json" for r in out) == 10


def test_dedup_dataset_without_documents_passes_rows_through():
    rows = [to_row(Rejected(f"bad.jsonl:{i}", "malformed_json", "c4", "{")) for i in range(5)]
    out = dedup_dataset(ray.data.from_items(rows, override_num_blocks=2)).take_all()
    assert sorted(out, key=lambda r: r["origin"]) == rows


def test_prepare_gives_the_papers_per_source_decisions_on_the_planted_corpus(tmp_path):
    """The planted corpus (tests/planted_corpus.py) through `prepare_corpus` on Ray, with
    CommonCrawl's quality models trained here (tests/quality_text.py): the same decisions as
    the single-process reference `decide_rows` and as the paper's, source by source, and a
    manifest that says which dedup and which model steps ran and what each removed."""
    from llamaray.config import CorpusConfig, load_config
    from llamaray.data.prepare import decide_rows, outcomes, prepare_corpus
    from llamaray.data.quality.models import kenlm_tool
    from planted_corpus import overrides, write
    from quality_text import DICT_PACKAGES, have_dicts, train_models

    if have_dicts():
        pytest.skip(f"word lists missing: `make wordlists` installs {DICT_PACKAGES}")
    if kenlm_tool("lmplz") is None:
        pytest.skip("KenLM's lmplz not built: `make kenlm-tools`")
    models = train_models(tmp_path / "quality")
    planted = write(tmp_path / "raw")
    cfg = load_config(
        None,
        [*overrides(planted["sources"], models), f"output_dir={tmp_path / 'out'}", "name=planted",
         "tokenizer.vocab_size=400", "seq_len=32", "validation_fraction=0", "tokenize_actors=1"],
        schema=CorpusConfig,
    )  # fmt: skip
    manifest = prepare_corpus(cfg)
    rows, lines_removed = decide_rows(cfg, planted["sources"])
    assert outcomes(rows) == planted["expected"]
    for name, want in planted["expected"].items():
        got = manifest["sources"][name]
        assert {k: got[k] for k in want} == want, name
        assert got["kept"] + sum(got["dropped"].values()) == got["documents_in"], name
    steps = {name: s["dedup"]["steps"] for name, s in manifest["sources"].items()}
    assert [
        (s["step"], s["documents_removed"], s["lines_removed"]) for s in steps["commoncrawl"]
    ] == [("lines", 1, lines_removed["commoncrawl"])]
    assert [(s["step"], s["documents_removed"]) for s in steps["github"]] == [("exact", 1)]
    assert [(s["step"], s["max_overlap"], s["documents_removed"]) for s in steps["books"]] == [
        ("overlap", 0.9, 1)
    ]
    assert steps["wikipedia"] == steps["stackexchange"] == []
    # CommonCrawl's model steps: all ran, each removed its planted page; the 5 kept pages
    # are counted in their buckets, the gibberish one in the tail.
    quality = manifest["sources"]["commoncrawl"]["quality"]
    assert [(q["step"], q["ran"], q["documents_removed"]) for q in quality["steps"]] == [
        ("language_id", True, 1), ("perplexity", True, 1), ("reference_classifier", True, 1),
    ]  # fmt: skip
    buckets = quality["steps"][1]["buckets"]
    assert buckets["tail"] == 1 and buckets["head"] + buckets["middle"] == 5
    assert quality["skipped"] == {} and manifest["skipped_steps"] == {}
    assert not quality["allow_missing_models"]
    assert not manifest["sources"]["wikipedia"]["dedup"]["cross_source"]
    assert len(manifest["sources"]["wikipedia"]["selection"]["wikipedia_languages"]) == 20
