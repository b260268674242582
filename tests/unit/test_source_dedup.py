"""The paper's per-source dedup and source selection, in one process (no Ray): the rules on
their own, and the planted corpus (tests/planted_corpus.py) decided source by source."""

import pytest

from llamaray.config import ConfigError, CorpusConfig, load_config
from llamaray.data.clean.books import exact_jaccard, shingles
from llamaray.data.clean.commoncrawl import LineDeduplicator, normalize_line
from llamaray.data.prepare import decide_rows, outcomes
from llamaray.data.read import to_row
from llamaray.data.records import Document, Rejected
from llamaray.data.select import select_document, stackexchange_site, wikipedia_language
from llamaray.data.source_dedup import (
    exact_dedup_rows,
    greedy_drops,
    line_dedup_rows,
    manifest_entry,
    overlap_dedup_rows,
    reason_of,
    shard_groups,
)
from planted_corpus import overrides, shifted, write


def cc(text: str, origin: str) -> Document:
    return Document(text, "commoncrawl", origin)


# --- CCNet line dedup ---------------------------------------------------------------------


def test_every_copy_of_a_repeated_line_goes_the_first_too():
    dedup = LineDeduplicator()
    out = dedup.process(
        [
            cc("Menu home\nFirst story text here.\nFooter line", "a:1"),
            cc("MENU, Home!\nSecond story text.", "a:2"),
            cc("Twice in one page.\nA new line.\ntwice in ONE page", "a:3"),
            Rejected("a:4", "malformed_json"),
        ]
    )
    assert out[0].text == "First story text here.\nFooter line"
    assert out[1].text == "Second story text."
    assert out[2].text == "A new line."  # a line repeated within one page goes too
    assert out[3] == Rejected("a:4", "malformed_json")
    assert dedup.lines_removed == 4


def test_a_page_of_repeated_lines_only_is_dropped_and_blank_lines_never_count():
    out = LineDeduplicator().process([cc("Login\n\n***", "a:1"), cc("login\n\n***\nText.", "a:2")])
    assert isinstance(out[0], Rejected) and out[0].reason == "cc_all_lines_duplicate"
    assert out[1].text == "***\nText." and normalize_line("***") == ""


def test_line_dedup_is_scoped_to_its_shard_group():
    rows = [to_row(cc("Shared footer\nPage one.", "f0.jsonl:1")),
            to_row(cc("Shared footer\nPage two.", "f1.jsonl:1")),
            to_row(cc("Shared footer\nPage three.", "f2.jsonl:1"))]  # fmt: skip
    groups = shard_groups(["f0.jsonl", "f1.jsonl", "f2.jsonl"], 2)
    assert groups == {"f0.jsonl": 0, "f1.jsonl": 0, "f2.jsonl": 1}
    out, removed = line_dedup_rows(rows, "commoncrawl", groups)
    assert [r["text"] for r in out] == ["Page one.", "Page two.", "Shared footer\nPage three."]
    assert removed == 2
    out, removed = line_dedup_rows(rows, "commoncrawl", shard_groups(["f0.jsonl"], 0))
    assert removed == 2  # a file outside the listed ones is a group of its own (-1)
    assert shard_groups(["a", "b", "c"], 0) == {"a": 0, "b": 0, "c": 0}


# --- GitHub exact, Books overlap ------------------------------------------------------------


def rows_of(source: str, texts: list[str]) -> list[dict]:
    return [to_row(Document(t, source, f"{source}.jsonl:{i + 1}")) for i, t in enumerate(texts)]


def test_exact_file_dedup_keeps_the_first_by_file_and_line_number():
    texts = ["x = 1\n", "y = 2\n", "x = 1\n", "x = 1 \n"]
    rows = rows_of("github", texts)
    rows = [rows[2], rows[0], rows[3], rows[1]]  # input order does not decide
    out = {r["origin"]: r["reason"] for r in exact_dedup_rows(rows, "github")}
    assert out == {"github.jsonl:1": "", "github.jsonl:2": "", "github.jsonl:3":
                   "github_exact_duplicate", "github.jsonl:4": ""}  # fmt: skip


def test_books_over_90_percent_overlap_are_dropped_85_percent_kept():
    a92, b92 = shifted(2000, 83, seed=1)
    a85, b85 = shifted(2000, 162, seed=2)
    assert exact_jaccard(shingles(a92), shingles(b92)) == pytest.approx(0.92, abs=0.002)
    assert exact_jaccard(shingles(a85), shingles(b85)) == pytest.approx(0.85, abs=0.002)
    out = overlap_dedup_rows(rows_of("books", [b92, a92, a85, b85]), "books", 0.9)
    assert [r["reason"] for r in out] == ["", "books_near_duplicate", "", ""]
    # The threshold is the setting's: at 0.8 the 85% pair goes too.
    out = overlap_dedup_rows(rows_of("books", [b92, a92, a85, b85]), "books", 0.8)
    assert [r["reason"] for r in out] == ["", "books_near_duplicate", "", "books_near_duplicate"]


def test_greedy_drops_keeps_a_chain_s_first_and_third():
    # b is over the threshold with a and with c, a and c not with each other: a kept, b
    # dropped, c kept (compared only with kept documents, as BookDeduplicator does).
    assert greedy_drops([("b:1", "b:2"), ("b:2", "b:3")], "books") == {"b:2"}


