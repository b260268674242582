"""What flows through the corpus pipeline: documents, and records that were rejected.

Every rejected record keeps where it came from (`origin`, "file:line") and why, so the
manifest can account for every input: documents in = kept + dropped by reason.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Document:
    """One document of one source."""

    text: str
    source: str
    """Corpus source name, one of `llamaray.data.sources.SOURCES` (or a user's own)."""
    origin: str
    """Where it was read: "path:line" (1-based line for JSONL/text, row for Parquet)."""
    meta: dict = field(default_factory=dict, hash=False, compare=False)
    """The record's own metadata (RedPajama's "meta"), e.g. license, language, score."""


@dataclass(frozen=True)
class Rejected:
    """A record that did not become (or stay) a document."""

    origin: str
    reason: str
    """A short stable key, e.g. "malformed_json", "c4_lorem_ipsum", "github_license"."""
    source: str = ""
    excerpt: str = ""
    """The first characters of the offending record, for the quarantine file."""

    @staticmethod
    def of(doc: Document, reason: str, excerpt_chars: int = 200) -> Rejected:
        return Rejected(doc.origin, reason, doc.source, doc.text[:excerpt_chars])

    def quarantine_line(self) -> str:
        """Its quarantine record: a JSON line {origin, reason, source, excerpt} with its
        newline. ASCII escapes: an excerpt may hold lone surrogates, which UTF-8 cannot
        encode."""
        record = {
            "origin": self.origin,
            "reason": self.reason,
            "source": self.source,
            "excerpt": self.excerpt,
        }
        return json.dumps(record) + "\n"
