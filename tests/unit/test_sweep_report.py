"""A sweep's report from given trial outcomes: status, best trial, summary table, plot,
best config. No Ray, no MLflow."""

from __future__ import annotations

import csv
import io
import math

import numpy as np
import pytest
from matplotlib import image

from llamaray.config import load_config
from llamaray.sweep.report import (
    DIVERGED,
    FAILED,
    FINISHED,
    STOPPED_EARLY,
    TrialOutcome,
    best_config,
    best_trial,
    classify,
    loss_vs_lr_png,
    summary_csv,
    summary_markdown,
)


def outcome(i, lr, batch, step, val_loss, error=None):
    status = classify(step, 8, val_loss, error)
    return TrialOutcome(f"t_{i}", f"sw-t_{i}", lr, batch, step, 8, val_loss, status, error)


@pytest.fixture
def outcomes():
    return [
        outcome(0, 3e-3, 512, 8, 5.8),
        outcome(1, 1e-5, 512, 2, 6.7),
        outcome(2, 1e-2, 512, 8, 5.4),
        outcome(3, 3e-3, 1024, 8, 5.5),
        outcome(4, 1e-2, 1024, 4, 5.3),  # lower than every finished loss, but at step 4
        outcome(5, 3e-1, 1024, 3, math.inf),
        outcome(6, 1e-3, 1024, 0, None, error="RayTaskError: worker died\n  traceback"),
    ]


def test_status_follows_how_a_trial_ended(outcomes):
    assert [o.status for o in outcomes] == [
        FINISHED, STOPPED_EARLY, FINISHED, FINISHED, STOPPED_EARLY, DIVERGED, FAILED,
    ]  # fmt: skip


def test_best_is_the_lowest_loss_of_a_whole_run(outcomes):
    assert best_trial(outcomes).name == "sw-t_2"  # not t_4, judged at step 4 of 8
    assert best_trial([o for o in outcomes if o.status != FINISHED]) is None


def test_summary_table_lists_every_trial(outcomes):
    rows = list(csv.DictReader(io.StringIO(summary_csv(outcomes))))
    assert [r["trial"] for r in rows] == [
        "sw-t_1", "sw-t_0", "sw-t_2", "sw-t_6", "sw-t_3", "sw-t_4", "sw-t_5",
    ]  # by batch size, then LR  # fmt: skip
    by_name = {r["trial"]: r for r in rows}
    assert by_name["sw-t_2"] == {
        "trial": "sw-t_2", "lr": "0.01", "batch_tokens": "512", "steps": "8/8",
        "val_loss": "5.4000", "status": "finished (best)",
    }  # fmt: skip
    assert by_name["sw-t_1"]["status"] == "stopped early" and by_name["sw-t_1"]["steps"] == "2/8"
    assert by_name["sw-t_5"]["val_loss"] == "inf" and by_name["sw-t_5"]["status"] == "diverged"
    assert by_name["sw-t_6"]["status"] == "failed: RayTaskError: worker died"
    assert by_name["sw-t_6"]["val_loss"] == ""

    md = summary_markdown(outcomes).splitlines()
    assert md[0] == "| trial | lr | batch_tokens | steps | val_loss | status |"
    assert len(md) == 2 + len(outcomes)
    assert "| sw-t_2 | 0.01 | 512 | 8/8 | 5.4000 | finished (best) |" in md


def test_plot_draws_each_batch_size(outcomes, tmp_path):
    png = loss_vs_lr_png(outcomes, tmp_path / "a.png", "sweep")
    pixels = image.imread(png)
    assert pixels.shape[:2] == (450, 700) and pixels.std() > 0.05
    # Another set of results draws another picture (the plot is of the data).
    changed = [outcome(o.trial_id[2:], o.lr, o.batch_tokens, o.step, (o.val_loss or 0) + 0.5)
               for o in outcomes[:4]]  # fmt: skip
    other = image.imread(loss_vs_lr_png(changed, tmp_path / "b.png", "sweep"))
    assert not np.array_equal(pixels, other)
    # Nothing finite to draw still gives a (blank) plot rather than an error.
    assert loss_vs_lr_png([outcomes[5], outcomes[6]], tmp_path / "c.png").is_file()


def test_best_config_is_ready_to_run(outcomes, tmp_path):
    base = load_config(
        None,
        ["name=sw", "model.preset=debug", "train.seq_len=32", "train.steps=8",
         "faults.nan_at_steps=[2]", "tracking.parent_run_id=abc", "optimizer.lr=1e-3"],
    )  # fmt: skip
    best = best_trial(outcomes)
    cfg = best_config(base, "sw", best, "/data/corpus")
    assert cfg.name == "sw-best"
    assert (cfg.optimizer.lr, cfg.train.batch_tokens, cfg.train.steps) == (1e-2, 512, 8)
    assert cfg.tracking.parent_run_id is None and cfg.faults.nan_at_steps == []
    assert cfg.train.stop_at_step is None and cfg.data.corpus == "/data/corpus"
    # The YAML it is written as loads back to the same config.
    (tmp_path / "best.yaml").write_text(cfg.to_yaml())
    assert load_config(tmp_path / "best.yaml") == cfg
