"""Evaluation tasks from local files: a folder with `task.yaml` and JSONL splits.

    my-task/
      task.yaml        name, type, prompt template, normalization, shots
      train.jsonl      items that k-shot prompts are drawn from
      test.jsonl       items that are scored

Multiple-choice item:  {"id": "q1", "question": "...", "choices": ["a", "b"], "answer": 1}
Free-form item:        {"id": "q2", "question": "...", "answers": ["Paris", "paris, france"]}

`task.yaml`:

    name: capitals
    type: multiple_choice            # or free_form
    template: "Question: {question}\\nAnswer:"
    normalization: chars             # chars | answer | none (multiple choice)
    num_fewshot: 0
    fewshot_split: train
    eval_split: test
    max_new_tokens: 16               # free form
    stop: ["\\n"]                    # free form

The continuation scored for a choice is `target_delimiter + choice` (" " by default), and
shots are joined by `fewshot_delimiter` ("\\n\\n"), which is how lm-evaluation-harness
builds its multiple-choice requests; the same task exported to the harness gives the same
strings. Nothing is downloaded: a bad line is an error naming `file:line` and the field.

The paper's benchmarks, in the files they are published in, are read by
`llamaray.eval.benchmarks` into the same `Task`; the fields below that only they use
(`description`, `fewshot_sampler`, `fewshot_group`, `answer_format`, per-choice
`contexts`) are also open to task folders.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class TaskSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    type: Literal["multiple_choice", "free_form", "code"] = Field(
        description="multiple_choice: scored by log-likelihood; free_form: a generated "
        "answer compared with the gold ones; code: a generated program run against tests "
        "(benchmarks only: HumanEval, MBPP)."
    )
    template: str = Field("Question: {question}\nAnswer:", description="Formats an item.")
    normalization: Literal["chars", "answer", "none"] = Field(
        "chars",
        description="Multiple choice: chars = log-likelihood per character of the choice "
        "(the paper's default); answer = log p(choice | prompt) - log p(choice | "
        "answer_context) (the paper's rule for OpenBookQA and BoolQ); none = raw "
        "log-likelihood.",
    )
    description: str = Field(
        "",
        description="Text before the shots and the prompt, formatted with the item "
        "(MMLU: 'The following are multiple choice questions (with answers) about "
        "{subject}.\\n\\n').",
    )
    fewshot_sampler: Literal["seeded", "first"] = Field(
        "seeded",
        description="seeded: k shots drawn per item by (seed, task, item id); first: the "
        "first k of the few-shot split in file order (MMLU's dev examples, the "
        "harness's first_n).",
    )
    fewshot_group: str | None = Field(
        None, description="Shots come only from items with the same value of this field."
    )
    answer_format: Literal["qa", "gsm8k", "math"] = Field(
        "qa",
        description="Free form: qa = cut at the first line break, final dot or comma, "
        "then exact match after normalization (the paper's closed-book QA); gsm8k = the "
        "number after '####'; math = the last \\boxed{} answer.",
    )
    answer_context: str = Field("Answer:", description="The context of the answer rule.")
    num_fewshot: int = Field(0, ge=0)
    fewshot_split: str = "train"
    eval_split: str = "test"
    target_delimiter: str = " "
    fewshot_delimiter: str = "\n\n"
    max_new_tokens: int = Field(32, gt=0, description="Free form: tokens generated at most.")
    stop: list[str] = Field(default_factory=lambda: ["\n"], description="Free form: cut here.")

    def prompt(self, item: dict) -> str:
        return self.template.format(**item)

    def header(self, item: dict) -> str:
        return self.description.format(**item) if self.description else ""


class MultipleChoiceItem(BaseModel):
    model_config = ConfigDict(extra="allow")

    id: str | int
    question: str
    choices: list[str] = Field(min_length=2)
    answer: int = Field(ge=0)
    contexts: list[str] | None = Field(
        None,
        description="Partial scoring (WinoGrande): the prompt for each choice; what is "
        "scored is `target` after it, the same text for every choice.",
    )
    target: str | None = None

    @model_validator(mode="after")
    def _answer_is_a_choice(self) -> MultipleChoiceItem:
        if self.answer >= len(self.choices):
            raise ValueError(f"answer {self.answer} is not an index of {len(self.choices)} choices")
        if (self.contexts is None) != (self.target is None):
            raise ValueError("contexts and target go together (partial scoring)")
        if self.contexts is not None and len(self.contexts) != len(self.choices):
            raise ValueError(f"{len(self.contexts)} contexts for {len(self.choices)} choices")
        return self


class FreeFormItem(BaseModel):
    model_config = ConfigDict(extra="allow")

    id: str | int
    question: str
    answers: list[str] = Field(min_length=1)


class TaskError(ValueError):
    """A task folder that cannot be read; the message names the file, line and field."""


class Task:
    """A loaded task: its spec and its splits (lists of item dicts)."""

    def __init__(self, spec: TaskSpec, splits: dict[str, list[dict]], path: Path):
        self.spec, self.splits, self.path = spec, splits, path

    @property
    def name(self) -> str:
        return self.spec.name

    def items(self, split: str | None = None) -> list[dict]:
        return self.splits[split or self.spec.eval_split]

    def __repr__(self) -> str:
        sizes = ", ".join(f"{k} {len(v)}" for k, v in self.splits.items())
        return f"Task({self.name!r}, {self.spec.type}, {sizes})"


def load_task(path: str | Path) -> Task:
    """Read and validate a task folder.

    >>> load_task("jobs/tasks/stdlib-modules")
    Task('stdlib-modules', multiple_choice, test 33, train 10)
    """
    path = Path(path)
    spec_file = path / "task.yaml"
    if not spec_file.is_file():
        raise TaskError(f"{path}: no task.yaml (a task is a folder with task.yaml + JSONL)")
    try:
        spec = TaskSpec.model_validate(yaml.safe_load(spec_file.read_text()) or {})
    except (ValidationError, yaml.YAMLError) as err:
        raise TaskError(f"{spec_file}: {_reason(err)}") from None
    if spec.type == "code":
        raise TaskError(
            f"{spec_file}: type: code tasks are read from their published files "
            "(llamaray.eval.benchmarks: humaneval, mbpp), not from a task folder"
        )
    item_type = MultipleChoiceItem if spec.type == "multiple_choice" else FreeFormItem
    splits = {}
    needed = {spec.eval_split} | ({spec.fewshot_split} if spec.num_fewshot else set())
    for split in sorted(needed | {p.stem for p in path.glob("*.jsonl")}):
        file = path / f"{split}.jsonl"
        if not file.is_file():
            raise TaskError(f"{path}: no {split}.jsonl (task.yaml uses the split {split!r})")
        splits[split] = _read_items(file, item_type)
    if not splits[spec.eval_split]:
        raise TaskError(f"{path / (spec.eval_split + '.jsonl')}: no items")
    _check_template(spec, splits[spec.eval_split][0], spec_file)
    return Task(spec, splits, path)


def jsonl_records(file: Path, what: str = "a record") -> Iterator[tuple[str, dict]]:
    """(where, object) for each non-empty line of a JSONL file, `where` being `file:line`;
    a TaskError naming the line for one that is not JSON or not an object (`what`)."""
    if not file.is_file():
        raise TaskError(f"{file}: no such file")
    for number, line in enumerate(file.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{file}:{number}"
        try:
            raw = json.loads(line)
        except json.JSONDecodeError as err:
            raise TaskError(f"{where}: not JSON ({err.msg})") from None
        if not isinstance(raw, dict):
            raise TaskError(f"{where}: {what} must be a JSON object")
        yield where, raw


def _read_items(file: Path, item_type: type[BaseModel]) -> list[dict]:
    items, seen = [], set()
    for where, raw in jsonl_records(file, "an item"):
        try:
            item = item_type.model_validate(raw).model_dump()
        except ValidationError as err:
            raise TaskError(f"{where}: {_reason(err)}") from None
        if item["id"] in seen:
            raise TaskError(f"{where}: duplicate id {item['id']!r}")
        seen.add(item["id"])
        items.append(item)
    return items


def _check_template(spec: TaskSpec, item: dict, spec_file: Path) -> None:
    try:
        spec.prompt(item)
        spec.header(item)
    except (KeyError, IndexError, ValueError) as err:
        raise TaskError(f"{spec_file}: template: {err!r} is not a field of the items") from None


def _reason(err: Exception) -> str:
    if isinstance(err, ValidationError):
        return "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'item'}: "
            + e["msg"].removeprefix("Value error, ")
            for e in err.errors()
        )
    return str(err)
