"""Stack Exchange: question and answers as plain text, best answers first.

LLaMA (Touvron et al. 2023, section 2.1): "We kept the data from the 28 largest websites,
removed the HTML tags from text and sorted the answers by score (from highest to lowest)."
RedPajama-Data v1 ships the result as one text ("Q: ...\\n\\nA: ...\\n\\nA: ..."). Records
may instead carry the raw post: meta "question" (HTML, or {"title", "text"/"body"}) and
"answers" ([{"text"/"body": HTML, "score": int or str}]); the text is then built from those.
"""

from __future__ import annotations

import dataclasses
import html
import math
import re
from html.parser import HTMLParser

from llamaray.data.records import Document

REASONS: tuple[str, ...] = ()

# Elements after which the text continues on a new line.
_BLOCK_TAGS = frozenset(
    {"p", "div", "br", "li", "ul", "ol", "pre", "blockquote", "tr", "table", "hr"}
    | {f"h{i}" for i in range(1, 7)}
)
_LOOKS_LIKE_HTML = re.compile(
    r"<(?:p|pre|code|a\s[^>]*href|br|hr|div|span|blockquote|ul|ol|li|h[1-6]|strong|em|b|i|kbd"
    r"|sup|sub|img|table)\b[^>]*>",
    re.IGNORECASE,
)
_MARKER_THEN_NEWLINE = re.compile(r"^([QA]):[ \t]*\n+", re.MULTILINE)


class _TextExtractor(HTMLParser):
    """Collects the text of an HTML fragment; <pre>/<code> text is kept verbatim."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)  # entities (&lt; &amp; &#39;) to characters
        self.parts: list[str] = []

    def handle_starttag(self, tag: str, attrs: list) -> None:
        if tag in _BLOCK_TAGS:
            self.parts.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in _BLOCK_TAGS:
            self.parts.append("\n")

    def handle_data(self, data: str) -> None:
        self.parts.append(data)


def html_to_text(fragment: str) -> str:
    """LLaMA: "removed the HTML tags from text". Tags go, entities are unescaped, the text of
    code blocks stays, and block elements end lines."""
    parser = _TextExtractor()
    parser.feed(fragment)
    parser.close()
    text = "\n".join(line.rstrip() for line in "".join(parser.parts).splitlines())
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def to_text(fragment: str) -> str:
    """HTML to text; text that has no HTML markup is only unescaped (so `List<T>` survives)."""
    if _LOOKS_LIKE_HTML.search(fragment):
        return html_to_text(fragment)
    return html.unescape(fragment).strip()


def score_value(score: object) -> float:
    """A score as a number ("10" > "9"); missing or malformed scores sort last."""
    if isinstance(score, bool):
        return -math.inf
    if isinstance(score, int | float):
        return float(score) if not math.isnan(score) else -math.inf
    try:
        value = float(str(score).strip())
    except ValueError:
        return -math.inf
    return value if not math.isnan(value) else -math.inf


def _body(post: object) -> str:
    if isinstance(post, dict):
        return str(post.get("text") or post.get("body") or "")
    return "" if post is None else str(post)


def build_text(question: object, answers: list) -> str:
    """ "Q: question\\n\\nA: best answer\\n\\nA: next answer", answers by score descending
    (ties keep their order)."""
    q = to_text(_body(question))
    if isinstance(question, dict) and question.get("title"):
        title = to_text(str(question["title"]))
        q = f"{title}\n{q}" if q else title
    ordered = sorted(
        answers or [],
        key=lambda a: score_value(a.get("score")) if isinstance(a, dict) else -math.inf,
        reverse=True,
    )
    answer_texts = [t for a in ordered if (t := to_text(_body(a)))]
    if not q and not answer_texts:
        return ""
    return "\n\n".join([f"Q: {q}"] + [f"A: {t}" for t in answer_texts])


def has_structured_post(doc: Document) -> bool:
    """Whether the record carries the question and its answers in its meta."""
    return "question" in doc.meta and "answers" in doc.meta


def clean(doc: Document) -> Document:
    """Builds the text from meta when the record has the raw post, else cleans the text."""
    if has_structured_post(doc):
        text = build_text(doc.meta["question"], doc.meta["answers"] or [])
    else:
        # "Q: <p>Why?</p>" must not become "Q:\nWhy?"
        text = _MARKER_THEN_NEWLINE.sub(r"\1: ", to_text(doc.text))
    return doc if text == doc.text else dataclasses.replace(doc, text=text)
