"""CommonCrawl cleaning (CCNet line dedup, Gopher heuristics; the model steps are in
test_quality.py), and the package's dispatch (`clean_document`, the registries)."""

import pytest

from llamaray.config import QualityConfig
from llamaray.data.clean import (
    CLEANERS,
    DEDUPLICATORS,
    REASONS,
    LineDeduplicator,
    clean_document,
    commoncrawl,
)
from llamaray.data.clean.commoncrawl import normalize_line, quality_filter
from llamaray.data.records import Document, Rejected
from llamaray.data.sources import SOURCES

SENTENCE = "The committee discussed the budget and agreed on new rules for the city."  # 13 words
GOOD = "\n".join([SENTENCE] * 6)  # 78 words, 6 lines


def cc(text: str, origin: str = "cc.jsonl:1") -> Document:
    return Document(text, "commoncrawl", origin)


def reason(out: Document | Rejected) -> str | None:
    return out.reason if isinstance(out, Rejected) else None


# --- dispatch ----------------------------------------------------------------------------------


def test_registry_covers_every_source_and_reasons_are_unique():
    assert set(CLEANERS) == set(SOURCES)
    assert set(DEDUPLICATORS) == {"commoncrawl", "github", "books"}
    assert len(REASONS) == len(set(REASONS))
    assert {"empty", "cc_too_few_words", "github_license", "books_near_duplicate"} <= set(REASONS)


@pytest.mark.parametrize("source", [*SOURCES, "my_own"])
@pytest.mark.parametrize("text", ["", "  \n\t "])
def test_empty_text_is_rejected_for_every_source(source, text):
    out = clean_document(Document(text, source, "x.jsonl:3"))
    assert isinstance(out, Rejected)
    assert (out.reason, out.origin, out.source) == ("empty", "x.jsonl:3", source)


def test_unknown_source_passes_through_unchanged():
    doc = Document("{ lorem ipsum }", "my_own", "x:1")
    assert clean_document(doc) is doc


def test_dispatch_uses_the_source_rules():
    asked = {"commoncrawl": {"quality": QualityConfig(heuristics=True)}}
    assert reason(clean_document(cc("too short"), asked)) == "cc_too_few_words"
    assert reason(clean_document(Document("too short", "my_own", "x:1"), asked)) is None


def test_a_document_the_rules_empty_is_rejected_with_its_original_excerpt():
    out = clean_document(Document("{{Infobox person}}<!-- c -->", "wikipedia", "w:1"))
    assert isinstance(out, Rejected)
    assert (out.reason, out.excerpt) == ("empty_after_clean", "{{Infobox person}}<!-- c -->")


# --- line dedup ----------------------------------------------------------------------------------


def test_normalize_line_lowercases_zeroes_digits_strips_punctuation_accents_and_spaces():
    assert normalize_line("  Héllo,   WORLD!  Page 12 of 40. ") == "hello world page 00 of 00"
    assert normalize_line("Café — «déjà vu»") == "cafe deja vu"
    assert normalize_line("!!! ...") == ""


def test_line_dedup_removes_every_copy_across_and_within_documents():
    dedup = LineDeduplicator()
    first = cc("Home | About\nThe first article's text.\nCopyright 2021.", "a:1")
    second = cc("home about\nA second, different article.\ncopyright 1999", "a:2")
    third = cc("Same line twice.\nA new line.\nsame line TWICE", "a:3")
    fourth = cc("Nothing repeated here.", "a:4")
    out = dedup.process([first, second, third, fourth])
    assert out[0].text == "The first article's text."  # CCNet: the first copy goes too
    assert out[1].text == "A second, different article."
    assert out[2].text == "A new line."
    assert out[3] is fourth  # nothing repeated: unchanged, same object
    assert dedup.lines_removed == 6


def test_document_of_only_duplicate_lines_is_rejected():
    out = LineDeduplicator().process(
        [cc("Menu\n\nLogin\n", "a:1"), cc("MENU.\n\n  login  \n---", "a:2")]
    )
    assert [(o.reason, o.origin) for o in out] == [
        ("cc_all_lines_duplicate", "a:1"),
        ("cc_all_lines_duplicate", "a:2"),
    ]


