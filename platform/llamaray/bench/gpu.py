"""GPU training throughput: tokens/s and MFU of the `1b` preset at sequence length 2048 in
bf16, and the checkpoint stall (how long saving a checkpoint holds up training).

The model is built as a training worker builds it (`train.worker.build_parallel_model`): on
the meta device, each block wrapped in selective activation checkpointing, optionally
compiled, sharded with FSDP2 over more than one rank (bf16 compute copies, fp32 master
weights and gradient reduction; one rank trains the plain model under bf16 autocast, as a
worker group of one does), then materialized on the device. The attention backend is
`auto`: xformers' memory-efficient kernel where it is installed, torch SDPA's flash kernel
otherwise. One step is forward, backward, clip and AdamW update on random tokens (the data
feed is not what is measured); the median of `--steps` timed steps after `--warmup` untimed
ones gives tokens/s, and MFU is that against the device's datasheet peak (`model.flops`).
Then a checkpoint is written twice with the workers' own code: as they write one by default
(`stage_checkpoint` to pinned host memory, then `write_checkpoint` in a
`CheckpointWriter`'s thread while steps go on), where the stall is the staging; and before
the next step (`save_checkpoint`, `train.async_checkpoint=false`), where it is all of it.

Torch alone: no Ray, no config parsing, so it runs on a bare GPU box. It starts a process
group of one rank itself (NCCL on CUDA, gloo on CPU), or joins torchrun's:

    PYTHONPATH=platform python -m llamaray.bench.gpu                 # 1b, seq 2048, bf16
    PYTHONPATH=platform python -m llamaray.bench.gpu --compile --micro-batch 8
    PYTHONPATH=platform python -m llamaray.bench.gpu --device cpu --preset debug \\
        --seq-len 64 --steps 2                                        # a smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist

from llamaray.model import Llama, ModelArgs, get_preset
from llamaray.model.attention import resolve_backend
from llamaray.model.device import pick_device
from llamaray.model.flops import device_peak_flops, mfu, param_count
from llamaray.parallel.activation_checkpoint import MODES, apply_activation_checkpointing
from llamaray.parallel.compile import apply_compile
from llamaray.parallel.fsdp import apply_fsdp, bf16_by_fsdp, step_autocast, worth_sharding
from llamaray.parallel.init import materialize
from llamaray.parallel.mesh import build_mesh, fsdp_mesh
from llamaray.train.checkpoint import (
    TrainState,
    save_checkpoint,
    stage_checkpoint,
    write_checkpoint,
)
from llamaray.train.checkpoint_writer import CheckpointWriter
from llamaray.train.optim import build_optimizer
from llamaray.train.step import train_step


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="1b")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--micro-batch", type=int, default=4, help="rows per step per GPU")
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    parser.add_argument("--device", default="auto", help="auto, cuda or cpu")
    parser.add_argument("--attention", default="auto", help="auto, xformers, sdpa, reference")
    parser.add_argument("--checkpointing", choices=MODES, default="selective")
    parser.add_argument("--compile", action="store_true", help="torch.compile each block")
    parser.add_argument("--steps", type=int, default=10, help="timed steps")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--vocab-size", type=int, default=32000)
    parser.add_argument(
        "--peak-tflops", type=float, default=None,
        help="per-device peak for MFU; default: the datasheet's for this GPU and dtype",
    )  # fmt: skip
    parser.add_argument(
        "--checkpoint-dir", default=None,
        help="where the timed checkpoint goes (removed afterwards); default: a temp folder",
    )  # fmt: skip
    parser.add_argument("--no-checkpoint", action="store_true", help="skip the checkpoint stall")
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    opts = parser.parse_args(argv)
    if opts.steps < 1 or opts.warmup < 0 or opts.micro_batch < 1 or opts.seq_len < 1:
        parser.error("--steps, --micro-batch and --seq-len must be positive, --warmup >= 0")
    return opts


def start_process_group(device: torch.device) -> None:
    """Join torchrun's group when launched by it, else a group of this one process."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    if dist.is_initialized():
        return
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        dist.init_process_group(backend)
    else:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)


