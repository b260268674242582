"""The Ray Tune side of a sweep: the trial function (each trial is the driver of one Ray
Train run, the Train V2 pattern), the callback that hands the workers' validation reports
to Tune, and the progress lines on the sweep driver's console.

Why only validation reports reach Tune: Tune requires every result to carry the metric it
optimizes (`val_loss`), and the workers report every `train.log_every` steps and at
checkpoints, mostly without it. Forwarding just the validated steps keeps the trials'
own logging (MLflow curves, console lines) as configured, where setting `log_every =
eval_every` would coarsen them. The trial's last step is not forwarded either: ASHA stops
any trial that reaches `max_t`, and a stop then would cut off the run's last checkpoint
and MLflow bookkeeping; the trial function reports it itself once `pretrain` returns.
"""

from __future__ import annotations

import math
import time

import ray.tune
from ray.tune.integration.ray_train import TuneReportCallback

from llamaray.config import RunConfig
from llamaray.console import logger

FORWARDED = ("step", "loss", "val_loss", "lr", "tokens_per_s")
"""What a trial's Tune results hold (plus `val_loss/<source>`): what ASHA and the summary
use; the full metrics are in the trial's MLflow run."""


class ValidationReport(TuneReportCallback):
    """Forward rank 0's reports that carry `val_loss`, before `last_step`, to Tune."""

    def __init__(self, last_step: int):
        super().__init__()
        self._last_step = last_step

    def after_report(self, run_context, metrics, checkpoint) -> None:
        first = metrics[0]
        if "val_loss" not in first or first.get("done") or first["step"] >= self._last_step:
            return
        kept = {k: v for k, v in first.items() if k in FORWARDED or k.startswith("val_loss/")}
        super().after_report(run_context, [kept], checkpoint)


def run_trial(
    config: dict, *, base: dict, sweep_name: str, parent_run_id: str, last_step: int
) -> None:
    """One trial: pretrain the base run with `config`'s `lr` and `batch_tokens` under the
    name `<sweep>-<trial id>`, then report its final validation loss to Tune. A run that
    stopped itself on non-finite values (train.nan_policy) is a result, not a crash: it
    is reported with val_loss = inf, so ASHA ranks it last and the summary says diverged."""
    from llamaray.orchestrate.pretrain import TrainingStopped, pretrain
    from llamaray.sweep.config import trial_config

    trial_id = ray.tune.get_context().get_trial_id()
    cfg = trial_config(
        RunConfig.model_validate(base),
        sweep_name,
        trial_id,
        config["lr"],
        config["batch_tokens"],
        parent_run_id,
        last_step,
    )
    try:
        out = pretrain(cfg, callbacks=[ValidationReport(last_step)])
    except TrainingStopped as err:
        step, _ = last_logged(cfg, "loss")
        ray.tune.report({"step": step, "val_loss": math.inf, "diverged": str(err)})
        return
    step, val_loss = out.step, out.metrics.get("val_loss")
    if val_loss is None or step < last_step:
        # The Train run had already finished before a restart of the sweep (the Tune state
        # did not record it yet): its relaunch trained no step and reported no loss.
        step, val_loss = last_logged(cfg, "val_loss")
    ray.tune.report({"step": step, "val_loss": val_loss})


def last_logged(cfg: RunConfig, key: str) -> tuple[int, float | None]:
    """(step, value) of the latest `key` in the run's MLflow history, (0, None) if none."""
    from llamaray.tracking import find_run, metric_history

    run_id = find_run(cfg.tracking.uri, cfg.tracking.experiment, cfg.name)
    if run_id is None:
        return 0, None
    history = metric_history(cfg.tracking.uri, run_id, key)
    if not history:
        return 0, None
    last = max(history, key=lambda m: (m.step, m.timestamp))
    return int(last.step), float(last.value)


log = logger()  # the drivers' lines: [llamaray] ...


class ProgressLines(ray.tune.Callback):
    """Trial started / validated / stopped early / finished lines on the driver's console."""

    def __init__(self, sweep_name: str, last_step: int):
        self._sweep = sweep_name
        self._last_step = last_step
        self._started: dict[str, float] = {}

    def _say(self, trial, msg: str) -> None:
        name = f"{self._sweep}-{trial.trial_id}"
        log.info(f"sweep trial {name}: {msg}")

    def _took(self, trial) -> str:
        start = self._started.get(trial.trial_id)
        return f" after {time.time() - start:.0f} s" if start else ""

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        self._started[trial.trial_id] = time.time()
        c = trial.config
        self._say(trial, f"started: lr {c['lr']:.3g}, {c['batch_tokens']} tokens/step")

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        step = result["step"]
        if step < self._last_step:  # the last one gets its own line below
            self._say(trial, f"step {step}/{self._last_step} val_loss {result['val_loss']:.4f}")

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        r = trial.last_result
        step, val, took = r.get("step", 0), r.get("val_loss"), self._took(trial)
        if val is None:
            self._say(trial, f"ended at step {step} without a validation loss{took}")
        elif not math.isfinite(val):
            self._say(trial, f"diverged at step {step}{took}: {r.get('diverged', '')}")
        elif step < self._last_step:
            self._say(trial, f"stopped early by ASHA at step {step} (val_loss {val:.4f}){took}")
        else:
            self._say(trial, f"finished: val_loss {val:.4f} at step {step}{took}")

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._say(trial, f"failed{self._took(trial)}; the error is in {trial.path}/error.txt")
