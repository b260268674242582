"""Sweep configs without Ray: the search space per preset, validation before any cluster
work, ASHA's rungs, trial concurrency from cluster resources, each trial's run config."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from llamaray.cli import main
from llamaray.config import ConfigError, load_config
from llamaray.model.args import get_preset
from llamaray.sweep.config import (
    DEFAULT_CONCURRENCY,
    default_batch_tokens,
    load_sweep_config,
    planned_trials,
    resolve_asha,
    resolve_space,
    sweep_concurrency,
    trial_concurrency,
    trial_config,
)

REPO = Path(__file__).resolve().parents[2]
# A debug-preset run whose rows are 32 x 4 x 2 workers = 256 tokens.
BASE = [
    "model.preset=debug",
    "train.seq_len=32",
    "train.micro_batch_size=4",
    "train.num_workers=2",
    "train.steps=40",
    "train.eval_every=5",
]


def sweep_error(*overrides: str) -> str:
    with pytest.raises(ConfigError) as err:
        load_sweep_config(None, [*BASE, *overrides])
    return str(err.value)


def test_default_space_is_centered_on_the_presets_lr_and_batch():
    run, sweep = load_sweep_config(None, BASE)
    space = resolve_space(run, sweep)
    lr = get_preset("debug").lr
    assert space.lr_min == pytest.approx(lr / 3) and space.lr_max == pytest.approx(lr * 3)
    assert space.batch_tokens == (4096, 8192, 16384)  # debug's 8192 x 1/2, 1, 2
    assert space.n_trials == 4 * 3  # num_samples LRs per batch size
    assert space.lr_values is None


def test_space_follows_the_runs_own_lr_and_the_yaml_overrides():
    run, sweep = load_sweep_config(None, [*BASE, "optimizer.lr=2e-3", "sweep.lr.factor=10"])
    space = resolve_space(run, sweep)
    assert (space.lr_min, space.lr_max) == (pytest.approx(2e-4), pytest.approx(2e-2))

    run, sweep = load_sweep_config(
        None, [*BASE, "sweep.lr.min=1e-4", "sweep.lr.max=1e-2", "sweep.batch_tokens=[512, 1024]"]
    )
    space = resolve_space(run, sweep)
    assert (space.lr_min, space.lr_max, space.batch_tokens) == (1e-4, 1e-2, (512, 1024))

    run, sweep = load_sweep_config(
        None, [*BASE, "sweep.lr.values=[1e-3, 3e-3, 1e-2]", "sweep.num_samples=1"]
    )
    space = resolve_space(run, sweep)
    assert space.lr_values == (1e-3, 3e-3, 1e-2) and space.n_trials == 3 * 3


def test_default_batch_sizes_round_to_whole_rows():
    assert default_batch_tokens(4 * 2**20, 2048 * 8) == [2 * 2**20, 4 * 2**20, 8 * 2**20]
    assert default_batch_tokens(1000, 256) == [512, 1024, 2048]
    assert default_batch_tokens(100, 256) == [256]  # never below one row


def test_seeded_search_draws_the_same_trials():
    run, sweep = load_sweep_config(
        None, [*BASE, "sweep.num_samples=3", "sweep.batch_tokens=[512, 1024]"]
    )
    space = resolve_space(run, sweep)
    first, again = planned_trials(space), planned_trials(space)
    assert first == again and len(first) == space.n_trials == 6
    assert sorted({t["batch_tokens"] for t in first}) == [512, 1024]
    assert all(space.lr_min <= t["lr"] <= space.lr_max for t in first)
    assert len({t["lr"] for t in first}) == 6  # drawn, not repeated
    other = load_sweep_config(
        None, [*BASE, "sweep.num_samples=3", "sweep.batch_tokens=[512, 1024]", "sweep.seed=1"]
    )
    assert planned_trials(resolve_space(*other)) != first


def test_grid_of_lr_values_keeps_the_listed_order():
    run, sweep = load_sweep_config(
        None,
        [
            *BASE,
            "sweep.lr.values=[3e-3, 1e-5, 1e-2]",
            "sweep.batch_tokens=[512]",
            "sweep.num_samples=1",
        ],
    )
    assert [t["lr"] for t in planned_trials(resolve_space(run, sweep))] == [3e-3, 1e-5, 1e-2]


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["sweep.batch_tokens=[512, 500]"], "sweep.batch_tokens: 500 is not a positive multiple of"
         " seq_len x micro_batch_size x data-parallel workers = 32 x 4 x 2 = 256"),
        (["sweep.batch_tokens=[512, 512]"], "sweep.batch_tokens: listed twice: 512"),
        (["sweep.batch_tokens=[]"], "sweep.batch_tokens: an empty list tries nothing"),
        (["sweep.lr.values=[1e-3]", "sweep.lr.min=1e-4"], "sweep.lr.values: give either values"),
        (["sweep.lr.min=1e-2", "sweep.lr.max=1e-3"], "sweep.lr.min: 0.01 must be below"),
        (["sweep.lr.values=[0.001, -1]"], "sweep.lr.values: learning rates must be finite and > 0"),
        (["sweep.lr.min=0.01"], "sweep.lr.min: 0.01 must be below sweep.lr.max=0.003"),
        (["sweep.lr.factor=1"], "sweep.lr.factor: Input should be greater than 1"),
        (["sweep.nmu_samples=3"], "sweep.nmu_samples: unknown key"),
        (["sweep.asha.max_t=50"], "sweep.asha.max_t: 50 is past train.steps=40"),
        (["sweep.asha.max_t=12"], "sweep.asha.max_t: 12 is not a multiple of train.eval_every=5"),
        (["sweep.asha.grace_period=45"], "sweep.asha.grace_period: 45 is past max_t=40"),
        (["sweep.asha.reduction_factor=1"], "sweep.asha.reduction_factor: Input should be greater"),
        (["train.eval_every=0"], "train.eval_every: 0 validates only at the end"),
        (["data.eval_rows=0"], "data.eval_rows: 0 gives no val_loss"),
        (["tracking.enabled=false"], "tracking.enabled: a sweep needs MLflow tracking"),
        (["train.stop_at_step=10"], "train.stop_at_step: not used in a sweep"),
        (["sweep.max_concurrent_trials=0"], "sweep.max_concurrent_trials: Input should be greater"),
    ],
)  # fmt: skip
def test_bad_sweep_fields_are_named(overrides, expected):
    assert expected in sweep_error(*overrides)


def test_sweep_yaml_is_a_run_config_plus_a_sweep_section(tmp_path):
    doc = load_config(None, BASE).model_dump()
    doc["sweep"] = {"num_samples": 2, "batch_tokens": [512]}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(doc))
    run, sweep = load_sweep_config(path, ["sweep.seed=7"])
    assert run.model.preset == "debug" and sweep.seed == 7 and sweep.batch_tokens == [512]
    # A plain run config refuses the section: sweeps and runs do not mix silently.
    with pytest.raises(ConfigError, match="sweep: unknown key"):
        load_config(path)


def test_demo_sweep_config_is_valid():
    run, sweep = load_sweep_config(REPO / "jobs/configs/sweep-demo.yaml")
    space = resolve_space(run, sweep)
    assert space.n_trials == 6 and space.batch_tokens == (2048, 4096)
    assert resolve_asha(run, sweep).rungs() == [20, 40]


def test_asha_defaults_and_rungs():
    run, sweep = load_sweep_config(None, [*BASE, "train.steps=300", "train.eval_every=50"])
    asha = resolve_asha(run, sweep)
    # max_t = steps; grace = the first validated step at or after 300 / 3^2.
    assert (asha.grace_period, asha.reduction_factor, asha.max_t) == (50, 3.0, 300)
    assert asha.rungs() == [50, 150]
    run, sweep = load_sweep_config(
        None,
        [
            *BASE,
            "sweep.asha.grace_period=2",
            "sweep.asha.reduction_factor=2",
            "sweep.asha.max_t=20",
        ],
    )
    asha = resolve_asha(run, sweep)
    assert asha.max_t == 20 and asha.rungs() == [2, 4, 8, 16]


@pytest.mark.parametrize(
    ("cluster", "workers", "cpus", "gpu", "trials", "expected"),
    [
        ({"CPU": 2.0}, 2, 0.5, False, 4, 2),  # the test cluster: 1 CPU per trial
        ({"CPU": 2.0}, 2, 1.0, False, 4, 1),
        ({"CPU": 16.0}, 2, 1.0, False, 4, 4),  # never more than there are trials
        ({"CPU": 64.0, "GPU": 8.0}, 4, 4.0, True, 10, 2),  # GPUs are the limit
        ({"CPU": 8.0, "GPU": 8.0}, 2, 4.0, True, 10, 1),  # CPUs are the limit
        ({"CPU": 64.0, "GPU": 8.0}, 4, 4.0, False, 10, 4),  # CPU training ignores the GPUs
    ],
)
def test_concurrency_fits_the_cluster(cluster, workers, cpus, gpu, trials, expected):
    run = load_config(
        None, [*BASE, f"train.num_workers={workers}", f"train.cpus_per_worker={cpus}"]
    )
    assert trial_concurrency(cluster, run, gpu, trials) == (expected, None)


def test_concurrency_when_no_trial_fits_yet():
    run = load_config(None, [*BASE, "train.num_workers=4", "train.cpus_per_worker=2"])
    n, warning = trial_concurrency({"CPU": 4.0}, run, False, 6)
    assert n == 1 and "the cluster has 4 CPUs, a trial needs 8" in warning


def test_trial_config_changes_only_what_a_trial_owns():
    base = load_config(None, [*BASE, "faults.nan_at_steps=[3]"])
    cfg = trial_config(base, "sw", "abc_00002", 2e-3, 1024, "parent-id", last_step=40)
    assert cfg.name == "sw-abc_00002"
    assert (cfg.optimizer.lr, cfg.train.batch_tokens) == (2e-3, 1024)
    assert cfg.tracking.parent_run_id == "parent-id" and cfg.tracking.export_hf is False
    assert cfg.train.stop_at_step is None  # the whole schedule
    unchanged = cfg.model_dump(exclude={"name", "optimizer", "train", "tracking"})
    assert unchanged == base.model_dump(exclude={"name", "optimizer", "train", "tracking"})
    # max_t below train.steps: the trial ends there, on the full schedule.
    assert trial_config(base, "sw", "t", 1e-3, 512, None, last_step=20).train.stop_at_step == 20


def test_cli_prints_the_planned_trials_and_rejects_bad_fields(capsys):
    args = ["sweep", *BASE, "sweep.lr.values=[1e-3, 3e-3]", "sweep.batch_tokens=[512]",
            "sweep.num_samples=1", "--print-config"]  # fmt: skip
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "# 2 trials; lr 0.001, 0.003; batch tokens 512" in out
    assert "#   trial 1: lr 0.003, 512 tokens/step" in out
    assert yaml.safe_load(out)["sweep"]["lr"]["values"] == [1e-3, 3e-3]
    assert main(["sweep", *BASE, "sweep.batch_tokens=[100]"]) == 2
    assert "sweep.batch_tokens: 100 is not a positive multiple" in capsys.readouterr().err


def test_concurrency_of_an_autoscaling_cluster_that_starts_empty():
    """A cluster scaled from zero has no CPUs at start: the sweep config, else the cluster's
    configured maximum, else a stated default decides, never the empty cluster."""
    run = load_config(None, [*BASE, "train.num_workers=2", "train.cpus_per_worker=1"])
    empty = {"memory": 1e9}  # the head of such a cluster: no CPUs
    n, how = sweep_concurrency(run, 6, 3, empty, None)
    assert (n, how) == (3, "3 at a time (sweep.max_concurrent_trials)")
    n, how = sweep_concurrency(run, 6, None, empty, {"CPU": 8.0})
    assert n == 4 and "configured maximum" in how
    n, how = sweep_concurrency(run, 3, None, empty, {"CPU": 64.0})
    assert n == 3  # never more than there are trials
    n, how = sweep_concurrency(run, 6, None, empty, None)
    assert n == DEFAULT_CONCURRENCY == 1
    assert "sweep.max_concurrent_trials" in how and "no maximum size" in how
    n, how = sweep_concurrency(run, 6, None, {"CPU": 4.0}, None)  # a fixed cluster
    assert n == 2 and "nodes up now" in how
    n, how = sweep_concurrency(run, 6, None, empty, {"CPU": 1.0})
    assert n == 1 and "even the cluster's configured maximum" in how
