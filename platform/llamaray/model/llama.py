"""The LLaMA network (Touvron et al. 2023), in plain torch.

Pre-norm transformer: RMSNorm before attention and before the MLP, SwiGLU MLP of width
2/3*4d, rotary position embeddings on queries and keys in every layer, no biases, an
untied output projection. Parameter names are those of Meta's reference implementation,
so its `consolidated.*.pth` files load without renaming.

Nothing here knows about distribution: FSDP, tensor parallelism and activation
checkpointing are applied from the outside (`llamaray.parallel`). Build big models on the
meta device and call `init_weights()` after materializing:

    >>> from llamaray.model import get_preset
    >>> with torch.device("meta"):
    ...     model = Llama(get_preset("7B").args)
    >>> model.to_empty(device="cpu"); model.init_weights()  # doctest: +SKIP
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from llamaray.model.args import ModelArgs
from llamaray.model.attention import BACKENDS, causal_attention
from llamaray.model.kv_cache import KVCache
from llamaray.model.loss import linear_cross_entropy

# ---------------------------------------------------------------------------- rotary


def precompute_rope(head_dim: int, max_seq_len: int, theta: float) -> torch.Tensor:
    """Unit complex numbers e^(i * position * theta^(-2j/d)), (max_seq_len, head_dim // 2)."""
    # Always on CPU, even inside a `torch.device("meta")` build: the table is real data.
    steps = torch.arange(0, head_dim, 2, dtype=torch.float32, device="cpu")
    inv_freq = 1.0 / (theta ** (steps / head_dim))
    positions = torch.arange(max_seq_len, dtype=torch.float32, device="cpu")
    angles = torch.outer(positions, inv_freq)
    return torch.polar(torch.ones_like(angles), angles)  # complex64


def apply_rope(x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    """Rotate each adjacent pair (x[2j], x[2j+1]) of x (B, T, H, D) by its position's angle.

    Pairs are adjacent and rotated as complex numbers, as in Meta's reference; Hugging Face
    pairs the two halves instead and permutes wq/wk rows to compensate (`model.formats`).
    One complex multiply is a single vectorized kernel: on CPU it is ~15x faster than the
    same rotation spelled with strided real views. freqs_cis: (T, D/2) for x's positions.
    """
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))  # (B, T, H, D/2)
    rotated = pairs * freqs_cis[None, :, None, :]  # (B, T, H, D/2)
    return torch.view_as_real(rotated).flatten(-2).type_as(x)  # (B, T, H, D)


# ---------------------------------------------------------------------------- layers


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalize in fp32 even under bf16 autocast: the mean of squares loses too much in bf16.
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return normed.type_as(x) * self.weight


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.kv_heads, args.head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * self.head_dim, args.dim, bias=False)
        self.backend = "auto"

    def forward(
        self,
        x: torch.Tensor,
        freqs_cis: torch.Tensor,
        cache: KVCache | None = None,
        layer: int = 0,
        start_pos: int = 0,
    ) -> torch.Tensor:
        bsz, seq, _ = x.shape
        # Heads as -1: under tensor parallelism each rank holds only its share of them.
        q = self.wq(x).view(bsz, seq, -1, self.head_dim)  # (B, T, H, D)
        k = self.wk(x).view(bsz, seq, -1, self.head_dim)  # (B, T, Hkv, D)
        v = self.wv(x).view(bsz, seq, -1, self.head_dim)  # (B, T, Hkv, D)
        q, k = apply_rope(q, freqs_cis), apply_rope(k, freqs_cis)
        if cache is not None:
            k, v = cache.update(layer, start_pos, k, v)  # (B, start_pos + T, Hkv, D)
        out = causal_attention(q, k, v, self.backend)  # (B, T, H, D)
        return self.wo(out.reshape(bsz, seq, -1))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        hidden = args.ffn_hidden_dim
        self.w1 = nn.Linear(args.dim, hidden, bias=False)  # gate
        self.w2 = nn.Linear(hidden, args.dim, bias=False)  # down
        self.w3 = nn.Linear(args.dim, hidden, bias=False)  # up

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, layer_id: int, args: ModelArgs):
        super().__init__()
        self.layer_id = layer_id
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.attention = Attention(args)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        self.feed_forward = FeedForward(args)

    def forward(self, x, freqs_cis, cache: KVCache | None = None, start_pos: int = 0):
        attn_in = self.attention_norm(x)
        h = x + self.attention(attn_in, freqs_cis, cache, self.layer_id, start_pos)
        return h + self.feed_forward(self.ffn_norm(h))


