"""The Wikipedia-reference classifier: a fastText linear model, references vs random pages.

LLaMA (section 2.1): "we trained a linear model to classify pages used as references in
Wikipedia v.s. randomly sampled pages, and discarded pages not classified as references."
The paper gives no more; RedPajama-v1 (`data_prep/cc/classifier`) reproduces it with a
fastText classifier (Joulin et al. 2016) on whole pages, newlines made spaces, labels
`__label__wiki` / `__label__cc`. Here the labels are `__label__reference` and
`__label__random`, the text is normalized as CCNet's (`normalize.normalize`), and a page is
dropped when its probability of being a reference is below `quality.reference_threshold`:
0.5 by default, "not classified as a reference" (RedPajama kept pages above 0.25).
`llamaray quality train reference` trains it from the two sets of pages.
"""

from __future__ import annotations

from llamaray.data.quality.language_id import with_ccnet
from llamaray.data.quality.models import fasttext_model, predict
from llamaray.data.quality.normalize import normalized_lines
from llamaray.data.records import Document, Rejected

REASON = "cc_not_reference"
POSITIVE, NEGATIVE = "reference", "random"


def classifier_line(text: str) -> str:
    """A page as the classifier reads it, in training and in use: its normalized lines on one
    line."""
    return " ".join(normalized_lines(text))


def reference_score(text: str, model_uri: str) -> float:
    """The classifier's probability that `text` is a page used as a Wikipedia reference."""
    found = dict(predict(fasttext_model(model_uri), classifier_line(text), k=2))
    return found.get(POSITIVE, 0.0)


def reference_filter(
    doc: Document, model_uri: str, *, min_score: float = 0.5
) -> Document | Rejected:
    """Keeps `doc` when its reference probability is at least `min_score`, recording it in
    `meta["ccnet"]`; else rejects it as cc_not_reference."""
    score = reference_score(doc.text, model_uri)
    if score < min_score:
        return Rejected.of(doc, REASON)
    return with_ccnet(doc, reference_score=round(score, 4))
