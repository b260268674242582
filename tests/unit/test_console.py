"""llamaray.console: Ray's internal warnings are dropped, everything else still printed,
once."""

from __future__ import annotations

import os
import warnings

import pytest

from llamaray.console import RAY_DATA_FILTER_FN, quiet_ray, quiet_warnings

PREEMPTION = (
    "[2026-01-01 00:00:00,000 W 1 1] core_worker.cc:1: Actor 'PreemptionWatcher' has "
    "constructor arguments in the object store and max_restarts > 0. If the arguments in "
    "the object store go out of scope or are lost, the actor restart will fail."
)


@pytest.fixture
def printed(monkeypatch):
    """The lines Ray's printer of other processes' output receives on this driver."""
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    monkeypatch.delenv("RAY_TRAIN_ENABLE_PRINT_PATCH", raising=False)  # restored after

    got: list[list[str]] = []
    dispatcher.add_handler("ray_print_logs", lambda data: got.append(data["lines"]))
    yield dispatcher, got
    dispatcher.remove_handler("ray_print_logs")


def test_the_preemption_watcher_warning_is_dropped_and_other_lines_kept(printed):
    dispatcher, got = printed
    quiet_ray()
    quiet_ray()  # idempotent: wrapped once
    dispatcher.emit({"pid": 7, "is_err": True, "lines": ["[train] step 1", PREEMPTION]})
    dispatcher.emit({"pid": 7, "is_err": True, "lines": [PREEMPTION]})
    dispatcher.emit({"pid": 7, "is_err": True, "lines": ["WARNING something real"]})
    assert got == [["[train] step 1"], ["WARNING something real"]]


def test_only_the_named_warning_is_ignored():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_warnings()
        warnings.warn(RAY_DATA_FILTER_FN, UserWarning, stacklevel=1)
        warnings.warn("a real problem", UserWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["a real problem"]


def test_workers_print_once_unless_the_user_chose_otherwise(printed, monkeypatch):
    quiet_ray()
    assert os.environ["RAY_TRAIN_ENABLE_PRINT_PATCH"] == "0"
    monkeypatch.setenv("RAY_TRAIN_ENABLE_PRINT_PATCH", "1")
    quiet_ray()
    assert os.environ["RAY_TRAIN_ENABLE_PRINT_PATCH"] == "1"


def test_our_lines_print_once_in_the_one_format(capsys):
    """llamaray's loggers print `[part] message` to the current stderr, once: not again
    through a handler on the root logger (as Ray or a user may install)."""
    import logging

    from llamaray.console import configure_logging, logger

    seen: list[str] = []

    class Root(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    root_handler = Root()
    logging.getLogger().addHandler(root_handler)
    try:
        configure_logging()
        configure_logging()  # idempotent: still one handler
        logger("train").info("step 1/4")
        logger().warning("no GPU")
        logger("train").debug("not shown at the default level")
    finally:
        logging.getLogger().removeHandler(root_handler)
    assert capsys.readouterr().err == "[train] step 1/4\n[llamaray] warning: no GPU\n"
    assert seen == []
