"""Model hyper-parameters and the size presets of the LLaMA paper (table 2).

`ModelArgs` describes the architecture only; how to train a size (learning rate, batch
tokens) sits beside it in `Preset`, because a sweep changes those without changing the
network. Counting parameters builds the model on the meta device, so even 65B costs no
memory.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace


@dataclass(frozen=True)
class ModelArgs:
    """Architecture of a LLaMA model. Defaults are the paper's 7B."""

    dim: int = 4096
    """Width of the residual stream."""
    n_layers: int = 32
    """Number of transformer blocks."""
    n_heads: int = 32
    """Query heads; `dim` must be divisible by it."""
    n_kv_heads: int | None = None
    """Key/value heads (grouped-query attention, LLaMA 2/3 checkpoints). None: same as n_heads."""
    vocab_size: int = 32000
    """Rows of the embedding table and of the output projection."""
    multiple_of: int = 256
    """SwiGLU hidden width is rounded up to a multiple of this (good matmul shapes)."""
    ffn_dim_multiplier: float | None = None
    """Extra factor on the SwiGLU width (LLaMA 2 70B); None for the LLaMA 1 sizes."""
    norm_eps: float = 1e-6
    """RMSNorm epsilon."""
    rope_theta: float = 10000.0
    """Base of the rotary embedding frequencies."""
    max_seq_len: int = 2048
    """Longest sequence the rotary tables are built for (the paper's context length)."""

    def __post_init__(self) -> None:
        problems = self.problems()
        if problems:
            raise ValueError("invalid model arguments:\n" + "\n".join(problems))

    def problems(self) -> list[str]:
        """Every inconsistency as "field: reason", so a config error can list them all."""
        out = []
        for name in ("dim", "n_layers", "n_heads", "vocab_size", "multiple_of", "max_seq_len"):
            if getattr(self, name) <= 0:
                out.append(f"{name}: {getattr(self, name)} must be positive")
        if self.n_heads > 0 and self.dim % self.n_heads:
            out.append(f"n_heads: {self.n_heads} must divide dim={self.dim}")
        elif self.n_heads > 0 and self.head_dim % 2:
            out.append(f"n_heads: dim/n_heads={self.head_dim} must be even for rotary embeddings")
        if self.n_kv_heads is not None and (self.n_kv_heads <= 0 or self.n_heads % self.n_kv_heads):
            out.append(
                f"n_kv_heads: {self.n_kv_heads} must be positive and divide n_heads={self.n_heads}"
            )
        if self.norm_eps <= 0:
            out.append(f"norm_eps: {self.norm_eps} must be positive")
        if self.rope_theta <= 0:
            out.append(f"rope_theta: {self.rope_theta} must be positive")
        return out

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def ffn_hidden_dim(self) -> int:
        """SwiGLU width: 2/3 of 4d (same compute as a 4d ReLU MLP with two matrices),
        optionally scaled, then rounded up to `multiple_of`."""
        hidden = int(2 * (4 * self.dim) / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * math.ceil(hidden / self.multiple_of)

    def to_dict(self) -> dict:
        return asdict(self)

    def with_(self, **changes) -> ModelArgs:
        return replace(self, **changes)

    def not_divisible(self, parts: int, names: tuple[str, ...]) -> list[str]:
        """ "name=size" for each of the named dimensions that `parts` does not divide: what
        stops the model from being split `parts` ways (tensor parallel, Meta's MP shards)."""
        sizes = {
            "n_heads": self.n_heads,
            "n_kv_heads": self.kv_heads,
            "dim": self.dim,
            "ffn_hidden_dim": self.ffn_hidden_dim,
            "vocab_size": self.vocab_size,
        }
        return [f"{n}={sizes[n]}" for n in names if sizes[n] % parts]


@dataclass(frozen=True)
class Preset:
    """A named model size with the paper's training settings for it."""

    name: str
    args: ModelArgs
    lr: float
    """Peak learning rate."""
    batch_tokens: int
    """Tokens per optimizer step (global batch)."""
    description: str = ""
    tags: tuple[str, ...] = field(default=())


_M = 1024 * 1024

PRESETS: dict[str, Preset] = {
    p.name: p
    for p in [
        Preset(
            "debug",
            ModelArgs(dim=64, n_layers=2, n_heads=4, multiple_of=32, max_seq_len=256),
            lr=1e-3,
            batch_tokens=8 * 1024,
            description="unit tests: a forward pass in milliseconds on CPU",
        ),
        Preset(
            "tiny",
            ModelArgs(dim=256, n_layers=4, n_heads=8, multiple_of=64, max_seq_len=512),
            lr=1e-3,
            batch_tokens=32 * 1024,
            description="CPU demo: learns a small corpus in minutes",
        ),
        Preset(
            "small",
            ModelArgs(dim=768, n_layers=12, n_heads=12, max_seq_len=1024),
            lr=6e-4,
            batch_tokens=512 * 1024,
            description="GPT-2-small size: one GPU, or a patient CPU",
        ),
        Preset(
            "1b",
            ModelArgs(dim=2048, n_layers=22, n_heads=16),
            lr=4e-4,
            batch_tokens=2 * _M,
            description="one GPU: MFU benchmark size",
        ),
        Preset("7B", ModelArgs(dim=4096, n_layers=32, n_heads=32), 3.0e-4, 4 * _M, "paper"),
        Preset("13B", ModelArgs(dim=5120, n_layers=40, n_heads=40), 3.0e-4, 4 * _M, "paper"),
        Preset("33B", ModelArgs(dim=6656, n_layers=60, n_heads=52), 1.5e-4, 4 * _M, "paper"),
        Preset("65B", ModelArgs(dim=8192, n_layers=80, n_heads=64), 1.5e-4, 4 * _M, "paper"),
    ]
}


def get_preset(name: str) -> Preset:
    """Look a preset up by name, e.g. `get_preset("7B").args.dim == 4096`."""
    try:
        return PRESETS[name]
    except KeyError:
        raise KeyError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}") from None
