"""Scoring tasks as the paper does: k-shot prompts, multiple-choice rules, exact match.

Evaluation is three steps so that the middle one can be spread over Ray workers:

1. `build_requests(task, ...)`: every model call the task needs, as plain data.
2. `run_requests(lm, requests)`: the model calls (log-likelihoods, greedy generations).
3. `aggregate(task, requests, responses)`: the choices made, per-item records, metrics.

Multiple-choice rules (`task.yaml: normalization`), as in the LLaMA paper, section 3:
- `chars`: the choice with the highest log-likelihood divided by its number of characters
  (lm-evaluation-harness's `acc_norm`), so long answers are not punished for length; the
  paper's rule for every task but two;
- `answer`: the highest log p(choice | prompt) - log p(choice | "Answer:"), which divides
  out how likely the choice is anyway (Brown et al. 2020); the paper names OpenBookQA and
  BoolQ as the tasks it uses it for;
- `none`: the raw log-likelihood (the harness's `acc`).
Partial scoring (WinoGrande): each choice has its own prompt (the sentence up to the blank,
with that option in it), and what is scored is the rest of the sentence, the same text for
every choice; the rules then agree.

Free-form answers are generated greedily, cut at the task's `stop` strings, and compared
by `answer_format` (`llamaray.eval.answers`): `qa` stops the answer at the first line
break, final dot or comma and takes exact match after the paper's normalization against
any gold answer; `gsm8k` and `math` compare the final answer (after "####", in
`\\boxed{}`). Code tasks run the generated program against the problem's tests in
`llamaray.eval.sandbox` (greedy here: pass@1 of one sample; `eval/sampling.py` draws n).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field

from llamaray.eval.answers import exact_match, extract_answer, is_correct, normalize_answer
from llamaray.eval.code import RunCode, score_completions
from llamaray.eval.tasks import Task

__all__ = ["exact_match", "normalize_answer"]  # re-exported: where callers found them

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
    shots: int | None = None
    """Few-shot examples per prompt (None: not known, e.g. a harness result)."""


# ---- prompts ---------------------------------------------------------------------------


def gold_text(task: Task, item: dict) -> str:
    if task.spec.type == "multiple_choice":
        return item["choices"][item["answer"]]
    if task.spec.type == "code":
        return item["solution"]
    return item.get("solution") or item["answers"][0]


def solved(task: Task, item: dict) -> str:
    """A few-shot example: the item's prompt and its right answer."""
    spec = task.spec
    if item.get("contexts") is not None:  # partial scoring: the whole, right sentence
        return item["contexts"][item["answer"]] + spec.target_delimiter + item["target"]
    return spec.prompt(item) + spec.target_delimiter + gold_text(task, item)


def shots(task: Task, item: dict, k: int, seed: int) -> list[dict]:
    """The k solved examples that precede `item`.

    Seeded (the default): drawn with a generator seeded by (seed, task, item id), so an item
    gets the same shots in every run and on every worker, whatever else is evaluated; the
    item itself is never among its own shots. `first`: the first k of the few-shot split,
    in file order (MMLU's five dev questions). With `fewshot_group` only items sharing the
    item's value of that field are candidates (MMLU: the same subject).
    """
    spec = task.spec
    if k == 0:
        return []
    pool = [x for x in task.items(spec.fewshot_split) if x["id"] != item["id"]]
    if spec.fewshot_group:
        pool = [x for x in pool if x.get(spec.fewshot_group) == item.get(spec.fewshot_group)]
    if len(pool) < k:
        group = spec.fewshot_group
        raise ValueError(
            f"task {task.name}: {k}-shot needs {k} examples in split "
            f"{spec.fewshot_split!r}, it has {len(pool)}"
            + (f" for {group}={item.get(group)!r}" if group else "")
        )
    if spec.fewshot_sampler == "first":
        return pool[:k]
    rng = random.Random(f"{seed}/{task.name}/{item['id']}")
    return rng.sample(pool, k)


def fewshot_context(task: Task, item: dict, k: int, seed: int, prompt: str | None = None) -> str:
    """The prompt for `item` (or `prompt`, for one choice under partial scoring) after the
    task's description and k solved examples (`shots`), joined by `fewshot_delimiter` as
    lm-evaluation-harness joins them."""
    spec = task.spec
    prompt = spec.prompt(item) if prompt is None else prompt
    examples = [solved(task, s) for s in shots(task, item, k, seed)]
    return spec.header(item) + spec.fewshot_delimiter.join([*examples, prompt])


def build_requests(
    task: Task, num_fewshot: int | None = None, seed: int = 0, limit: int | None = None
) -> list[Request]:
    """Every model call the task's evaluated split needs, in a fixed order."""
    spec = task.spec
    k = spec.num_fewshot if num_fewshot is None else num_fewshot
    requests = []
    for i, item in enumerate(task.items()[:limit]):
        if spec.type in ("free_form", "code"):
            requests.append(Request(i, "generate", 0, fewshot_context(task, item, k, seed)))
            continue
        if item.get("contexts") is not None:  # partial scoring
            continuation = spec.target_delimiter + item["target"]
            for c, context in enumerate(item["contexts"]):
                context = fewshot_context(task, item, k, seed, prompt=context)
                requests.append(Request(i, "choice", c, context, continuation))
            continue
        context = fewshot_context(task, item, k, seed)
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


# ---- aggregation -----------------------------------------------------------------------


def aggregate(
    task: Task,
    requests: Sequence[Request],
    responses: Sequence,
    run_code: RunCode | None = None,
) -> TaskResult:
    """Choices, per-item records and metrics from the responses to `build_requests`.
    Code tasks run each completion through `run_code` (default: the sandbox, here)."""
    items = task.items()
    by_item: dict[int, dict] = {}
    for request, response in zip(requests, responses, strict=True):
        slot = by_item.setdefault(request.item, {"choice": {}, "prior": {}, "generate": None})
        if request.role == "generate":
            slot["generate"] = response
        else:
            slot[request.role][request.choice] = response
    records = []
    if task.spec.type == "code":
        completions = [slot["generate"] for _, slot in sorted(by_item.items())]
        records = score_completions([items[i] for i in sorted(by_item)], completions, run_code)
        metrics = {"pass@1": _mean(r["passed"] for r in records), "n": len(records)}
        return TaskResult(task.name, metrics, records)
    if task.spec.type == "free_form":
        fmt = task.spec.answer_format
        for i, slot in sorted(by_item.items()):
            item = items[i]
            prediction = extract_answer(fmt, slot["generate"])
            records.append(
                {
                    "id": item["id"],
                    "generation": slot["generate"],
                    "prediction": prediction,
                    "answers": item["answers"],
                    "exact_match": is_correct(fmt, prediction, item["answers"]),
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
        # What was scored: the choices, or under partial scoring the same target for all.
        scored = item["choices"] if item.get("contexts") is None else [item["target"]] * count
        picks = {rule: choose(logprobs, scored, rule, priors) for rule in rules}
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
    result = aggregate(task, requests, responses)
    result.shots = task.spec.num_fewshot if num_fewshot is None else num_fewshot
    return result


def _mean(values) -> float:
    values = [float(v) for v in values]
    return sum(values) / len(values) if values else float("nan")
