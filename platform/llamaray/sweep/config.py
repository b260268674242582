"""What a sweep searches and how: the `sweep:` section of a sweep YAML, checked before Ray.

A sweep YAML is a run config (`llamaray.config.RunConfig`) plus a top-level `sweep:`
section. Every trial is that run with its own `optimizer.lr` and `train.batch_tokens`:

    name: lr-sweep
    model: {preset: tiny}
    train: {steps: 300, eval_every: 50}
    sweep:
      num_samples: 3              # learning rates drawn per batch size
      lr: {factor: 3}             # log-uniform in [LR / 3, LR x 3] around the preset's LR
      batch_tokens: [2048, 4096]  # every size is tried
      asha: {grace_period: 50, reduction_factor: 3}

    >>> run, sweep = load_sweep_config("jobs/configs/sweep-demo.yaml")
    >>> resolve_space(run, sweep).n_trials
    6

Nothing here imports Ray: the search space, the ASHA rungs and the trial concurrency are
plain functions of the config (and of the cluster's resources, passed in).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from llamaray.config import RunConfig, load_config

DEFAULT_BATCH_MULTIPLIERS = (0.5, 1.0, 2.0)
"""Default batch sizes: the run's batch tokens times these, rounded to whole rows."""


class _Section(BaseModel):
    # Unknown keys are errors, as in every config section: a typo must not fall back silently.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class LrSpace(_Section):
    """Learning rates to try: log-uniform between two bounds, or a fixed list."""

    min: float | None = Field(None, gt=0, description="Lower bound; None: LR / factor.")
    max: float | None = Field(None, gt=0, description="Upper bound; None: LR x factor.")
    factor: float = Field(
        3.0, gt=1, description="Default bounds: the run's peak LR (the preset's) / and x this."
    )
    values: list[float] | None = Field(
        None, description="Try exactly these (a grid) instead of sampling between bounds."
    )

    @field_validator("values")
    @classmethod
    def _values_positive(cls, values: list[float] | None) -> list[float] | None:
        if values is not None:
            if not values:
                raise ValueError("an empty list tries nothing; list at least one LR or omit it")
            bad = [str(v) for v in values if not (0 < v < math.inf)]
            if bad:
                raise ValueError(f"learning rates must be finite and > 0: {', '.join(bad)}")
        return values


class AshaConfig(_Section):
    """ASHA early stopping on validation loss; times are optimizer steps."""

    grace_period: int | None = Field(
        None,
        gt=0,
        description="Steps before a trial may be stopped; None: the first validation step at "
        "or after max_t / reduction_factor^2 (two halvings before the end).",
    )
    reduction_factor: float = Field(
        3.0, gt=1, description="Each rung keeps the best 1/reduction_factor of trials."
    )
    max_t: int | None = Field(
        None,
        gt=0,
        description="Steps a trial trains at most; None: train.steps. Fewer: trials end at "
        "max_t on the full train.steps schedule (like train.stop_at_step).",
    )


class SweepConfig(_Section):
    """The `sweep:` section. Trials = num_samples x len(batch_tokens) (x len(lr.values))."""

    num_samples: int = Field(
        4,
        gt=0,
        description="Learning rates drawn per batch size; with lr.values, repeats of the grid.",
    )
    seed: int = Field(0, description="Seed of the search: the same seed draws the same trials.")
    lr: LrSpace = Field(default_factory=LrSpace)
    batch_tokens: list[int] | None = Field(
        None,
        description="Batch sizes (tokens per step), every one tried; None: the run's batch "
        "tokens x 1/2, 1, 2 rounded to whole rows of seq_len x micro_batch_size x dp.",
    )
    asha: AshaConfig = Field(default_factory=AshaConfig)
    max_concurrent_trials: int | None = Field(
        None,
        gt=0,
        description="Trials running at once; None: as many as fit in the cluster's configured "
        "maximum (published by its autoscaler), else in the nodes up now, else 1. Set it on "
        "an autoscaling cluster that starts with no worker nodes.",
    )


