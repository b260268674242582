"""What a run shows on the console: our progress lines and real warnings, not the internal
warnings of the libraries under us that a user can do nothing about.

The one place that decides which library output is noise. Each filter names one exact
message, so anything else a library says (a real problem) still gets through.

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

import os
import re
import warnings
from collections.abc import Callable

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
