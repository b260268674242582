"""What a finished sweep says: each trial's outcome, the best one, a summary table, a plot
of validation loss against learning rate per batch size, and the best run's config.

Pure functions of the trials' outcomes (no Ray, no MLflow), so they are tested on given
results:

    >>> t = [TrialOutcome("a", "s-a", 1e-3, 512, 8, 8, 4.1, FINISHED),
    ...      TrialOutcome("b", "s-b", 1e-5, 512, 2, 8, 6.2, STOPPED_EARLY)]
    >>> best_trial(t).name
    's-a'
    >>> print(summary_markdown(t).splitlines()[3])
    | s-a | 0.001 | 512 | 8/8 | 4.1000 | finished (best) |
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass
from pathlib import Path

from llamaray.config import RunConfig

FINISHED = "finished"
STOPPED_EARLY = "stopped early"
DIVERGED = "diverged"
"""Training stopped itself on non-finite loss (`train.nan_policy`): a result, not a crash."""
FAILED = "failed"


@dataclass
class TrialOutcome:
    trial_id: str
    name: str
    """The trial's run name `<sweep>-<trial id>`: its Train run and MLflow child run."""
    lr: float
    batch_tokens: int
    step: int
    """The last step the trial reached (its last validated step when stopped early)."""
    last_step: int
    """The step a trial that is not stopped trains to (train.steps, or sweep.asha.max_t)."""
    val_loss: float | None
    """Validation loss at `step`; None when the trial never validated."""
    status: str
    error: str | None = None
    mlflow_run_id: str | None = None


def classify(step: int, last_step: int, val_loss: float | None, error: str | None) -> str:
    """A trial's status from how it ended.

    >>> classify(8, 8, 4.0, None), classify(2, 8, 6.0, None), classify(5, 8, math.inf, None)
    ('finished', 'stopped early', 'diverged')
    """
    if error:
        return FAILED
    if val_loss is not None and not math.isfinite(val_loss):
        return DIVERGED
    return FINISHED if step >= last_step else STOPPED_EARLY


def best_trial(outcomes: list[TrialOutcome]) -> TrialOutcome | None:
    """The lowest final validation loss among trials that trained their whole budget; a
    trial stopped early was judged at an earlier step, so its loss is not comparable."""
    done = [
        o
        for o in outcomes
        if o.status == FINISHED and o.val_loss is not None and math.isfinite(o.val_loss)
    ]
    return min(done, key=lambda o: o.val_loss) if done else None


def _finite(x: float | None) -> bool:
    return x is not None and math.isfinite(x)


_COLUMNS = ("trial", "lr", "batch_tokens", "steps", "val_loss", "status")


def _rows(outcomes: list[TrialOutcome]) -> list[dict]:
    best = best_trial(outcomes)
    rows = []
    for o in sorted(outcomes, key=lambda o: (o.batch_tokens, o.lr, o.name)):
        status = o.status + (" (best)" if best is not None and o is best else "")
        if o.error:
            status += f": {o.error.splitlines()[0][:120]}"
        rows.append(
            {
                "trial": o.name,
                "lr": f"{o.lr:.4g}",
                "batch_tokens": str(o.batch_tokens),
                "steps": f"{o.step}/{o.last_step}",
                "val_loss": "" if o.val_loss is None else f"{o.val_loss:.4f}",
                "status": status,
            }
        )
    return rows


def summary_csv(outcomes: list[TrialOutcome]) -> str:
    """One line per trial, ordered by batch size then LR."""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(_rows(outcomes))
    return out.getvalue()


def summary_markdown(outcomes: list[TrialOutcome]) -> str:
    """The same table in Markdown (MLflow shows it as text; docs and PRs render it)."""
    lines = [
        "| " + " | ".join(_COLUMNS) + " |",
        "|" + "---|" * len(_COLUMNS),
    ]
    lines += ["| " + " | ".join(r[c] for c in _COLUMNS) + " |" for r in _rows(outcomes)]
    return "\n".join(lines) + "\n"


def loss_vs_lr_png(outcomes: list[TrialOutcome], path: str | Path, title: str = "") -> Path:
    """Final validation loss against LR (log axis), one colour per batch size: finished
    trials as filled markers joined by a line, trials stopped early as hollow markers at
    the loss they were stopped with (an earlier step, so above the line)."""
    import matplotlib

    matplotlib.use("Agg")  # the driver may have no display
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
    sizes = sorted({o.batch_tokens for o in outcomes})
    colors = plt.get_cmap("viridis")([i / max(1, len(sizes) - 1) * 0.85 for i in range(len(sizes))])
    plotted = False
    for size, color in zip(sizes, colors, strict=True):
        shown = [
            o
            for o in outcomes
            if o.batch_tokens == size and o.val_loss is not None and math.isfinite(o.val_loss)
        ]
        done = sorted((o for o in shown if o.status == FINISHED), key=lambda o: o.lr)
        early = [o for o in shown if o.status == STOPPED_EARLY]
        if done:
            ax.plot(
                [o.lr for o in done], [o.val_loss for o in done], "o-", color=color,
                label=f"{size} tokens/step",
            )  # fmt: skip
            plotted = True
        if early:
            ax.scatter(
                [o.lr for o in early], [o.val_loss for o in early], facecolors="none",
                edgecolors=[color], label=f"{size}: stopped early (loss when stopped)",
            )  # fmt: skip
            plotted = True
    best = best_trial(outcomes)
    if best is not None:
        ax.scatter([best.lr], [best.val_loss], marker="*", s=200, color="crimson", zorder=3,
                   label=f"best: lr {best.lr:.3g}, {best.batch_tokens} tokens")  # fmt: skip
    ax.set_xscale("log")
    ax.set_xlabel("peak learning rate")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    if plotted:
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


def best_config(
    base: RunConfig, sweep_name: str, best: TrialOutcome, corpus: str | None
) -> RunConfig:
    """The run to launch next: the sweep's base config with the best trial's LR and batch,
    named `<sweep>-best`, on the corpus the trials used, with the full step budget (no
    stop), not nested under the sweep and without fault injection.

    >>> from llamaray.config import load_config
    >>> base = load_config(None, ["model.preset=debug", "train.seq_len=32"])
    >>> best = TrialOutcome("a", "s-a", 2e-3, 4096, 8, 8, 3.9, FINISHED)
    >>> cfg = best_config(base, "s", best, None)
    >>> cfg.name, cfg.optimizer.lr, cfg.train.batch_tokens
    ('s-best', 0.002, 4096)
    """
    doc = base.model_dump(exclude={"faults"})
    doc["name"] = f"{sweep_name}-best"
    doc["optimizer"]["lr"] = best.lr
    doc["train"]["batch_tokens"] = best.batch_tokens
    doc["train"]["stop_at_step"] = None
    doc["tracking"]["parent_run_id"] = None
    if corpus:
        doc["data"]["corpus"] = corpus
    return RunConfig.model_validate(doc)
