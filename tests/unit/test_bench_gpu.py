"""`make bench-gpu`'s script, on a CPU with the debug preset: it builds, trains, saves a
checkpoint, and prints every figure it exists to print. The GPU box runs it with torch
alone, so it must not import Ray."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

PLATFORM = Path(__file__).resolve().parents[2] / "platform"


@pytest.mark.slow
def test_cpu_smoke_run_prints_throughput_mfu_and_checkpoint_stall(tmp_path):
    figures_file, checkpoints = tmp_path / "figures.json", tmp_path / "checkpoints"
    checkpoints.mkdir()
    # Ray would be found in this environment; the script must not look for it.
    no_ray = tmp_path / "no_ray"
    (no_ray / "ray").mkdir(parents=True)
    (no_ray / "ray" / "__init__.py").write_text("raise ImportError('no Ray on the GPU box')\n")
    env = os.environ | {"PYTHONPATH": f"{no_ray}{os.pathsep}{PLATFORM}", "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable, "-m", "llamaray.bench.gpu", "--device", "cpu", "--preset", "debug",
        "--seq-len", "64", "--steps", "2", "--warmup", "1", "--micro-batch", "2",
        "--vocab-size", "256", "--peak-tflops", "1", "--json", str(figures_file),
        "--checkpoint-dir", str(checkpoints),
    ]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "tokens/s" in out and "MFU:" in out and "checkpoint stall:" in out, out
    figures = json.loads(figures_file.read_text())
    assert figures["preset"] == "debug" and figures["seq_len"] == 64
    assert figures["checkpointing"] == "selective" and figures["attention"] == "sdpa"
    assert len(figures["step_s_all"]) == 2
    assert figures["tokens_per_s"] == pytest.approx(2 * 64 / figures["step_s_median"])
    assert 0 < figures["mfu"] < 1
    assert figures["checkpoint_stall_s"] > 0 and figures["checkpoint_gb"] > 0
    assert figures["checkpoint_stall_sync_s"] > 0 and figures["steps_during_checkpoint_s"]
    assert f"{figures['tokens_per_s']:,.0f} tokens/s" in out
    # The timed checkpoint is removed afterwards.
    assert list(checkpoints.iterdir()) == []
