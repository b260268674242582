"""Sampling evaluation: n samples per problem, then pass@k (code) or maj1@k (answers).

The paper's code numbers (section 3.5) are pass@1 from samples at temperature 0.1 and
pass@100 (HumanEval) / pass@80 (MBPP) from samples at temperature 0.8, both estimated with
Chen et al.'s unbiased estimator; its math numbers (section 3.4) are maj1@k, the majority
answer of k samples (k = 100 for GSM8k, 256 for MATH). Run one evaluation per temperature.

Two steps, like `scoring`: `sample_requests` (the model, on the Ray actors: it only calls
`LanguageModel.generate_until`, which uses `model.generation.generate` with its KV cache)
and `score_samples` (on the driver; code runs in the sandbox through `run_code`, which the
runner points at the actors so no program runs on the driver's node).

Draws are reproducible and independent of the number of workers: the samples of a
request come in chunks of at most `lm.batch_size` copies of its prompt, each chunk with a
generator seeded by (seed, item, chunk); only the batch size changes them.
"""

from __future__ import annotations

from collections.abc import Sequence

from llamaray.eval.answers import extract_answer, is_correct, majority, normalize_answer
from llamaray.eval.code import RunCode, run_completions
from llamaray.eval.estimators import pass_at_k
from llamaray.eval.lm import batch_seed
from llamaray.eval.scoring import Request, TaskResult
from llamaray.eval.tasks import Task


def sample_requests(
    lm,
    requests: Sequence[Request],
    n: int,
    *,
    temperature: float,
    top_p: float,
    max_new_tokens: int,
    stop: Sequence[str],
    seed: int = 0,
) -> list[list[str]]:
    """n sampled continuations of each generation request's context."""
    out = []
    for request in requests:
        texts: list[str] = []
        for start in range(0, n, lm.batch_size):
            count = min(lm.batch_size, n - start)
            texts += lm.generate_until(
                [request.context] * count,
                max_new_tokens=max_new_tokens,
                stop=stop,
                temperature=temperature,
                top_p=top_p,
                seed=batch_seed(seed, f"{request.item}/{start}"),
            )
        out.append(texts)
    return out


def score_samples(
    task: Task,
    requests: Sequence[Request],
    samples: Sequence[Sequence[str]],
    ks: Sequence[int],
    run_code: RunCode = run_completions,
) -> TaskResult:
    """pass@k (code tasks) or maj1@k (free-form tasks) for each k in `ks` that is at most
    the number of samples, averaged over the problems; per-problem records."""
    items = [task.items()[r.item] for r in requests]
    n = min((len(s) for s in samples), default=0)
    ks = sorted({k for k in ks if 1 <= k <= n})
    if not ks:
        raise ValueError(f"no k in {list(ks)} fits {n} samples per problem")
    records = []
    if task.spec.type == "code":
        flat_items = [item for item, s in zip(items, samples, strict=True) for _ in s]
        passed = run_code(flat_items, [text for s in samples for text in s])
        at = 0
        for item, s in zip(items, samples, strict=True):
            ok, at = passed[at : at + len(s)], at + len(s)
            records.append({"id": item["id"], "n": len(s), "correct": sum(ok), "passed": ok})
        metrics = {
            f"pass@{k}": sum(pass_at_k(r["n"], r["correct"], k) for r in records) / len(records)
            for k in ks
        }
    elif task.spec.type == "free_form":
        fmt = task.spec.answer_format
        metrics = {f"maj1@{k}": 0.0 for k in ks}
        for item, s in zip(items, samples, strict=True):
            answers = [extract_answer(fmt, text) for text in s]
            votes = [_vote_key(fmt, a) for a in answers]
            record = {"id": item["id"], "n": len(s), "answers": answers, "gold": item["answers"]}
            for k in ks:
                # The winning vote's first answer stands for its class.
                winner = majority(votes[:k])
                pick = next((a for a, v in zip(answers, votes, strict=True) if v == winner), None)
                record[f"maj1@{k}"] = is_correct(fmt, pick, item["answers"])
                metrics[f"maj1@{k}"] += record[f"maj1@{k}"] / len(items)
            records.append(record)
    else:
        raise ValueError(f"task {task.name}: sampling evaluates code and free-form tasks")
    metrics["n"] = len(records)
    metrics["samples"] = n
    return TaskResult(task.name, metrics, records)


def _vote_key(answer_format: str, answer: str | None) -> str | None:
    """Answers that count as the same vote: QA answers after the paper's normalization;
    GSM8k and MATH answers are normalized when extracted."""
    if answer is None:
        return None
    return normalize_answer(answer) if answer_format == "qa" else answer
