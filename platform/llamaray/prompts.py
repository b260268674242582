"""Prompt templates of instruction examples: the defaults and the placeholder check.

One owner for both the config's validation of `finetune.template*` (`llamaray.config`) and
the instruction reader (`llamaray.data.instructions`), so the config layer need not import
the data layer.

>>> check_template("Q: {instruction} A:", ["instruction"])
>>> check_template("Q: {question}", ["instruction"])  # doctest: +ELLIPSIS
Traceback (most recent call last):
...
ValueError: has no {instruction}; has unknown placeholder(s) {question} (allowed: ...
"""

from __future__ import annotations

import string
from collections.abc import Sequence

DEFAULT_TEMPLATE = "### Instruction:\n{instruction}\n\n### Response:\n"
DEFAULT_TEMPLATE_WITH_INPUT = (
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)


def template_fields(template: str) -> set[str]:
    """The `{name}` placeholders of a template (ValueError if it does not parse)."""
    try:
        return {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as err:
        raise ValueError(f"{template!r} is not a valid template: {err}") from None


def check_template(template: str, required: Sequence[str]) -> None:
    """ValueError unless `template`'s placeholders are exactly `required` (each once or more).

    Literal braces are written doubled, as in `str.format`: `{{` and `}}`.
    """
    names = template_fields(template)
    if "" in names:
        raise ValueError("positional placeholder {} is not allowed; name the field")
    missing = [n for n in required if n not in names]
    unknown = sorted(names - set(required))
    problems = []
    if missing:
        problems.append("has no " + ", ".join("{" + n + "}" for n in missing))
    if unknown:
        problems.append(
            "has unknown placeholder(s) "
            + ", ".join("{" + n + "}" for n in unknown)
            + " (allowed: "
            + ", ".join("{" + n + "}" for n in required)
            + "; write literal braces as {{ }})"
        )
    if problems:
        raise ValueError("; ".join(problems))
