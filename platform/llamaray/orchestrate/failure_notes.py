"""`FailureNotes`: a Ray Train callback, run in the controller, that says which worker
failed, at which step and why, each time one does: the line a user looks for when a run
restarts (`train.max_failures`) or ends. It is printed (the controller's output reaches
the driver's console and `ray job logs`) and kept in the run's MLflow run, in the tag
`llamaray.failures`, one line per failure.

Ray Train's own failure message names the worker but not the step, and a hung worker
(`train.hang_timeout_s`, found by the controller's health check) otherwise shows only as
a stalled progress bar until it is declared dead.
"""

from __future__ import annotations

import sys
from concurrent.futures import ThreadPoolExecutor

from ray.train import UserCallback

FAILURES_TAG = "llamaray.failures"
_TAG_CHARS = 5000  # MLflow's limit on a tag's value; the newest lines are kept


class FailureNotes(UserCallback):
    def __init__(
        self, hang_timeout_s: float, tracking_uri: str | None = None, run_id: str | None = None
    ):
        self.hang_timeout_s = hang_timeout_s
        self.tracking_uri, self.run_id = tracking_uri, run_id
        # Reports come when the workers have resumed (the step they start from), then at
        # checkpoints and validations: the last one's step is where a failure came after.
        # None until a (re)started group's first report is taken: a worker that fails
        # within a poll of its start (the controller takes reports every 0.5 s) leaves
        # that report untaken.
        self.last_step: int | None = None
        # Where the workers last resumed (a start report) or could resume from (a
        # registered checkpoint since): what the controller knows of where a restarted
        # group, not yet reported, began. None until this launch has seen either. Only a
        # hint: the workers pass over a checkpoint that fails its integrity check.
        self.resume_point: int | None = None

    def after_report(self, run_context, metrics, checkpoint):
        steps = [m.get("step") for m in metrics if isinstance(m.get("step"), int)]
        if not steps:
            return
        self.last_step = max(steps)
        if any(m.get("started") for m in metrics):
            self.resume_point = self.last_step  # exactly where this group began
        elif checkpoint is not None:
            self.resume_point = max(self.resume_point or 0, self.last_step)

    def after_exception(self, run_context, worker_exceptions):
        for rank, error in sorted(worker_exceptions.items()):
            # The controller's stderr reaches the driver's console (and `ray job logs`);
            # Ray Train's own loggers in the controller go to its log files only.
            note = failure_note(rank, self.last_step, error, self.hang_timeout_s, self.resume_point)
            print(f"[llamaray] {note}", file=sys.stderr, flush=True)
            # Recorded beside the controller's loop, which restarts the group meanwhile;
            # one thread, so the notes are appended in order.
            self._recorder().submit(self._record, note)
        # The group restarts from the newest complete checkpoint, which the workers pick
        # (passing over one that fails its integrity check): unknown here until the new
        # group reports.
        self.last_step = None

    def _recorder(self) -> ThreadPoolExecutor:
        if getattr(self, "_pool", None) is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="failure-notes")
        return self._pool

    def __getstate__(self):  # the callback is pickled into the controller, without a pool
        return {k: v for k, v in self.__dict__.items() if k != "_pool"}

    def _record(self, note: str) -> None:
        """Append `note` to the MLflow run's failures tag; a warning if tracking is away
        (a failure note must never fail the controller)."""
        if not (self.tracking_uri and self.run_id):
            return
        try:
            from llamaray import tracking

            with tracking.bounded_requests():
                client = tracking.client(self.tracking_uri)
                earlier = client.get_run(self.run_id).data.tags.get(FAILURES_TAG, "")
                notes = (earlier + "\n" + note).strip()[-_TAG_CHARS:]
                client.set_tag(self.run_id, FAILURES_TAG, notes)
        except Exception as err:  # the tracking server may be the thing that failed
            print(f"[llamaray] could not record the failure in MLflow: {err}", file=sys.stderr)


def failure_note(
    rank: int,
    last_step: int | None,
    error: BaseException,
    hang_timeout_s: float,
    resume_point: int | None = None,
) -> str:
    """One line: which rank, after which step, and why (a hang says the timeout that ended
    it). The step is the last one every worker reported to Ray Train: the step they
    resumed from, a checkpoint or a validation (logged steps are not reported: they never
    wait on the controller); the failure came after it. The run's MLflow metrics show the
    last step trained. A group that failed before the controller took any report from it
    (`last_step` None) is said to be so, with the newest resume point the controller saw,
    if any: the step a group last started from, or a checkpoint registered since.

    >>> print(failure_note(1, 4, TimeoutError("A worker health check has been hanging"), 5))
    worker rank 1 failed after step 4 (its last checkpoint or validation): it stopped \
answering for over train.hang_timeout_s=5s
    >>> print(failure_note(0, None, RuntimeError("lost"), 5, resume_point=2))
    worker rank 0 failed before its group's first report (the newest resume point seen: \
step 2): lost
    >>> print(failure_note(0, None, RuntimeError("lost"), 5))
    worker rank 0 failed before its group's first report: lost
    """
    why = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if "health check has been hanging" in str(error):
        why = f"it stopped answering for over train.hang_timeout_s={hang_timeout_s:g}s"
    if last_step is not None:
        since = f"after step {last_step} (its last checkpoint or validation)"
    elif resume_point is not None:
        since = (
            f"before its group's first report (the newest resume point seen: step {resume_point})"
        )
    else:
        since = "before its group's first report"
    return f"worker rank {rank} failed {since}: {why}"