# ---------------------------------------------------------------------------- init


@dataclass(frozen=True)
class InitRule:
    """How one parameter starts: "ones", "normal" or "trunc_normal" (cut at 3 std)."""

    kind: str
    std: float = 0.0


def init_rule(args: ModelArgs, name: str) -> InitRule:
    """The reference initialization of parameter `name` (Meta's names, e.g.
    "layers.3.attention.wo.weight").

    Projections that write into the residual stream (wo, w2) get a depth-scaled std so the
    stream's variance does not grow with depth (torchtitan's reference init does the same);
    the output projection reads a unit-RMS vector, so std dim^-0.5 gives unit-scale logits.
    """
    parts = name.split(".")
    if parts[-2].endswith("norm"):
        return InitRule("ones")
    if name == "tok_embeddings.weight":
        return InitRule("normal", 0.02)
    if name == "output.weight":
        return InitRule("trunc_normal", args.dim**-0.5)
    if parts[0] == "layers" and parts[-2] in ("wq", "wk", "wv", "wo", "w1", "w2", "w3"):
        layer = int(parts[1])
        writes_residual = parts[-2] in ("wo", "w2")
        std = 0.02 / math.sqrt(2 * (layer + 1)) if writes_residual else 0.02
        return InitRule("trunc_normal", std)
    raise KeyError(f"no init rule for parameter {name!r}")


def init_tensor(tensor: torch.Tensor, rule: InitRule, generator: torch.Generator) -> None:
    """Fill `tensor` in place by `rule`, drawing from `generator`."""
    if rule.kind == "ones":
        nn.init.ones_(tensor)
    elif rule.kind == "normal":
        nn.init.normal_(tensor, std=rule.std, generator=generator)
    else:
        std = rule.std
        nn.init.trunc_normal_(tensor, std=std, a=-3 * std, b=3 * std, generator=generator)


# Wrappers applied from outside (activation checkpointing, torch.compile) insert these into
# parameter names; the init rules and seeds are keyed by the unwrapped names.
_WRAPPER_PARTS = ("_checkpoint_wrapped_module.", "_orig_mod.")


def canonical_name(name: str) -> str:
    """A parameter name with wrapper modules' parts removed."""
    for part in _WRAPPER_PARTS:
        name = name.replace(part, "")
    return name


def param_generator(seed: int, name: str, device: torch.device) -> torch.Generator:
    """A generator for one parameter, keyed by (seed, name): each parameter's values depend
    on nothing else, so a sharded build (each rank filling its slice of a full draw) and a
    one-process build give identical weights."""
    generator = torch.Generator(device=device)
    generator.manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63)
    return generator


# ---------------------------------------------------------------------------- model


