"""Causal self-attention kernels behind one switch.

The paper (section 2.4) uses xformers' memory-efficient attention: it never materializes
the T x T score matrix, neither in the forward nor for the backward. On CUDA with xformers
installed we call it; everywhere else torch's `scaled_dot_product_attention`, whose CPU and
CUDA kernels are flash-style and save only the log-sum-exp. `reference` is the textbook
softmax(QK^T)V, kept for tests because it is easy to trust.

All backends take and return (batch, seq, heads, head_dim): the layout the projections
produce and the one xformers wants, so the common path needs no copies.
"""

from __future__ import annotations

import functools
import math
from typing import Literal

import torch
import torch.nn.functional as F

AttentionBackend = Literal["auto", "sdpa", "xformers", "reference"]
BACKENDS: tuple[str, ...] = ("auto", "sdpa", "xformers", "reference")


@functools.cache
def _xformers_ops():
    """xformers' ops module, or None where it does not import (it has no CPU kernels)."""
    try:
        import xformers.ops as xops
    except Exception:  # ImportError, or a build that fails to load its CUDA extension
        return None
    return xops


def xformers_available() -> bool:
    return torch.cuda.is_available() and _xformers_ops() is not None


def resolve_backend(backend: str, device: torch.device) -> str:
    """Turn `auto` into a concrete kernel for `device`; reject impossible requests clearly."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {BACKENDS}")
    if backend == "auto":
        return "xformers" if device.type == "cuda" and xformers_available() else "sdpa"
    if backend == "xformers" and (device.type != "cuda" or _xformers_ops() is None):
        raise RuntimeError(
            "attention backend 'xformers' needs a CUDA device and the xformers package "
            "(pip install 'llamaray[gpu]'); use 'auto' to fall back to torch SDPA"
        )
    return backend


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """Repeat key/value heads for grouped-query attention.

    (B, S, kvh, D) -> (B, S, kvh * n_rep, D)
    """
    if n_rep == 1:
        return x
    b, s, kvh, d = x.shape
    return x[:, :, :, None, :].expand(b, s, kvh, n_rep, d).reshape(b, s, kvh * n_rep, d)


def _bottom_right_causal_mask(q_len: int, kv_len: int, device: torch.device) -> torch.Tensor:
    """Queries are the last q_len positions of the kv_len keys (prefill after a cache)."""
    return torch.ones(q_len, kv_len, dtype=torch.bool, device=device).tril(kv_len - q_len)


def causal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str = "auto"
) -> torch.Tensor:
    """Causal attention of q (B, T, H, D) over k, v (B, S, Hkv, D), S >= T; returns (B, T, H, D).

    When S > T the queries sit at the end of the key sequence (decoding with a KV cache).
    """
    backend = resolve_backend(backend, q.device)
    n_rep = q.shape[2] // k.shape[2]
    k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)
    q_len, kv_len = q.shape[1], k.shape[1]
    if backend == "xformers":
        return _xformers_attention(q, k, v, q_len, kv_len)
    qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, T, D)
    if backend == "sdpa":
        if q_len == kv_len:
            out = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True)
        elif q_len == 1:  # one new token sees every cached position: no mask at all
            out = F.scaled_dot_product_attention(qh, kh, vh)
        else:
            mask = _bottom_right_causal_mask(q_len, kv_len, q.device)
            out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask)
    else:
        out = reference_attention(qh, kh, vh)
    return out.transpose(1, 2)  # (B, T, H, D)


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(QK^T / sqrt(d) + causal mask) V on (B, H, T, D); stores the T x S matrix."""
    q_len, kv_len = q.shape[-2], k.shape[-2]
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])  # (B, H, T, S)
    mask = _bottom_right_causal_mask(q_len, kv_len, q.device)
    scores = scores.float().masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, dim=-1).type_as(q) @ v


def _xformers_attention(q, k, v, q_len: int, kv_len: int) -> torch.Tensor:
    xops = _xformers_ops()
    if q_len == kv_len:
        bias = xops.LowerTriangularMask()
    elif q_len == 1:
        bias = None
    else:
        bias = xops.fmha.attn_bias.LowerTriangularFromBottomRightMask()
    return xops.memory_efficient_attention(q, k, v, attn_bias=bias)
