"""Per-source cleaning of the LLaMA paper's corpus (Touvron et al. 2023, section 2.1).

Pure Python (stdlib and numpy), so it runs the same in a test, a script or a Ray task;
CommonCrawl's model steps (`data.quality`) load fastText and KenLM models when configured.

- `clean_document(doc)`: the common checks, then the source's per-document rules
  (`CLEANERS[doc.source]`); a source without rules gets only the common checks.
- `DEDUPLICATORS[source]()`: the paper's dedup of each source, as a single-process class
  with `process(docs)`: CommonCrawl line dedup over a shard group (before the per-document
  rules, as CCNet does), GitHub exact file dedup and book near-duplicate removal (after
  them). `data.source_dedup` runs them (and their Ray Data versions) in `prepare`.

Every rejection is a `Rejected` with a stable reason key; `REASONS` lists them all.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from llamaray.data.clean import arxiv, books, c4, commoncrawl, github, stackexchange, wikipedia
from llamaray.data.clean.books import BookDeduplicator
from llamaray.data.clean.commoncrawl import LineDeduplicator
from llamaray.data.clean.github import ExactFileDeduplicator
from llamaray.data.records import Document, Rejected

Cleaner = Callable[..., Document | Rejected]  # (doc, **per-source options)

CLEANERS: dict[str, Cleaner] = {
    "commoncrawl": commoncrawl.clean,
    "c4": c4.clean,
    "github": github.clean,
    "wikipedia": wikipedia.clean,
    "books": books.clean,
    "arxiv": arxiv.clean,
    "stackexchange": stackexchange.clean,
}
"""Per-document rules by source name."""

DEDUPLICATORS: dict[str, type[LineDeduplicator | ExactFileDeduplicator | BookDeduplicator]] = {
    "commoncrawl": LineDeduplicator,
    "github": ExactFileDeduplicator,
    "books": BookDeduplicator,
}
"""The paper's deduplication by source name: one instance per shard group (CCNet) or source."""

COMMON_REASONS: tuple[str, ...] = ("empty", "empty_after_clean")

REASONS: tuple[str, ...] = COMMON_REASONS + tuple(
    reason
    for module in (commoncrawl, c4, github, wikipedia, books, arxiv, stackexchange)
    for reason in module.REASONS
)
"""Every rejection reason this package produces."""


def _has_content(doc: Document) -> bool:
    # A Stack Exchange record may carry its post in meta, with the text still to be built.
    if doc.source == "stackexchange" and stackexchange.has_structured_post(doc):
        return True
    return bool(doc.text.strip())


def clean_document(
    doc: Document, options: Mapping[str, Mapping[str, Any]] | None = None
) -> Document | Rejected:
    """A document's cleaned form, or why it was rejected.

    Empty or whitespace-only input is rejected "empty"; a document the rules emptied is
    rejected "empty_after_clean" (with the original text as the excerpt). `options` gives
    keyword arguments per source's cleaner, e.g. {"github": {"extra_licenses": ["PSF-2.0"]}}.
    """
    if not _has_content(doc):
        return Rejected.of(doc, "empty")
    cleaner = CLEANERS.get(doc.source)
    if cleaner is None:
        return doc
    out = cleaner(doc, **(options or {}).get(doc.source, {}))
    if isinstance(out, Document) and not out.text.strip():
        return Rejected.of(doc, "empty_after_clean")
    return out


__all__ = [
    "CLEANERS",
    "DEDUPLICATORS",
    "REASONS",
    "BookDeduplicator",
    "Cleaner",
    "ExactFileDeduplicator",
    "LineDeduplicator",
    "clean_document",
]