def test_reasons_are_per_source():
    assert reason_of("lines", "commoncrawl") == "cc_all_lines_duplicate"
    assert reason_of("exact", "github") == "github_exact_duplicate"
    assert reason_of("overlap", "books") == "books_near_duplicate"
    assert reason_of("overlap", "wikipedia") == "wikipedia_near_duplicate"


# --- selection ---------------------------------------------------------------------------------


def test_wikipedia_language_and_stackexchange_site_come_from_meta_or_url():
    assert wikipedia_language({"language": "FR"}) == "fr"
    assert wikipedia_language({"url": "https://sr.wikipedia.org/wiki/X"}) == "sr"
    assert wikipedia_language({"url": "https://example.org/x"}) == ""
    assert stackexchange_site({"url": "https://math.stackexchange.com/questions/1"}) == (
        "math.stackexchange.com"
    )
    assert stackexchange_site({"site": "https://superuser.com/"}) == "superuser.com"
    cfg = CorpusConfig()
    keep = dict(wikipedia_languages=set(cfg.wikipedia_languages),
                stackexchange_sites=set(cfg.stackexchange_sites))  # fmt: skip
    assert len(cfg.wikipedia_languages) == 20 and len(cfg.stackexchange_sites) == 28
    doc = Document("t", "wikipedia", "w:1", {"language": "ja"})
    assert select_document(doc, **keep).reason == "wikipedia_language"
    assert select_document(Document("t", "wikipedia", "w:2"), **keep).reason == (
        "wikipedia_no_language"
    )
    assert select_document(doc, wikipedia_languages=(), stackexchange_sites=()) is doc
    post = Document("t", "stackexchange", "s:1", {"url": "https://cooking.stackexchange.com/q"})
    assert select_document(post, **keep).reason == "stackexchange_site"
    assert select_document(Document("t", "c4", "c:1"), **keep).source == "c4"


# --- config ------------------------------------------------------------------------------------


def test_the_papers_dedup_is_the_default_and_a_key_changes_only_itself():
    cfg = CorpusConfig()
    rules = cfg.dedup.sources
    assert (rules["commoncrawl"].lines, rules["commoncrawl"].line_group_shards) == (True, 50)
    assert rules["github"].exact and rules["books"].overlap == 0.9
    assert set(rules) == {"commoncrawl", "github", "books"} and not cfg.dedup.cross_source
    cfg = load_config(None, ["dedup.sources.github.overlap=0.7"], CorpusConfig)
    assert cfg.dedup.sources["github"].exact and cfg.dedup.sources["github"].overlap == 0.7
    assert cfg.dedup.sources["books"].overlap == 0.9


def test_bad_dedup_and_selection_values_name_the_field_and_the_reason():
    with pytest.raises(ConfigError) as err:
        load_config(
            None,
            ["dedup.sources.books.overlap=0.2", "dedup.sources.commoncrawl.line_group_shards=-1",
             "wikipedia_languages=[English]", "stackexchange_sites=[not a site]"],
            CorpusConfig,
        )  # fmt: skip
    msg = str(err.value)
    assert "dedup.sources.books.overlap: Input should be greater than or equal to 0.5" in msg
    assert "dedup.sources.commoncrawl.line_group_shards: Input should be greater" in msg
    assert "wikipedia_languages: 'English': not a Wikipedia language code" in msg
    assert "stackexchange_sites: 'not a site': not a site host name" in msg


# --- the planted corpus ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    return write(tmp_path_factory.mktemp("planted"))


def test_the_planted_corpus_gets_the_papers_decisions_source_by_source(planted):
    # Without CommonCrawl's quality models (quality.allow_missing_models): the dedup and
    # selection decisions only; test_quality.py has those with the models.
    cfg = load_config(None, overrides(planted["sources"]), CorpusConfig)
    rows, lines_removed = decide_rows(cfg, planted["sources"])
    assert outcomes(rows) == planted["expected_without_models"]
    assert lines_removed == planted["lines_removed"]
    kept = [r["text"] for r in rows if r["kind"] == "doc"]
    # No copy of the boilerplate is left in the first shard group; the second group's stays.
    b1, b2 = planted["boilerplate"]
    assert sum(b1 in t for t in kept) == 1 and not any(b2 in t for t in kept)
    # The Wikipedia article and its crawled copy are both kept (no cross-source dedup).
    article = planted["article"]
    assert sum(t.strip() == article for t in kept) == 2


def test_cross_source_dedup_only_when_asked(planted):
    cfg = load_config(
        None, [*overrides(planted["sources"]), "dedup.cross_source=true"], CorpusConfig
    )
    rows, _ = decide_rows(cfg, planted["sources"])
    got = outcomes(rows)
    # The corpus-wide pass keeps the copy of the first source by name (data.dedup.order_key).
    assert got["wikipedia"]["dropped"] == {"wikipedia_language": 1, "exact_duplicate": 1}
    assert got["commoncrawl"]["kept"] == 8
    entry = manifest_entry(cfg.dedup, "wikipedia", got["wikipedia"]["dropped"])
    assert [s["step"] for s in entry["steps"]] == ["cross_source"]
    assert entry["steps"][0]["documents_removed"] == 1 and entry["cross_source"]
    entry = manifest_entry(cfg.dedup, "commoncrawl", got["commoncrawl"]["dropped"], 8)
    assert [s["step"] for s in entry["steps"]] == ["lines", "cross_source"]
    assert entry["steps"][0]["lines_removed"] == 8 and entry["steps"][0]["documents_removed"] == 1
