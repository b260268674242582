"""Autoregressive text generation: greedy, temperature and nucleus (top-p) sampling.

Pure torch, no Ray and no torch.distributed: it runs on any `Llama` (or anything with the
same `model(tokens, cache=None, start_pos=0)` forward and an `args.max_seq_len`).

Prompts of different lengths share one batch the way Meta's reference `generate` does it.
The model has no padding mask and rotary positions are absolute, so left padding would shift
every short prompt's positions and let it attend to pad tokens. Instead prompts are
right-padded into a (B, total_len) buffer and decoding starts at the *shortest* prompt's
length; at each position a row keeps its own prompt token while it still has one and takes
the sampled token afterwards. Every row then sits at the same position at every step, which
is exactly what one shared KV cache needs, and no pad token is ever fed to the model.

    >>> model = Llama(get_preset("debug").args.with_(vocab_size=100))  # doctest: +SKIP
    >>> generate(model, [[1, 5, 7], [1, 9]], SamplingConfig(max_new_tokens=4, temperature=0))
    ... # doctest: +SKIP
    [[12, 40, 3, 3], [77, 2, 2, 2]]
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from llamaray.model.kv_cache import KVCache


@dataclass(frozen=True)
class SamplingConfig:
    """How to pick each new token.

    >>> greedy = SamplingConfig(max_new_tokens=32, temperature=0.0)
    >>> creative = SamplingConfig(max_new_tokens=32, temperature=0.8, top_p=0.95, seed=0)
    """

    max_new_tokens: int = 128
    """Most tokens generated per prompt; fewer when eos comes first or `max_seq_len` is hit."""
    temperature: float = 0.6
    """Divides the logits before the softmax. 0 means greedy (argmax; seed and top_p unused)."""
    top_p: float = 0.9
    """Nucleus sampling: draw only from the smallest set of tokens whose probability mass
    reaches top_p. 1.0 turns it off (plain sampling from the tempered softmax)."""
    seed: int | None = None
    """Seeds a private torch.Generator, so a run is reproducible and the global RNG is left
    untouched. None: draw from torch's global RNG."""
    eos_id: int | None = None
    """A row stops once it generates this token (the token itself is not returned). None: no
    early stop. `generate_text` fills it from the tokenizer when left None."""

    def __post_init__(self) -> None:
        problems = []
        if self.max_new_tokens < 0:
            problems.append(f"max_new_tokens={self.max_new_tokens} must be >= 0")
        if self.temperature < 0:
            problems.append(f"temperature={self.temperature} must be >= 0 (0 = greedy)")
        if not 0 < self.top_p <= 1:
            problems.append(f"top_p={self.top_p} must be in (0, 1] (1 = off)")
        if problems:
            raise ValueError("invalid sampling config: " + "; ".join(problems))


