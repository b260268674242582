import pytest

from llamaray.data.records import Document, Rejected
from llamaray.data.sources import PAPER_MIXTURE, SOURCES


def test_paper_table_1():
    assert sum(m.proportion for m in PAPER_MIXTURE.values()) == pytest.approx(1.0)
    assert SOURCES == (
        "commoncrawl",
        "c4",
        "github",
        "wikipedia",
        "books",
        "arxiv",
        "stackexchange",
    )
    assert (PAPER_MIXTURE["wikipedia"].proportion, PAPER_MIXTURE["wikipedia"].epochs) == (
        0.045,
        2.45,
    )
    assert PAPER_MIXTURE["commoncrawl"].proportion == 0.67


def test_rejected_keeps_origin_reason_and_excerpt():
    doc = Document("x" * 500, "c4", "a.jsonl:7")
    rej = Rejected.of(doc, "c4_lorem_ipsum")
    assert (rej.origin, rej.reason, rej.source, len(rej.excerpt)) == (
        "a.jsonl:7",
        "c4_lorem_ipsum",
        "c4",
        200,
    )