class Llama(nn.Module):
    """LLaMA language model: `model(tokens)` maps (batch, seq) token ids to (batch, seq, vocab)
    logits.

    >>> from llamaray.model import get_preset
    >>> model = Llama(get_preset("debug").args.with_(vocab_size=100))
    >>> model(torch.zeros(2, 5, dtype=torch.long)).shape
    torch.Size([2, 5, 100])
    """

    def __init__(self, args: ModelArgs, attention_backend: str = "auto"):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        # A ModuleDict keyed by layer index (not a list) so FSDP wraps each block by name and
        # pipeline stages can drop blocks while keeping checkpoint keys stable.
        self.layers = nn.ModuleDict(
            {str(i): TransformerBlock(i, args) for i in range(args.n_layers)}
        )
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        # A plain attribute, not a buffer: `model.to(torch.bfloat16)` would silently drop the
        # imaginary part of a complex buffer, and a meta-device build would leave it empty.
        # Derived from args, so checkpoints hold only Meta's names. Moved to the input's
        # device on first use.
        self.freqs_cis = precompute_rope(args.head_dim, args.max_seq_len, args.rope_theta)
        self.set_attention_backend(attention_backend)
        if not self.tok_embeddings.weight.is_meta:
            self.init_weights()

    def set_attention_backend(self, backend: str) -> None:
        """Switch every layer's attention kernel: auto, sdpa, xformers or reference."""
        if backend not in BACKENDS:
            raise ValueError(f"unknown attention backend {backend!r}; choose one of {BACKENDS}")
        for block in self.layers.values():
            block.attention.backend = backend

    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> None:
        """The reference initialization (call after `to_empty` on a meta-device build).

        Each parameter draws from its own generator keyed by (`seed`, its name), so the
        weights are the same however the model is later sharded. `seed=None` draws the seed
        from torch's global RNG, so `torch.manual_seed` still decides it.
        """
        if seed is None:
            seed = int(torch.randint(0, 2**31 - 1, ()).item())
        for name, param in self.named_parameters():
            name = canonical_name(name)
            generator = param_generator(seed, name, param.device)
            init_tensor(param, init_rule(self.args, name), generator)

    def forward(
        self,
        tokens: torch.Tensor,
        cache: KVCache | None = None,
        start_pos: int = 0,
        *,
        targets: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(B, T) tokens -> (B, T, vocab) logits; with (B, T) `targets`, the mean next-token
        loss instead, fused with the output projection so the logits are never stored
        (`llamaray.model.loss`). The loss goes through `forward` so wrappers' hooks (FSDP) run."""
        seq = tokens.shape[1]
        if start_pos + seq > self.args.max_seq_len:
            raise ValueError(
                f"positions {start_pos}..{start_pos + seq - 1} exceed max_seq_len="
                f"{self.args.max_seq_len}"
            )
        if self.freqs_cis.device != tokens.device:
            self.freqs_cis = self.freqs_cis.to(tokens.device)
        freqs_cis = self.freqs_cis[start_pos : start_pos + seq]  # (T, D/2)
        h = self.tok_embeddings(tokens)  # (B, T, dim)
        for block in self.layers.values():
            h = block(h, freqs_cis, cache, start_pos)
        h = self.norm(h)
        if targets is None:
            return self.output(h)  # (B, T, vocab)
        # Under tensor parallelism h and the output weight are DTensors, sharded by sequence
        # and by vocab; the fused loss takes plain tensors, so gather both whole. Every rank
        # then computes the same loss, and the gathers' backward keeps each rank's shard of
        # the gradients. Duck-typed: the model imports nothing from torch.distributed.
        weight = self.output.weight
        h, weight = (t.full_tensor() if hasattr(t, "full_tensor") else t for t in (h, weight))
        return linear_cross_entropy(h.flatten(0, 1), weight, targets.flatten())

    def num_params(self, exclude_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - self.tok_embeddings.weight.numel() if exclude_embedding else n

    @classmethod
    def from_pretrained(cls, path: str | Path, **kwargs) -> Llama:
        """Load a Meta checkpoint folder (`params.json` + `consolidated.NN.pth`) or a Hugging
        Face Llama folder (`config.json` + safetensors).

        >>> model = Llama.from_pretrained("checkpoints/llama-7b")  # doctest: +SKIP
        """
        from llamaray.model.formats import load_pretrained

        return load_pretrained(path, **kwargs)
