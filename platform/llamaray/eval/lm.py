"""The scoring primitive of evaluation: log-likelihoods and greedy continuations from a
loaded model. Pure torch and our tokenizer (no Ray, no torch.distributed), so one Ray
actor, a notebook or the lm-evaluation-harness adapter all score the same way.

    >>> lm = LanguageModel.from_pretrained("runs/checkpoints/demo/hf")  # doctest: +SKIP
    >>> lm.loglikelihood([("Question: 2+2?\\nAnswer:", " 4")])  # doctest: +SKIP
    [LoglikelihoodResult(logprob=-1.83, is_greedy=True, n_tokens=2)]

Tokenization of a (context, continuation) pair follows lm-evaluation-harness (HFLM's
`_encode_pair`), so that our scorer and the harness see the same token ids: whitespace at
the end of the context (spaces, newlines) moves to the start of the continuation, the pair
is encoded as one string, and the continuation is what follows the context's own encoding.
Encoding the two separately would give the continuation a different first piece
(SentencePiece's "▁word" versus "word") than the model saw in training.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from llamaray.model import Llama
from llamaray.model.device import pick_device
from llamaray.tokenizer import Tokenizer


@dataclass
class LoglikelihoodResult:
    logprob: float
    """Sum of log p(continuation token | everything before it), natural log."""
    is_greedy: bool
    """Every continuation token is the model's argmax at its position."""
    n_tokens: int
    """Continuation tokens scored."""


