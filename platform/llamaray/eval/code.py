"""Code benchmarks: a completion becomes a program with the problem's tests, run in the
sandbox; it passes when the program exits 0.

An item of a code task (`benchmarks.read_humaneval`, `read_mbpp`) holds `question` (the
prompt the model continues), `prefix` (the text the completion is appended to: HumanEval's
prompt, the function signature and docstring; nothing for MBPP, whose completion is the
whole function) and `test` (the checks run after it: HumanEval's `check(entry_point)`,
MBPP's asserts).

    >>> item = {"id": 0, "prefix": "def add(a, b):\\n", "test": "assert add(1, 2) == 3"}
    >>> program(item, "    return a + b\\n")
    'def add(a, b):\\n    return a + b\\n\\n\\n\\nassert add(1, 2) == 3\\n'
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

from llamaray.eval.sandbox import SandboxLimits, run_program


def program(item: dict, completion: str) -> str:
    """The program that decides whether `completion` solves `item`."""
    return item["prefix"] + completion + "\n\n\n" + item["test"] + "\n"


def run_completions(
    items: Sequence[dict],
    completions: Sequence[str],
    limits: SandboxLimits | None = None,
    parallel: int | None = None,
) -> list[bool]:
    """Whether each (item, completion) pair passes, in order. The programs run `parallel`
    at a time (default: the CPUs this process may use), each in its own sandbox."""
    parallel = parallel or max(1, len(os.sched_getaffinity(0)))
    programs = [program(i, c) for i, c in zip(items, completions, strict=True)]
    with ThreadPoolExecutor(parallel) as pool:  # threads wait on subprocesses
        results = list(pool.map(lambda code: run_program(code, limits), programs))
    return [r.passed for r in results]


RunCode = Callable[[list[dict], list[str]], list[bool]]
"""Runs (item, completion) pairs, returns pass/fail in order: `run_completions` here, or
the runner's, which runs them on the Scorer actors' nodes."""


def score_completions(
    items: Sequence[dict], completions: Sequence[str], run_code: RunCode | None = None
) -> list[dict]:
    """Per item: id, completion, passed (one completion per item)."""
    passed = (run_code or run_completions)(list(items), list(completions))
    return [
        {"id": item["id"], "completion": completion, "passed": ok}
        for item, completion, ok in zip(items, completions, passed, strict=True)
    ]
