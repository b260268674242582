"""Language identification with a fastText linear classifier (CCNet's first model step).

LLaMA (section 2.1) runs CCNet, which "performs language identification with a fastText
linear classifier to remove non-English pages". CCNet (Wenzek et al. 2020, section 3.3) uses
fastText's `lid.176.bin` (Joulin et al. 2016, "Bag of Tricks for Efficient Text
Classification"; Grave et al. 2018 for the 176 languages) on the whole page, newlines made
spaces, and keeps a page whose most likely language scores at least 0.5 (cc_net
`split_by_lang.py`, `--threshold 0.5`). `llamaray quality train lid` trains such a model
from text of each language, or point `quality.lid_model` at `lid.176.bin`.
"""

from __future__ import annotations

import dataclasses

from llamaray.data.quality.models import fasttext_model, predict
from llamaray.data.records import Document, Rejected

REASON = "cc_wrong_language"
LABEL_PREFIX = "__label__"


def identify(text: str, model_uri: str) -> tuple[str, float]:
    """The most likely language of `text` and its probability; ("", 0.0) when the model
    gives none (an empty text)."""
    found = predict(fasttext_model(model_uri), text, k=1)
    return found[0] if found else ("", 0.0)


def language_filter(
    doc: Document, model_uri: str, *, language: str = "en", min_score: float = 0.5
) -> Document | Rejected:
    """Keeps `doc` when fastText's top language is `language` with probability >= `min_score`
    (CCNet's rule), recording both in `meta["ccnet"]`; else rejects it as cc_wrong_language."""
    found, score = identify(doc.text, model_uri)
    if found != language or score < min_score:
        return Rejected.of(doc, REASON)
    return with_ccnet(doc, language=found, language_score=round(score, 4))


def with_ccnet(doc: Document, **fields) -> Document:
    """`doc` with `fields` added to its `meta["ccnet"]` (what the quality steps found)."""
    meta = dict(doc.meta)
    meta["ccnet"] = {**meta.get("ccnet", {}), **fields}
    return dataclasses.replace(doc, meta=meta)
