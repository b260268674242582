"""Wikipedia: wikitext markup to plain text."""

import pytest

from llamaray.data.clean import clean_document
from llamaray.data.clean.wikipedia import clean, strip_markup
from llamaray.data.records import Document, Rejected


def wiki(text: str) -> Document:
    return Document(text, "wikipedia", "enwiki.jsonl:4", {"title": "Paris"})


@pytest.mark.parametrize(
    ("markup", "plain"),
    [
        ("the [[Seine|river Seine]] flows", "the river Seine flows"),
        ("the [[Seine]] flows", "the Seine flows"),
        ("many [[bus]]es and [[Loire|]]", "many buses and Loire"),
        ("see [https://example.org the site] now", "see the site now"),
        ("see [https://example.org] now", "see  now"),
        ("a {{convert|105|km2|sqmi}} city", "a  city"),
        ("a {{Infobox|name={{lang|fr|Paris}}|x=1}} city", "a  city"),
        ("cited<ref name=a>{{cite web|url=x}} Smith</ref> here", "cited here"),
        ('cited<ref name="b" /> here', "cited here"),
        ("a <!-- hidden\\nnote --> comment", "a  comment"),
        ("'''Paris''' is ''the'' capital", "Paris is the capital"),
        ("== History ==\\nText.", "History\\nText."),
        ("=== Early   times===", "Early   times"),
        ("x <small>small</small> <br/> y", "x small  y"),
        ("x &nbsp;&ndash; y", "x \\xa0\\u2013 y"),
        ("[[File:Paris.jpg|thumb|The [[Eiffel Tower]] at night]]Paris", "Paris"),
        ("Paris[[Category:Capitals in Europe]]", "Paris"),
        ("Paris [[Image:Flag.svg|20px]] flag", "Paris  flag"),
        ("a <math>x^2</math> b", "a  b"),
        ("__NOTOC__Paris", "Paris"),
    ],
)
def test_markup_rules(markup, plain):
    markup = markup.replace("\\n", "\n")
    plain = plain.replace("\\n", "\n").replace("\\xa0", "\xa0").replace("\\u2013", "\u2013")
    assert strip_markup(markup) == plain


def test_nested_tables_are_removed():
    text = "Before.\n{| class=wikitable\n|-\n| a || {|\n| inner\n|}\n|-\n| b\n|}\nAfter."
    assert strip_markup(text) == "Before.\n\nAfter."


def test_unclosed_template_does_not_eat_the_article():
    assert strip_markup("Start {{broken template. The rest of the article.") == (
        "Start {{broken template. The rest of the article."
    )


def test_plain_text_is_unchanged_and_blank_runs_collapse():
    plain = "Paris is the capital of France.\n\nIt lies on the Seine."
    assert strip_markup(plain) == plain
    assert strip_markup("One.\n\n\n\n{{navbox}}\n\nTwo.  ") == "One.\n\nTwo."


def test_clean_keeps_origin_and_meta():
    out = clean(wiki("'''Paris''' is the [[capital city|capital]] of [[France]].{{cn}}"))
    assert isinstance(out, Document)
    assert out.text == "Paris is the capital of France."
    assert (out.origin, out.meta, out.source) == ("enwiki.jsonl:4", {"title": "Paris"}, "wikipedia")


def test_redirects_are_rejected():
    out = clean_document(wiki("#REDIRECT [[Paris, France]]"))
    assert isinstance(out, Rejected)
    assert out.reason == "wikipedia_redirect"
    assert isinstance(clean_document(wiki("A #redirect mention in [[text]].")), Document)


def test_markup_only_page_is_rejected_as_empty_after_clean():
    out = clean_document(wiki("{{Disambiguation}}\n[[Category:Stubs]]"))
    assert isinstance(out, Rejected)
    assert out.reason == "empty_after_clean"
