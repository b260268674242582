"""C4: the heuristics of Raffel et al. 2020 (section 2.2), as in TFDS's `c4_utils.clean_page`.

LLaMA (Touvron et al. 2023, section 2.1) uses the public C4, whose "quality filtering mostly
relies on heuristics such as presence of punctuation marks or the number of words and
sentences in a webpage". Line rules drop lines; page rules reject the whole page.

Not reproduced: the "List of Dirty, Naughty, Obscene or Otherwise Bad Words" page filter, the
three-sentence-span deduplication across the dataset, and langdetect's English filter.
"""

from __future__ import annotations

import dataclasses
import re

from llamaray.data.records import Document, Rejected

REASONS: tuple[str, ...] = ("c4_lorem_ipsum", "c4_curly_brace", "c4_too_few_sentences")

# C4: "we only retained lines that ended in a terminal punctuation mark (i.e. a period,
# exclamation mark, question mark, or end quotation mark)". TFDS uses . ? ! and '"'; we add
# the typographic closing quote. Lines ending with "..." do not count (TFDS `_ELLIPSIS`).
END_MARKS = (".", "!", "?", '"', "\u201d")
ELLIPSIS = "..."
MIN_WORDS_PER_LINE = 5  # C4: "only retained lines that contained at least 5 words"
MIN_SENTENCES = 3  # C4: "discarded any page with fewer than 3 sentences"
MAX_WORD_LENGTH = 1000  # TFDS `_MAX_WORD_LENGTH`: lines with a longer "word" are dropped
# TFDS `_CITATION_REGEX`: Wikipedia-style citation markers are removed from lines.
CITATION = re.compile(r"\[\d*\]|\[edit\]|\[citation needed\]", re.IGNORECASE)
# TFDS `_POLICY_SUBSTRINGS`: lines of cookie banners and legal footers are dropped.
POLICY_SUBSTRINGS = (
    "terms of use",
    "privacy policy",
    "cookie policy",
    "uses cookies",
    "use of cookies",
    "use cookies",
)
# A sentence ends with . ! or ? (optionally closed by a quote) before a space or the line end.
# TFDS counts sentences with NLTK's punkt tokenizer; this regex over-counts abbreviations
# ("e.g. the") but needs no model.
_SENTENCE_END = re.compile(r"[.!?]+[\"\u201d]?(?=\s|$)")


def has_lorem_ipsum(text: str) -> bool:
    """C4: "removed any page where the phrase 'lorem ipsum' appeared" (placeholder text)."""
    return "lorem ipsum" in text.lower()


def has_curly_brace(text: str) -> bool:
    """C4: "removed any pages that contained a curly bracket" (code, not natural language).

    The paper's wording (any page); TFDS tests only the lines that survived the line rules.
    """
    return "{" in text


def ends_with_terminal_punctuation(line: str) -> bool:
    """C4: keep only lines that end in a terminal punctuation mark (not an ellipsis)."""
    return line.endswith(END_MARKS) and not line.endswith(ELLIPSIS)


def is_policy_line(line: str) -> bool:
    """TFDS: drop lines mentioning terms of use, privacy/cookie policies and cookie notices."""
    lower = line.lower()
    return any(p in lower for p in POLICY_SUBSTRINGS)


def mentions_javascript(line: str) -> bool:
    """C4: "removed any line with the word Javascript" ("Javascript must be enabled ...")."""
    return "javascript" in line.lower()


def count_sentences(line: str) -> int:
    """Sentences in a kept line (which ends in terminal punctuation, so at least one)."""
    return max(1, len(_SENTENCE_END.findall(line)))


def keep_line(line: str) -> str | None:
    """The line as C4 keeps it (citation markers removed), or None when a line rule drops it."""
    if any(len(w) > MAX_WORD_LENGTH for w in line.split()):
        return None
    line = CITATION.sub("", line).strip()
    if not ends_with_terminal_punctuation(line):
        return None
    if len(line.split()) < MIN_WORDS_PER_LINE:
        return None
    if mentions_javascript(line) or is_policy_line(line):
        return None
    return line


def clean(doc: Document) -> Document | Rejected:
    """Page rules first (lorem ipsum, curly bracket), then line rules, then the sentence count."""
    if has_lorem_ipsum(doc.text):
        return Rejected.of(doc, "c4_lorem_ipsum")
    if has_curly_brace(doc.text):
        return Rejected.of(doc, "c4_curly_brace")
    lines = [kept for line in doc.text.splitlines() if (kept := keep_line(line.strip()))]
    if sum(map(count_sentences, lines)) < MIN_SENTENCES:
        return Rejected.of(doc, "c4_too_few_sentences")
    return dataclasses.replace(doc, text="\n".join(lines))