def test_line_dedup_keeps_blank_and_punctuation_only_lines_and_collapses_blank_runs():
    dedup = LineDeduplicator()
    out = dedup.process(
        [cc("Footer line\nOwn text.", "a:1"),
         cc("Para one.\n\nFooter line\n\nPara two.\n***\n***", "a:2")]
    )  # fmt: skip
    assert out[1].text == "Para one.\n\nPara two.\n***\n***"


def test_line_dedup_passes_rejected_records_through():
    rej = Rejected("bad.jsonl:9", "malformed_json")
    assert LineDeduplicator().process([rej]) == [rej]


# --- the model steps ------------------------------------------------------------------------------
# Language id, perplexity and the reference classifier run with real models trained on text
# made there: tests/unit/test_quality.py.


def test_without_quality_settings_nothing_runs():
    french = cc("\n".join(["Le conseil municipal a vote le budget de la ville hier soir."] * 6))
    assert commoncrawl.clean(french) is french
    assert commoncrawl.clean(cc("too short")).text == "too short"


def test_the_gopher_heuristics_run_only_when_asked():
    """They are not in LLaMA's CommonCrawl recipe: off by default, `quality.heuristics` on."""
    short, asked = cc("too short"), QualityConfig(heuristics=True)
    assert commoncrawl.clean(short, QualityConfig()) is short
    assert reason(commoncrawl.clean(short, asked)) == "cc_too_few_words"
    assert commoncrawl.clean(cc(GOOD), asked).text == GOOD


# --- quality heuristics --------------------------------------------------------------------------


def words(n: int, word: str = "house") -> str:
    return " ".join([word] * n)


def test_good_document_is_kept_unchanged():
    doc = cc(GOOD)
    assert quality_filter(doc) is doc
    assert clean_document(doc) is doc


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (words(49), "cc_too_few_words"),
        (words(50), None),
        (words(100_000), None),
        (words(100_001), "cc_too_many_words"),
    ],
)
def test_word_count_bounds(text, expected):
    assert reason(quality_filter(cc(text))) == expected


@pytest.mark.parametrize(
    ("word", "expected"),
    [
        ("ab", "cc_mean_word_length"),
        ("abc", None),
        ("abcdefghij", None),
        ("abcdefghijk", "cc_mean_word_length"),
    ],
)
def test_mean_word_length_between_3_and_10(word, expected):
    assert reason(quality_filter(cc(words(60, word)))) == expected


def test_symbol_to_word_ratio_below_0_1():
    # 78 words + 10 "#" words: 10 / 88 = 0.114; with 5: 5 / 83 = 0.06
    assert reason(quality_filter(cc(GOOD + " #" * 10))) == "cc_symbol_ratio"
    assert reason(quality_filter(cc(GOOD + " #" * 5))) is None
    assert reason(quality_filter(cc(GOOD + " wait..." * 10))) == "cc_symbol_ratio"


def test_at_most_90_percent_of_lines_start_with_a_bullet():
    all_bullets = "\n".join(f"• {SENTENCE}" for _ in range(10))
    nine_of_ten = "\n".join([f"- {SENTENCE}"] * 9 + [SENTENCE])
    assert reason(quality_filter(cc(all_bullets))) == "cc_bullet_lines"
    assert reason(quality_filter(cc(nine_of_ten))) is None


def test_at_most_30_percent_of_lines_end_with_an_ellipsis():
    def text(n_ellipsis: int) -> str:
        return "\n".join([SENTENCE + ".."] * n_ellipsis + [SENTENCE] * (10 - n_ellipsis))

    assert reason(quality_filter(cc(text(4)))) == "cc_ellipsis_lines"
    assert reason(quality_filter(cc(text(3)))) is None
    assert reason(quality_filter(cc("\n".join([SENTENCE + "\u2026"] * 4 + [SENTENCE] * 6)))) == (
        "cc_ellipsis_lines"
    )


def test_at_least_80_percent_of_words_contain_a_letter():
    # 78 alphabetic words; + 20 numbers -> 0.796, + 15 numbers -> 0.839
    assert reason(quality_filter(cc(GOOD + " 123" * 20))) == "cc_non_alpha_words"
    assert reason(quality_filter(cc(GOOD + " 123" * 15))) is None
    assert reason(quality_filter(cc(GOOD + " a1b" * 20))) is None