def sample_top_p(
    probs: torch.Tensor, p: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Draw one token per row of `probs` (..., vocab) from its nucleus; returns (...) ids.

    The nucleus is the smallest set of most-probable tokens whose mass reaches `p`: a token is
    kept iff the mass of the tokens ranked above it is still below `p`, so the most probable
    token is always kept (p -> 0 is argmax). The kept probabilities are renormalized.

    >>> probs = torch.tensor([[0.5, 0.25, 0.125, 0.125]])
    >>> int(sample_top_p(probs, 0.75, torch.Generator().manual_seed(0))) in (0, 1)
    True
    """
    sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
    mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
    # `>=` (not Meta's `>`): once the tokens above already reach p, this one is surplus.
    outside = mass_before >= p
    outside[..., 0] = False  # never empty, even for p <= 0 or rounding
    sorted_probs = sorted_probs.masked_fill(outside, 0.0)
    # multinomial normalizes its weights itself, so no explicit renormalization is needed;
    # it only takes 1-D or 2-D input, hence the flatten of any leading dims.
    flat = sorted_probs.reshape(-1, sorted_probs.shape[-1])
    picked = torch.multinomial(flat, num_samples=1, generator=generator)  # (N, 1) sorted ranks
    picked = picked.reshape(*sorted_probs.shape[:-1], 1)
    return torch.gather(order, -1, picked).squeeze(-1)


def _next_token(
    logits: torch.Tensor, config: SamplingConfig, generator: torch.Generator | None
) -> torch.Tensor:
    """(B, vocab) logits of the last position -> (B,) token ids."""
    if config.temperature == 0:
        return logits.argmax(dim=-1)
    # fp32 softmax: a bf16 model's logits would otherwise quantize small probabilities to 0.
    probs = torch.softmax(logits.float() / config.temperature, dim=-1)
    if config.top_p < 1.0:
        return sample_top_p(probs, config.top_p, generator)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)


def generate(
    model: nn.Module,
    prompts: list[list[int]],
    config: SamplingConfig,
    *,
    use_cache: bool = True,
) -> list[list[int]]:
    """Continue each prompt (a list of token ids); return only the new tokens of each.

    Each row gets at most `config.max_new_tokens` tokens, stops early after generating
    `config.eos_id` (which is not returned), and never grows past the model's context:
    prompt + new tokens <= `model.args.max_seq_len`, so a prompt of exactly max_seq_len
    tokens gets no new ones. A prompt longer than that, an empty prompt or an id outside the
    vocabulary raises ValueError. An eos *inside* a prompt does not stop anything.

    With `use_cache` (the default) the shared prefix is prefilled in one forward call and
    every later step feeds one token against a KV cache. `use_cache=False` recomputes the
    whole prefix at every step: quadratic, but an independent reference for tests. Both
    consume the random generator identically, so with the same seed they give the same
    tokens. The model runs in eval mode under `torch.inference_mode()`; its previous
    train/eval mode is restored afterwards.

    >>> model = Llama(get_preset("debug").args.with_(vocab_size=100))  # doctest: +SKIP
    >>> generate(model, [[1, 5, 7], [1, 9]], SamplingConfig(max_new_tokens=3, temperature=0))
    ... # doctest: +SKIP
    [[12, 40, 3], [77, 2, 2]]
    """
    if not prompts:
        return []
    max_seq_len = model.args.max_seq_len
    vocab_size = model.args.vocab_size
    for i, prompt in enumerate(prompts):
        if not prompt:
            raise ValueError(f"prompt {i} is empty; it needs at least one token (e.g. bos)")
        if len(prompt) > max_seq_len:
            raise ValueError(
                f"prompt {i} has {len(prompt)} tokens, more than the model's "
                f"max_seq_len={max_seq_len}; truncate it"
            )
        if min(prompt) < 0 or max(prompt) >= vocab_size:
            raise ValueError(f"prompt {i} has token ids outside [0, vocab_size={vocab_size})")

    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            return _generate(model, prompts, config, use_cache)
    finally:
        model.train(was_training)


def _generate(
    model: nn.Module, prompts: list[list[int]], config: SamplingConfig, use_cache: bool
) -> list[list[int]]:
    param = next(model.parameters())
    device, dtype = param.device, param.dtype
    bsz = len(prompts)
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    min_len = int(lengths.min())
    max_seq_len = model.args.max_seq_len
    # Each row may end at its own position; the buffer only needs to reach the furthest one.
    ends = (lengths + config.max_new_tokens).clamp(max=max_seq_len)  # (B,) exclusive
    total_len = int(ends.max())
    if bool((ends == lengths).all()):
        return [[] for _ in prompts]  # max_new_tokens=0, or every prompt fills the context

    tokens = torch.zeros(bsz, total_len, dtype=torch.long, device=device)
    is_prompt = torch.zeros(bsz, total_len, dtype=torch.bool, device=device)
    for i, prompt in enumerate(prompts):
        tokens[i, : len(prompt)] = torch.tensor(prompt, dtype=torch.long, device=device)
        is_prompt[i, : len(prompt)] = True

    generator = None
    if config.seed is not None and config.temperature > 0:
        generator = torch.Generator(device=device).manual_seed(config.seed)
    # Sized to what this call can reach, not to max_seq_len: a short generation on a big model
    # should not allocate the full context for every layer.
    cache = None
    if use_cache:
        cache = KVCache(model.args, bsz, max_seq_len=total_len, dtype=dtype, device=device)
    eos_hit = torch.zeros(bsz, dtype=torch.bool, device=device)
    prev_pos = 0
    for cur_pos in range(min_len, total_len):
        if cache is not None:
            logits = model(tokens[:, prev_pos:cur_pos], cache=cache, start_pos=prev_pos)
        else:
            logits = model(tokens[:, :cur_pos])
        # Sample for every row, even those still inside their prompt or already finished, so
        # the generator's stream does not depend on which rows are active.
        sampled = _next_token(logits[:, -1], config, generator)
        generated = ~is_prompt[:, cur_pos]
        tokens[:, cur_pos] = torch.where(generated, sampled, tokens[:, cur_pos])
        if config.eos_id is not None:
            eos_hit |= generated & (sampled == config.eos_id)
        prev_pos = cur_pos
        if bool((eos_hit | (cur_pos + 1 >= ends)).all()):
            break  # every row has its eos or its last token: no need to run the model again

    out = []
    for i, row in enumerate(tokens.tolist()):
        new = row[len(prompts[i]) : int(ends[i])]
        if config.eos_id is not None and config.eos_id in new:
            new = new[: new.index(config.eos_id)]
        out.append(new)
    return out


class _Tokenizer(Protocol):
    """What `generate_text` needs; `llamaray.tokenizer.Tokenizer` has it."""

    bos_id: int
    eos_id: int

    def encode(self, text: str, bos: bool = ..., eos: bool = ...) -> list[int]: ...

    def decode(self, ids: list[int]) -> Any: ...


def generate_text(
    model: nn.Module,
    tokenizer: _Tokenizer,
    prompts: list[str],
    config: SamplingConfig,
    *,
    use_cache: bool = True,
) -> list[str]:
    """Encode each prompt (with bos), `generate`, and decode only the continuation.

    Generation stops at the tokenizer's eos unless `config.eos_id` names another token (a
    negative `tokenizer.eos_id`, as sentencepiece reports when it has none, means no stop).

    >>> tok = Tokenizer("tokenizer.model")  # doctest: +SKIP
    >>> generate_text(model, tok, ["The capital of France is"], SamplingConfig(temperature=0))
    ... # doctest: +SKIP
    [' Paris, ...']
    """
    if config.eos_id is None and getattr(tokenizer, "eos_id", None) is not None:
        eos_id = int(tokenizer.eos_id)
        if eos_id >= 0:
            config = dataclasses.replace(config, eos_id=eos_id)
    ids = [tokenizer.encode(text, bos=True, eos=False) for text in prompts]
    new = generate(model, ids, config, use_cache=use_cache)
    return [_continuation(tokenizer, prompt, toks) for prompt, toks in zip(ids, new, strict=True)]


def _continuation(tokenizer: _Tokenizer, prompt: list[int], new: list[int]) -> str:
    # Decoding the new tokens alone would drop the space SentencePiece stores at the start of
    # a piece ("▁is" alone decodes to "is"); decode the whole and cut the prompt's text off.
    head = tokenizer.decode(prompt)
    whole = tokenizer.decode(prompt + new)
    return whole[len(head) :] if whole.startswith(head) else tokenizer.decode(new)
