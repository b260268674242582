"""The kernel floor of a training step: how long its matmuls and attention take on their
own, at the step's shapes, with nothing else around them.

A step's share of the 2048^3 matmul peak is bounded by what the kernels it calls reach at
its own shapes: a (1024 x 768) x (768 x 768) product does not run at the speed of a
2048^3 one, and attention's kernel has its own speed. The floor times each of the step's
matmuls once per shape (forward, input gradient and weight gradient of every linear
layer; the output projection as the fused loss runs it, `model.loss.chunk_sizes`) and
attention's forward and backward (torch SDPA, causal), best of `repeats`, and sums them
as the model calls them. Casts, norms, rotary, elementwise work and the optimizer are
left out, so no step can be faster than the floor, and `flops / floor / peak` is the
most of the peak a step at these shapes could show.

    >>> from llamaray.model import get_preset
    >>> args = get_preset("debug").args.with_(vocab_size=256)
    >>> floor = kernel_floor(args, batch=1, seq_len=16, dtype="fp32", repeats=1)
    >>> 0 < floor.attention_s < floor.seconds and floor.matmul_s > 0
    True
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from llamaray.model import ModelArgs
from llamaray.model.attention import causal_attention
from llamaray.model.loss import chunk_sizes
from llamaray.train.step import DTYPES


@dataclass(frozen=True)
class KernelFloor:
    matmul_s: float  # every linear layer's three matmuls, and the output projection's
    attention_s: float  # SDPA forward + backward, every layer
    matmul_flops: int  # what those matmuls compute: 6 x tokens x matmul parameters

    @property
    def seconds(self) -> float:
        return self.matmul_s + self.attention_s


def linear_shapes(args: ModelArgs) -> list[tuple[int, int, int]]:
    """(in features, out features, how many per model) of the blocks' linear layers."""
    d, q, kv = args.dim, args.n_heads * args.head_dim, args.kv_heads * args.head_dim
    layers, hidden = args.n_layers, args.ffn_hidden_dim
    return [(d, q, layers), (d, kv, 2 * layers), (q, d, layers), (d, hidden, 2 * layers),
            (hidden, d, layers)]  # fmt: skip


def kernel_floor(
    args: ModelArgs,
    batch: int,
    seq_len: int,
    dtype: str,
    device: torch.device | str = "cpu",
    repeats: int = 5,
) -> KernelFloor:
    """The floor of one step of `batch` x `seq_len` tokens in `dtype` (see the module)."""
    device = torch.device(device)
    kind = DTYPES[dtype]
    tokens = batch * seq_len
    generator = torch.Generator(device=device).manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator, device=device).to(kind)

    def best(fn: Callable[..., object], *inputs: torch.Tensor) -> float:
        return _best_seconds(fn, inputs, repeats, device)

    matmul_s, matmul_flops = 0.0, 0
    for fan_in, fan_out, count in linear_shapes(args):
        x, weight, grad = rand(tokens, fan_in), rand(fan_out, fan_in), rand(tokens, fan_out)
        # Forward, input gradient, weight gradient: nn.Linear's three products.
        matmul_s += count * (
            best(torch.mm, x, weight.T) + best(torch.mm, grad, weight) + best(torch.mm, grad.T, x)
        )
        matmul_flops += count * 3 * 2 * tokens * fan_in * fan_out
    output_s, output_flops = _output_projection(args, tokens, rand, best)
    matmul_s, matmul_flops = matmul_s + output_s, matmul_flops + output_flops

    head_dim = args.head_dim
    q = rand(batch, seq_len, args.n_heads, head_dim).requires_grad_()
    k = rand(batch, seq_len, args.kv_heads, head_dim).requires_grad_()
    v = rand(batch, seq_len, args.kv_heads, head_dim).requires_grad_()
    out_grad = rand(batch, seq_len, args.n_heads, head_dim)

    attention_s = args.n_layers * best(_attention_step, q, k, v, out_grad)
    return KernelFloor(matmul_s, attention_s, matmul_flops)


def _output_projection(args: ModelArgs, tokens: int, rand, best) -> tuple[float, int]:
    """The fused loss's matmuls, (seconds, FLOPs): logits chunk by chunk, both gradients
    group by group."""
    chunk, group = chunk_sizes(args.vocab_size)
    weight = rand(args.vocab_size, args.dim)
    seconds, flops = 0.0, 0
    for size, count in _pieces(tokens, chunk):
        seconds += count * best(torch.mm, rand(size, args.dim), weight.T)
        flops += count * 2 * size * args.dim * args.vocab_size
    for size, count in _pieces(tokens, group):
        hidden, grad = rand(size, args.dim), rand(size, args.vocab_size)
        seconds += count * (best(torch.mm, grad, weight) + best(torch.mm, grad.T, hidden))
        flops += count * 2 * 2 * size * args.dim * args.vocab_size
    return seconds, flops


def _attention_step(q, k, v, out_grad) -> None:
    causal_attention(q, k, v, "sdpa").backward(out_grad)


def _pieces(total: int, size: int) -> list[tuple[int, int]]:
    """`total` cut into pieces of `size`: [(size, how many), (remainder, 1)].

    >>> _pieces(1024, 131)
    [(131, 7), (107, 1)]
    """
    whole, rest = divmod(total, size)
    return [(size, whole)] * (whole > 0) + [(rest, 1)] * (rest > 0)


def _best_seconds(
    fn: Callable[..., object], inputs: tuple, repeats: int, device: torch.device
) -> float:
    fn(*inputs)  # warm-up: first calls pick kernels and fault in pages
    best = math.inf
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn(*inputs)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return best
