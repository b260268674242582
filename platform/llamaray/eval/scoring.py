"""Scoring tasks as the paper does: k-shot prompts, multiple-choice rules, exact match.

Evaluation is three steps so that the middle one can be spread over Ray workers:

1. `build_requests(task, ...)`: every model call the task needs, as plain data.
2. `run_requests(lm, requests)`: the model calls (log-likelihoods, greedy generations).
3. `aggregate(task, requests, responses)`: the choices made, per-item records, metrics.

Multiple-choice rules (`task.yaml: normalization`), as in the LLaMA paper, section 3:
- `chars`: the choice with the highest log-likelihood divided by its number of characters
  (lm-evaluation-harness's `acc_norm`), so long answers are not punished for length;
- `answer`: the highest log p(choice | prompt) - log p(choice | "Answer:"), which divides
  out how likely the choice is anyway (the paper uses it for OpenBookQA, BoolQ, ARC and
  RACE);
- `none`: the raw log-likelihood (the harness's `acc`).
Free-form answers are generated greedily and scored by exact match after SQuAD's
normalization (lowercase, no punctuation, no articles, single spaces), taking the best
over the gold answers.
"""

from __future__ import annotations

import random
import re
import string
from collections.abc import Sequence
from dataclasses import dataclass, field

from llamaray.eval.tasks import Task

RULES = ("chars", "answer", "none")


@dataclass(frozen=True)
class Request:
    """One model call: a log-likelihood of `continuation` after `context`, or a greedy
    generation after `context` (`continuation` is None)."""

    item: int
    """Index of the item in the evaluated split."""
    role: str
    """"choice" (conditional), "prior" (given the answer context) or "generate"."""
    choice: int
    context: str
    continuation: str | None = None


@dataclass
class TaskResult:
    task: str
    metrics: dict[str, float]
    records: list[dict] = field(default_factory=list)
    """Per item: id, gold, prediction, scores (what a reviewer needs to audit a number)."""


# ---- prompts ---------------------------------------------------------------------------


def gold_text(task: Task, item: dict) -> str:
    if task.spec.type == "multiple_choice":
        return item["choices"][item["answer"]]
    return item["answers"][0]


def fewshot_context(task: Task, item: dict, k: int, seed: int) -> str:
    """The prompt for `item` after k solved examples from the few-shot split.

    The shots are drawn with a generator seeded by (seed, task, item id), so an item gets
    the same shots in every run and on every worker, whatever else is evaluated; the item
    itself is never among its own shots.
    """
    spec = task.spec
    prompt = spec.prompt(item)
    if k == 0:
        return prompt
    pool = [x for x in task.items(spec.fewshot_split) if x["id"] != item["id"]]
    if len(pool) < k:
        raise ValueError(
            f"task {task.name}: {k}-shot needs {k} examples in split "
            f"{spec.fewshot_split!r}, it has {len(pool)}"
        )
    rng = random.Random(f"{seed}/{task.name}/{item['id']}")
    shots = rng.sample(pool, k)
    solved = [spec.prompt(s) + spec.target_delimiter + gold_text(task, s) for s in shots]
    return spec.fewshot_delimiter.join([*solved, prompt])


def build_requests(
    task: Task, num_fewshot: int | None = None, seed: int = 0, limit: int | None = None
) -> list[Request]:
    """Every model call the task's evaluated split needs, in a fixed order."""
    spec = task.spec
    k = spec.num_fewshot if num_fewshot is None else num_fewshot
    requests = []
    for i, item in enumerate(task.items()[:limit]):
        context = fewshot_context(task, item, k, seed)
        if spec.type == "free_form":
            requests.append(Request(i, "generate", 0, context))
            continue
        for c, choice in enumerate(item["choices"]):
            continuation = spec.target_delimiter + choice
            requests.append(Request(i, "choice", c, context, continuation))
            if spec.normalization == "answer":
                requests.append(Request(i, "prior", c, spec.answer_context, continuation))
    return requests


