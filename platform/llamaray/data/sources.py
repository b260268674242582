"""The pretraining sources and the paper's mixture (Touvron et al. 2023, table 1)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SourceMix:
    name: str
    proportion: float
    """Share of the training tokens sampled from this source."""
    epochs: float
    """Passes over this source's tokens the paper reports for 1.4T training tokens."""
    disk_gb: float
    """The paper's disk size of the cleaned source."""


PAPER_MIXTURE: dict[str, SourceMix] = {
    m.name: m
    for m in (
        SourceMix("commoncrawl", 0.670, 1.10, 3300),
        SourceMix("c4", 0.150, 1.06, 783),
        SourceMix("github", 0.045, 0.64, 328),
        SourceMix("wikipedia", 0.045, 2.45, 83),
        SourceMix("books", 0.045, 2.23, 85),
        SourceMix("arxiv", 0.025, 1.06, 92),
        SourceMix("stackexchange", 0.020, 1.03, 78),
    )
}
SOURCES: tuple[str, ...] = tuple(PAPER_MIXTURE)
