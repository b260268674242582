"""`train.dtype: auto`: one function resolves it, by a measured probe on CPU, and the
training worker trains in what it resolves to."""

from __future__ import annotations

import pytest
import torch
from test_learning import text_corpus

from llamaray.config import ConfigError, load_config
from llamaray.model import get_preset
from llamaray.train import precision
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
    precision._cpu_bf16.cache_clear()
    speedup = cpu_bf16_speedup(96)
    assert speedup > 0
    expected = "bf16" if speedup >= BF16_MIN_SPEEDUP else "fp32"
    assert resolve_dtype("auto", CPU, 96) == expected
    assert resolve_dtype("auto", CPU, 96) == expected
    info = cpu_bf16_speedup.cache_info()
    assert (info.misses, info.hits) == (1, 1)  # measured once, then remembered
    assert precision._cpu_bf16.cache_info().misses == 1  # the ranks agreed once


def _resolve_on_rank(rank: int, port: int, probe: list[float], out) -> None:
    import torch.distributed as dist

    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=len(probe)
    )
    precision.cpu_bf16_speedup = lambda width: probe[rank]  # this rank's measurement
    out.put((rank, resolve_dtype("auto", CPU, 64)))
    dist.destroy_process_group()


@pytest.mark.slow  # two spawned ranks, twice: ~25 s
def test_auto_picks_bf16_only_when_every_rank_measured_it_faster():
    import socket

    import torch.multiprocessing as mp

    for probe, expected in (([3.0, 1.0], "fp32"), ([3.0, 2.0], "bf16")):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        ctx = mp.get_context("spawn")
        out = ctx.Queue()
        procs = [ctx.Process(target=_resolve_on_rank, args=(r, port, probe, out)) for r in range(2)]
        for proc in procs:
            proc.start()
        for proc in procs:
            proc.join(timeout=60)
        assert [proc.exitcode for proc in procs] == [0, 0]
        assert dict(out.get(timeout=5) for _ in procs) == {0: expected, 1: expected}


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


@pytest.mark.slow  # the real worker, twice
def test_a_resume_where_auto_resolves_otherwise_is_refused(corpus, tmp_path, monkeypatch):
    cfg = load_config(None, [
        "name=auto-moved", f"output_dir={tmp_path}", "tracking.enabled=false",
        "model.preset=debug", "train.seq_len=64", "train.batch_tokens=512",
        "train.micro_batch_size=8", "train.num_workers=1", "train.device=cpu",
        "train.steps=2", "train.stop_at_step=1", "data.eval_rows=8", "train.dtype=auto",
    ])  # fmt: skip
    ensure_process_group()
    spec = WorkerSpec(cfg.model_dump(), str(corpus), cfg.run_uri)
    assert run_worker(spec, LocalLauncher(tmp_path / "checkpoints")).step == 1
    width = get_preset("debug").args.dim
    first = resolve_dtype("auto", CPU, width)
    # The relaunch lands on hardware where the probe answers the other way.
    monkeypatch.setattr(precision, "_cpu_bf16", lambda w: first == "fp32")
    resumed = cfg.model_copy(update={"train": cfg.train.model_copy(update={"stop_at_step": None})})
    spec = WorkerSpec(resumed.model_dump(), str(corpus), cfg.run_uri)
    with pytest.raises(ConfigError, match=f"was trained in {first}; set train.dtype: {first}"):
        run_worker(spec, LocalLauncher(tmp_path / "checkpoints"))
