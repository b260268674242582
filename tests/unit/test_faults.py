"""Fault injection (`faults.*`): each fault fires once per run name, however many times the
run restarts, and `faults.kill_at_step` takes several steps. The process really is killed
(SIGKILL) or frozen (SIGSTOP), so each launch runs in a subprocess."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest

from llamaray.config import ConfigError, load_config

LAUNCH = """
import sys
from llamaray.config import load_config
from llamaray.train.faults import maybe_kill
cfg = load_config(None, ["train.num_workers=2", *sys.argv[2:]])
for step in range(1, 7):
    print(step, flush=True)
    maybe_kill(cfg, rank=1, step=step, run_dir=sys.argv[1])
print("done", flush=True)
"""


def launch(run_dir, *overrides, wait=True) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", LAUNCH, str(run_dir), *overrides],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    if wait:
        proc.wait(timeout=60)
    return proc


def test_a_rank_is_killed_at_each_listed_step_once(tmp_path):
    kills = ("faults.kill_rank=1", "faults.kill_at_step=[3, 5]")
    first = launch(tmp_path, *kills)
    assert first.returncode == -signal.SIGKILL and first.stdout.read().split() == ["1", "2", "3"]
    second = launch(tmp_path, *kills)  # the restarted worker gets past step 3, dies at 5
    assert second.returncode == -signal.SIGKILL
    assert second.stdout.read().split() == ["1", "2", "3", "4", "5"]
    third = launch(tmp_path, *kills)
    assert third.returncode == 0 and third.stdout.read().split()[-1] == "done"
    assert sorted(p.name for p in (tmp_path / ".faults").iterdir()) == [
        "killed-rank1-step3", "killed-rank1-step5",
    ]  # fmt: skip
    other_rank = launch(tmp_path / "other", "faults.kill_rank=0", "faults.kill_at_step=3")
    assert other_rank.returncode == 0


def test_a_stopped_rank_stays_frozen_until_killed_and_stops_once(tmp_path):
    stop = ("faults.stop_rank=1", "faults.stop_at_step=2")
    proc = launch(tmp_path, *stop, wait=False)
    deadline = time.monotonic() + 30
    while not (tmp_path / ".faults" / "stopped-rank1-step2").exists():
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.05)
    time.sleep(0.5)
    assert proc.poll() is None  # frozen, not ended: only a timeout can end it
    with open(f"/proc/{proc.pid}/stat") as f:
        assert f.read().split(")")[-1].split()[0] == "T"  # stopped
    proc.kill()
    proc.wait(timeout=10)
    again = launch(tmp_path, *stop)
    assert again.returncode == 0


def test_fault_settings_are_checked_before_any_work():
    with pytest.raises(ConfigError, match=r"faults\.kill_at_step"):
        load_config(None, ["faults.kill_rank=0", "faults.kill_at_step=[3, 0]"])
    with pytest.raises(ConfigError, match=r"faults\.stop_rank: 2 is not a rank of 2"):
        load_config(None, ["train.num_workers=2", "faults.stop_rank=2", "faults.stop_at_step=1"])
    with pytest.raises(ConfigError, match=r"faults\.stop_at_step: set together"):
        load_config(None, ["faults.stop_rank=0"])


def test_failure_notes_count_from_the_resumed_step_and_the_last_report(capsys):
    """Reports come when the workers have resumed, then only at checkpoints and
    validations: a failure's note names the last of them. A group that fails before the
    controller took any report from it is said to, with the newest resume point seen: the
    step a group last started from, or a checkpoint registered since."""
    from llamaray.orchestrate.failure_notes import FailureNotes

    notes = FailureNotes(hang_timeout_s=5)

    def fail() -> str:
        notes.after_exception(None, {1: RuntimeError("lost")})
        return capsys.readouterr().err.strip()

    before_any = "failed before its group's first report"
    assert fail() == f"[llamaray] worker rank 1 {before_any}: lost"  # nothing seen yet
    notes.after_report(None, [{"step": 4, "started": True}], checkpoint=None)
    assert fail() == "[llamaray] worker rank 1 failed after step 4 (its last checkpoint or " \
        "validation): lost"  # fmt: skip
    seen = before_any + " (the newest resume point seen: step {})"
    assert seen.format(4) in fail()  # restarted, not yet reported
    notes.after_report(None, [{"step": 4, "started": True}], checkpoint=None)
    notes.after_report(None, [{"step": 6}], checkpoint=object())
    notes.after_report(None, [{"step": 7, "val_loss": 2.0}], checkpoint=None)
    assert "after step 7 " in fail()
    assert seen.format(6) in fail()  # a validation is no resume point; step 6's is
    # The workers passed over step 6 (damaged): the start report says where they began.
    notes.after_report(None, [{"step": 4, "started": True}], checkpoint=None)
    assert "after step 4 " in fail()
    assert seen.format(4) in fail()


def test_slow_step_waits_the_configured_time_after_each_step(monkeypatch):
    from llamaray.train import faults

    waits = []
    monkeypatch.setattr(faults.time, "sleep", waits.append)
    faults.slow_step(load_config(None, []))
    faults.slow_step(load_config(None, ["faults.slow_step_s=0.75"]))
    assert waits == [0.75]
