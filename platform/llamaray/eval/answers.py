"""Final answers out of generated text, and when two answers are the same.

- Closed-book QA (NaturalQuestions, TriviaQA), as the LLaMA paper (appendix A): the answer
  stops at the first line break, final dot or comma, and is compared after lowercasing,
  dropping articles, punctuation and duplicate whitespace, with any of the gold aliases.
- GSM8k: the number after the last "####" (the format of the data set's own solutions,
  which the few-shot examples teach), else the last number in the text.
- MATH: the content of the last `\\boxed{...}` (the data set's solutions mark their answer
  so), else Minerva's "The final answer is X", compared after a normalization of LaTeX
  spellings (Hendrycks et al.'s `strip_string`, in part).

    >>> qa_answer(" Paris, the capital.\\nQ: next")
    ' Paris'
    >>> gsm8k_answer("3 + 4 = 7 apples.\\n#### 1,007")
    '1007'
    >>> math_answer("so $x = \\\\boxed{\\\\dfrac{1}{2}}$.")
    '\\\\frac{1}{2}'
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence

# ---- closed-book QA ----------------------------------------------------------------------

# A dot or comma that ends a word: followed by whitespace or the end of the text. "3.5",
# "U.S.A" and "1,000" keep their inner marks; "Paris." and "Paris, France" end at them.
_FINAL_MARK = re.compile(r"[.,](?=\s|$)")
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def qa_answer(text: str) -> str:
    """The answer as the paper extracts it: up to the first line break, then up to the
    first dot or comma that ends a word."""
    text = text.split("\n", 1)[0]
    match = _FINAL_MARK.search(text)
    return text[: match.start()] if match else text


def normalize_answer(text: str) -> str:
    """Lowercase, drop punctuation and articles, one space between words (SQuAD's
    normalization, which the paper describes)."""
    text = _ARTICLES.sub(" ", text.lower().translate(_PUNCTUATION))
    return " ".join(text.split())


def exact_match(prediction: str, answers: Sequence[str]) -> bool:
    """The prediction equals any of the gold answers after `normalize_answer`."""
    return any(normalize_answer(prediction) == normalize_answer(a) for a in answers)


# ---- GSM8k -------------------------------------------------------------------------------

_NUMBER = re.compile(r"-?[$]?\d[\d,]*(?:\.\d+)?")


def normalize_number(text: str) -> str:
    """'1,007' -> '1007', '$18.00' -> '18', '-3.50' -> '-3.5', '7.' -> '7'."""
    text = text.strip().replace(",", "").replace("$", "").rstrip(".")
    if re.fullmatch(r"-?\d+\.\d*", text):
        text = text.rstrip("0").rstrip(".")
    return text


def gsm8k_answer(text: str) -> str | None:
    """The number after the last "####", else the last number in `text`; None if none."""
    if "####" in text:
        tail = text.rsplit("####", 1)[1]
        found = _NUMBER.search(tail)
        if found:
            return normalize_number(found.group())
    numbers = _NUMBER.findall(text)
    return normalize_number(numbers[-1]) if numbers else None


# ---- MATH --------------------------------------------------------------------------------


def last_boxed(text: str) -> str | None:
    """The content of the last `\\boxed{...}` (or `\\fbox{...}`), braces balanced; None if
    there is none or it is not closed."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    rest = text[start:]
    if rest.startswith("\\boxed ") and "{" not in rest.split(" ", 1)[1][:1]:
        # `\boxed 5`: the argument is the next token.
        return rest.split(" ", 1)[1].split("$")[0].strip() or None
    open_at = rest.find("{")
    if open_at < 0:
        return None
    depth = 0
    for i in range(open_at, len(rest)):
        if rest[i] == "{":
            depth += 1
        elif rest[i] == "}":
            depth -= 1
            if depth == 0:
                return rest[open_at + 1 : i]
    return None