class SweepFile(RunConfig):
    """A sweep YAML: the run every trial starts from, plus `sweep:`."""

    sweep: SweepConfig = Field(default_factory=SweepConfig)

    @model_validator(mode="after")
    def _sweep_fits_run(self) -> SweepFile:
        problems = sweep_problems(self.run_config(), self.sweep)
        if problems:
            raise ValueError("\n".join(problems))
        return self

    def run_config(self) -> RunConfig:
        return RunConfig.model_validate(self.model_dump(exclude={"sweep"}))


def load_sweep_config(
    path: str | Path | None, overrides: list[str] | None = None
) -> tuple[RunConfig, SweepConfig]:
    """Read a sweep YAML (a run config plus `sweep:`) with `a.b=value` overrides (`sweep.*`
    included); ConfigError lists every bad field, before any cluster work.

    >>> run, sweep = load_sweep_config(None, ["model.preset=debug", "train.seq_len=64",
    ...     "train.eval_every=10", "train.steps=40", "sweep.lr.values=[1e-3, 3e-3]"])
    >>> sweep.lr.values, run.model.preset
    ([0.001, 0.003], 'debug')
    """
    doc = load_config(path, overrides, schema=SweepFile)
    return doc.run_config(), doc.sweep


def row_tokens(run: RunConfig) -> int:
    """Tokens of one row on every data-parallel worker: what batch tokens must divide by."""
    return run.train.seq_len * run.train.micro_batch_size * run.data_parallel


def default_batch_tokens(center: int, row: int) -> list[int]:
    """`center` x 1/2, 1, 2, each rounded to a multiple of `row` (at least one row).

    >>> default_batch_tokens(8192, 256)
    [4096, 8192, 16384]
    >>> default_batch_tokens(300, 256)
    [256, 512]
    """
    sizes = {max(row, round(center * m / row) * row) for m in DEFAULT_BATCH_MULTIPLIERS}
    return sorted(sizes)


def sweep_problems(run: RunConfig, sweep: SweepConfig) -> list[str]:
    """Every way the sweep does not fit its run, as "field.path: reason"."""
    problems: list[str] = []
    t = run.train
    if not run.tracking.enabled:
        problems.append(
            "tracking.enabled: a sweep needs MLflow tracking (its trials are child runs of the "
            "sweep's run, and the summary is logged there)"
        )
    if t.eval_every == 0:
        problems.append(
            "train.eval_every: 0 validates only at the end, but ASHA compares trials by val_loss "
            f"along the way; set it, e.g. train.eval_every={max(1, t.steps // 8)}"
        )
    if run.data.eval_rows == 0:
        problems.append("data.eval_rows: 0 gives no val_loss to compare trials by")
    if t.stop_at_step is not None:
        problems.append(
            "train.stop_at_step: not used in a sweep; sweep.asha.max_t ends trials early"
        )
    lr = sweep.lr
    if lr.values is not None and (lr.min is not None or lr.max is not None):
        problems.append("sweep.lr.values: give either values or min/max bounds, not both")
    low = lr.min if lr.min is not None else run.peak_lr / lr.factor
    high = lr.max if lr.max is not None else run.peak_lr * lr.factor
    if lr.values is None and low >= high:
        problems.append(f"sweep.lr.min: {low:g} must be below sweep.lr.max={high:g}")
    row = row_tokens(run)
    for value in sweep.batch_tokens or []:
        if value <= 0 or value % row:
            problems.append(
                f"sweep.batch_tokens: {value} is not a positive multiple of seq_len x "
                f"micro_batch_size x data-parallel workers = {t.seq_len} x "
                f"{t.micro_batch_size} x {run.data_parallel} = {row}"
            )
    if sweep.batch_tokens is not None:
        if not sweep.batch_tokens:
            problems.append(
                "sweep.batch_tokens: an empty list tries nothing; omit it or list sizes"
            )
        repeated = sorted({v for v in sweep.batch_tokens if sweep.batch_tokens.count(v) > 1})
        if repeated:
            problems.append(f"sweep.batch_tokens: listed twice: {', '.join(map(str, repeated))}")
    asha = sweep.asha
    if asha.max_t is not None:
        if asha.max_t > t.steps:
            problems.append(f"sweep.asha.max_t: {asha.max_t} is past train.steps={t.steps}")
        elif asha.max_t < t.steps and t.eval_every and asha.max_t % t.eval_every:
            problems.append(
                f"sweep.asha.max_t: {asha.max_t} is not a multiple of train.eval_every="
                f"{t.eval_every}: a trial's last step must be validated"
            )
    max_t = min(asha.max_t or t.steps, t.steps)
    if asha.grace_period is not None and asha.grace_period > max_t:
        problems.append(f"sweep.asha.grace_period: {asha.grace_period} is past max_t={max_t}")
    return problems