class LanguageModel:
    """A single-process model + tokenizer in eval mode, scoring in batches."""

    def __init__(
        self,
        model: Llama,
        tokenizer: Tokenizer,
        *,
        batch_size: int = 16,
        device: str | torch.device | None = None,
        dtype: str = "fp32",
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if dtype not in ("fp32", "bf16"):
            raise ValueError(f"dtype must be fp32 or bf16, got {dtype!r}")
        self.device = torch.device(device) if device else next(model.parameters()).device
        self.model = model.to(self.device).eval()
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.dtype = dtype

    @classmethod
    def from_pretrained(
        cls, path: str | Path, tokenizer_path: str | Path | None = None, **kwargs
    ) -> LanguageModel:
        """A Meta or Hugging Face model folder; the tokenizer defaults to
        `<path>/tokenizer.model` (where `llamaray train` exports it)."""
        tokenizer_path = Path(tokenizer_path or Path(path) / "tokenizer.model")
        if not tokenizer_path.is_file():
            raise FileNotFoundError(f"no tokenizer at {tokenizer_path}; pass tokenizer_path")
        device = pick_device(kwargs.pop("device", None))
        model = Llama.from_pretrained(path, device=device)
        return cls(model, Tokenizer(tokenizer_path), device=device, **kwargs)

    @property
    def max_length(self) -> int:
        return self.model.args.max_seq_len

    # ---- log-likelihoods -------------------------------------------------------------

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """(context ids with bos, continuation ids), split as lm-evaluation-harness does."""
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
        whole = self.tokenizer.encode(context + continuation, bos=True)
        context_ids = self.tokenizer.encode(context, bos=True)
        return whole[: len(context_ids)], whole[len(context_ids) :]

    def loglikelihood(self, requests: Sequence[tuple[str, str]]) -> list[LoglikelihoodResult]:
        """log p(continuation | context) for each (context, continuation) pair."""
        pairs = []
        for i, (context, continuation) in enumerate(requests):
            if not continuation:
                raise ValueError(f"request {i}: the continuation is empty")
            pairs.append(self.encode_pair(context, continuation))
        return self.loglikelihood_tokens(pairs)

    def loglikelihood_tokens(
        self, pairs: Sequence[tuple[list[int], list[int]]]
    ) -> list[LoglikelihoodResult]:
        """Score token-id pairs (context, continuation); the context holds bos if wanted.

        Each pair becomes one row: context + continuation minus the last token as input,
        left-truncated to `max_length` (the continuation is always kept whole). Rows are
        batched longest first with right padding; a causal model's scores at real
        positions do not depend on padding after them, so results equal one-at-a-time
        scoring (tested), and come back in input order.
        """
        rows = []
        for i, (context, continuation) in enumerate(pairs):
            if not continuation:
                raise ValueError(f"pair {i}: no continuation tokens")
            if len(continuation) > self.max_length:
                raise ValueError(
                    f"pair {i}: continuation of {len(continuation)} tokens exceeds the "
                    f"model's max_length={self.max_length}"
                )
            if not context:
                raise ValueError(f"pair {i}: no context token (use bos)")
            tokens = (list(context) + list(continuation))[-(self.max_length + 1) :]
            rows.append((tokens[:-1], len(continuation)))
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
        results: list[LoglikelihoodResult | None] = [None] * len(rows)
        for start in range(0, len(order), self.batch_size):
            batch = [order[j] for j in range(start, min(start + self.batch_size, len(order)))]
            inputs = self._padded([rows[i][0] for i in batch])
            logprobs = self._logprobs(inputs)  # (B, T, vocab)
            for b, i in enumerate(batch):
                inputs_i, n = rows[i]
                end = len(inputs_i)
                # Position p predicts token p + 1: the last n inputs predict the continuation.
                scores = logprobs[b, end - n : end]  # (n, vocab)
                target = torch.tensor(list(pairs[i][1]), device=scores.device)
                picked = scores.gather(1, target[:, None]).squeeze(1)
                results[i] = LoglikelihoodResult(
                    logprob=float(picked.double().sum()),
                    is_greedy=bool((scores.argmax(-1) == target).all()),
                    n_tokens=n,
                )
        return results  # type: ignore[return-value]

    def loglikelihood_rolling(self, texts: Sequence[str]) -> list[float]:
        """Log-likelihood of each whole text (every token scored once, bos as the first
        context), in windows of `max_length` that each condition on as much preceding text
        as fits, as the harness's rolling windows do."""
        pairs: list[tuple[list[int], list[int]]] = []
        owner: list[int] = []
        for i, text in enumerate(texts):
            ids = [self.tokenizer.bos_id, *self.tokenizer.encode(text)]
            for start in range(1, len(ids), self.max_length):
                end = min(start + self.max_length, len(ids))
                context_start = max(0, end - 1 - self.max_length)
                pairs.append((ids[context_start:start], ids[start:end]))
                owner.append(i)
        totals = [0.0] * len(texts)
        for i, result in zip(owner, self.loglikelihood_tokens(pairs), strict=True):
            totals[i] += result.logprob
        return totals

    # ---- generation ------------------------------------------------------------------

    def generate_until(
        self,
        prompts: Sequence[str],
        *,
        max_new_tokens: int = 32,
        stop: Sequence[str] = ("\n",),
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
    ) -> list[str]:
        """Continuation of each prompt, cut before the first stop string: greedy by
        default, else sampled at `temperature` from the `top_p` nucleus (`seed` seeds each
        batch of `batch_size` prompts; the draws of a row depend on its batch)."""
        import dataclasses

        from llamaray.model.generation import SamplingConfig, generate_text

        config = SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p)
        out: list[str] = []
        for start in range(0, len(prompts), self.batch_size):
            if seed is not None:  # one stream per batch: equal prompts in two batches differ
                config = dataclasses.replace(config, seed=batch_seed(seed, start))
            batch = list(prompts[start : start + self.batch_size])
            # Keep room for the new tokens: a prompt that fills the context gets none.
            fitted = [self._fit_prompt(p, max_new_tokens) for p in batch]
            with self._autocast():
                texts = generate_text(self.model, self.tokenizer, fitted, config)
            out += [_cut(text, stop) for text in texts]
        return out

    # ---- internals -------------------------------------------------------------------

    def _fit_prompt(self, prompt: str, max_new_tokens: int) -> str:
        ids = self.tokenizer.encode(prompt, bos=True)
        room = self.max_length - min(max_new_tokens, self.max_length - 1)
        if len(ids) <= room:
            return prompt
        # Drop whole leading tokens (bos re-added by generate_text): the end of the prompt
        # is what the continuation depends on.
        return self.tokenizer.decode(ids[len(ids) - room + 1 :])

    def _padded(self, rows: list[list[int]]) -> torch.Tensor:
        width = max(len(r) for r in rows)
        pad = 0  # any valid id: padded positions come after every scored one
        batch = torch.full((len(rows), width), pad, dtype=torch.long)
        for i, r in enumerate(rows):
            batch[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        return batch.to(self.device)

    def _autocast(self):
        import contextlib

        if self.dtype == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    @torch.inference_mode()
    def _logprobs(self, inputs: torch.Tensor) -> torch.Tensor:
        with self._autocast():
            logits = self.model(inputs)  # (B, T, vocab)
        return F.log_softmax(logits.float(), dim=-1)


def batch_seed(seed: int, index: int | str) -> int:
    """A generator seed for part `index` of a seeded computation (63 bits, torch's range)."""
    import random

    return random.Random(f"{seed}/{index}").getrandbits(63)


def _cut(text: str, stop: Sequence[str]) -> str:
    cut = len(text)
    for s in stop:
        if s and (i := text.find(s)) >= 0:
            cut = min(cut, i)
    return text[:cut]
