"""GitHub: permissive licenses, RedPajama-v1's file-quality heuristics, header strip, exact dedup.

LLaMA (Touvron et al. 2023, section 2.1): "We only kept projects that are distributed under the
Apache, BSD and MIT licenses. Additionally, we filtered low quality files with heuristics based
on the line length or proportion of alphanumeric characters, and removed boilerplate, such as
headers, with regular expressions. Finally, we deduplicate the resulting dataset at the file
level, with exact matches." Thresholds are RedPajama-Data v1's
(`data_prep/github/github_run_filter.py`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from collections.abc import Collection, Iterable, Iterator

from llamaray.data.records import Document, Rejected

REASONS: tuple[str, ...] = (
    "github_license",
    "github_max_line_length",
    "github_mean_line_length",
    "github_alphanum_fraction",
    "github_alpha_token_ratio",
    "github_exact_duplicate",
)

# --- license ---------------------------------------------------------------------------------

# Words that carry no license identity ("The MIT License", "Apache License, Version 2.0").
_NOISE = frozenset({"the", "license", "licence", "version", "v", "software", "or", "and"})


def _key(*words: str) -> frozenset[str]:
    return frozenset(words)


# Spellings seen in GitHub/BigQuery/SPDX metadata, as sets of significant words.
_PERMISSIVE: dict[frozenset[str], str] = {
    _key("mit"): "MIT",
    _key("expat"): "MIT",
    _key("mit", "expat"): "MIT",
    _key("bsd", "2", "clause"): "BSD-2-Clause",
    _key("bsd", "2"): "BSD-2-Clause",
    _key("bsd", "2", "clause", "simplified"): "BSD-2-Clause",
    _key("simplified", "bsd"): "BSD-2-Clause",
    _key("freebsd"): "BSD-2-Clause",
    _key("bsd", "3", "clause"): "BSD-3-Clause",
    _key("bsd", "3"): "BSD-3-Clause",
    _key("bsd", "3", "clause", "new", "revised"): "BSD-3-Clause",
    _key("bsd", "3", "clause", "new"): "BSD-3-Clause",
    _key("bsd", "3", "clause", "revised"): "BSD-3-Clause",
    _key("new", "bsd"): "BSD-3-Clause",
    _key("modified", "bsd"): "BSD-3-Clause",
    _key("revised", "bsd"): "BSD-3-Clause",
    _key("apache", "2"): "Apache-2.0",
    _key("asl", "2"): "Apache-2.0",
}
_SPDX_OPERATOR = re.compile(r"\s+(?:or|and)\s+|[()]", re.IGNORECASE)


def _words(name: str) -> frozenset[str]:
    # "Apache-2.0" -> {apache, 2}; "bsd3" -> {bsd, 3}; "v2.0" -> {2}
    tokens = re.findall(r"[a-z]+|\d+(?:\.\d+)*", name.lower())
    return frozenset(re.sub(r"(?:\.0)+$", "", t) for t in tokens if t not in _NOISE)


def spdx_permissive(name: str) -> str | None:
    """The SPDX id of a permissive license name (MIT, BSD-2/3-Clause, Apache-2.0), else None.

    An SPDX expression ("MIT OR Apache-2.0") counts when every license in it is permissive.
    A bare "BSD" or "Apache" (without clause count or version) does not count.
    """
    if found := _PERMISSIVE.get(_words(name)):
        return found
    parts = [p for p in _SPDX_OPERATOR.split(name) if p.strip()]
    if len(parts) < 2:
        return None
    ids = [_PERMISSIVE.get(_words(p)) for p in parts]
    if not all(ids):
        return None
    return " OR ".join(dict.fromkeys(i for i in ids if i))


def license_rule(meta: dict, extra_licenses: Collection[str] = ()) -> str | None:
    """LLaMA: keep only Apache, BSD and MIT projects; a missing license is not permissive.

    `extra_licenses` are accepted too, exactly as spelled (a user's choice, e.g. "PSF-2.0").
    """
    value = meta.get("license")
    names = [value] if isinstance(value, str) else value if isinstance(value, list | tuple) else []
    ok = names and all(
        isinstance(n, str) and (n in extra_licenses or spdx_permissive(n)) for n in names
    )
    return None if ok else "github_license"


# --- boilerplate header ----------------------------------------------------------------------

LICENSE_WORDS = re.compile(
    r"copyright|licen[cs]e|permission is hereby granted|all rights reserved|\(c\)\s*\d{4}",
    re.IGNORECASE,
)
# `#` starts a C preprocessor directive, not a comment, when a directive name follows directly.
_PREPROCESSOR = re.compile(
    r"#(?:include|define|if|ifdef|ifndef|endif|else|elif|pragma|import|undef|error|warning)\b"
)


def _is_line_comment(line: str, marker: str) -> bool:
    s = line.lstrip()
    return s.startswith(marker) and not (marker == "#" and _PREPROCESSOR.match(s))


def _delimited_end(lines: list[str], i: int, opener: str, closer: str) -> int | None:
    """End (exclusive) of a block opened at the start of lines[i], or None if it is no header."""
    text = lines[i].lstrip()[len(opener) :]
    j = i
    while closer not in text:
        j += 1
        if j == len(lines):
            return None  # never closed: not a header comment
        text = lines[j]
    if text.split(closer, 1)[1].strip():
        return None  # code follows the comment on its last line: leave it alone
    return j + 1


def _comment_block_end(lines: list[str], i: int) -> int | None:
    """End (exclusive) of the comment block that starts at lines[i], or None."""
    s = lines[i].lstrip()
    for marker in ("#", "//"):
        if _is_line_comment(s, marker):
            j = i
            while j < len(lines) and _is_line_comment(lines[j], marker):
                j += 1
            return j
    for opener, closer in (("/*", "*/"), ('"""', '"""'), ("'''", "'''")):
        if s.startswith(opener):
            return _delimited_end(lines, i, opener, closer)
    return None


def strip_license_header(text: str) -> str:
    """Removes the license/copyright comment blocks at the top of a source file.

    LLaMA: "removed boilerplate, such as headers, with regular expressions". Before the first
    line of code, each comment block (# or // lines, a /* */ block, a \"\"\" or ''' docstring)
    that mentions copyright, a license, "permission is hereby granted" or "all rights
    reserved" is removed; other comments and a shebang line stay. Idempotent.
    """
    lines = text.splitlines(keepends=True)
    start = 1 if lines and lines[0].startswith("#!") else 0
    kept: list[str] = []
    removed = False
    i = start
    while i < len(lines):
        if not lines[i].strip():
            if kept and kept[-1].strip():  # no leading or doubled blank lines where blocks went
                kept.append(lines[i])
            i += 1
            continue
        end = _comment_block_end(lines, i)
        if end is None:
            break
        if LICENSE_WORDS.search("".join(lines[i:end])):
            removed = True
        else:
            kept.extend(lines[i:end])
        i = end
    if not removed:
        return text
    return "".join(lines[:start] + kept + lines[i:])


# --- file quality (RedPajama-Data v1, github_run_filter.py) ----------------------------------

MAX_LINE_LENGTH = 1000  # RedPajama: drop files whose longest line exceeds 1000 characters
MAX_MEAN_LINE_LENGTH = 100  # RedPajama: drop files whose mean line length exceeds 100
MIN_ALPHANUM_FRACTION = 0.25  # RedPajama: drop files with < 25% alphanumeric characters
MIN_ALPHA_PER_TOKEN = 1.5  # RedPajama: drop files with < 1.5 alphabetic characters per token
# RedPajama counts tokens with a BPE tokenizer; we count regex tokens instead: runs of word
# characters and single punctuation characters. On code this is close to a BPE count (each
# identifier and operator is about one token) and needs no tokenizer file.
_TOKEN = re.compile(r"\w+|[^\w\s]")


def max_line_length_rule(lines: list[str]) -> str | None:
    """RedPajama: the longest line is at most 1000 characters (minified/generated files)."""
    longest = max(map(len, lines), default=0)
    return "github_max_line_length" if longest > MAX_LINE_LENGTH else None


def mean_line_length_rule(lines: list[str]) -> str | None:
    """RedPajama: the mean line length is at most 100 characters."""
    mean = sum(map(len, lines)) / max(len(lines), 1)
    return "github_mean_line_length" if mean > MAX_MEAN_LINE_LENGTH else None


def alphanum_fraction_rule(text: str) -> str | None:
    """RedPajama: at least 25% of the characters are alphanumeric (not data tables, art)."""
    fraction = sum(c.isalnum() for c in text) / max(len(text), 1)
    return None if fraction >= MIN_ALPHANUM_FRACTION else "github_alphanum_fraction"


def alpha_token_ratio_rule(text: str) -> str | None:
    """RedPajama: at least 1.5 alphabetic characters per token (not hex dumps, number tables)."""
    tokens = len(_TOKEN.findall(text))
    alpha = sum(c.isalpha() for c in text)
    return None if alpha / max(tokens, 1) >= MIN_ALPHA_PER_TOKEN else "github_alpha_token_ratio"


def quality_rule(text: str) -> str | None:
    """The first RedPajama file heuristic that fails, or None."""
    lines = text.splitlines()
    return (
        max_line_length_rule(lines)
        or mean_line_length_rule(lines)
        or alphanum_fraction_rule(text)
        or alpha_token_ratio_rule(text)
    )


def clean(doc: Document, extra_licenses: Collection[str] = ()) -> Document | Rejected:
    """License, then header strip, then the quality heuristics on the stripped file."""
    if reason := license_rule(doc.meta, extra_licenses):
        return Rejected.of(doc, reason)
    out = dataclasses.replace(doc, text=strip_license_header(doc.text))
    if reason := quality_rule(out.text):
        return Rejected.of(doc, reason)
    return out


def file_key(text: str) -> bytes:
    """The exact-duplicate key of a file: SHA-256 of its bytes after the license header strip
    (idempotent, so a cleaned file and its raw form have the same key). Nothing else is
    normalized: in code, whitespace is content."""
    return hashlib.sha256(strip_license_header(text).encode("utf-8", "surrogatepass")).digest()


class ExactFileDeduplicator:
    """LLaMA: "we deduplicate the resulting dataset at the file level, with exact matches".

    Keeps the first file with a given content (after the license header strip, so files that
    differ only in their copyright line are duplicates); later ones are rejected
    "github_exact_duplicate".
    """

    def __init__(self, reason: str = "github_exact_duplicate") -> None:
        self.seen: set[bytes] = set()
        self.reason = reason

    def apply(self, doc: Document) -> Document | Rejected:
        digest = file_key(doc.text)
        if digest in self.seen:
            return Rejected.of(doc, self.reason)
        self.seen.add(digest)
        return doc

    def process(self, docs: Iterable[Document | Rejected]) -> Iterator[Document | Rejected]:
        """Dedups documents in order; already rejected records pass through."""
        for doc in docs:
            yield doc if isinstance(doc, Rejected) else self.apply(doc)
