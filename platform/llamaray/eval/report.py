"""The results of an evaluation as a table like the paper's: benchmark, shots, metric,
score; as markdown (to read) and CSV (to load), both logged as artifacts of the eval run;
and, across a run's checkpoints, each score against training tokens (the paper's figure 2,
`scores_vs_tokens_png`), logged into the training run.

    >>> rows = [Row("arc-easy", 0, "acc", 0.25), Row("humaneval", 0, "pass@1", 0.5)]
    >>> print(markdown(rows))
    | benchmark | shots | metric | score |
    |---|---|---|---|
    | arc-easy | 0 | acc | 25.0 |
    | humaneval | 0 | pass@1 | 50.0 |
    <BLANKLINE>

Scores are shown as the paper shows them, in percent with one decimal, in the markdown;
the CSV keeps the fraction unrounded. The counts that every result carries (`n`,
`samples`) and the other multiple-choice rules reported for information (`acc_chars`,
`acc_raw`) are left out: the table holds the number the paper would print.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass

# Not scores: counts, and the alternative rules kept for information.
_NOT_HEADLINE = {"n", "samples", "acc_chars", "acc_raw"}


@dataclass(frozen=True)
class Row:
    benchmark: str
    shots: int | None
    metric: str
    score: float


def rows_of(tasks: dict) -> list[Row]:
    """One row per headline metric of each `TaskResult`, in evaluation order."""
    return [
        Row(name, result.shots, metric, float(value))
        for name, result in tasks.items()
        for metric, value in result.metrics.items()
        if metric not in _NOT_HEADLINE
    ]


def markdown(rows: list[Row]) -> str:
    lines = ["| benchmark | shots | metric | score |", "|---|---|---|---|"]
    for r in rows:
        shots = "" if r.shots is None else str(r.shots)
        lines.append(f"| {r.benchmark} | {shots} | {r.metric} | {100 * r.score:.1f} |")
    return "\n".join(lines) + "\n"


def csv_text(rows: list[Row]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["benchmark", "shots", "metric", "score"])
    for r in rows:
        writer.writerow([r.benchmark, "" if r.shots is None else r.shots, r.metric, repr(r.score)])
    return out.getvalue()


def scores_vs_tokens_png(series: dict[str, list[tuple[int, float]]], path, title: str = ""):
    """One panel per metric (`eval/<task>/<metric>`), its score against the training tokens
    seen at each evaluated checkpoint, as the paper's figure 2 draws them. Returns `path`."""
    import math
    from pathlib import Path

    import matplotlib

    matplotlib.use("Agg")  # no display where evaluations run
    import matplotlib.pyplot as plt

    names = sorted(series)
    cols = min(3, max(1, len(names)))
    rows = max(1, math.ceil(len(names) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), dpi=100, squeeze=False)
    for ax, name in zip(axes.flat, names, strict=False):
        points = sorted(series[name])
        ax.plot([t / 1e6 for t, _ in points], [v for _, v in points], "o-", lw=1.5)
        ax.set_title(name.removeprefix("eval/"), fontsize=9)
        ax.set_xlabel("training tokens (millions)")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(names) :]:
        ax.axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path
