"""Write a small instruction set of fixed-format transformations, seeded and reproducible.

    python jobs/data/make_instructions.py --out jobs/data/instructions-demo.jsonl --n 1000

Every example is generated here from a short word list written for this project (no
third-party text). The tasks are rules a small model can pick up from a few hundred
examples (counting, repeating, spelling, reordering, formatting), so a short finetune
shows a clear drop of the response loss on held-out instructions; some carry an `input`
field, to exercise the second prompt template.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

_WORD_TEXT = """
apple river stone cloud tiger lemon paper candle forest window garden rocket
pencil silver market bridge planet copper violin basket meadow harbor lantern
marble pepper rabbit saddle thunder velvet wagon yellow anchor barrel cactus
dragon engine falcon glacier hammer island jacket kettle ladder magnet needle
orange parrot quartz ribbon shadow turtle umbrella valley walnut
"""
WORDS = _WORD_TEXT.split()


def _count(rng: random.Random) -> dict:
    start = rng.randint(0, 40)
    end = start + rng.randint(2, 6)
    return {
        "instruction": f"Count from {start} to {end}.",
        "response": " ".join(str(i) for i in range(start, end + 1)),
    }


def _repeat(rng: random.Random) -> dict:
    word, times = rng.choice(WORDS), rng.randint(2, 5)
    return {
        "instruction": f"Repeat the word {word} {times} times.",
        "response": " ".join([word] * times),
    }


def _spell(rng: random.Random) -> dict:
    word = rng.choice(WORDS)
    return {"instruction": f"Spell {word} with dashes.", "response": "-".join(word)}


def _bullets(rng: random.Random) -> dict:
    items = rng.sample(WORDS, rng.randint(2, 4))
    return {
        "instruction": "Write these words as a bulleted list.",
        "input": ", ".join(items),
        "response": "\n".join(f"- {w}" for w in items),
    }


def _reverse(rng: random.Random) -> dict:
    items = rng.sample(WORDS, 3)
    return {
        "instruction": "Reverse the order of the words.",
        "input": " ".join(items),
        "response": " ".join(reversed(items)),
    }


def _sort(rng: random.Random) -> dict:
    numbers = rng.sample(range(1, 30), rng.randint(3, 5))
    return {
        "instruction": "Sort the numbers from smallest to largest.",
        "input": " ".join(map(str, numbers)),
        "response": " ".join(map(str, sorted(numbers))),
    }


def _brackets(rng: random.Random) -> dict:
    word = rng.choice(WORDS)
    return {"instruction": f"Put the word {word} in square brackets.", "response": f"[{word}]"}


TASKS = (_count, _repeat, _spell, _bullets, _reverse, _sort, _brackets)


def make_examples(n: int, seed: int = 0) -> list[dict]:
    """`n` examples, the tasks in turn, each drawn from `random.Random(seed)`."""
    rng = random.Random(seed)
    return [TASKS[i % len(TASKS)](rng) for i in range(n)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="JSONL file to write")
    parser.add_argument("--n", type=int, default=1000, help="examples")
    parser.add_argument("--seed", type=int, default=0)
    opts = parser.parse_args()
    out = Path(opts.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", encoding="utf-8") as f:
        for example in make_examples(opts.n, opts.seed):
            f.write(json.dumps(example) + "\n")
    print(f"wrote {opts.n} examples to {out}")


if __name__ == "__main__":
    main()
