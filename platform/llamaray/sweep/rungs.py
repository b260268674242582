"""ASHA's rungs saved with the sweep, so a resumed sweep stops the trials that an
uninterrupted one would have stopped.

Tune saves its search algorithm's state and its callbacks' state with the experiment (in
the sweep's storage, every `TUNE_GLOBAL_CHECKPOINT_S`), but not its scheduler's. A sweep
whose driver died and was submitted again therefore got an ASHA with empty rungs: a trial
reaching a rung found nothing recorded there to be compared with and went on, so the
resumed sweep spent whole trials on learning rates the first driver would have stopped at
their first rung. `KeepRungs` is a Tune callback whose state is the scheduler's rungs.

Why a callback that points at the scheduler works after `Tuner.restore`: the tuner keeps
its `TuneConfig` (the scheduler) and its `RunConfig` (the callbacks) in one pickle,
`tuner.pkl`, so the restored callback points at the restored scheduler, the one the new
controller uses; the controller restores the callbacks' state before it resumes a trial.

A rung's record is a trial's first result at or past the rung's step, whatever the other
trials did, so the saved rungs are exactly what the first driver would have gone on with.
"""

from __future__ import annotations

import ray.tune
from ray.tune.schedulers import AsyncHyperBandScheduler


class KeepRungs(ray.tune.Callback):
    """Saves and restores `scheduler`'s rungs (step -> {trial id: score}) with the
    experiment's state."""

    def __init__(self, scheduler: AsyncHyperBandScheduler):
        self.scheduler = scheduler

    def get_state(self) -> dict:
        return {"brackets": [rungs(bracket) for bracket in self.scheduler._brackets]}

    def set_state(self, state: dict) -> None:
        saved = state["brackets"]
        brackets = self.scheduler._brackets
        milestones = [[step for step, _ in bracket] for bracket in saved]
        current = [[step for step, _ in rungs(bracket)] for bracket in brackets]
        if milestones != current:
            # The sweep config is checked against the parent run's before a resume, so this
            # is a Tune that builds its brackets differently. Ranking trials at other steps
            # would silently change which are stopped: refuse instead.
            raise ValueError(
                f"ASHA's saved rungs are at steps {milestones}, this scheduler's at {current}"
            )
        for bracket, rungs_saved in zip(brackets, saved, strict=True):
            for (_, recorded), (_, scores) in zip(bracket._rungs, rungs_saved, strict=True):
                recorded.clear()
                recorded.update(scores)


def rungs(bracket) -> list[tuple[int, dict[str, float]]]:
    """(step, {trial id: score}) of each rung of an ASHA bracket, highest step first (as
    Tune keeps them). The scores are Tune's: the metric signed so that higher is better."""
    return [(int(step), dict(recorded)) for step, recorded in bracket._rungs]
