"""What a run shows on the console: our progress lines and real warnings, not the internal
warnings of the libraries under us that a user can do nothing about.

Our own lines go through `logging`, under the logger "llamaray", in one format set here:
`[part] message` (`[prepare] ...`, `[train] step ...`, `[llamaray] ...` for the drivers),
with `warning: ` before a warning. `logger(part)` gives a module its logger and installs
the one handler on first use, in every process that logs (driver, Ray Train workers, Tune
trials), so nobody has to remember to configure it. The handler writes to the process's
current `sys.stderr`; Ray forwards a worker's stderr to the driver, and the "llamaray"
logger does not propagate, so a line printed by a worker reaches the driver once even
where Ray or the user has put a handler on the root logger.

This module is also the one place that decides which library output is noise. Each filter
names one exact message, so anything else a library says (a real problem) still gets through.

    >>> import warnings
    >>> with warnings.catch_warnings(record=True) as caught:
    ...     warnings.simplefilter("always")
    ...     quiet_warnings()
    ...     warnings.warn(RAY_DATA_FILTER_FN)
    >>> caught
    []
    >>> is_ray_noise("(TrainController pid=1) [core_worker.cc:1] Actor 'PreemptionWatcher' "
    ...              "has constructor arguments in the object store and max_restarts > 0.")
    True
"""

from __future__ import annotations

import logging
import os
import re
import sys
import warnings
from collections.abc import Callable

LOGGER = "llamaray"  # the root of our loggers; its children are named by part

# Ray Data warns on every `Dataset.filter(fn)` that an expression would be faster; the
# filters we run are cheap next to tokenizing, and the warning repeats on every prepare.
RAY_DATA_FILTER_FN = "Use 'expr' instead of 'fn' when possible for performant filters."

# Lines Ray's own processes print that the driver would echo (`log_to_driver`). Ray Train's
# controller starts its PreemptionWatcher actor with the workers' handles as arguments and
# `max_restarts=-1`, and Ray core warns about that pairing on every launch
# (ray-project/ray#53727): Ray Train's choice, nothing a run can change.
RAY_NOISE_LINES = ("has constructor arguments in the object store and max_restarts > 0",)

# Ray Train replaces `print` in its workers with one that logs the line to Train's logger
# (shown on the console) and, when Ray has wrapped sys.stdout as it does in workers, prints
# it as well: every printed line of a worker reached the driver twice. Off, a print is
# printed once. Ray Train passes this variable from the driver to its workers.
RAY_TRAIN_PRINT_PATCH = "RAY_TRAIN_ENABLE_PRINT_PATCH"


# urllib3 warns at every retry of a request ("Retrying (Retry(total=1, ...)) after
# connection broken by ...: /api/2.0/mlflow/runs/log-batch"): while the tracking server is
# away, rank 0's sender would print that at every attempt. The sender says the outage and
# the recovery once each instead (`tracking.MetricLogger`); other requests' retries still show.
URLLIB3_RETRY = "Retrying ("
MLFLOW_API = "/api/"


class _MlflowRetries(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith(URLLIB3_RETRY):
            return True
        url = str(record.args[-1]) if isinstance(record.args, tuple) and record.args else ""
        return not (url.startswith(MLFLOW_API) and "mlflow" in url)


def quiet_mlflow_retries() -> None:
    """Drop urllib3's per-retry warnings about MLflow's REST requests (this process);
    idempotent."""
    pool = logging.getLogger("urllib3.connectionpool")
    if not any(isinstance(f, _MlflowRetries) for f in pool.filters):
        pool.addFilter(_MlflowRetries())


def quiet_warnings() -> None:
    """Ignore the library warnings above (this process); idempotent."""
    warnings.filterwarnings("ignore", message=re.escape(RAY_DATA_FILTER_FN), category=UserWarning)


def is_ray_noise(line: str) -> bool:
    return any(noise in line for noise in RAY_NOISE_LINES)


def quiet_ray() -> None:
    """On a driver, after `ray.init` and before launching training: ignore the warnings
    above, have Ray Train's workers print each line once (unless RAY_TRAIN_ENABLE_PRINT_PATCH
    is set), and drop `RAY_NOISE_LINES` from the output of Ray's processes that this driver
    prints (when it prints them: `log_to_driver`). Idempotent."""
    quiet_warnings()
    os.environ.setdefault(RAY_TRAIN_PRINT_PATCH, "0")
    try:  # Ray's printer of other processes' output; private, so checked, not assumed
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:
        return
    with dispatcher._lock:
        dispatcher.handlers = [
            (name, _drop_noise(handler)) if name == "ray_print_logs" else (name, handler)
            for name, handler in dispatcher.handlers
        ]


def _drop_noise(handler: Callable[[dict], None]) -> Callable[[dict], None]:
    if getattr(handler, "drops_ray_noise", False):
        return handler

    def filtered(data: dict) -> None:
        lines = [line for line in data.get("lines", ()) if not is_ray_noise(line)]
        if lines:
            handler(dict(data, lines=lines))

    filtered.drops_ray_noise = True
    return filtered


# ---- our own lines ------------------------------------------------------------------------


class _Stderr(logging.StreamHandler):
    """The process's current `sys.stderr` at each line (as logging's last-resort handler
    does), so a line goes where stderr goes now: Ray's worker log, pytest's capture."""

    def __init__(self) -> None:
        logging.Handler.__init__(self)

    @property
    def stream(self):
        return sys.stderr


class _Format(logging.Formatter):
    """`[part] message`: the logger's name without the leading "llamaray." (the drivers'
    own logger prints as `[llamaray]`), and `warning: ` or `error: ` before such a line."""

    def format(self, record: logging.LogRecord) -> str:
        part = record.name.removeprefix(f"{LOGGER}.")
        level = f"{record.levelname.lower()}: " if record.levelno >= logging.WARNING else ""
        return f"[{part}] {level}{record.getMessage()}" + (
            "\n" + self.formatException(record.exc_info) if record.exc_info else ""
        )


def configure_logging(level: int = logging.INFO) -> logging.Logger:
    """Give the "llamaray" logger its one handler and format (idempotent); returns it."""
    root = logging.getLogger(LOGGER)
    if not any(isinstance(h, _Stderr) for h in root.handlers):
        handler = _Stderr()
        handler.setFormatter(_Format())
        root.addHandler(handler)
        root.setLevel(level)
        root.propagate = False  # printed by our handler only: each line once
    return root


def logger(part: str = LOGGER) -> logging.Logger:
    """The logger of one part of llamaray, printed as `[part] message`.

    >>> import contextlib, io
    >>> with contextlib.redirect_stderr(io.StringIO()) as err:
    ...     logger("prepare").info("reading 2 source(s)")
    ...     logger().warning("no GPU")
    >>> print(err.getvalue(), end="")
    [prepare] reading 2 source(s)
    [llamaray] warning: no GPU
    """
    configure_logging()
    return logging.getLogger(LOGGER if part == LOGGER else f"{LOGGER}.{part}")
