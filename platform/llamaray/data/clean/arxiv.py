"""arXiv: LaTeX sources reduced to the paper's body.

LLaMA (Touvron et al. 2023, section 2.1): "We process arXiv Latex files ... Following Lewkowycz
et al. (2022), we removed everything before the first section, as well as the bibliography. We
also removed the comments from the .tex files, and inline-expanded definitions and macros
written by users to increase consistency across papers." RedPajama-Data v1
(`data_prep/arxiv/arxiv_cleaner.py`) does the same and also cuts at \\appendix; the paper does
not say so, and we keep appendices.
"""

from __future__ import annotations

import dataclasses
import re

from llamaray.data.records import Document, Rejected

REASONS: tuple[str, ...] = ("arxiv_no_section",)

MAX_EXPANSION_PASSES = 5  # macros defined with other macros; bounded against recursion

_FULL_LINE_COMMENT = re.compile(r"^[ \t]*%.*(?:\n|\Z)", re.MULTILINE)
# A % not escaped: preceded by an even number (0, 2, ...) of backslashes ("\\%" is a line break
# followed by a comment).
_INLINE_COMMENT = re.compile(r"(?<!\\)((?:\\\\)*)%.*$", re.MULTILINE)
_FIRST_SECTION = re.compile(r"\\(?:chapter|section)\b\*?")
_THEBIBLIOGRAPHY = re.compile(
    r"\\begin\{thebibliography\}.*?(?:\\end\{thebibliography\}|\Z)", re.DOTALL
)
_BIBLIOGRAPHY_TAIL = re.compile(r"\\bibliography\s*\{|\\printbibliography\b")
_BIBLIOGRAPHY_STYLE = re.compile(r"\\bibliographystyle\s*\{[^{}]*\}[ \t]*\n?")
_DEFINITION = re.compile(r"\\(?:(?:re)?newcommand|providecommand)\*?|\\def(?![a-zA-Z@])")
_CONTROL_WORD = re.compile(r"\\[a-zA-Z@]+")


def strip_comments(tex: str) -> str:
    """Removes % comments: whole comment lines, and the rest of a line after an unescaped %."""
    return _INLINE_COMMENT.sub(r"\1", _FULL_LINE_COMMENT.sub("", tex))


def _skip_spaces(tex: str, i: int) -> int:
    while i < len(tex) and tex[i] in " \t\n":
        i += 1
    return i


def _group_end(tex: str, i: int) -> int | None:
    """Index after the "}" matching the "{" at tex[i] (escaped braces ignored), or None."""
    depth = 0
    j = i
    while j < len(tex):
        c = tex[j]
        if c == "\\":
            j += 2
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return j + 1
        j += 1
    return None


def _parse_definition(tex: str, m: re.Match) -> tuple[str, str, int] | None:
    """(macro name, body, end of the definition) for an argument-less definition, else None."""
    i = _skip_spaces(tex, m.end())
    if tex.startswith("{", i):  # \newcommand{\foo}
        end = _group_end(tex, i)
        if end is None:
            return None
        name = tex[i + 1 : end - 1].strip()
        i = end
    else:  # \newcommand\foo, \def\foo
        name_match = _CONTROL_WORD.match(tex, i)
        if not name_match:
            return None
        name = name_match.group()
        i = name_match.end()
    if not _CONTROL_WORD.fullmatch(name):
        return None
    i = _skip_spaces(tex, i)
    if not tex.startswith("{", i):  # "[1]" or "#1": the macro takes arguments
        return None
    end = _group_end(tex, i)
    if end is None:
        return None
    return name, tex[i + 1 : end - 1], end


def extract_macros(tex: str) -> tuple[str, dict[str, str]]:
    """The text without its argument-less macro definitions, and those macros (name -> body).

    Handles \\newcommand{\\foo}{...}, \\newcommand*\\foo{...}, \\renewcommand,
    \\providecommand and \\def\\foo{...}; a later definition of a name wins. Definitions with
    arguments ([n] or #1) stay in the text, unexpanded.
    """
    macros: dict[str, str] = {}
    out: list[str] = []
    pos = 0
    for m in _DEFINITION.finditer(tex):
        if m.start() < pos:
            continue  # inside a definition already consumed
        parsed = _parse_definition(tex, m)
        if parsed is None:
            continue
        name, body, end = parsed
        macros[name] = body
        out.append(tex[pos : m.start()])
        pos = end
    out.append(tex[pos:])
    return "".join(out), macros


def expand_macros(tex: str, macros: dict[str, str]) -> str:
    """Replaces each use of a macro (and an empty {} after it) with its body."""
    if not macros:
        return tex
    names = sorted(macros, key=len, reverse=True)
    use = re.compile("(" + "|".join(map(re.escape, names)) + r")(?![a-zA-Z@])(?:\{\})?")
    for _ in range(MAX_EXPANSION_PASSES):
        expanded = use.sub(lambda m: macros[m.group(1)], tex)
        if expanded == tex:
            break
        tex = expanded
    return tex


def drop_front_matter(tex: str) -> str | None:
    """Everything from the first \\section (or \\chapter) on; None if there is none."""
    m = _FIRST_SECTION.search(tex)
    return tex[m.start() :] if m else None


def drop_bibliography(tex: str) -> str:
    """Removes thebibliography environments and everything from \\bibliography{...} or
    \\printbibliography on (with the \\bibliographystyle line)."""
    tex = _BIBLIOGRAPHY_STYLE.sub("", _THEBIBLIOGRAPHY.sub("", tex))
    m = _BIBLIOGRAPHY_TAIL.search(tex)
    return tex[: m.start()] if m else tex


def clean(doc: Document) -> Document | Rejected:
    """Comments, then macro definitions (most live in the preamble), then front matter and
    bibliography; the macros are expanded in what remains."""
    tex, macros = extract_macros(strip_comments(doc.text))
    body = drop_front_matter(tex)
    if body is None:
        return Rejected.of(doc, "arxiv_no_section")
    body = expand_macros(drop_bibliography(body), macros)
    body = re.sub(r"\n{3,}", "\n\n", body).strip()
    return dataclasses.replace(doc, text=body)
