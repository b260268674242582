"""Stack Exchange: Q/A text built from meta, answers by score, HTML removed."""

import pytest

from llamaray.data.clean import clean_document
from llamaray.data.clean.stackexchange import build_text, html_to_text, score_value, to_text
from llamaray.data.records import Document, Rejected


def se(text: str = "", **meta) -> Document:
    return Document(text, "stackexchange", "se.jsonl:8", meta)


def test_post_from_meta_answers_sorted_by_numeric_score():
    doc = se(
        question="<p>How do I sort a list?</p>",
        answers=[
            {"body": "<p>Use a loop.</p>", "score": "9"},
            {"text": "<p>Use <code>sorted(xs)</code>.</p>", "score": "10"},
            {"body": "<p>Bad answer.</p>", "score": -2},
            {"body": "<p>Also sorted.</p>", "score": 10},
        ],
    )
    out = clean_document(doc)
    assert isinstance(out, Document)
    assert out.text == (
        "Q: How do I sort a list?\n\n"
        "A: Use sorted(xs).\n\n"
        "A: Also sorted.\n\n"  # ties keep their order
        "A: Use a loop.\n\n"
        "A: Bad answer."
    )


def test_html_is_removed_entities_unescaped_and_code_kept():
    body = (
        "<p>Try this &amp; that:</p>\n<pre><code>if (a &lt; b) {\n    x++;\n}\n</code></pre>"
        "<ul><li>one</li><li>two</li></ul><p>It&#39;s <a href='u'>here</a>.</p>"
    )
    assert html_to_text(body) == (
        "Try this & that:\n\nif (a < b) {\n    x++;\n}\n\none\n\ntwo\n\nIt's here."
    )


def test_already_joined_text_keeps_angle_brackets_that_are_not_html():
    plain = "Q: Why does List<String> fail?\n\nA: Use List<? extends T> &amp; friends."
    assert to_text(plain) == "Q: Why does List<String> fail?\n\nA: Use List<? extends T> & friends."
    doc = se("Q: Why?\n\nA: Because.")
    assert clean_document(doc) is doc


def test_already_joined_text_with_html_is_stripped():
    out = clean_document(se("Q: <p>Why?</p>\n\nA: <p>Because <b>so</b>.</p>"))
    assert isinstance(out, Document)
    assert out.text == "Q: Why?\n\nA: Because so."


def test_question_as_dict_with_title_and_missing_scores_last():
    text = build_text(
        {"title": "Sorting &amp; lists", "body": "<p>How?</p>"},
        [{"body": "no score"}, {"body": "<p>scored</p>", "score": "1"}, "not a dict"],
    )
    assert text == "Q: Sorting & lists\nHow?\n\nA: scored\n\nA: no score\n\nA: not a dict"


@pytest.mark.parametrize(
    ("score", "value"),
    [(3, 3.0), ("10", 10.0), (" -4 ", -4.0), ("2.5", 2.5), (None, float("-inf"))],
)
def test_score_value(score, value):
    assert score_value(score) == value


def test_bad_scores_sort_last():
    assert score_value("n/a") == float("-inf")
    assert score_value(True) == float("-inf")
    assert score_value(float("nan")) == float("-inf")
    assert sorted(["9", "10", "100", "-1"], key=score_value) == ["-1", "9", "10", "100"]


def test_meta_post_with_empty_text_field_is_not_rejected_as_empty():
    out = clean_document(se("", question="<p>Q?</p>", answers=[]))
    assert isinstance(out, Document)
    assert out.text == "Q: Q?"


def test_empty_post_is_rejected():
    out = clean_document(se("", question="<p> </p>", answers=[{"body": "", "score": 1}]))
    assert isinstance(out, Rejected)
    assert out.reason == "empty_after_clean"
    assert clean_document(se("", question="<p>Q?</p>")).reason == "empty"  # no answers key
