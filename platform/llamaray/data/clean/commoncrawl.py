"""CommonCrawl: the CCNet pipeline (line dedup, language id, n-gram perplexity), LLaMA's
reference classifier, and Gopher-style quality heuristics.

LLaMA (Touvron et al. 2023, section 2.1): "We preprocess five CommonCrawl dumps ... with the
CCNet pipeline (Wenzek et al., 2020). This process deduplicates the data at the line level,
performs language identification with a fastText linear classifier to remove non-English
pages and filters low quality content with an n-gram language model. In addition, we trained
a linear model to classify pages used as references in Wikipedia v.s. randomly sampled pages".

Here:
- `LineDeduplicator` (`repeated_lines`, `remove_lines`): CCNet's line-level dedup over a group
  of shards, every copy of a repeated line removed (run first; on Ray:
  `data.source_dedup.line_dedup_dataset`).
- the model steps (`data.quality`: fastText language id, KenLM perplexity buckets, the
  reference classifier), each run when `CorpusConfig.quality` names its model
  (`data.quality.steps`).
- `quality_filter`: the Gopher heuristics (Rae et al. 2021, appendix A.1.1), as computed by
  RedPajama-V2's quality signals. They are not in LLaMA's recipe, so they run only when
  `quality.heuristics` asks: after the model steps, a floor that needs no model (where the
  model steps are skipped, say).
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
import string
import unicodedata
from collections.abc import Collection, Iterable

from llamaray.config import QualityConfig
from llamaray.data.quality import steps
from llamaray.data.records import Document, Rejected
from llamaray.storage import adopt_s3

REASONS: tuple[str, ...] = (
    "cc_all_lines_duplicate",
    *steps.REASONS,
    "cc_too_few_words",
    "cc_too_many_words",
    "cc_mean_word_length",
    "cc_symbol_ratio",
    "cc_bullet_lines",
    "cc_ellipsis_lines",
    "cc_non_alpha_words",
)

# --- line-level deduplication (CCNet) -------------------------------------------------------

_DIGITS = re.compile(r"\d")
_SPACES = re.compile(r"\s+")


def _dropped_in_dedup(char: str) -> bool:
    # NFD splits "é" into "e" + a combining accent (category Mn), dropped together with every
    # punctuation (P*), control/format/unassigned (C*) and ASCII punctuation character (which
    # includes symbols such as | + $ < = > ^ ` ~). Whitespace is collapsed later instead.
    category = unicodedata.category(char)
    dropped = category == "Mn" or category[0] in "PC" or char in string.punctuation
    return dropped and not char.isspace()


# The same for ASCII text, without a per-character Python loop (most web lines are ASCII).
_ASCII_DROPPED = str.maketrans(
    "", "", "".join(c for c in map(chr, range(128)) if _dropped_in_dedup(c))
)


def _strip_punct_and_accents(text: str) -> str:
    if text.isascii():
        return text.translate(_ASCII_DROPPED)
    return "".join(c for c in unicodedata.normalize("NFD", text) if not _dropped_in_dedup(c))


def normalize_line(line: str) -> str:
    """The form under which two lines count as the same line.

    CCNet's `text_normalizer.normalize_for_dedup` lowercases, maps every digit to 0 and removes
    (unicode) punctuation and non-printing characters; `normalize` also strips accents. We do
    all of these, remove ASCII punctuation too and collapse whitespace, so "Page 12 of 40." and
    "page 31 of 99" are one line.
    """
    line = _DIGITS.sub("0", line.strip().lower())
    return _SPACES.sub(" ", _strip_punct_and_accents(line)).strip()


def line_hash(normalized: str) -> int:
    """64-bit hash of a normalized line (CCNet keeps 64-bit line hashes too)."""
    return int.from_bytes(hashlib.blake2b(normalized.encode(), digest_size=8).digest(), "little")


def line_hashes(text: str) -> list[int | None]:
    """The hash of each line of `text` (`str.splitlines`), None for a line that normalizes to
    nothing (blank, or only punctuation): those are never counted nor removed."""
    return [line_hash(n) if (n := normalize_line(line)) else None for line in text.splitlines()]


def repeated_lines(docs: Iterable[Document | Rejected]) -> set[int]:
    """The hashes of the lines that occur more than once in `docs` (one shard group): twice in
    one document, or in two documents. CCNet's `HashesCollector` marks exactly these."""
    seen: set[int] = set()
    repeated: set[int] = set()
    for doc in docs:
        if isinstance(doc, Document):
            for h in line_hashes(doc.text):
                if h is None:
                    continue
                if h in seen:
                    repeated.add(h)
                seen.add(h)
    return repeated


def remove_lines(
    doc: Document, repeated: Collection[int], reason: str = "cc_all_lines_duplicate"
) -> tuple[Document | Rejected, int]:
    """`doc` without every line whose hash is in `repeated`, and how many lines went.

    CCNet (Wenzek et al. 2020, section 3.2; cc_net `dedup.py`, `deduplicate_two_pass`: "even
    removing the first occurence. This is what is done in the paper"): no copy of a repeated
    line is kept, so boilerplate (menus, cookie banners, footers) leaves every page it was on.
    Lines that normalize to nothing stay, at most one blank line between kept lines. A
    document left with no line of content is rejected with `reason`.
    """
    kept: list[str] = []
    removed = 0
    content = False  # a kept line with something left after normalization
    for line, h in zip(doc.text.splitlines(), line_hashes(doc.text), strict=True):
        if h is None:
            if line.strip():
                kept.append(line)
            elif kept and kept[-1].strip():
                kept.append("")
            continue
        if h in repeated:
            removed += 1
            continue
        kept.append(line)
        content = True
    if not removed:
        return doc, 0
    if not content:
        return Rejected.of(doc, reason), removed
    return dataclasses.replace(doc, text="\n".join(kept).strip("\n")), removed


