"""Metrics over n sampled answers per problem: pass@k (code) and maj1@k (math).

pass@k is Chen et al. (2021)'s unbiased estimator: with n samples of which c pass, the
probability that at least one of k samples drawn without replacement passes,
1 - C(n - c, k) / C(n, k). The binomials overflow floats long before n = 200, so it is
computed as the product 1 - prod_{i = n-c+1}^{n} (1 - k / i), which is the same ratio
term by term (their reference implementation does the same).

maj1@k (Lewkowycz et al. 2022, the LLaMA paper's table 7): the answer that most of k
samples reach is the prediction; the problem counts as solved when it is right.

    >>> round(pass_at_k(n=10, c=3, k=1), 12)
    0.3
    >>> round(pass_at_k(n=200, c=1, k=100), 4)
    0.5
    >>> maj_at_k(["4", "5", "4"], "4")
    True
"""

from __future__ import annotations

from collections.abc import Sequence

from llamaray.eval.answers import majority


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased estimate of pass@k from n samples of which c are correct."""
    if not 0 <= c <= n:
        raise ValueError(f"need 0 <= c <= n, got n={n}, c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"pass@{k} needs 1 <= k <= n samples, got n={n}")
    if n - c < k:
        return 1.0  # every k-subset holds a correct sample
    product = 1.0
    for i in range(n - c + 1, n + 1):
        product *= 1.0 - k / i
    return 1.0 - product


def mean_pass_at_k(counts: Sequence[tuple[int, int]], k: int) -> float:
    """pass@k averaged over problems, each given as (n samples, c correct)."""
    if not counts:
        raise ValueError("no problems")
    return sum(pass_at_k(n, c, k) for n, c in counts) / len(counts)


def maj_at_k(answers: Sequence[str | None], gold: str, k: int | None = None) -> bool:
    """Whether the majority of the first k answers (all if None) is `gold`. Answers are
    compared as given: normalize them first (`answers.gsm8k_answer`, `math_answer`)."""
    k = len(answers) if k is None else k
    if not 1 <= k <= len(answers):
        raise ValueError(f"maj1@{k} needs 1 <= k <= {len(answers)} answers")
    return majority(answers[:k]) == gold
