"""A real text sample built from the running Python installation, with no download.

Two labeled sources, written as JSONL in RedPajama's shape (one document per line:
``{"text": ..., "meta": {"source": ..., "path": ...}}``):

- ``code``: the standard library's own ``.py`` files (test suites and site-packages left out);
- ``prose``: the documentation topics of ``pydoc_data.topics`` (the language reference
  sections that ``help()`` shows) and the module docstrings of the standard library.

Docstrings are read by parsing with :mod:`ast`, never by importing, so building the
sample runs no third-party or stdlib module code. The output depends only on the Python
version and ``seed``: files are listed in sorted order, then shuffled with
``random.Random(seed)`` so that the per-source byte cap keeps a spread of modules rather
than the alphabetically first ones.

Example::

    >>> paths = write_stdlib_sample(Path("sample"), max_bytes_per_source=1_000_000)
    >>> sorted(paths)
    ['code', 'prose']
    >>> first = next(iter_texts([paths["prose"]]))
"""

from __future__ import annotations

import ast
import io
import json
import os
import random
import sys
import sysconfig
import tokenize
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

SOURCES = ("code", "prose")
"""Names of the sources `write_stdlib_sample` writes, one ``<name>.jsonl`` each."""

# Test suites are mostly fixtures and deliberately malformed input; site-packages is not
# the standard library at all.
_SKIP_DIRS = frozenset(
    {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
)


@dataclass(frozen=True)
class _SourceFile:
    rel: str
    text: str


@dataclass
class _Scan:
    files: list[_SourceFile]
    not_utf8: int


def stdlib_dir() -> Path:
    """Directory of the running interpreter's standard library sources."""
    return Path(sysconfig.get_paths()["stdlib"])


def _scan_stdlib(root: Path) -> _Scan:
    """Read every stdlib ``.py`` file that is valid UTF-8, in sorted path order."""
    files: list[_SourceFile] = []
    not_utf8 = 0
    # Sorting the relative posix path (not the walk order) makes the listing independent
    # of the file system.
    candidates = sorted(
        p.relative_to(root).as_posix()
        for p in root.rglob("*.py")
        if not _SKIP_DIRS.intersection(p.relative_to(root).parts[:-1])
    )
    for rel in candidates:
        try:
            text = (root / rel).read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            not_utf8 += 1
            continue
        except OSError:
            # Dangling links or unreadable files in odd installations: not part of the sample.
            continue
        files.append(_SourceFile(rel, text))
    return _Scan(files, not_utf8)


def _module_docstring(source: str) -> str | None:
    """``ast.get_docstring`` of a module, parsing only its first logical line.

    The docstring can only be the first statement, and parsing just that line is much
    cheaper than parsing whole files (most of the time it takes to build the sample).
    """
    lines: list[str] = []
    read = io.StringIO(source).readline

    def readline() -> str:
        # Keep the lines exactly as tokenize saw them (split on "\n" only), so its
        # (row, column) positions index into them.
        lines.append(read())
        return lines[-1]

    end = None
    try:
        for tok in tokenize.generate_tokens(readline):
            if tok.type == tokenize.NEWLINE:
                end = tok.end
                break
    except (tokenize.TokenError, SyntaxError):
        return None
    if end is None:
        return None
    head = "".join(lines[: end[0] - 1]) + lines[end[0] - 1][: end[1]]
    with warnings.catch_warnings():
        # Old escape sequences in stdlib sources warn on newer Pythons; irrelevant here.
        warnings.simplefilter("ignore")
        try:
            tree = ast.parse(head)
        except (SyntaxError, ValueError):
            # A compound statement's header alone does not parse: no docstring either.
            return None
    return ast.get_docstring(tree, clean=True)


def _prose_documents(files: list[_SourceFile]) -> list[tuple[str, str]]:
    from pydoc_data.topics import topics  # data only: a dict of str, no code runs

    docs = [(f"pydoc_data/topics.py:{key}", topics[key]) for key in sorted(topics)]
    for f in files:
        doc = _module_docstring(f.text)
        if doc and doc.strip():
            docs.append((f"{f.rel}:__doc__", doc))
    return docs


def _write_source(
    uri: str, source: str, docs: list[tuple[str, str]], max_bytes: int, seed: int
) -> tuple[int, int]:
    """Write a seeded shuffle of ``docs`` to ``uri`` (a local path or ``s3://``) up to
    ``max_bytes`` of text. The file is built in memory (it is at most a few times
    ``max_bytes``) and written whole through `llamaray.storage`."""
    from llamaray.storage import write_text

    order = list(range(len(docs)))
    random.Random(f"{seed}:{source}").shuffle(order)
    n_docs = n_bytes = 0
    out = io.StringIO()
    for i in order:
        rel, text = docs[i]
        size = len(text.encode("utf-8"))
        # Skip (not stop at) a document that would overflow, so one big file early in
        # the shuffle does not leave the source nearly empty.
        if n_bytes + size > max_bytes:
            continue
        meta = {"source": source, "path": rel}
        if source == "code":
            meta["license"] = "PSF-2.0"  # the standard library's license, stated as is
        record = {"text": text, "meta": meta}
        out.write(json.dumps(record, ensure_ascii=False) + "\n")
        n_docs += 1
        n_bytes += size
    write_text(uri, out.getvalue())
    return n_docs, n_bytes


def write_stdlib_sample(
    out_dir: str | Path, max_bytes_per_source: int = 8_000_000, seed: int = 0
) -> dict[str, Path | str]:
    """Write ``code.jsonl`` and ``prose.jsonl`` under ``out_dir``; return their paths by source.

    ``out_dir`` is a local folder (the paths returned are `Path`s) or an ``s3://`` prefix
    (they are URIs): `llamaray prepare` writes the sample into its output, where the read
    tasks on any node find it.

    ``max_bytes_per_source`` caps the UTF-8 size of the document texts of each source
    (JSON escaping makes the files somewhat larger). A short summary goes to stderr.

    Example::

        >>> paths = write_stdlib_sample(Path("sample"), max_bytes_per_source=2_000_000)
        >>> paths["code"].name
        'code.jsonl'
    """
    if max_bytes_per_source <= 0:
        raise ValueError(f"max_bytes_per_source must be positive, got {max_bytes_per_source}")
    from llamaray.storage import is_s3, join

    out_dir = os.fspath(out_dir)
    root = stdlib_dir()
    scan = _scan_stdlib(root)
    if not scan.files:
        raise RuntimeError(f"no standard library sources found under {root}")

    per_source = {
        "code": [(f.rel, f.text) for f in scan.files if f.text.strip()],
        "prose": _prose_documents(scan.files),
    }
    paths: dict[str, Path | str] = {}
    version = ".".join(map(str, sys.version_info[:3]))
    print(
        f"stdlib sample (Python {version}, seed {seed}) -> {out_dir}: "
        f"{len(scan.files)} .py files read, {scan.not_utf8} skipped as not UTF-8",
        file=sys.stderr,
    )
    for source in SOURCES:
        path = join(out_dir, f"{source}.jsonl")
        n_docs, n_bytes = _write_source(
            path, source, per_source[source], max_bytes_per_source, seed
        )
        print(
            f"  {source:<6} {n_docs:>6} documents {n_bytes / 1e6:>8.2f} MB "
            f"(of {len(per_source[source])} available)",
            file=sys.stderr,
        )
        paths[source] = path if is_s3(path) else Path(path)
    return paths


def iter_texts(paths: Iterable[str | Path]) -> Iterator[str]:
    """Yield the ``"text"`` field of every line of the given JSONL files, in order.

    Example::

        >>> paths = write_stdlib_sample(Path("sample"), max_bytes_per_source=100_000)
        >>> n_chars = sum(len(t) for t in iter_texts([paths["code"]]))
    """
    for path in paths:
        with Path(path).open(encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    yield json.loads(line)["text"]
