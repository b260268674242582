"""`train.dtype: auto`: one function resolves it, by a measured probe on CPU, and the
training worker trains in what it resolves to."""

from __future__ import annotations

import pytest
import torch
from test_learning import text_corpus

from llamaray.config import load_config
from llamaray.model import get_preset
from llamaray.train.launcher import LocalLauncher, ensure_process_group
from llamaray.train.precision import (
    BF16_MIN_SPEEDUP,
    cpu_bf16_speedup,
    matmul_flops,
    resolve_dtype,
)
from llamaray.train.worker import WorkerSpec, run_worker

CPU = torch.device("cpu")


@pytest.mark.parametrize("setting", ["fp32", "bf16"])
def test_explicit_dtypes_are_kept(setting):
    assert resolve_dtype(setting, CPU, 64) == setting


def test_unknown_dtype_is_refused():
    with pytest.raises(ValueError, match="fp16"):
        resolve_dtype("fp16", CPU, 64)


def test_auto_on_cpu_follows_the_probe_which_runs_once_per_width():
    cpu_bf16_speedup.cache_clear()
    speedup = cpu_bf16_speedup(96)
    assert speedup > 0
    expected = "bf16" if speedup >= BF16_MIN_SPEEDUP else "fp32"
    assert resolve_dtype("auto", CPU, 96) == expected
    assert resolve_dtype("auto", CPU, 96) == expected
    info = cpu_bf16_speedup.cache_info()
    assert (info.misses, info.hits) == (1, 2)  # measured once, then remembered


def test_matmul_probe_counts_its_work():
    assert matmul_flops(64, "fp32", rows=32, repeats=1) > 0


def test_config_accepts_auto():
    cfg = load_config(None, ["name=auto", "train.dtype=auto"])
    assert cfg.train.dtype == "auto"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return text_corpus(tmp_path_factory.mktemp("precision"))


@pytest.mark.slow  # a tokenizer, a corpus and three short runs
def test_worker_trains_in_the_dtype_auto_resolves_to(corpus, tmp_path):
    def final_loss(dtype: str) -> float:
        cfg = load_config(None, [
            f"name=dtype-{dtype}", f"output_dir={tmp_path / dtype}", "tracking.enabled=false",
            "model.preset=debug", "train.seq_len=64", "train.batch_tokens=512",
            "train.micro_batch_size=8", "train.num_workers=1", "train.device=cpu",
            "train.steps=2", "train.log_every=1", "train.checkpoint_every=0",
            "data.eval_rows=8", f"train.dtype={dtype}",
        ])  # fmt: skip
        ensure_process_group()  # one gloo rank, never destroyed (see test_checkpoint.py)
        launcher = LocalLauncher(tmp_path / dtype / "checkpoints")
        result = run_worker(WorkerSpec(cfg.model_dump(), str(corpus), cfg.run_uri), launcher)
        assert result.step == 2
        return result.last["loss"]

    resolved = resolve_dtype("auto", CPU, get_preset("debug").args.dim)
    other = "fp32" if resolved == "bf16" else "bf16"
    auto = final_loss("auto")
    assert auto == final_loss(resolved)
    assert auto != final_loss(other)
