"""Final answers out of generations (the paper's cut, GSM8k, MATH), majority votes, and
the pass@k estimator against its closed form."""

from __future__ import annotations

import itertools
import math
import random

import pytest

from llamaray.eval.answers import (
    exact_match,
    gsm8k_answer,
    last_boxed,
    majority,
    math_answer,
    normalize_answer,
    normalize_math,
    qa_answer,
)
from llamaray.eval.estimators import maj_at_k, mean_pass_at_k, pass_at_k


@pytest.mark.parametrize(
    "generation, answer",
    [
        (" Paris", " Paris"),
        (" Paris.", " Paris"),
        (" Paris, France", " Paris"),
        (" Paris\nQ: next question", " Paris"),
        (" Charles Darwin. He wrote it in 1859.", " Charles Darwin"),
        (" 3.5 million", " 3.5 million"),  # a dot inside a number is not the final dot
        (" 1,000 people", " 1,000 people"),
        (" the U.S.A.", " the U.S.A"),
        ("\n Paris", ""),  # a line break first: no answer
    ],
)
def test_the_papers_answer_stops_at_line_break_final_dot_or_comma(generation, answer):
    assert qa_answer(generation) == answer


def test_normalization_lowercases_drops_articles_punctuation_and_spaces():
    assert normalize_answer("  The Eiffel-Tower!  ") == "eiffeltower"
    assert normalize_answer("An apple,   a day") == "apple day"
    assert exact_match(qa_answer(" The Paris. It is"), ["London", "paris"])
    assert not exact_match(qa_answer(" Lyon, or Paris"), ["paris"])


@pytest.mark.parametrize(
    "text, answer",
    [
        ("3 + 4 = 7\n#### 7", "7"),
        ("#### 1,234", "1234"),
        ("#### $18.00", "18"),
        ("#### -3.50", "-3.5"),
        ("we get 5 then 12 apples.", "12"),  # no marks: the last number
        ("#### 4\nthen #### 9", "9"),
        ("no number at all", None),
    ],
)
def test_gsm8k_answer(text, answer):
    assert gsm8k_answer(text) == answer


def test_math_answers_take_the_last_balanced_box_and_normalize_latex():
    assert last_boxed("\\boxed{1} and \\boxed{\\frac{a}{b+{c}}} end") == "\\frac{a}{b+{c}}"
    assert last_boxed("\\boxed{unclosed") is None and last_boxed("none") is None
    assert last_boxed("so \\boxed 5$") == "5"
    same = [
        "\\frac{1}{2}",
        "\\dfrac12",
        "\\tfrac{1}{2}",
        "0.5",
        "1/2",
        "\\left(\\frac{1}{2}\\right)",
    ]
    assert {normalize_math(s).strip("()") for s in same} == {"\\frac{1}{2}"}
    assert normalize_math("90^\\circ") == "90" and normalize_math("x = 5") == "5"
    assert normalize_math("10\\text{ cm}") == "10" and normalize_math("\\$5") == "5"
    assert normalize_math("\\frac{1}{3}") != normalize_math("\\frac{1}{2}")
    assert math_answer("The final answer is $7$. I hope it is correct.") == "7"
    assert math_answer("nothing here") is None


def test_majority_vote_ignores_missing_answers_and_breaks_ties_by_order():
    assert majority(["4", None, "5", "4", None, None]) == "4"
    assert majority(["5", "4", "4", "5"]) == "5"  # tie: the first seen
    assert majority([None, None]) is None
    assert maj_at_k(["3", "4", "4"], "4") and not maj_at_k(["3", "4", "4"], "4", k=1)
    with pytest.raises(ValueError, match="maj1@4 needs"):
        maj_at_k(["1"], "1", k=4)


def closed_form(n: int, c: int, k: int) -> float:
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def test_pass_at_k_equals_the_closed_form():
    for n, c, k in itertools.product(range(1, 12), range(0, 12), range(1, 12)):
        if c <= n and k <= n:
            assert pass_at_k(n, c, k) == pytest.approx(closed_form(n, c, k), abs=1e-12)
    # The paper's sizes, where the binomials no longer fit in a float.
    for n, c, k in [(200, 13, 100), (200, 1, 100), (200, 150, 80), (1000, 3, 500)]:
        exact = 1 - math.comb(n - c, k) / math.comb(n, k)  # Python integers: exact
        assert pass_at_k(n, c, k) == pytest.approx(exact, rel=1e-12)


def test_pass_at_k_is_the_chance_that_some_of_k_draws_pass():
    # Brute force over every k-subset of a small sample set.
    samples = [True, False, False, True, False, False, False]
    n, c = len(samples), sum(samples)
    for k in range(1, n + 1):
        subsets = list(itertools.combinations(samples, k))
        expected = sum(any(s) for s in subsets) / len(subsets)
        assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert pass_at_k(5, 0, 3) == 0.0 and pass_at_k(5, 3, 3) == 1.0
    rng = random.Random(0)
    counts = [(20, rng.randint(0, 20)) for _ in range(30)]
    assert mean_pass_at_k(counts, 1) == pytest.approx(sum(c / n for n, c in counts) / 30)


def test_pass_at_k_refuses_impossible_counts():
    with pytest.raises(ValueError, match="pass@5 needs 1 <= k <= n"):
        pass_at_k(3, 1, 5)
    with pytest.raises(ValueError, match="0 <= c <= n"):
        pass_at_k(3, 4, 1)
