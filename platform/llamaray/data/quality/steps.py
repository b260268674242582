"""Which of CommonCrawl's model steps run, the check of their files before any cluster work,
their application to a page in CCNet's order, and their manifest entry.

The order is CCNet's (Wenzek et al. 2020, figure 1): language id, then the language model's
perplexity, then LLaMA's reference classifier (section 2.1 lists it after CCNet). A step runs
when its model is configured (`CorpusConfig.quality`); when one is not, `check_models` stops
`prepare` naming the setting and how to train the model, unless
`quality.allow_missing_models` is true, and the manifest then says the step was skipped.
"""

from __future__ import annotations

from llamaray.config import ConfigError, QualityConfig
from llamaray.data.quality import language_id, perplexity, reference
from llamaray.data.records import Document, Rejected
from llamaray.storage import exists

STEPS: dict[str, str] = {
    "language_id": "lid_model",
    "perplexity": "perplexity_model",
    "reference_classifier": "reference_model",
}
"""Each model step and the `quality` field naming its model, in the order they run."""

ORIGINS: dict[str, str] = {
    "language_id": "CCNet (Wenzek et al. 2020, 3.3): fastText language id, score >= 0.5",
    "perplexity": "CCNet (Wenzek et al. 2020, 3.3): KenLM 5-gram perplexity on SentencePiece "
    "pieces, head/middle/tail at the 33rd/66th percentiles",
    "reference_classifier": "LLaMA (Touvron et al. 2023, 2.1): linear classifier of pages "
    "used as Wikipedia references vs random pages",
}

HOW_TO_TRAIN: dict[str, str] = {
    "lid_model": "fastText's published lid.176.bin, or `llamaray quality train lid --lang "
    "en=<english text> --lang fr=<french text> ... --output lid.bin`",
    "perplexity_model": "CCNet's lm_sp/<lang>.arpa.bin (with <lang>.sp.model and cutoffs of "
    "a crawl sample scored as prepare scores it), "
    "or `llamaray quality train lm --input <wikipedia text> --sample <crawl pages> --output "
    "en.arpa.bin`",
    "reference_model": "`llamaray quality train reference --positive <pages cited by "
    "Wikipedia> --negative <random pages> --output reference.bin`",
}

REASONS: tuple[str, ...] = (
    language_id.REASON,
    *perplexity.REASONS,
    reference.REASON,
)


def perplexity_files(q: QualityConfig) -> tuple[str, str]:
    """The perplexity step's SentencePiece model and cutoffs: as set, else beside the model."""
    assert q.perplexity_model is not None
    return (
        q.perplexity_tokenizer or perplexity.companion(q.perplexity_model, ".sp.model"),
        q.perplexity_cutoffs or perplexity.companion(q.perplexity_model, ".cutoffs.json"),
    )


def model_paths(q: QualityConfig) -> dict[str, str | None]:
    """Every file the model steps read, by its setting: what the cleaning tasks open on
    whichever node runs them (`placement.shared_state_problem` names the local ones on a
    cluster whose nodes share no disk)."""
    paths: dict[str, str | None] = {f"quality.{f}": getattr(q, f) for f in STEPS.values()}
    if q.perplexity_model is not None:
        tokenizer, cutoffs = perplexity_files(q)
        paths |= {"quality.perplexity_tokenizer": tokenizer, "quality.perplexity_cutoffs": cutoffs}
    return paths


