"""CCNet's text normalization, applied before every model step (language id aside).

Wenzek et al. 2020 (CCNet), section 3.3: the language model is trained and queried on text
"normalized ... (lower case, numbers replaced by 0, accents and unicode punctuation
normalized)"; cc_net's `text_normalizer.normalize(line, accent=True, case=True, numbers=True,
punct=1)` does it, line by line. The same function prepares the training text (`quality
train`) and the text scored in `prepare`, so a model never sees text normalized otherwise.
"""

from __future__ import annotations

import re
import unicodedata

# cc_net text_normalizer.UNICODE_PUNCT: full-width and typographic punctuation -> ASCII.
UNICODE_PUNCT: dict[str, str] = {
    "，": ",",
    "。": ".",
    "、": ",",
    "„": '"',
    "”": '"',
    "“": '"',
    "«": '"',
    "»": '"',
    "１": '"',
    "」": '"',
    "「": '"',
    "《": '"',
    "》": '"',
    "´": "'",
    "∶": ":",
    "：": ":",
    "？": "?",
    "！": "!",
    "（": "(",
    "）": ")",
    "；": ";",
    "–": "-",
    "—": " - ",
    "．": ". ",
    "～": "~",
    "’": "'",
    "…": "...",
    "━": "-",
    "〈": "<",
    "〉": ">",
    "【": "[",
    "】": "]",
    "％": "%",
    "►": "-",
}
_PUNCT = re.compile("|".join(map(re.escape, UNICODE_PUNCT)))
_DIGITS = re.compile(r"\d")
# cc_net's NON_PRINTING_CHARS_RE: C0 and C1 control characters (a line holds no newline).
_NON_PRINTING = re.compile("[" + "".join(map(chr, [*range(32), *range(127, 160)])) + "]")


def strip_accents(line: str) -> str:
    """ "é" -> "e": NFD, then the combining marks (category Mn) dropped (cc_net's)."""
    if line.isascii():
        return line
    return "".join(c for c in unicodedata.normalize("NFD", line) if unicodedata.category(c) != "Mn")


def normalize(line: str) -> str:
    """One line as CCNet's models see it: stripped, lowercased, accents removed, every digit
    0, unicode punctuation mapped to ASCII, control characters removed.

    >>> normalize("  Le 14 Juillet, à Paris… ")
    'le 00 juillet, a paris...'
    """
    line = line.strip()
    if not line:
        return line
    line = _DIGITS.sub("0", strip_accents(line.lower()))
    line = _PUNCT.sub(lambda m: UNICODE_PUNCT[m.group()], line)
    return _NON_PRINTING.sub("", line)


def normalized_lines(text: str) -> list[str]:
    """The non-empty normalized lines of a document: CCNet's unit of scoring (its pages are
    paragraphs joined by newlines)."""
    return [n for line in text.splitlines() if (n := normalize(line))]
