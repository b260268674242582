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
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class TaskSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    type: Literal["multiple_choice", "free_form"]
    template: str = Field("Question: {question}\nAnswer:", description="Formats an item.")
    normalization: Literal["chars", "answer", "none"] = Field(
        "chars",
        description="Multiple choice: chars = log-likelihood per character of the choice "
        "(the paper's default); answer = log p(choice | prompt) - log p(choice | "
        "answer_context) (the paper's rule for some tasks); none = raw log-likelihood.",
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


class MultipleChoiceItem(BaseModel):
    model_config = ConfigDict(extra="allow")

    id: str | int
    question: str
    choices: list[str] = Field(min_length=2)
    answer: int = Field(ge=0)

    @model_validator(mode="after")
    def _answer_is_a_choice(self) -> MultipleChoiceItem:
        if self.answer >= len(self.choices):
            raise ValueError(f"answer {self.answer} is not an index of {len(self.choices)} choices")
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


def _read_items(file: Path, item_type: type[BaseModel]) -> list[dict]:
    items, seen = [], set()
    for number, line in enumerate(file.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{file}:{number}"
        try:
            raw = json.loads(line)
        except json.JSONDecodeError as err:
            raise TaskError(f"{where}: not JSON ({err.msg})") from None
        if not isinstance(raw, dict):
            raise TaskError(f"{where}: an item must be a JSON object")
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