def check_models(q: QualityConfig) -> None:
    """Raise `ConfigError` naming every `quality` setting that stops the model steps: a model
    not set (unless `allow_missing_models`), a file that is not there, cutoffs that do not
    parse. Called by `prepare` on the driver, before Ray starts, when a commoncrawl source is
    configured."""
    problems = []
    if not q.allow_missing_models:
        for field in q.missing():
            problems.append(
                f"quality.{field}: not set, and a commoncrawl source is configured. Set it "
                f"to {HOW_TO_TRAIN[field]}; or set quality.allow_missing_models=true to "
                "skip the step (the manifest records it)"
            )
    files = [(f, getattr(q, f)) for f in STEPS.values() if getattr(q, f) is not None]
    if q.perplexity_model is not None:
        tokenizer, cutoffs = perplexity_files(q)
        files += [("perplexity_tokenizer", tokenizer), ("perplexity_cutoffs", cutoffs)]
    for field, uri in files:
        if not exists(uri):
            beside = "" if getattr(q, field) == uri else " (beside quality.perplexity_model)"
            problems.append(f"quality.{field}: {uri} does not exist{beside}")
        elif field == "perplexity_cutoffs":
            try:
                perplexity.load_cutoffs(uri)
            except ValueError as err:
                problems.append(f"quality.{field}: {err}")
    if problems:
        raise ConfigError("invalid config:\n" + "\n".join(f"  {p}" for p in problems))


def apply_models(doc: Document, q: QualityConfig) -> Document | Rejected:
    """The configured model steps on one page, in CCNet's order; the first that rejects it
    names the reason. What each found is recorded in the kept page's `meta["ccnet"]`."""
    out: Document | Rejected = doc
    if q.lid_model is not None:
        out = language_id.language_filter(
            out, q.lid_model, language=q.language, min_score=q.lid_threshold
        )
    if isinstance(out, Document) and q.perplexity_model is not None:
        tokenizer, cutoffs = perplexity_files(q)
        out = perplexity.perplexity_filter(
            out,
            q.perplexity_model,
            tokenizer_uri=tokenizer,
            cutoffs_uri=cutoffs,
            keep=tuple(q.keep_buckets),
        )
    if isinstance(out, Document) and q.reference_model is not None:
        out = reference.reference_filter(out, q.reference_model, min_score=q.reference_threshold)
    return out


def skipped(q: QualityConfig) -> dict[str, str]:
    """The model steps that do not run, and why (the manifest's `skipped_steps`)."""
    return {
        step: f"quality.{field} not set (quality.allow_missing_models=true)"
        for step, field in STEPS.items()
        if getattr(q, field) is None
    }


def manifest_entry(q: QualityConfig, dropped: dict[str, int], kept_buckets: dict[str, int]) -> dict:
    """The commoncrawl source's `quality` entry: each model step, whether it ran, its model
    and setting, and the documents it removed; for perplexity the documents per bucket (kept
    ones from their meta, `kept_buckets`, dropped ones from their reasons)."""
    steps = []
    for step, field in STEPS.items():
        model = getattr(q, field)
        entry: dict = {
            "step": step,
            "ran": model is not None,
            "model": model,
            "origin": ORIGINS[step],
        }
        if step == "language_id":
            entry |= {
                "language": q.language,
                "threshold": q.lid_threshold,
                "documents_removed": dropped.get(language_id.REASON, 0),
            }
        elif step == "perplexity":
            by_bucket = {
                b: kept_buckets.get(b, 0) + dropped.get(f"cc_perplexity_{b}", 0)
                for b in perplexity.BUCKETS
            }
            entry |= {
                "keep_buckets": list(q.keep_buckets),
                "buckets": by_bucket,
                "documents_removed": sum(dropped.get(r, 0) for r in perplexity.REASONS),
            }
            if model is not None:
                tokenizer, cutoffs = perplexity_files(q)
                c = perplexity.load_cutoffs(cutoffs)
                entry |= {
                    "tokenizer": tokenizer,
                    "cutoffs": {"path": cutoffs, "head": c.head, "middle": c.middle},
                }
        else:
            entry |= {
                "threshold": q.reference_threshold,
                "documents_removed": dropped.get(reference.REASON, 0),
            }
        steps.append(entry)
    return {
        "allow_missing_models": q.allow_missing_models,
        "steps": steps,
        "skipped": skipped(q),
        "gopher_heuristics": q.heuristics,  # not the paper's; on only when asked
    }
