"""Instruction/response examples for finetuning: read, template, tokenize, mask, pad.

The data is JSONL, one example a line; `input` is optional and other keys are ignored:

    {"instruction": "Count from 3 to 6.", "response": "3 4 5 6"}
    {"instruction": "Sort the words.", "input": "pear fig", "response": "fig pear"}

An example becomes one row of at most `seq_len + 1` tokens, like a pretraining row:

    tokens   <s> [prompt ..............] [response ........] </s>   (padding)
    labels  -100 -100 ............. -100  response ids ...... eos    -100 ...

The prompt is the template filled with the example (`render_prompt`); prompt and response
are tokenized separately and concatenated, so the boundary between the masked prompt and
the learned response is exact (tokenizing the joined text could merge a piece across it).
Labels are -100 (`IGNORE_INDEX`, what the loss skips) on `<s>`, the prompt and the padding:
only the response and its end-of-sequence token are learned, so the model learns to answer
and to stop. A row longer than `seq_len + 1` is cut at the end (the response loses its tail
and `</s>`: counted as *truncated*); an example whose prompt alone fills the row has no
response token left to learn and is *dropped* (counted, with its file:line).

Examples are kept ragged in memory (`EncodedInstructions`: one flat id array plus offsets)
and padded per micro-batch only to the longest example in it (`micro_batch`).

    >>> examples = read_examples("jobs/data/instructions-demo.jsonl")  # doctest: +SKIP
    >>> encoded = encode_examples(examples, Tokenizer("tok/tokenizer.model"), Template(), 128)
    ... # doctest: +SKIP
    >>> inputs, targets = encoded.micro_batch([0, 1], multiple=8)  # doctest: +SKIP
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

# The templates and their check belong to llamaray.prompts (shared with the config).
from llamaray.prompts import (
    DEFAULT_TEMPLATE,
    DEFAULT_TEMPLATE_WITH_INPUT,
    check_template,
)

IGNORE_INDEX = -100
"""Targets the loss skips; the same value as `llamaray.model.loss.IGNORE_INDEX`."""

FIELDS = ("instruction", "input", "response")
REQUIRED_FIELDS = ("instruction", "response")

_MAX_ERRORS_SHOWN = 20


class InstructionDataError(ValueError):
    """Bad instruction data; the message names each bad `file:line`, its field and why."""


@dataclass(frozen=True)
class Example:
    instruction: str
    response: str
    input: str = ""
    origin: str = ""
    """`file:line` it came from, for messages."""


@dataclass(frozen=True)
class Template:
    """How an example's prompt is written (the response follows it directly)."""

    without_input: str = DEFAULT_TEMPLATE
    """For examples with no `input`; placeholder `{instruction}`."""
    with_input: str = DEFAULT_TEMPLATE_WITH_INPUT
    """For examples with an `input`; placeholders `{instruction}` and `{input}`."""

    def __post_init__(self) -> None:
        check_template(self.without_input, ["instruction"])
        check_template(self.with_input, ["instruction", "input"])

    def render_prompt(self, example: Example) -> str:
        if example.input:
            return self.with_input.format(instruction=example.instruction, input=example.input)
        return self.without_input.format(instruction=example.instruction)


# ------------------------------------------------------------------------------ reading


