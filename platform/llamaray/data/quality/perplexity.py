"""The n-gram language-model filter: KenLM perplexity, bucketed head / middle / tail.

LLaMA (section 2.1): CCNet "filters low quality content with an n-gram language model".
CCNet (Wenzek et al. 2020, section 3.3, "Quality filtering"): a 5-gram KenLM model (Heafield
2011) per language, trained on that language's Wikipedia tokenized with a SentencePiece model
(Kudo 2018) and normalized (`normalize.normalize`), scores every paragraph (line) of a page;
the page's perplexity is 10 ** (-sum of log10 probabilities / tokens), where each line counts
its pieces plus one for the end of sentence (cc_net `perplexity.py`, `DocLM`, `pp`). cc_net's
own pipeline normalizes a page whole before scoring it, and its normalizer drops newlines, so
there a page is one line with one end of sentence; here each line is scored with its own.
Cutoffs must therefore come from this scoring (`llamaray quality train lm --sample`): cc_net's
published per-language cutoffs (`cutoff.csv`) are not comparable. Pages are split by
perplexity into three equal parts, head, middle and tail, at the 33rd and 66th percentiles of
a sample of that language's crawl pages (the paper's buckets; cc_net's code keeps its own
per-language edges in `cutoff.csv`); LLaMA keeps what CCNet keeps:
head and middle, "dropping the tail" (CCNet's released corpus) is `quality.keep_buckets`'s
default. `llamaray quality train lm` writes the three files this step reads, side by side:
`<lang>.arpa.bin` (KenLM), `<lang>.sp.model` (SentencePiece), `<lang>.cutoffs.json`.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from llamaray.data.quality.language_id import with_ccnet
from llamaray.data.quality.models import kenlm_model, sentencepiece_model
from llamaray.data.quality.normalize import normalized_lines
from llamaray.data.records import Document, Rejected
from llamaray.storage import read_text

BUCKETS: tuple[str, ...] = ("head", "middle", "tail")
PERCENTILES: tuple[float, float] = (33.0, 66.0)
"""CCNet's bucket edges: the 33rd and 66th percentiles of a sample's perplexities."""
REASONS: tuple[str, ...] = tuple(f"cc_perplexity_{b}" for b in BUCKETS)
"""A document of a bucket not kept is dropped as cc_perplexity_<bucket>."""


def companion(model_uri: str, suffix: str) -> str:
    """A file written beside a KenLM model: `<dir>/en.arpa.bin` -> `<dir>/en<suffix>`,
    CCNet's naming (`lm_sp/en.arpa.bin` beside `lm_sp/en.sp.model`).

    >>> companion("s3://b/lm/en.arpa.bin", ".sp.model")
    's3://b/lm/en.sp.model'
    >>> companion("models/fr.bin", ".cutoffs.json")
    'models/fr.cutoffs.json'
    """
    head, sep, name = model_uri.rpartition("/")
    for ending in (".bin", ".arpa"):
        name = name.removesuffix(ending)
    return f"{head}{sep}{name}{suffix}"


@dataclass(frozen=True)
class Cutoffs:
    """Perplexity bucket edges: head <= `head` < middle <= `middle` < tail."""

    head: float
    middle: float

    def bucket(self, perplexity: float) -> str:
        """Head up to `head`, middle up to `middle`, tail above."""
        if perplexity <= self.head:
            return "head"
        return "middle" if perplexity <= self.middle else "tail"

    def to_json(self, **extra) -> str:
        return json.dumps({"head": self.head, "middle": self.middle, **extra}, indent=1)

    @staticmethod
    def from_json(text: str, where: str = "cutoffs") -> Cutoffs:
        try:
            data = json.loads(text)
            return Cutoffs(float(data["head"]), float(data["middle"]))
        except (ValueError, KeyError, TypeError) as err:
            raise ValueError(
                f"{where}: not a cutoffs file ({{'head': ..., 'middle': ...}}): {err}"
            ) from None


def percentile_cutoffs(
    perplexities: Iterable[float], percentiles: Sequence[float] = PERCENTILES
) -> Cutoffs:
    """The bucket edges of a sample: its perplexities' percentiles (linear interpolation,
    numpy's default, as cc_net computes `cutoff.csv` with np.percentile).

    >>> percentile_cutoffs([10, 20, 30, 40])
    Cutoffs(head=19.9, middle=29.8)
    """
    import numpy as np

    values = np.asarray([p for p in perplexities if math.isfinite(p)], dtype=np.float64)
    if not len(values):
        raise ValueError("no finite perplexity in the sample: cannot set the cutoffs")
    head, middle = np.percentile(values, list(percentiles))
    return Cutoffs(round(float(head), 4), round(float(middle), 4))


@functools.lru_cache(maxsize=8)
def load_cutoffs(uri: str) -> Cutoffs:
    return Cutoffs.from_json(read_text(uri), uri)


def tokenized_lines(text: str, tokenizer_uri: str) -> list[str]:
    """The document's normalized lines as SentencePiece pieces joined by spaces: the text
    KenLM was trained on and is queried with."""
    sp = sentencepiece_model(tokenizer_uri)
    lines = normalized_lines(text)
    return [" ".join(pieces) for pieces in sp.encode(lines, out_type=str)] if lines else []


def perplexity_of_lines(lines: Iterable[str], model) -> tuple[float, int]:
    """(perplexity, tokens) of tokenized lines under `model` (a KenLM model's location,
    loaded once per process, or a loaded `kenlm.Model`): 10 ** (-sum log10 p / tokens),
    each line's tokens its pieces + 1 (`</s>`; cc_net `DocLM`); inf for no line."""
    lm = kenlm_model(model) if isinstance(model, str) else model
    log_prob, tokens = 0.0, 0
    for line in lines:
        log_prob += lm.score(line, bos=True, eos=True)
        tokens += len(line.split()) + 1
    return (10.0 ** (-log_prob / tokens) if tokens else math.inf), tokens


def document_perplexity(text: str, model_uri: str, tokenizer_uri: str) -> float:
    """The page's perplexity under the KenLM model (normalized, tokenized, line by line)."""
    return perplexity_of_lines(tokenized_lines(text, tokenizer_uri), model_uri)[0]


def perplexity_filter(
    doc: Document,
    model_uri: str,
    *,
    tokenizer_uri: str | None = None,
    cutoffs_uri: str | None = None,
    keep: Sequence[str] = ("head", "middle"),
) -> Document | Rejected:
    """Scores `doc`, records `perplexity` and `bucket` in `meta["ccnet"]` and keeps it when
    its bucket is in `keep`; else rejects it as cc_perplexity_<bucket>. The tokenizer and
    cutoffs default to the files beside the model (`companion`)."""
    tokenizer_uri = tokenizer_uri or companion(model_uri, ".sp.model")
    cutoffs = load_cutoffs(cutoffs_uri or companion(model_uri, ".cutoffs.json"))
    perplexity = document_perplexity(doc.text, model_uri, tokenizer_uri)
    bucket = cutoffs.bucket(perplexity)
    if bucket not in keep:
        return Rejected.of(doc, f"cc_perplexity_{bucket}")
    return with_ccnet(doc, perplexity=round(perplexity, 1), bucket=bucket)
