"""The kernel floor of a training step: how long its matmuls and attention take on their
own, at the step's shapes, with nothing else around them.

A step's share of the 2048^3 matmul peak is bounded by what the kernels it calls reach at
its own shapes: a (1024 x 768) x (768 x 768) product does not run at the speed of a
2048^3 one, and attention's kernel has its own speed. The floor times each of the step's
matmuls once per shape (forward, input gradient and weight gradient of every linear
layer; the output projection as the fused loss runs it, `model.loss.chunk_sizes`) and
attention's forward and backward (the model's kernel: SDPA on CPU), best of `repeats`,
and sums them as the model calls them. Casts, norms, rotary, elementwise work and the optimizer are
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
from llamaray.model.attention import causal_attention, resolve_backend
from llamaray.model.loss import chunk_sizes
from llamaray.train.step import DTYPES


@dataclass(frozen=True)
class KernelFloor:
    matmul_s: float  # every linear layer's three matmuls, and the output projection's
    attention_s: float  # SDPA forward + backward, every layer
    matmul_flops: int  # what the products timed compute: 6 x tokens x matmul parameters

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
    attention: str = "auto",
) -> KernelFloor:
    """The floor of one step of `batch` x `seq_len` tokens in `dtype` (see the module),
    with the attention kernel the model would pick (`attention`, as `Llama` takes it)."""
    device = torch.device(device)
    kind = DTYPES[dtype]
    tokens = batch * seq_len
    generator = torch.Generator(device=device).manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator, device=device).to(kind)

    matmuls = _Matmuls(repeats, device)
    for fan_in, fan_out, count in linear_shapes(args):
        x, weight, grad = rand(tokens, fan_in), rand(fan_out, fan_in), rand(tokens, fan_out)
        matmuls.time(count, x, weight.T)  # forward
        matmuls.time(count, grad, weight)  # input gradient
        matmuls.time(count, grad.T, x)  # weight gradient
    # The fused loss's: logits chunk by chunk, both gradients group by group.
    chunk, group = chunk_sizes(args.vocab_size)
    weight = rand(args.vocab_size, args.dim)
    for size, count in _pieces(tokens, chunk):
        matmuls.time(count, rand(size, args.dim), weight.T)
    for size, count in _pieces(tokens, group):
        hidden, grad = rand(size, args.dim), rand(size, args.vocab_size)
        matmuls.time(count, grad, weight)
        matmuls.time(count, grad.T, hidden)

    backend = resolve_backend(attention, device)
    q = rand(batch, seq_len, args.n_heads, args.head_dim).requires_grad_()
    k = rand(batch, seq_len, args.kv_heads, args.head_dim).requires_grad_()
    v = rand(batch, seq_len, args.kv_heads, args.head_dim).requires_grad_()
    out_grad = rand(batch, seq_len, args.n_heads, args.head_dim)
    one_layer = _best_seconds(_attention_step, (q, k, v, out_grad, backend), repeats, device)
    return KernelFloor(matmuls.seconds, args.n_layers * one_layer, matmuls.flops)


class _Matmuls:
    """Times each product once and counts it as often as the step calls it; the FLOPs are
    those of the products timed, so a shape left out shows in the count."""

    def __init__(self, repeats: int, device: torch.device):
        self.repeats, self.device = repeats, device
        self.seconds, self.flops = 0.0, 0

    def time(self, count: int, a: torch.Tensor, b: torch.Tensor) -> None:
        self.seconds += count * _best_seconds(torch.mm, (a, b), self.repeats, self.device)
        self.flops += count * 2 * a.shape[0] * a.shape[1] * b.shape[1]


def _attention_step(q, k, v, out_grad, backend: str) -> None:
    # autograd.grad, not backward: nothing accumulates into q.grad across repeats.
    torch.autograd.grad(causal_attention(q, k, v, backend), (q, k, v), out_grad)


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
