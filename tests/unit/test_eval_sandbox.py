"""The code sandbox contains what a generated program may try: a fork bomb, writes outside
its folder, an endless loop, a huge allocation, the network, a huge file, a process that
leaves its group. Each fails that sample only; a correct program still passes after."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from llamaray.eval.code import run_completions
from llamaray.eval.sandbox import (
    SandboxLimits,
    SandboxUnavailable,
    run_program,
    unavailable_reason,
)

pytestmark = pytest.mark.skipif(
    unavailable_reason() is not None, reason=f"no code sandbox: {unavailable_reason()}"
)

QUICK = SandboxLimits(cpu_seconds=1, wall_seconds=3.0, memory_bytes=1 << 30, processes=8)
CORRECT = "def add(a, b):\n    return a + b\nassert add(2, 3) == 5\nprint('ok')\n"


def sandbox_folders() -> set[str]:
    return {p.name for p in Path(os.environ.get("TMPDIR", "/tmp")).glob("llamaray-sample-*")}


def test_a_correct_program_passes_and_a_wrong_one_fails():
    before = sandbox_folders()
    ok = run_program(CORRECT, QUICK)
    assert ok.passed and ok.status == "passed" and ok.stdout == "ok\n"
    bad = run_program("assert 1 + 1 == 3", QUICK)
    assert not bad.passed and bad.status == "failed" and "AssertionError" in bad.stderr
    assert sandbox_folders() == before  # folders removed


@pytest.fixture
def callers_folder():
    """A folder of the caller's outside /tmp (/tmp inside the sandbox is its own folder)."""
    folder = Path(tempfile.mkdtemp(prefix="sandbox-test-", dir=Path.home()))
    yield folder
    shutil.rmtree(folder)


def test_writes_outside_its_folder_are_refused_and_inside_are_removed(callers_folder):
    before = sandbox_folders()
    kept = callers_folder / "kept.txt"
    kept.write_text("mine")
    program = (
        "import os\n"
        "open('inside.txt', 'w').write('x')\n"  # its own folder: allowed
        "open('/tmp/also-inside.txt', 'w').write('x')\n"  # /tmp is its folder
        f"open({str(callers_folder / 'new.txt')!r}, 'w').write('escaped')\n"
    )
    result = run_program(program, QUICK)
    assert not result.passed and "PermissionError" in result.stderr
    for attempt in (f"open({str(kept)!r}, 'w')", f"import os; os.remove({str(kept)!r})"):
        assert "PermissionError" in run_program(attempt, QUICK).stderr
    assert sorted(p.name for p in callers_folder.iterdir()) == ["kept.txt"]
    assert kept.read_text() == "mine"
    for outside in ("/var/tmp/escaped", "/dev/shm/escaped"):
        # An empty tmpfs of the sample's own there: writing may succeed, but nothing
        # reaches the real one.
        run_program(f"open({outside!r}, 'w').write('x')", QUICK)
        assert not Path(outside).exists(), outside
    assert sandbox_folders() == before  # its own folder went with it


def test_an_endless_loop_is_stopped_by_the_cpu_limit_or_the_clock():
    result = run_program("while True:\n    pass\n", QUICK)
    assert not result.passed and result.seconds < QUICK.wall_seconds + 2
    sleeper = run_program("import time\ntime.sleep(60)\n", QUICK)  # no CPU: the clock
    assert sleeper.status == "timeout" and sleeper.seconds < QUICK.wall_seconds + 2


def test_a_fork_bomb_is_held_by_the_process_limit_and_killed_whole():
    bomb = (
        "import os, time\n"
        "while True:\n"
        "    try:\n"
        "        if os.fork() == 0:\n"
        "            os.setsid()\n"  # try to leave the process group that gets killed
        "    except OSError:\n"
        "        time.sleep(0.01)\n"
    )
    result = run_program(bomb, QUICK)
    assert not result.passed
    assert run_program(CORRECT, QUICK).passed  # nothing of the bomb is left in the way


def test_a_huge_allocation_fails_that_sample_only():
    result = run_program("x = bytearray(8 << 30)\n", QUICK)
    assert not result.passed and "MemoryError" in result.stderr


def test_no_network_and_no_huge_files():
    connect = "import socket\nsocket.create_connection(('1.1.1.1', 53), timeout=2)\n"
    result = run_program(connect, QUICK)
    assert not result.passed and "unreachable" in result.stderr
    loopback = "import socket\ns = socket.socket()\ns.connect(('127.0.0.1', 22))\n"
    assert not run_program(loopback, QUICK).passed
    big = SandboxLimits(cpu_seconds=2, wall_seconds=4.0, file_bytes=1 << 16)
    result = run_program("open('big', 'wb').write(b'x' * (1 << 20))\n", big)
    assert not result.passed  # SIGXFSZ / EFBIG past file_bytes


def test_the_environment_is_not_inherited(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "do-not-leak")
    result = run_program("import os\nprint(sorted(os.environ))\n", QUICK)
    assert result.passed and "AWS_SECRET_ACCESS_KEY" not in result.stdout


def test_completions_run_in_parallel_each_in_its_own_sandbox():
    items = [
        {"id": i, "prefix": "def f(x):\n", "test": f"assert f({i}) == {2 * i}"} for i in range(4)
    ]
    completions = [
        "    return 2 * x\n",
        "    return x + x\n",
        "    return x\n",
        "    while 1: pass\n",
    ]
    assert run_completions(items, completions, QUICK, parallel=2) == [True, True, False, False]


def test_bad_limits_are_refused():
    with pytest.raises(ValueError, match="cpu_seconds=0 must be > 0"):
        SandboxLimits(cpu_seconds=0)


def test_an_interpreter_the_sample_cannot_run_is_refused_not_scored_zero(callers_folder):
    hidden = callers_folder / "python"
    hidden.write_text("#!/bin/sh\nexit 0\n")
    hidden.chmod(0o700)  # only the caller may run it
    with pytest.raises(SandboxUnavailable, match="cannot run"):
        run_program("pass", QUICK, python=str(hidden))
