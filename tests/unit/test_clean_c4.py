"""C4 heuristics (Raffel et al. 2020, section 2.2)."""

import pytest

from llamaray.data.clean import clean_document
from llamaray.data.clean.c4 import clean, count_sentences, keep_line
from llamaray.data.records import Document, Rejected

LINE = "The river flooded the old town after three days of rain."


def c4(*lines: str) -> Document:
    return Document("\n".join(lines), "c4", "c4.jsonl:5")


def kept_text(*lines: str) -> str:
    out = clean(c4(*lines))
    assert isinstance(out, Document), out
    return out.text


def rejected(*lines: str) -> str:
    out = clean(c4(*lines))
    assert isinstance(out, Rejected), out
    return out.reason


def test_good_page_is_kept():
    assert kept_text(LINE, LINE, LINE) == "\n".join([LINE] * 3)
    assert isinstance(clean_document(c4(LINE, LINE, LINE)), Document)


@pytest.mark.parametrize(
    ("line", "kept"),
    [
        ("Home About Contact Us Today Menu", False),  # no terminal punctuation
        ("Read the rest of this story here...", False),  # ellipsis
        ("Is the new bridge finally open to traffic?", True),
        ("What a wonderful day it was for everyone!", True),
        ('She told them "we will rebuild the bridge."', True),
        ("She told them \u201cwe will rebuild the bridge\u201d", True),
        ("She told them 'we will rebuild the bridge'", False),
    ],
)
def test_only_lines_ending_in_terminal_punctuation_are_kept(line, kept):
    assert (keep_line(line) is not None) is kept
    assert (line in kept_text(LINE, LINE, LINE, line)) is kept


def test_lines_need_at_least_5_words():
    assert keep_line("Click here to go.") is None
    assert keep_line("Click here to go now.") == "Click here to go now."
    assert kept_text(LINE, "Click here to go.", LINE, LINE) == "\n".join([LINE] * 3)


def test_javascript_and_policy_lines_are_dropped():
    text = kept_text(
        LINE,
        "Please enable JavaScript to view the comments.",
        "By using this site you accept our Privacy Policy.",
        "This website uses cookies to improve your experience.",
        "Read our terms of use before you post anything.",
        LINE,
        LINE,
    )
    assert text == "\n".join([LINE] * 3)


def test_citation_markers_are_removed_and_overlong_words_drop_the_line():
    assert keep_line("The town was founded by settlers in 1820.[3]") == (
        "The town was founded by settlers in 1820."
    )
    assert keep_line("Its population grew very fast.[citation needed] [edit]") == (
        "Its population grew very fast."
    )
    assert keep_line("Its population grew fast " + "x" * 1001 + " indeed.") is None
    assert keep_line("Its population grew fast " + "x" * 1000 + " indeed.") is not None


def test_lorem_ipsum_rejects_the_page():
    assert rejected(LINE, LINE, LINE, "Lorem Ipsum dolor sit amet") == "c4_lorem_ipsum"
    assert rejected(LINE, LINE, "Lorem ipsum dolor sit amet, consectetur.") == "c4_lorem_ipsum"


def test_curly_bracket_rejects_the_page():
    assert rejected(LINE, LINE, LINE, "function f() { return 1; }") == "c4_curly_brace"
    assert rejected(LINE, "x }") != "c4_curly_brace"  # only the opening bracket counts


def test_pages_need_3_sentences():
    assert rejected(LINE, LINE) == "c4_too_few_sentences"
    assert rejected(LINE, LINE, "too short.") == "c4_too_few_sentences"
    three_in_one = "It rained for days. The river rose fast. Then the town flooded."
    assert kept_text(three_in_one) == three_in_one
    out = clean_document(c4("Only navigation", "Menu"))
    assert isinstance(out, Rejected)
    assert (out.reason, out.origin) == ("c4_too_few_sentences", "c4.jsonl:5")


@pytest.mark.parametrize(
    ("line", "n"),
    [
        ("Hi there. How are you? Fine!", 3),
        ('He said "stop." Then he left.', 2),
        ("Version 3.5 is out now.", 1),
        ('They called it "home"', 1),
    ],
)
def test_count_sentences(line, n):
    assert count_sentences(line) == n
