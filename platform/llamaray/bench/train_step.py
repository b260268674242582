"""Training-step throughput: our Llama against Hugging Face's LlamaForCausalLM.

Both models get the same architecture, the same batch, the same loss function and the
same AdamW; one "step" is forward, backward, clip and optimizer update. Rounds alternate
between the two so that drift in machine load hits both alike, and the median step time
is reported. Imports torch (and transformers, when present) only, never Ray, so it runs on
a bare GPU box:

    PYTHONPATH=platform python -m llamaray.bench.train_step --preset tiny
    PYTHONPATH=platform python -m llamaray.bench.train_step --preset 1b --seq-len 2048 \\
        --batch 4 --dtypes bf16 --no-reference --peak-tflops 989   # MFU on one H100
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable

import torch

from llamaray.model import Llama, ModelArgs, get_preset
from llamaray.model.device import pick_device
from llamaray.model.flops import flops_per_token, mfu
from llamaray.parallel.activation_checkpoint import apply_activation_checkpointing
from llamaray.train.optim import build_optimizer
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
    """Median seconds per step for each runner, rounds interleaved."""
    for run in runners.values():
        for _ in range(warmup):
            run()
    times: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(rounds):
        for name, run in runners.items():
            times[name].append(run())
    return {name: statistics.median(ts) for name, ts in times.items()}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--vocab-size", type=int, default=32000, help="the paper's vocabulary")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--dtypes", default="fp32,bf16", help="comma list of fp32, bf16")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps-per-round", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    parser.add_argument("--checkpointing", default="none", choices=["none", "full", "selective"])
    parser.add_argument("--compile", action="store_true", help="also time torch.compile(ours)")
    parser.add_argument("--no-reference", action="store_true", help="skip transformers")
    parser.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU")
    parser.add_argument("--device", default="auto", help="auto: CUDA if available, else CPU")
    parser.add_argument("--json", default=None, help="also write the results here")
    opts = parser.parse_args(argv)

    device = pick_device(opts.device, setting="--device")
    args = get_preset(opts.preset).args.with_(
        vocab_size=opts.vocab_size, max_seq_len=max(opts.seq_len, 16)
    )
    torch.manual_seed(0)
    rows = torch.randint(0, args.vocab_size, (opts.batch, opts.seq_len + 1), device=device)
    tokens_per_step = opts.batch * opts.seq_len
    fpt = flops_per_token(args, opts.seq_len)
    print(
        f"# train step: preset={opts.preset} dim={args.dim} layers={args.n_layers} "
        f"vocab={args.vocab_size} batch={opts.batch}x{opts.seq_len} device={device} "
        f"threads={torch.get_num_threads()} torch={torch.__version__} "
        f"python={platform.python_version()}",
        flush=True,
    )

    results = []
    for dtype in opts.dtypes.split(","):
        ours = Llama(args).to(device)
        apply_activation_checkpointing(ours, opts.checkpointing)
        runners = {"ours": time_steps(ours, rows, dtype, opts.steps_per_round)}
        if opts.compile:
            compiled = torch.compile(Llama(args).to(device))
            runners["ours+compile"] = time_steps(compiled, rows, dtype, opts.steps_per_round)
        reference = None if opts.no_reference else build_reference(args, device)
        if reference is not None:
            runners["hf"] = time_steps(reference, rows, dtype, opts.steps_per_round)
        seconds = measure(runners, opts.rounds, opts.warmup)
        for name, sec in seconds.items():
            row = {
                "dtype": dtype,
                "model": name,
                "step_s": sec,
                "tokens_per_s": tokens_per_step / sec,
                "vs_hf": seconds["hf"] / sec if "hf" in seconds else None,
            }
            if opts.peak_tflops:
                row["mfu"] = mfu(row["tokens_per_s"], args, opts.seq_len, opts.peak_tflops * 1e12)
            results.append(row)
        del ours, runners, reference

    print(f"{'dtype':6} {'model':13} {'step ms':>9} {'tokens/s':>10} {'vs HF':>7} {'MFU':>6}")
    for r in results:
        vs = f"{r['vs_hf']:.2f}x" if r["vs_hf"] else "-"
        used = f"{100 * r['mfu']:.1f}%" if "mfu" in r else "-"
        print(
            f"{r['dtype']:6} {r['model']:13} {1e3 * r['step_s']:9.1f} "
            f"{r['tokens_per_s']:10.0f} {vs:>7} {used:>6}"
        )
    report = {"config": vars(opts), "flops_per_token": fpt, "results": results}
    if opts.json:
        with open(opts.json, "w") as f:
            json.dump(report, f, indent=2)
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