def build(args: ModelArgs, opts: argparse.Namespace, device: torch.device):
    """The model as `build_parallel_model` makes it (tensor parallel aside), and its AdamW."""
    mesh = build_mesh(device.type, dist.get_world_size())
    with torch.device("meta"):
        model = Llama(args, attention_backend=opts.attention)
    apply_activation_checkpointing(model, opts.checkpointing)
    if opts.compile:
        apply_compile(model)
    dp = mesh["dp"].size()  # no tensor parallelism here: every rank is data-parallel
    if worth_sharding(dp):
        bf16 = bf16_by_fsdp(opts.dtype, device, dp)
        apply_fsdp(model, fsdp_mesh(mesh), param_dtype=torch.bfloat16 if bf16 else torch.float32)
    materialize(model, device, seed=0)
    return model, build_optimizer(model, get_preset(opts.preset).lr)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run(opts: argparse.Namespace) -> dict:
    """Build, time, checkpoint; return the figures (the same on every rank)."""
    device = pick_device(opts.device, setting="--device")
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    start_process_group(device)
    world, rank = dist.get_world_size(), dist.get_rank()
    base = get_preset(opts.preset).args
    args = base.with_(vocab_size=opts.vocab_size, max_seq_len=max(base.max_seq_len, opts.seq_len))
    torch.manual_seed(rank)
    model, optimizer = build(args, opts, device)
    autocast_dtype = step_autocast(opts.dtype, device, world)  # world = dp: no tp here
    rows = torch.randint(0, args.vocab_size, (opts.micro_batch, opts.seq_len + 1), device=device)
    lr = get_preset(opts.preset).lr

    def step() -> float:
        _sync(device)
        start = time.perf_counter()
        stats = train_step(model, optimizer, [rows], lr, dtype=autocast_dtype)
        _sync(device)
        if not stats.finite:
            raise RuntimeError(f"non-finite loss {stats.loss} in a benchmark step")
        return time.perf_counter() - start

    for _ in range(opts.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = [step() for _ in range(opts.steps)]
    median = statistics.median(times)
    tokens_per_s = world * opts.micro_batch * opts.seq_len / median

    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = opts.peak_tflops * 1e12 if opts.peak_tflops else None
    if peak is None and device.type == "cuda":
        peak = device_peak_flops(device_name, opts.dtype)
    figures = {
        "preset": opts.preset,
        "params": param_count(args),
        "seq_len": opts.seq_len,
        "micro_batch": opts.micro_batch,
        "dtype": opts.dtype,
        "attention": resolve_backend(opts.attention, device),
        "checkpointing": opts.checkpointing,
        "compile": opts.compile,
        "device": device_name,
        "world": world,
        "step_s_median": median,
        "step_s_all": times,
        "tokens_per_s": tokens_per_s,
        "peak_flops_per_device": peak,
        "mfu": mfu(tokens_per_s, args, opts.seq_len, peak * world) if peak else None,
        "max_memory_gb": (
            torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
        ),
    }
    if not opts.no_checkpoint:
        figures |= checkpoint_stall(model, optimizer, opts, step, device)
    return figures


def checkpoint_stall(model, optimizer, opts: argparse.Namespace, step, device) -> dict:
    """How long a checkpoint blocks the loop, written as the workers write one by default
    (`train.async_checkpoint`: staged to host memory, then written by a `CheckpointWriter`
    while steps run) and written before the next step (`save_checkpoint`); with the steps
    run while the background write was in flight."""
    own_folder = opts.checkpoint_dir is None
    root = Path(tempfile.mkdtemp(prefix="llamaray-bench-") if own_folder else opts.checkpoint_dir)
    state = TrainState(step=opts.warmup + opts.steps, world_size=dist.get_world_size())
    writer = CheckpointWriter()
    try:
        _sync(device)
        start = time.perf_counter()
        save_checkpoint(root / "step-sync", model, optimizer, state)
        _sync(device)
        sync_stall = time.perf_counter() - start
        after = step()
        size = sum(p.stat().st_size for p in (root / "step-sync").rglob("*") if p.is_file())

        _sync(device)
        start = time.perf_counter()
        staged = stage_checkpoint(model, optimizer, state)
        _sync(device)
        stall = time.perf_counter() - start
        pending = writer.submit(partial(write_checkpoint, root / "step-async"), staged)
        meanwhile = []
        while True:  # every rank takes as many steps: they agree on when the write is done
            meanwhile.append(step())
            done = torch.tensor([int(pending.done())], device=device)
            dist.all_reduce(done, op=dist.ReduceOp.MIN)
            if done.item():
                break
        writer.wait()
        complete = time.perf_counter() - start
        dist.barrier()
    finally:
        dist.barrier()
        if own_folder:  # one per rank (torchrun): each removes its own
            shutil.rmtree(root, ignore_errors=True)
        elif dist.get_rank() == 0:
            for name in ("step-sync", "step-async"):
                shutil.rmtree(root / name, ignore_errors=True)
    return {
        "checkpoint_stall_s": stall,
        "checkpoint_complete_s": complete,
        "steps_during_checkpoint_s": meanwhile,
        "checkpoint_stall_sync_s": sync_stall,
        "step_after_checkpoint_s": after,
        "checkpoint_gb": size / 1e9,
    }


def report(figures: dict) -> str:
    f = figures
    params = f"{f['params'] / 1e9:.2f}B" if f["params"] >= 1e9 else f"{f['params'] / 1e6:.1f}M"
    lines = [
        f"{f['preset']} ({params} params), seq {f['seq_len']}, micro-batch "
        f"{f['micro_batch']}, {f['dtype']}, attention {f['attention']}, checkpointing "
        f"{f['checkpointing']}, compile {'on' if f['compile'] else 'off'}, "
        f"{f['world']} x {f['device']}",
        f"step time: median {f['step_s_median']:.3f} s over {len(f['step_s_all'])} steps",
        f"throughput: {f['tokens_per_s']:,.0f} tokens/s",
    ]
    if f["mfu"] is None:
        lines.append("MFU: n/a (no datasheet peak for this device; pass --peak-tflops)")
    else:
        lines.append(
            f"MFU: {100 * f['mfu']:.1f}% of {f['peak_flops_per_device'] / 1e12:.0f} TFLOP/s "
            f"per device"
        )
    if f["max_memory_gb"] is not None:
        lines.append(f"peak memory: {f['max_memory_gb']:.1f} GiB")
    if "checkpoint_stall_s" in f:
        during = statistics.median(f["steps_during_checkpoint_s"])
        lines.append(
            f"checkpoint stall: {f['checkpoint_stall_s']:.2f} s in the background (staging "
            f"to host memory; complete after {f['checkpoint_complete_s']:.2f} s, "
            f"{len(f['steps_during_checkpoint_s'])} steps of median {during:.3f} s meanwhile), "
            f"{f['checkpoint_stall_sync_s']:.2f} s written before the next step "
            f"({f['checkpoint_gb']:.2f} GB; the step after it {f['step_after_checkpoint_s']:.3f} s)"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    figures = run(opts)
    if dist.get_rank() == 0:
        print(report(figures), flush=True)
        if opts.json:
            Path(opts.json).write_text(json.dumps(figures, indent=2))
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