@dataclass(frozen=True)
class SearchSpace:
    """The resolved search: LR bounds (log-uniform) or LR values (grid), batch sizes (grid)."""

    lr_min: float | None
    lr_max: float | None
    lr_values: tuple[float, ...] | None
    batch_tokens: tuple[int, ...]
    num_samples: int
    seed: int

    @property
    def n_trials(self) -> int:
        return len(self.lr_values or (None,)) * len(self.batch_tokens) * self.num_samples

    def param_space(self) -> dict:
        """Tune's `param_space`: batch sizes as a grid, so each size gets its own LR draws
        (the loss-vs-LR plot has a curve per size); LRs log-uniform or a grid."""
        from ray import tune

        lr = (
            tune.grid_search(list(self.lr_values))
            if self.lr_values
            else tune.loguniform(self.lr_min, self.lr_max)
        )
        return {"lr": lr, "batch_tokens": tune.grid_search(list(self.batch_tokens))}

    def as_params(self) -> dict[str, str]:
        """For the sweep's MLflow run."""
        out = {
            "sweep.batch_tokens": ",".join(map(str, self.batch_tokens)),
            "sweep.num_samples": str(self.num_samples),
            "sweep.seed": str(self.seed),
            "sweep.n_trials": str(self.n_trials),
        }
        if self.lr_values:
            out["sweep.lr.values"] = ",".join(f"{v:g}" for v in self.lr_values)
        else:
            out |= {"sweep.lr.min": f"{self.lr_min:g}", "sweep.lr.max": f"{self.lr_max:g}"}
        return out


def search_algorithm(space: SearchSpace, max_concurrent: int = 0):
    """Tune's random/grid search, seeded: the same seed gives the same trials in the same
    order. It also limits how many trials run at once (0: no limit)."""
    from ray.tune.search import BasicVariantGenerator

    return BasicVariantGenerator(random_state=space.seed, max_concurrent=max_concurrent)


def _plan_only(config: dict) -> None:
    """Stands in for the trainable when listing a sweep's trials; never runs."""


def planned_trials(space: SearchSpace) -> list[dict]:
    """The trials a sweep will run, in order, as {"lr", "batch_tokens"}: drawn by the same
    seeded generator the Tuner uses, without Ray.

    >>> run, sweep = load_sweep_config(None, ["model.preset=debug", "train.seq_len=32",
    ...     "train.eval_every=10", "train.steps=40", "sweep.batch_tokens=[512]",
    ...     "sweep.lr.values=[1e-3, 3e-3]", "sweep.num_samples=1"])
    >>> planned_trials(resolve_space(run, sweep))
    [{'lr': 0.001, 'batch_tokens': 512}, {'lr': 0.003, 'batch_tokens': 512}]
    """
    import tempfile

    from ray.tune.experiment import Experiment

    generator = search_algorithm(space)
    # An Experiment makes its (empty) folder on creation: keep it out of ~/ray_results.
    with tempfile.TemporaryDirectory(prefix="llamaray-plan-") as scratch:
        experiment = Experiment(
            "plan",
            _plan_only,
            config=space.param_space(),
            num_samples=space.num_samples,
            storage_path=scratch,
        )
        generator.add_configurations([experiment])
    trials = []
    while (trial := generator.next_trial()) is not None:
        trials.append({"lr": trial.config["lr"], "batch_tokens": trial.config["batch_tokens"]})
    return trials


