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


def quiet_warnings() -> None:
    """Ignore the library warnings above (this process); idempotent."""
    warnings.filterwarnings("ignore", message=re.escape(RAY_DATA_FILTER_FN), category=UserWarning)


def is_ray_noise(line: str) -> bool:
    return any(noise in line for noise in RAY_NOISE_LINES)


def quiet_ray() -> None:
    """After `ray.init`: ignore the warnings above, and drop `RAY_NOISE_LINES` from the
    output of Ray's processes that this driver prints. Idempotent; a no-op when Ray does
    not print other processes' output here (`log_to_driver=False`)."""
    quiet_warnings()
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
