"""arXiv: LaTeX front matter, bibliography, comments and user macros."""

from llamaray.data.clean import clean_document
from llamaray.data.clean.arxiv import (
    drop_bibliography,
    drop_front_matter,
    expand_macros,
    extract_macros,
    strip_comments,
)
from llamaray.data.records import Document, Rejected

PAPER = r"""\documentclass{article}
\usepackage{amsmath}
\newcommand{\model}{LLaMA}
\newcommand*\R{\mathbb{R}}
\def\eg{e.g.,\ }
\renewcommand{\vec}[1]{\mathbf{#1}}
\title{A Paper}
\begin{document}
\maketitle
\begin{abstract}We train \model.\end{abstract}
\section{Introduction}
We train \model{} on $x \in \R^d$, \eg text. % TODO cite more
% a whole comment line
Accuracy rose by 5\% over \vec{v}.
\section*{Results}
\model is better than \modelsmall.
\bibliographystyle{plain}
\bibliography{refs}
\end{document}
"""


def arxiv(text: str) -> Document:
    return Document(text, "arxiv", "arxiv.jsonl:2", {"arxiv_id": "2302.13971"})


def test_clean_paper():
    out = clean_document(arxiv(PAPER))
    assert isinstance(out, Document)
    assert out.text == (
        "\\section{Introduction}\n"
        "We train LLaMA on $x \\in \\mathbb{R}^d$, e.g.,\\  text. \n"
        "Accuracy rose by 5\\% over \\vec{v}.\n"
        "\\section*{Results}\n"
        "LLaMA is better than \\modelsmall."
    )
    assert out.meta == {"arxiv_id": "2302.13971"}


def test_no_section_is_rejected():
    out = clean_document(arxiv("\\begin{document}\nJust an abstract.\n\\end{document}"))
    assert isinstance(out, Rejected)
    assert (out.reason, out.origin) == ("arxiv_no_section", "arxiv.jsonl:2")
    # \subsection alone, or \sectionmark, is not a section
    assert drop_front_matter("\\subsection{A}\\sectionmark{x}") is None


def test_front_matter_is_dropped_up_to_the_first_section_or_chapter():
    assert drop_front_matter("preamble\n\\section{A}\ntext") == "\\section{A}\ntext"
    assert (
        drop_front_matter("pre\n\\chapter*{One}\n\\section{A}") == "\\chapter*{One}\n\\section{A}"
    )


def test_comments_are_removed_but_escaped_percent_kept():
    assert strip_comments("a 5\\% rise % comment\n% line\n  % indented\nb") == "a 5\\% rise \nb"
    assert strip_comments("line break\\\\% comment") == "line break\\\\"
    assert strip_comments("no comment here") == "no comment here"


def test_bibliography_is_removed():
    tex = "Text.\n\\begin{thebibliography}{9}\n\\bibitem{a} A.\n\\end{thebibliography}\nMore."
    assert drop_bibliography(tex) == "Text.\n\nMore."
    assert drop_bibliography("Text.\n\\bibliography{refs}\n\\appendix\nA") == "Text.\n"
    assert drop_bibliography("Text.\n\\printbibliography\n") == "Text.\n"
    assert drop_bibliography("Text with \\cite{x}.") == "Text with \\cite{x}."


def test_macros_without_arguments_are_extracted_and_definitions_removed():
    tex = (
        "\\newcommand{\\a}{A}\n\\newcommand*\\b{B {nested}}\n\\def\\c{C}\n"
        "\\renewcommand{\\a}{AA}\n\\providecommand{\\d}{D}\n"
        "\\newcommand{\\f}[1]{F#1}\n\\def\\g#1{G#1}\nbody"
    )
    rest, macros = extract_macros(tex)
    assert macros == {"\\a": "AA", "\\b": "B {nested}", "\\c": "C", "\\d": "D"}
    assert rest == "\n\n\n\n\n\\newcommand{\\f}[1]{F#1}\n\\def\\g#1{G#1}\nbody"


def test_macro_expansion():
    macros = {"\\a": "A", "\\ab": "X\\a", "\\loop": "\\loop+"}
    assert expand_macros("\\a \\ab{} \\abc \\a1", macros) == "A XA \\abc A1"
    assert expand_macros("\\loop", macros) == "\\loop" + "+" * 5  # bounded
    assert expand_macros("\\a", {}) == "\\a"