_FINAL_ANSWER = re.compile(r"final answer is\s*\$?(.+?)\$?\s*(?:\.\s*I hope|\.?\s*$)", re.S)


def math_answer(text: str) -> str | None:
    """The normalized final answer of a MATH solution or generation; None if none."""
    boxed = last_boxed(text)
    if boxed is None:
        found = _FINAL_ANSWER.search(text)
        boxed = found.group(1) if found else None
    return None if boxed is None else normalize_math(boxed)


def normalize_math(text: str) -> str:
    """Spellings of one LaTeX answer made equal: spaces, `\\left`/`\\right`, `\\dfrac`,
    degrees, dollars, `\\text{units}` at the end, a leading "x =", "0.5" vs ".5", and
    `\\frac12` vs `\\frac{1}{2}` (part of Hendrycks et al.'s `strip_string`)."""
    s = text.strip().replace("\n", "").rstrip(".")
    s = s.replace("\\!", "").replace("\\\\", "\\")
    s = s.replace("tfrac", "frac").replace("dfrac", "frac")
    s = s.replace("\\left", "").replace("\\right", "")
    s = s.replace("^{\\circ}", "").replace("^\\circ", "")
    s = s.replace("\\$", "").replace("$", "").replace("\\%", "").replace("%", "")
    s = re.sub(r"\\text\{\s*[a-zA-Z ]*\}\s*$", "", s)  # trailing units
    s = re.sub(r"\\(?:text|mbox|mathrm)\{(.*?)\}", r"\1", s)
    s = s.replace(" .", " 0.").replace("{.", "{0.")
    if s.startswith("."):
        s = "0" + s
    if re.fullmatch(r"[a-zA-Z]\s*=.*", s):  # "x = 5" -> "5"
        s = s.split("=", 1)[1]
    s = s.replace(" ", "")
    s = re.sub(r"\\frac(\d)(\d)", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\frac\{([^{}]*)\}(\d)", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\sqrt(\d)", r"\\sqrt{\1}", s)
    if s == "0.5":
        s = "\\frac{1}{2}"
    if re.fullmatch(r"-?\d+/\d+", s):  # "1/2" -> "\frac{1}{2}"
        num, den = s.split("/")
        sign, num = ("-", num[1:]) if num.startswith("-") else ("", num)
        s = f"{sign}\\frac{{{num}}}{{{den}}}"
    return s


# ---- by task --------------------------------------------------------------------------

ANSWER_FORMATS = ("qa", "gsm8k", "math")


def extract_answer(answer_format: str, text: str) -> str | None:
    """The final answer of a generation under a task's `answer_format`."""
    if answer_format == "qa":
        return qa_answer(text)
    if answer_format == "gsm8k":
        return gsm8k_answer(text)
    if answer_format == "math":
        return math_answer(text)
    raise ValueError(f"unknown answer_format {answer_format!r}; one of {ANSWER_FORMATS}")


def is_correct(answer_format: str, prediction: str | None, answers: Sequence[str]) -> bool:
    """Whether an extracted answer is right: exact match after normalization for qa; the
    same normalized number (gsm8k) or LaTeX (math) as any gold answer otherwise."""
    if prediction is None:
        return False
    if answer_format == "qa":
        return exact_match(prediction, answers)
    if answer_format == "gsm8k":
        return prediction in {normalize_number(a) for a in answers}
    if answer_format == "math":
        return prediction in {normalize_math(a) for a in answers}
    raise ValueError(f"unknown answer_format {answer_format!r}; one of {ANSWER_FORMATS}")


# ---- majority vote -----------------------------------------------------------------------


def majority(answers: Sequence[str | None]) -> str | None:
    """The most frequent answer (None, no answer found, never wins); ties go to the answer
    seen first, so the vote does not depend on anything but the order of the samples."""
    counts = Counter(a for a in answers if a is not None)
    if not counts:
        return None
    best = max(counts.values())
    return next(a for a in answers if a is not None and counts[a] == best)
