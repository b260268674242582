"""Training-step throughput: our Llama against Hugging Face's LlamaForCausalLM, and
against the machine's own matmul peak.

Both models get the same architecture, the same batch, the same loss function and the
same AdamW; one "step" is forward, backward, clip and optimizer update. Every (preset,
dtype, model) combination is timed in each round, rounds interleaved so that drift in
machine load hits all alike, and the median step time is reported. The fp32 and bf16 peaks
are a 2048^3 matmul measured in the same run (before and after the steps, best taken), and
each row gives its achieved FLOP/s (`model/flops.py`'s count) as a share of the peak of its
dtype. Imports torch (and transformers, when present) only, never Ray, so it runs on a bare
GPU box:

    PYTHONPATH=platform python -m llamaray.bench.train_step            # tiny and small
    PYTHONPATH=platform python -m llamaray.bench.train_step --presets 1b --seq-len 2048 \\
        --batch 4 --dtypes bf16 --no-reference --peak-tflops 989   # MFU on one H100
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable

import torch

from llamaray.bench.kernel_floor import kernel_floor
from llamaray.model import Llama, ModelArgs, get_preset
from llamaray.model.device import pick_device
from llamaray.model.flops import flops_per_token, mfu
from llamaray.parallel.activation_checkpoint import apply_activation_checkpointing
from llamaray.parallel.compile import apply_compile
from llamaray.train.optim import build_optimizer
from llamaray.train.precision import matmul_flops
from llamaray.train.step import train_step


class _HFLoss(torch.nn.Module):
    """LlamaForCausalLM behind our `model(tokens, targets=...) -> loss` call, so both run the
    same step; the loss is HF's own (`shift_labels` = our already-shifted targets)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        # HF computes a loss only when `labels` is given; `shift_labels` then takes precedence.
        return self.model(
            input_ids=tokens, labels=targets, shift_labels=targets.contiguous(), use_cache=False
        ).loss


def build_reference(args: ModelArgs, device: torch.device) -> torch.nn.Module | None:
    """transformers' LlamaForCausalLM with the same architecture, or None if not installed."""
    try:
        from transformers import LlamaConfig, LlamaForCausalLM
    except ImportError:
        return None
    config = LlamaConfig(
        vocab_size=args.vocab_size,
        hidden_size=args.dim,
        intermediate_size=args.ffn_hidden_dim,
        num_hidden_layers=args.n_layers,
        num_attention_heads=args.n_heads,
        num_key_value_heads=args.kv_heads,
        rms_norm_eps=args.norm_eps,
        max_position_embeddings=args.max_seq_len,
        rope_theta=args.rope_theta,
        tie_word_embeddings=False,
        attn_implementation="sdpa",  # its fastest built-in kernel on every device
    )
    return _HFLoss(LlamaForCausalLM(config)).to(device)


def time_steps(
    model: torch.nn.Module, rows: torch.Tensor, dtype: str, steps: int
) -> Callable[[], float]:
    """A closure that runs `steps` training steps and returns seconds per step."""
    optimizer = build_optimizer(model, lr=1e-4)
    device = rows.device

    def run() -> float:
        _sync(device)
        start = time.perf_counter()
        for _ in range(steps):
            train_step(model, optimizer, [rows], lr=1e-4, dtype=dtype)
        _sync(device)
        return (time.perf_counter() - start) / steps

    return run


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(runners: dict[str, Callable[[], float]], rounds: int, warmup: int) -> dict[str, float]:
    """Median seconds per step for each runner, rounds interleaved across all of them."""
    for run in runners.values():
        for _ in range(warmup):
            run()
    times: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(rounds):
        for name, run in runners.items():
            times[name].append(run())
    return {name: statistics.median(ts) for name, ts in times.items()}


# Each preset's batch when the command line gives none: `tiny` as the CPU demo trains it,
# `small` as large as one CPU step should be (a GPU-sized batch would take minutes).
DEFAULT_SHAPES = {"tiny": (8, 256), "small": (2, 512)}


