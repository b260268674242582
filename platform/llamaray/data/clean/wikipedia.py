"""Wikipedia: wikitext markup to plain text.

LLaMA (Touvron et al. 2023, section 2.1): "We process the data to remove hyperlinks, comments
and other formatting boilerplate." Dumps already converted to plain text (WikiExtractor, the
HF `wikipedia` set RedPajama-v1 used) pass through nearly unchanged: each rule only matches
markup.
"""

from __future__ import annotations

import dataclasses
import html
import re

from llamaray.data.records import Document, Rejected

REASONS: tuple[str, ...] = ("wikipedia_redirect",)

_REDIRECT = re.compile(r"\A\s*#redirect\b", re.IGNORECASE)
_COMMENT = re.compile(r"<!--.*?(?:-->|\Z)", re.DOTALL)
# <ref>...</ref>, <ref name="x">...</ref> and self-closing <ref name="x" />: citations.
_REF = re.compile(r"<ref\b[^>]*/>|<ref\b[^>]*>.*?</ref\s*>", re.DOTALL | re.IGNORECASE)
# Elements whose content is markup or non-prose, removed with their content.
_DROPPED_ELEMENTS = re.compile(
    r"<(math|gallery|timeline|score|syntaxhighlight|graph|templatedata)\b[^>]*>.*?</\1\s*>",
    re.DOTALL | re.IGNORECASE,
)
_TAG = re.compile(r"</?[a-zA-Z][^<>]*>")
_INNER_LINK = re.compile(r"\[\[([^\[\]]*)\]\]")
# Links into these namespaces are media, categories or files, not prose: removed whole.
_DROPPED_NAMESPACES = re.compile(r"\s*(?:file|image|media|category)\s*:", re.IGNORECASE)
_EXTERNAL_LINK = re.compile(r"\[(?:https?:|ftp:)?//[^\s\]]*(?:\s+([^\]]*))?\]")
_HEADING = re.compile(r"^(={1,6})\s*(.*?)\s*\1\s*$", re.MULTILINE)
_QUOTES = re.compile(r"'{2,5}")  # ''italic'', '''bold''', '''''both'''''
_MAGIC_WORD = re.compile(r"__[A-Z]+__")  # __NOTOC__, __TOC__, ...


def is_redirect(text: str) -> bool:
    """A redirect page ("#REDIRECT [[Target]]") has no content of its own."""
    return bool(_REDIRECT.match(text))


def remove_comments(text: str) -> str:
    """<!-- editor comments --> (LLaMA: "remove ... comments")."""
    return _COMMENT.sub("", text)


def remove_refs(text: str) -> str:
    """<ref>citations</ref>, with their content, and non-prose elements like <math>."""
    return _DROPPED_ELEMENTS.sub("", _REF.sub("", text))


def _remove_balanced(text: str, opener: str, closer: str) -> str:
    """Removes every (possibly nested) opener...closer span.

    An opener never closed is kept with the text after it: a stray "{{" must not eat the rest
    of the article. A stray closer is kept too.
    """
    out: list[str] = []
    depth = 0
    pos = 0  # start of the text not yet copied to `out`
    token = re.compile(re.escape(opener) + "|" + re.escape(closer))
    for m in token.finditer(text):
        if m.group() == opener:
            if depth == 0:
                out.append(text[pos : m.start()])
                pos = m.start()
            depth += 1
        elif depth > 0:
            depth -= 1
            if depth == 0:
                pos = m.end()
    out.append(text[pos:])
    return "".join(out)


def remove_templates(text: str) -> str:
    """{{templates}}, nested ones included (infoboxes, citation templates, navboxes)."""
    return _remove_balanced(text, "{{", "}}")


def remove_tables(text: str) -> str:
    """{| tables |}, nested ones included."""
    return _remove_balanced(text, "{|", "|}")


def _link_text(m: re.Match) -> str:
    inner = m.group(1)
    if _DROPPED_NAMESPACES.match(inner):
        return ""
    target, _, label = inner.partition("|")
    return (label if label.strip() else target).lstrip(":")


def replace_links(text: str) -> str:
    """[[target|text]] -> text, [[target]] -> target; [[File:...]], [[Category:...]] removed.

    Innermost links first, so a link inside an image caption is resolved before the image
    link (with its caption) is removed.
    """
    while True:
        new = _INNER_LINK.sub(_link_text, text)
        if new == text:
            return new
        text = new


def replace_external_links(text: str) -> str:
    """[http://example.com text] -> text; a bare [http://example.com] is removed."""
    return _EXTERNAL_LINK.sub(lambda m: m.group(1) or "", text)


def replace_headings(text: str) -> str:
    """== Heading == -> Heading."""
    return _HEADING.sub(r"\2", text)


def remove_formatting(text: str) -> str:
    """Bold/italic quotes, remaining HTML-ish tags (content kept), magic words, entities."""
    text = _TAG.sub("", _QUOTES.sub("", text))
    return html.unescape(_MAGIC_WORD.sub("", text))


def tidy_whitespace(text: str) -> str:
    """Trailing spaces removed and at most one blank line between paragraphs."""
    text = "\n".join(line.rstrip() for line in text.splitlines())
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def strip_markup(text: str) -> str:
    """Wikitext to plain text, in an order where each step sees no markup it cannot handle."""
    text = remove_refs(remove_comments(text))
    text = remove_tables(remove_templates(text))
    text = replace_external_links(replace_links(text))
    text = remove_formatting(replace_headings(text))
    return tidy_whitespace(text)


def clean(doc: Document) -> Document | Rejected:
    """Redirects are rejected; every other page is converted to plain text."""
    if is_redirect(doc.text):
        return Rejected.of(doc, "wikipedia_redirect")
    return dataclasses.replace(doc, text=strip_markup(doc.text))