def parse_example(line: str, origin: str) -> Example:
    """One JSONL line as an Example; InstructionDataError naming `origin` and the field."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise InstructionDataError(
            f"{origin}: not valid JSON ({err.msg} at column {err.colno})"
        ) from None
    if not isinstance(record, dict):
        raise InstructionDataError(
            f"{origin}: expected a JSON object with {', '.join(REQUIRED_FIELDS)}, "
            f"got {type(record).__name__}"
        )
    values = {}
    for name in FIELDS:
        value = record.get(name, "" if name == "input" else None)
        if value is None:
            raise InstructionDataError(
                f"{origin}: {name}: missing (required: instruction, response)"
            )
        if not isinstance(value, str):
            raise InstructionDataError(
                f"{origin}: {name}: must be a string, got {type(value).__name__}"
            )
        if name in REQUIRED_FIELDS and not value.strip():
            raise InstructionDataError(f"{origin}: {name}: empty")
        values[name] = value
    return Example(values["instruction"], values["response"], values["input"], origin)


def read_examples(path: str | Path) -> list[Example]:
    """Every example of a JSONL file (blank lines skipped). Raises InstructionDataError
    listing each bad line as `file:line: field: reason` (the first 20), or naming the file
    when it is missing or holds no example."""
    path = Path(path)
    if not path.is_file():
        raise InstructionDataError(f"{path}: no such file")
    examples: list[Example] = []
    errors: list[str] = []
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            origin = f"{path}:{number}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                errors.append(f"{origin}: not UTF-8 ({err.reason} at byte {err.start})")
                continue
            if not line.strip():
                continue
            try:
                examples.append(parse_example(line, origin))
            except InstructionDataError as err:
                errors.append(str(err))
    if errors:
        shown = errors[:_MAX_ERRORS_SHOWN]
        more = len(errors) - len(shown)
        raise InstructionDataError(
            f"{len(errors)} bad line(s) in {path}:\n  "
            + "\n  ".join(shown)
            + (f"\n  ... and {more} more" if more else "")
        )
    if not examples:
        raise InstructionDataError(f"{path}: no examples (the file is empty)")
    return examples


def split_examples(
    examples: Sequence[Example], fraction: float, seed: int
) -> tuple[list[Example], list[Example]]:
    """(train, held out): a seeded random `fraction` held out, at least one example when
    `fraction` > 0; each part keeps file order."""
    if not 0 <= fraction < 1:
        raise ValueError(f"fraction must be in [0, 1), got {fraction}")
    n_held = min(len(examples) - 1, max(1, round(fraction * len(examples)))) if fraction else 0
    held = set(np.random.default_rng(seed).permutation(len(examples))[:n_held].tolist())
    train = [e for i, e in enumerate(examples) if i not in held]
    return train, [e for i, e in enumerate(examples) if i in held]


# --------------------------------------------------------------------------- tokenizing


class _Tokenizer(Protocol):
    bos_id: int
    eos_id: int

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]: ...


@dataclass
class EncodedInstructions:
    """Tokenized examples, ragged: example i is `ids[offsets[i]:offsets[i + 1]]`, of which
    the first `prompt_lens[i]` tokens (`<s>` and the prompt) carry no loss."""

    ids: np.ndarray
    offsets: np.ndarray
    prompt_lens: np.ndarray
    seq_len: int
    truncated: int = 0
    """Examples whose response was cut to fit `seq_len + 1` tokens."""
    dropped: list[str] = field(default_factory=list)
    """`file:line` of examples left out because the prompt alone filled the row."""

    def __len__(self) -> int:
        return len(self.prompt_lens)

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    @property
    def response_tokens(self) -> np.ndarray:
        """Tokens that carry loss, per example."""
        return self.lengths - self.prompt_lens

    def stats(self) -> dict[str, int]:
        return {
            "examples": len(self),
            "truncated": self.truncated,
            "dropped": len(self.dropped),
            "response_tokens": int(self.response_tokens.sum()),
            "tokens": int(self.lengths.sum()),
            "max_tokens": int(self.lengths.max()) if len(self) else 0,
        }

    def micro_batch(self, indices: Iterable[int], multiple: int = 1) -> tuple[np.ndarray, ...]:
        """(inputs, targets) for examples `indices`: int64 arrays (B, T), T the longest
        example minus one rounded up to `multiple` (at most `seq_len`). Targets are the
        next tokens, IGNORE_INDEX on prompt and padding; padded inputs are 0 (causal
        attention: a pad after an example never reaches its tokens)."""
        idx = np.asarray(list(indices), dtype=np.int64)
        lengths = self.lengths[idx]
        width = int(lengths.max(initial=1)) - 1
        width = min(self.seq_len, -(-max(width, 1) // multiple) * multiple)
        tokens = np.zeros((len(idx), width + 1), dtype=np.int64)
        labels = np.full((len(idx), width + 1), IGNORE_INDEX, dtype=np.int64)
        for row, i in enumerate(idx):
            start, end, prompt = self.offsets[i], self.offsets[i + 1], self.prompt_lens[i]
            tokens[row, : end - start] = self.ids[start:end]
            labels[row, prompt : end - start] = self.ids[start + prompt : end]
        return tokens[:, :-1], labels[:, 1:]

    def to_dict(self) -> dict[str, Any]:
        """Plain data (numpy arrays, ints, strings), to travel to the training workers."""
        return {
            "ids": self.ids,
            "offsets": self.offsets,
            "prompt_lens": self.prompt_lens,
            "seq_len": self.seq_len,
            "truncated": self.truncated,
            "dropped": list(self.dropped),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EncodedInstructions:
        return cls(
            np.asarray(data["ids"]),
            np.asarray(data["offsets"]),
            np.asarray(data["prompt_lens"]),
            int(data["seq_len"]),
            int(data["truncated"]),
            list(data["dropped"]),
        )


def batch_indices(n_rows: int, rows_per_step: int, step: int, seed: int) -> np.ndarray:
    """The examples of finetuning step `step`: epochs are seeded permutations of the
    `n_rows` examples, so the order is a function of the step and a resumed run draws the
    same.

    >>> batch_indices(6, 2, 3, seed=0).tolist() == batch_indices(6, 2, 3, seed=0).tolist()
    True
    >>> sorted(batch_indices(6, 3, 0, 0).tolist() + batch_indices(6, 3, 1, 0).tolist())
    [0, 1, 2, 3, 4, 5]
    """
    epoch_len = n_rows // rows_per_step
    if epoch_len == 0:
        raise ValueError(f"{n_rows} training rows cannot fill one step of {rows_per_step} rows")
    epoch, offset = divmod(step, epoch_len)
    order = np.random.default_rng([seed, epoch]).permutation(n_rows)
    return order[offset * rows_per_step : (offset + 1) * rows_per_step]


def encode_examples(
    examples: Sequence[Example], tokenizer: _Tokenizer, template: Template, seq_len: int
) -> EncodedInstructions:
    """Tokenize `examples` into rows of at most `seq_len + 1` tokens: `<s>`, the rendered
    prompt, the response, `</s>`; the response is cut to fit (counted as truncated), an
    example whose prompt leaves no room for a response token is dropped (listed)."""
    if seq_len < 1:
        raise ValueError(f"seq_len must be positive, got {seq_len}")
    if tokenizer.bos_id < 0 or tokenizer.eos_id < 0:
        raise ValueError("the tokenizer needs <s> and </s> pieces to frame examples")
    ids: list[np.ndarray] = []
    prompt_lens: list[int] = []
    truncated = 0
    dropped: list[str] = []
    row = seq_len + 1
    for example in examples:
        prompt = tokenizer.encode(template.render_prompt(example), bos=True)
        response = tokenizer.encode(example.response, eos=True)
        # The first response token is the target of position len(prompt) - 1: it must be
        # one of the seq_len targets of the row.
        if len(prompt) > seq_len:
            dropped.append(example.origin)
            continue
        tokens = prompt + response
        if len(tokens) > row:
            truncated += 1
            tokens = tokens[:row]
        ids.append(np.asarray(tokens, dtype=np.int32))
        prompt_lens.append(len(prompt))
    lengths = [len(t) for t in ids]
    return EncodedInstructions(
        ids=np.concatenate(ids) if ids else np.empty(0, dtype=np.int32),
        offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
        prompt_lens=np.asarray(prompt_lens, dtype=np.int64),
        seq_len=seq_len,
        truncated=truncated,
        dropped=dropped,
    )