class LineDeduplicator:
    """CCNet's line dedup over one shard group, in one process: two passes over the group's
    documents, the first finding the repeated lines (`repeated_lines`), the second removing
    every copy of them (`remove_lines`). The reference for the Ray version
    (`data.source_dedup.line_dedup_dataset`); `lines_removed` counts what went.
    """

    def __init__(self, reason: str = "cc_all_lines_duplicate") -> None:
        self.reason = reason
        self.lines_removed = 0

    def process(self, docs: Iterable[Document | Rejected]) -> list[Document | Rejected]:
        """The group's documents, deduplicated, in order; rejected records pass through."""
        docs = list(docs)
        repeated = repeated_lines(docs)
        out: list[Document | Rejected] = []
        for doc in docs:
            if isinstance(doc, Document):
                doc, removed = remove_lines(doc, repeated, self.reason)
                self.lines_removed += removed
            out.append(doc)
        return out


# --- quality heuristics (Gopher, as in RedPajama-V2's quality signals) -----------------------

MIN_WORDS, MAX_WORDS = 50, 100_000  # Gopher: "between 50 and 100,000 words"
MIN_MEAN_WORD_LENGTH, MAX_MEAN_WORD_LENGTH = 3.0, 10.0  # Gopher: "mean word length ... 3 to 10"
MAX_SYMBOL_RATIO = 0.1  # Gopher: "symbol-to-word ratio greater than 0.1" (# and ellipsis)
MAX_BULLET_LINES = 0.9  # Gopher: "more than 90% of lines starting with a bullet point"
MAX_ELLIPSIS_LINES = 0.3  # Gopher: "more than 30% ending with an ellipsis"
MIN_ALPHA_WORDS = 0.8  # Gopher: "80% of words in a document contain at least one alphabetic"

# RedPajama-V2's BULLET_POINT_SYMBOLS (•, ‣, ▶, ◀, ◦, ■, □, ▪, ▫, en dash) plus the ASCII list
# markers "-" and "*" and the middle dot, which web text uses the same way.
BULLETS = ("\u2022", "\u2023", "\u25b6", "\u25c0", "\u25e6", "\u25a0", "\u25a1", "\u25aa",
           "\u25ab", "\u2013", "-", "*", "\u00b7")  # fmt: skip
ELLIPSES = ("...", "\u2026")


def _nonblank_lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip()]


def word_count_rule(words: list[str]) -> str | None:
    """Gopher: keep documents of 50 to 100,000 (whitespace-separated) words."""
    if len(words) < MIN_WORDS:
        return "cc_too_few_words"
    if len(words) > MAX_WORDS:
        return "cc_too_many_words"
    return None


def mean_word_length_rule(words: list[str]) -> str | None:
    """Gopher: mean word length between 3 and 10 characters."""
    mean = sum(map(len, words)) / max(len(words), 1)
    ok = MIN_MEAN_WORD_LENGTH <= mean <= MAX_MEAN_WORD_LENGTH
    return None if ok else "cc_mean_word_length"


def symbol_ratio_rule(text: str, words: list[str]) -> str | None:
    """Gopher: (hash symbols + ellipses) per word below 0.1."""
    symbols = text.count("#") + text.count("...") + text.count("\u2026")
    return None if symbols / max(len(words), 1) < MAX_SYMBOL_RATIO else "cc_symbol_ratio"


def bullet_lines_rule(lines: list[str]) -> str | None:
    """Gopher: at most 90% of the (non-blank) lines start with a bullet point."""
    bullets = sum(line.startswith(BULLETS) for line in lines)
    return "cc_bullet_lines" if lines and bullets / len(lines) > MAX_BULLET_LINES else None


def ellipsis_lines_rule(lines: list[str]) -> str | None:
    """Gopher: at most 30% of the (non-blank) lines end with an ellipsis."""
    ellipses = sum(line.endswith(ELLIPSES) for line in lines)
    return "cc_ellipsis_lines" if lines and ellipses / len(lines) > MAX_ELLIPSIS_LINES else None


def alpha_words_rule(words: list[str]) -> str | None:
    """Gopher: at least 80% of the words contain an alphabetic character."""
    alpha = sum(any(c.isalpha() for c in w) for w in words)
    return None if alpha / max(len(words), 1) >= MIN_ALPHA_WORDS else "cc_non_alpha_words"


def quality_filter(doc: Document) -> Document | Rejected:
    """The Gopher heuristics; the first failing rule names the rejection."""
    words = doc.text.split()
    lines = _nonblank_lines(doc.text)
    for reason in (
        word_count_rule(words),
        mean_word_length_rule(words),
        symbol_ratio_rule(doc.text, words),
        bullet_lines_rule(lines),
        ellipsis_lines_rule(lines),
        alpha_words_rule(words),
    ):
        if reason:
            return Rejected.of(doc, reason)
    return doc


def clean(doc: Document, quality: QualityConfig | None = None, s3=None) -> Document | Rejected:
    """Per-document CommonCrawl steps: the model steps `quality` configures, in CCNet's order
    (language id, perplexity, reference classifier; `data.quality.steps`), then the Gopher
    heuristics if `quality.heuristics` asks (they are not in LLaMA's recipe). None: the
    defaults, under which nothing runs (no model is set). `s3`: the driver's S3 filesystem,
    adopted (`storage.adopt_s3`) so a node reads s3:// models with the driver's settings.

    Line dedup runs over a shard group before this (`LineDeduplicator`).
    """
    if s3 is not None:
        adopt_s3(s3)
    quality = quality or QualityConfig()
    out = steps.apply_models(doc, quality)
    if quality.heuristics and isinstance(out, Document):
        return quality_filter(out)
    return out
