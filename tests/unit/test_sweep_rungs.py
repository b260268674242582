"""ASHA's rungs survive a sweep driver's restart (llamaray.sweep.rungs), without Ray: the
scheduler and the callback are pickled together as Tune pickles a tuner, and the
callback's state goes through Tune's own save and restore of callback state."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import ray.cloudpickle as pickle
from ray.tune.callback import CallbackList
from ray.tune.schedulers import ASHAScheduler, TrialScheduler

from llamaray.sweep.rungs import KeepRungs, rungs


def scheduler() -> ASHAScheduler:
    return ASHAScheduler(
        time_attr="step", metric="val_loss", mode="min", max_t=16, grace_period=2,
        reduction_factor=2,
    )  # fmt: skip


def report(asha: ASHAScheduler, trial, step: int, val_loss: float) -> str:
    if trial.trial_id not in asha._trial_info:
        asha.on_trial_add(None, trial)
    return asha.on_trial_result(None, trial, {"step": step, "val_loss": val_loss})


def test_a_restored_sweep_stops_the_trial_the_first_driver_would_have(tmp_path):
    good, hopeless = SimpleNamespace(trial_id="good"), SimpleNamespace(trial_id="hopeless")
    asha = scheduler()
    tuner_pkl = pickle.dumps({"scheduler": asha, "callbacks": [KeepRungs(asha)]})
    for step, loss in ((2, 5.0), (4, 4.5), (6, 4.2)):
        assert report(asha, good, step, loss) == TrialScheduler.CONTINUE
    assert [step for step, _ in rungs(asha._brackets[0])] == [16, 8, 4, 2]
    CallbackList([KeepRungs(asha)]).save_to_dir(str(tmp_path))  # the driver dies here

    def resumed(restore_state: bool) -> ASHAScheduler:
        restored = pickle.loads(tuner_pkl)  # Tuner.restore: tuner.pkl, then the state
        assert restored["callbacks"][0].scheduler is restored["scheduler"]
        if restore_state:
            callbacks = CallbackList(restored["callbacks"])
            assert callbacks.can_restore(str(tmp_path))
            callbacks.restore_from_dir(str(tmp_path))
        return restored["scheduler"]

    asha = resumed(restore_state=True)
    assert dict(rungs(asha._brackets[0])) == {16: {}, 8: {}, 4: {"good": -4.5}, 2: {"good": -5.0}}
    # The resumed trial goes on past the rungs it already passed, as before the restart;
    # the next trial is stopped at its first rung, 2, where "good" scored better.
    assert report(asha, good, 8, 3.9) == TrialScheduler.CONTINUE
    assert report(asha, hopeless, 2, 6.2) == TrialScheduler.STOP
    # Without the saved rungs, nothing at rung 2 to compare with: it would have gone on.
    assert report(resumed(restore_state=False), hopeless, 2, 6.2) == TrialScheduler.CONTINUE


def test_rungs_at_other_steps_are_refused():
    saved = KeepRungs(scheduler()).get_state()
    other = ASHAScheduler(
        time_attr="step", metric="val_loss", mode="min", max_t=16, grace_period=4,
        reduction_factor=2,
    )  # fmt: skip
    with pytest.raises(ValueError, match=r"saved rungs are at steps \[\[16, 8, 4, 2\]\]"):
        KeepRungs(other).set_state(saved)
