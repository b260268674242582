"""Key/value cache for incremental decoding: each step feeds only the new tokens."""

from __future__ import annotations

import torch

from llamaray.model.args import ModelArgs


class KVCache:
    """Preallocated keys and values for every layer, (layers, B, max_seq_len, Hkv, D) each."""

    def __init__(
        self,
        args: ModelArgs,
        batch_size: int,
        max_seq_len: int | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ):
        self.max_seq_len = max_seq_len or args.max_seq_len
        shape = (args.n_layers, batch_size, self.max_seq_len, args.kv_heads, args.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    def update(
        self, layer: int, start_pos: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, T, Hkv, D) at positions start_pos.. and return all keys and values
        so far, (B, start_pos + T, Hkv, D)."""
        end = start_pos + k.shape[1]
        if end > self.max_seq_len:
            raise ValueError(f"KV cache holds {self.max_seq_len} positions; asked for {end}")
        bsz = k.shape[0]
        self.k[layer, :bsz, start_pos:end] = k
        self.v[layer, :bsz, start_pos:end] = v
        return self.k[layer, :bsz, :end], self.v[layer, :bsz, :end]