def run_requests(
    lm, requests: Sequence[Request], max_new_tokens: int = 32, stop: Sequence[str] = ("\n",)
) -> list:
    """The model calls, in order: a log-likelihood (float) per scoring request, the
    generated text per generation request. `lm` is a `LanguageModel`."""
    out: list = [None] * len(requests)
    scored = [i for i, r in enumerate(requests) if r.continuation is not None]
    for i, result in zip(
        scored,
        lm.loglikelihood([(requests[i].context, requests[i].continuation) for i in scored]),
        strict=True,
    ):
        out[i] = result.logprob
    generate = [i for i, r in enumerate(requests) if r.continuation is None]
    if generate:
        texts = lm.generate_until(
            [requests[i].context for i in generate], max_new_tokens=max_new_tokens, stop=stop
        )
        for i, text in zip(generate, texts, strict=True):
            out[i] = text
    return out


# ---- rules -----------------------------------------------------------------------------


def choose(
    logprobs: Sequence[float],
    choices: Sequence[str],
    rule: str,
    priors: Sequence[float] | None = None,
) -> int:
    """Index of the chosen answer under `rule` (ties: the first, as numpy's argmax)."""
    if rule == "chars":
        scores = [lp / max(1, len(c)) for lp, c in zip(logprobs, choices, strict=True)]
    elif rule == "answer":
        if priors is None:
            raise ValueError("the answer rule needs log p(choice | answer context)")
        scores = [lp - prior for lp, prior in zip(logprobs, priors, strict=True)]
    elif rule == "none":
        scores = list(logprobs)
    else:
        raise ValueError(f"unknown rule {rule!r}; one of {', '.join(RULES)}")
    return max(range(len(scores)), key=lambda i: (scores[i], -i))


_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD's answer normalization: lowercase, drop punctuation and articles, one space."""
    text = _ARTICLES.sub(" ", text.lower().translate(_PUNCTUATION))
    return " ".join(text.split())


def exact_match(prediction: str, answers: Sequence[str]) -> bool:
    return any(normalize_answer(prediction) == normalize_answer(a) for a in answers)


# ---- aggregation -----------------------------------------------------------------------


def aggregate(task: Task, requests: Sequence[Request], responses: Sequence) -> TaskResult:
    """Choices, per-item records and metrics from the responses to `build_requests`."""
    items = task.items()
    by_item: dict[int, dict] = {}
    for request, response in zip(requests, responses, strict=True):
        slot = by_item.setdefault(request.item, {"choice": {}, "prior": {}, "generate": None})
        if request.role == "generate":
            slot["generate"] = response
        else:
            slot[request.role][request.choice] = response
    records = []
    if task.spec.type == "free_form":
        for i, slot in sorted(by_item.items()):
            item = items[i]
            hit = exact_match(slot["generate"], item["answers"])
            records.append(
                {
                    "id": item["id"],
                    "prediction": slot["generate"],
                    "answers": item["answers"],
                    "exact_match": hit,
                }
            )
        metrics = {"exact_match": _mean(r["exact_match"] for r in records), "n": len(records)}
        return TaskResult(task.name, metrics, records)

    rules = ["chars", "none"] + (["answer"] if task.spec.normalization == "answer" else [])
    hits = {rule: [] for rule in rules}
    for i, slot in sorted(by_item.items()):
        item = items[i]
        count = len(item["choices"])
        logprobs = [slot["choice"][c] for c in range(count)]
        priors = [slot["prior"][c] for c in range(count)] if slot["prior"] else None
        picks = {rule: choose(logprobs, item["choices"], rule, priors) for rule in rules}
        for rule, pick in picks.items():
            hits[rule].append(pick == item["answer"])
        record = {
            "id": item["id"],
            "gold": item["answer"],
            "prediction": picks[task.spec.normalization],
            "correct": picks[task.spec.normalization] == item["answer"],
            "logprobs": logprobs,
        }
        if priors is not None:
            record["priors"] = priors
        records.append(record)
    metrics = {"acc": _mean(hits[task.spec.normalization])}
    # The other rules, for information (the harness reports acc and acc_norm side by side).
    metrics["acc_chars"] = _mean(hits["chars"])
    metrics["acc_raw"] = _mean(hits["none"])
    metrics["n"] = len(records)
    return TaskResult(task.name, metrics, records)


def evaluate_task(
    lm, task: Task, num_fewshot: int | None = None, seed: int = 0, limit: int | None = None
) -> TaskResult:
    """All three steps in this process."""
    requests = build_requests(task, num_fewshot, seed, limit)
    responses = run_requests(lm, requests, task.spec.max_new_tokens, task.spec.stop)
    return aggregate(task, requests, responses)


def _mean(values) -> float:
    values = [float(v) for v in values]
    return sum(values) / len(values) if values else float("nan")