def resolve_space(run: RunConfig, sweep: SweepConfig) -> SearchSpace:
    """Bounds and sizes with the defaults filled in: centered on the run's peak LR and batch
    tokens, which are the preset's (the paper's) unless the run config sets them.

    >>> run, sweep = load_sweep_config(None, ["model.preset=debug", "train.seq_len=32",
    ...     "train.micro_batch_size=4", "train.eval_every=10", "train.steps=40"])
    >>> space = resolve_space(run, sweep)
    >>> round(space.lr_min, 6), round(space.lr_max, 6), space.batch_tokens
    (0.000333, 0.003, (4096, 8192, 16384))
    """
    lr, center = sweep.lr, run.peak_lr
    batches = sweep.batch_tokens or default_batch_tokens(run.batch_tokens, row_tokens(run))
    return SearchSpace(
        lr_min=None if lr.values else (lr.min or center / lr.factor),
        lr_max=None if lr.values else (lr.max or center * lr.factor),
        lr_values=tuple(lr.values) if lr.values else None,
        batch_tokens=tuple(batches),
        num_samples=sweep.num_samples,
        seed=sweep.seed,
    )


@dataclass(frozen=True)
class AshaPlan:
    grace_period: int
    reduction_factor: float
    max_t: int

    def rungs(self) -> list[int]:
        """Steps at which ASHA compares trials (Tune's rule: grace x rf^k below max_t)."""
        out, k = [], 0
        while self.grace_period * self.reduction_factor**k < self.max_t:
            out.append(round(self.grace_period * self.reduction_factor**k))
            k += 1
        return out


def resolve_asha(run: RunConfig, sweep: SweepConfig) -> AshaPlan:
    """ASHA's settings with defaults: max_t = train.steps; grace period = the first
    validation step at or after max_t / rf^2.

    >>> run, sweep = load_sweep_config(None, ["model.preset=debug", "train.seq_len=32",
    ...     "train.eval_every=50", "train.steps=300"])
    >>> resolve_asha(run, sweep)
    AshaPlan(grace_period=50, reduction_factor=3.0, max_t=300)
    """
    a, every = sweep.asha, run.train.eval_every
    max_t = min(a.max_t or run.train.steps, run.train.steps)
    grace = a.grace_period
    if grace is None:
        grace = min(max_t, every * max(1, math.ceil(max_t / a.reduction_factor**2 / every)))
    return AshaPlan(grace, a.reduction_factor, max_t)


def trial_concurrency(
    cluster: dict[str, float], run: RunConfig, use_gpu: bool, n_trials: int
) -> tuple[int, str | None]:
    """How many trials fit at once: each needs train.num_workers x cpus_per_worker CPUs
    (and num_workers GPUs on GPU); the trial's own driver process reserves no CPU or GPU.
    Returns (trials, warning); at least 1, at most n_trials. The warning says when the
    cluster cannot fit even one trial now (an autoscaler may add nodes; trials wait).

    >>> from llamaray.config import load_config
    >>> run = load_config(None, ["train.seq_len=512", "train.num_workers=2",
    ...                          "train.cpus_per_worker=0.5"])
    >>> trial_concurrency({"CPU": 2.0}, run, False, 4)
    (2, None)
    """
    t = run.train
    fits = math.floor(cluster.get("CPU", 0.0) / (t.num_workers * t.cpus_per_worker) + 1e-9)
    limit = f"{cluster.get('CPU', 0.0):g} CPUs, a trial needs {t.num_workers * t.cpus_per_worker:g}"
    if use_gpu:
        gpu_fits = math.floor(cluster.get("GPU", 0.0) / t.num_workers + 1e-9)
        if gpu_fits < fits:
            fits = gpu_fits
            limit = f"{cluster.get('GPU', 0.0):g} GPUs, a trial needs {t.num_workers}"
    if fits < 1:
        return 1, f"the cluster has {limit}: trials wait until nodes are added"
    return min(fits, n_trials), None


DEFAULT_CONCURRENCY = 1
"""Trials at once when nothing says more: no `sweep.max_concurrent_trials`, no maximum size
published by the cluster's autoscaler, and no room for a trial on the nodes up now."""


