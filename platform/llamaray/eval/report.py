"""The results of an evaluation as a table like the paper's: benchmark, shots, metric,
score; as markdown (to read) and CSV (to load), both logged as artifacts of the eval run.

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