def matmul_peaks(device: torch.device, size: int = 2048) -> dict[str, float]:
    """Best FLOP/s of a size^3 matmul in each dtype: the peak the step is held against."""
    return {
        dtype: matmul_flops(size, dtype, repeats=5, device=device.type)
        for dtype in ("fp32", "bf16")
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--presets", "--preset", default="tiny,small", help="comma list, timed together"
    )
    parser.add_argument("--vocab-size", type=int, default=32000, help="the paper's vocabulary")
    parser.add_argument("--seq-len", type=int, default=None, help="default: per preset")
    parser.add_argument("--batch", type=int, default=None, help="default: per preset")
    parser.add_argument("--dtypes", default="fp32,bf16", help="comma list of fp32, bf16")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps-per-round", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    parser.add_argument("--checkpointing", default="none", choices=["none", "full", "selective"])
    parser.add_argument(
        "--compile", action="store_true", help="also time ours with model.compile (each block)"
    )
    parser.add_argument("--no-reference", action="store_true", help="skip transformers")
    parser.add_argument(
        "--peak-tflops", type=float, default=None, help="device peak; default: measured matmul"
    )
    parser.add_argument("--device", default="auto", help="auto: CUDA if available, else CPU")
    parser.add_argument("--json", default=None, help="also write the results here")
    opts = parser.parse_args(argv)

    device = pick_device(opts.device, setting="--device")
    dtypes = opts.dtypes.split(",")
    print(
        f"# train step: presets={opts.presets} vocab={opts.vocab_size} device={device} "
        f"threads={torch.get_num_threads()} torch={torch.__version__} "
        f"python={platform.python_version()} allocator={_allocator()}",
        flush=True,
    )
    peaks_before = matmul_peaks(device)
    runners: dict[tuple[str, str, str], Callable[[], float]] = {}
    setups = {}
    for preset in opts.presets.split(","):
        batch, seq_len = DEFAULT_SHAPES.get(preset, (8, 256))
        batch, seq_len = opts.batch or batch, opts.seq_len or seq_len
        args = get_preset(preset).args.with_(
            vocab_size=opts.vocab_size, max_seq_len=max(seq_len, 16)
        )
        torch.manual_seed(0)
        rows = torch.randint(0, args.vocab_size, (batch, seq_len + 1), device=device)
        setups[preset] = (args, batch, seq_len)
        # One model per implementation, stepped in every dtype: the work per step is the
        # same, and `small` in four copies would not fit beside the other processes.
        models = {"ours": Llama(args).to(device)}
        apply_activation_checkpointing(models["ours"], opts.checkpointing)
        if opts.compile:
            models["ours+compile"] = Llama(args).to(device)
            apply_compile(models["ours+compile"])
        reference = None if opts.no_reference else build_reference(args, device)
        if reference is not None:
            models["hf"] = reference
        for name, model in models.items():
            for dtype in dtypes:
                runners[(preset, dtype, name)] = time_steps(
                    model, rows, dtype, opts.steps_per_round
                )
    seconds = measure(runners, opts.rounds, opts.warmup)
    floors = {
        (preset, dtype): kernel_floor(*setups[preset], dtype, device)
        for preset in setups
        for dtype in dtypes
    }
    peaks_after = matmul_peaks(device)
    # The best of both measurements: a peak is what the machine can do when least disturbed.
    peaks = {d: max(peaks_before[d], peaks_after[d]) for d in peaks_before}
    if opts.peak_tflops:
        peaks = {d: opts.peak_tflops * 1e12 for d in peaks}
    print(
        "# peak (2048^3 matmul, best of 5, before / after the steps): "
        + ", ".join(
            f"{d} {peaks_before[d] / 1e9:.0f} / {peaks_after[d] / 1e9:.0f} GFLOP/s" for d in peaks
        )
    )
    print(
        "# achieved FLOP/s = tokens/s x (6 N + 12 L d T) (model/flops.py: N non-embedding "
        "parameters incl. the output projection, L layers, d width, T sequence length)"
    )

    results = []
    for (preset, dtype, name), sec in seconds.items():
        args, batch, seq_len = setups[preset]
        tokens_per_s = batch * seq_len / sec
        hf = seconds.get((preset, dtype, "hf"))
        floor = floors[(preset, dtype)]
        results.append(
            {
                "preset": preset,
                "shape": f"{batch}x{seq_len}",
                "dtype": dtype,
                "model": name,
                "step_s": sec,
                "tokens_per_s": tokens_per_s,
                "flops_per_token": flops_per_token(args, seq_len),
                "flops_per_s": tokens_per_s * flops_per_token(args, seq_len),
                "peak_flops": peaks[dtype],
                "of_peak": mfu(tokens_per_s, args, seq_len, peaks[dtype]),
                "vs_hf": hf / sec if hf else None,
                "floor_s": floor.seconds,
                "floor_matmul_s": floor.matmul_s,
                "floor_attention_s": floor.attention_s,
                "floor_matmul_flops_per_s": floor.matmul_flops / floor.matmul_s,
                # The most of the peak any step of these shapes could show.
                "floor_of_peak": mfu(batch * seq_len / floor.seconds, args, seq_len, peaks[dtype]),
            }
        )
    results.sort(key=lambda r: (r["preset"], r["dtype"], r["model"] != "ours", r["model"]))
    print(
        f"{'preset':7} {'shape':7} {'dtype':5} {'model':13} {'step ms':>9} {'tokens/s':>9} "
        f"{'GFLOP/s':>8} {'of peak':>7} {'vs HF':>6}"
    )
    for r in results:
        vs = f"{r['vs_hf']:.2f}x" if r["vs_hf"] else "-"
        print(
            f"{r['preset']:7} {r['shape']:7} {r['dtype']:5} {r['model']:13} "
            f"{1e3 * r['step_s']:9.1f} {r['tokens_per_s']:9.0f} {r['flops_per_s'] / 1e9:8.1f} "
            f"{100 * r['of_peak']:6.1f}% {vs:>6}"
        )
    print(
        "# kernel floor (bench/kernel_floor.py): the step's matmuls at their own shapes (and "
        "their GFLOP/s) and attention forward+backward, best of 5 each, nothing else; "
        "'at most' is the floor's share of the peak, the most any step of this shape could show"
    )
    print(
        f"{'preset':7} {'dtype':5} {'matmul ms':>9} {'GFLOP/s':>8} {'attn ms':>8} "
        f"{'floor ms':>8} {'at most':>7} {'ours':>6} {'compiled':>8}"
    )
    for (preset, dtype), floor in floors.items():
        share = next(
            r["floor_of_peak"] for r in results if (r["preset"], r["dtype"]) == (preset, dtype)
        )
        of_step = [
            f"{floor.seconds / seconds[key]:.0%}" if key in seconds else "-"
            for key in ((preset, dtype, "ours"), (preset, dtype, "ours+compile"))
        ]
        print(
            f"{preset:7} {dtype:5} {1e3 * floor.matmul_s:9.1f} "
            f"{floor.matmul_flops / floor.matmul_s / 1e9:8.0f} {1e3 * floor.attention_s:8.1f} "
            f"{1e3 * floor.seconds:8.1f} {100 * share:6.1f}% {of_step[0]:>6} {of_step[1]:>8}"
        )
    print("# ours / compiled: the floor's share of that step's time (the rest: casts, norms, "
          "rotary, elementwise work, the optimizer)")  # fmt: skip
    above = [f"{p} {d}" for (p, d), f in floors.items() if f.seconds > seconds[(p, d, "ours")]]
    if above:  # the floor is a part of the step: only load while it was timed puts it above
        print(
            f"# WARNING: the floor is above the step for {', '.join(above)}: other work slowed "
            "the floor's kernels; its 'at most' is not valid, rerun on a quiet machine"
        )
    report = {
        "config": vars(opts),
        "peaks": {"before": peaks_before, "after": peaks_after, "used": peaks},
        "results": results,
    }
    if opts.json:
        with open(opts.json, "w") as f:
            json.dump(report, f, indent=2)
    return report


def _allocator() -> str:
    """jemalloc when preloaded (LD_PRELOAD), else the C library's malloc."""
    return "jemalloc" if "jemalloc" in os.environ.get("LD_PRELOAD", "") else "libc"


if __name__ == "__main__":
    main(sys.argv[1:])