def sweep_concurrency(
    run: RunConfig,
    n_trials: int,
    configured: int | None,
    now: dict[str, float],
    maximum: dict[str, float] | None,
) -> tuple[int, str]:
    """(trials at once, a line saying where that number comes from), in this order:
    `sweep.max_concurrent_trials`; else what fits in the cluster's configured maximum
    (`maximum`, the resources its autoscaler may reach, None when unknown); else what fits
    in the resources up `now`, when at least one trial does (a cluster of fixed size);
    else `DEFAULT_CONCURRENCY`. An autoscaling cluster that starts from zero nodes has
    nothing up now, so `now` alone would always say one trial.

    >>> from llamaray.config import load_config
    >>> run = load_config(None, ["train.seq_len=512", "train.num_workers=2"])
    >>> sweep_concurrency(run, 6, None, {}, {"CPU": 64.0})[0]
    6
    >>> sweep_concurrency(run, 6, None, {}, None)[0]
    1
    """
    if configured:
        return configured, f"{configured} at a time (sweep.max_concurrent_trials)"
    if maximum:
        trials, warning = trial_concurrency(maximum, run, uses_gpu(run, maximum), n_trials)
        if warning is None:
            return trials, f"{trials} at a time, sized from the cluster's configured maximum"
        return DEFAULT_CONCURRENCY, (
            f"even the cluster's configured maximum cannot hold one trial "
            f"({warning.removeprefix('the cluster has ').split(':')[0]}): running "
            f"{DEFAULT_CONCURRENCY} at a time; trials wait for resources that may never come, "
            "lower train.num_workers or train.cpus_per_worker"
        )
    trials, warning = trial_concurrency(now, run, uses_gpu(run, now), n_trials)
    if warning is None:
        return trials, (
            f"{trials} at a time, sized from the nodes up now (the cluster publishes no "
            "maximum size; set sweep.max_concurrent_trials if it can add nodes)"
        )
    return DEFAULT_CONCURRENCY, (
        f"the nodes up now cannot hold one trial ({warning.split(':')[0]}) and the cluster "
        f"publishes no maximum size (an autoscaling cluster may start with no nodes): running "
        f"{DEFAULT_CONCURRENCY} trial at a time; set sweep.max_concurrent_trials to run more"
    )


def uses_gpu(run: RunConfig, cluster: dict[str, float]) -> bool:
    """The same rule as the pretraining launcher: cuda, or auto on a cluster with GPUs."""
    return run.train.device == "cuda" or (
        run.train.device == "auto" and cluster.get("GPU", 0.0) > 0
    )


def trial_config(
    base: RunConfig,
    sweep_name: str,
    trial_id: str,
    lr: float,
    batch_tokens: int,
    parent_run_id: str | None,
    last_step: int,
) -> RunConfig:
    """Trial `trial_id`'s run: the sweep's base run with its LR and batch size, named
    `<sweep>-<trial id>` (Tune keeps trial ids across a restore, so a restarted trial
    resumes its own checkpoints and MLflow run), nested under the sweep's MLflow run,
    ending at `last_step` (sweep.asha.max_t) on the full schedule. Trials do not export
    their model: the sweep compares hyperparameters; `best.yaml` trains the one to keep.

    >>> from llamaray.config import load_config
    >>> base = load_config(None, ["model.preset=debug", "train.seq_len=32", "train.steps=8"])
    >>> cfg = trial_config(base, "s", "ab_00001", 3e-3, 512, "p1", 4)
    >>> cfg.name, cfg.optimizer.lr, cfg.train.batch_tokens, cfg.train.stop_at_step
    ('s-ab_00001', 0.003, 512, 4)
    """
    doc = base.model_dump()
    doc["name"] = f"{sweep_name}-{trial_id}"
    doc["optimizer"]["lr"] = float(lr)
    doc["train"]["batch_tokens"] = int(batch_tokens)
    doc["train"]["stop_at_step"] = last_step if last_step < base.train.steps else None
    doc["tracking"]["parent_run_id"] = parent_run_id
    doc["tracking"]["export_hf"] = False
    return RunConfig.model_validate(doc)
