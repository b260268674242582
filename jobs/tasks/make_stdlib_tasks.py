"""Write the example evaluation tasks from this Python's standard library (no download).

    python jobs/tasks/make_stdlib_tasks.py          # rewrites jobs/tasks/stdlib-*/

- `stdlib-modules` (multiple choice, per-character rule): which module has this docstring
  summary? The right module name and three others.
- `stdlib-modules-answer` (the same items, scored with the "Answer:" rule).
- `stdlib-summary` (free form): the module's name, from its summary.

The demo model is trained on standard-library text, so these are tasks it can learn
something about; they exist to exercise the evaluation path, not as a benchmark.
"""

from __future__ import annotations

import importlib
import json
import random
import sys
import warnings
from pathlib import Path

MODULES = [
    "abc", "argparse", "array", "ast", "base64", "bisect", "calendar", "cmath", "codecs",
    "collections", "colorsys", "contextlib", "copy", "csv", "dataclasses", "datetime",
    "decimal", "difflib", "enum", "fnmatch", "fractions", "functools", "getopt", "gettext",
    "glob", "gzip", "hashlib", "heapq", "hmac", "html", "inspect", "io", "ipaddress",
    "itertools", "json", "keyword", "linecache", "locale", "logging", "lzma", "math",
    "mimetypes", "numbers", "operator", "optparse", "os", "pathlib", "pickle", "pprint",
    "queue", "quopri", "random", "re", "sched", "secrets", "shlex", "shutil", "signal",
    "socket", "sqlite3", "statistics", "string", "struct", "subprocess", "tarfile",
    "tempfile", "textwrap", "threading", "timeit", "tokenize", "traceback", "typing",
    "unicodedata", "uuid", "warnings", "weakref", "zipfile", "zlib",
]  # fmt: skip


def summaries() -> list[tuple[str, str]]:
    out = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in MODULES:
            try:
                doc = (importlib.import_module(name).__doc__ or "").strip()
            except ImportError:
                continue
            first = doc.split("\n\n")[0].replace("\n", " ").strip()
            if 10 <= len(first) <= 160 and name not in first.lower().split():
                out.append((name, first))
    return out


def write(folder: Path, spec: dict, splits: dict[str, list[dict]]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "task.yaml").write_text(json.dumps(spec, indent=2) + "\n")
    for split, items in splits.items():
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(i) + "\n" for i in items))


def main(out: Path) -> None:
    rng = random.Random(0)
    pairs = summaries()
    rng.shuffle(pairs)
    names = [n for n, _ in pairs]
    mc = []
    for i, (name, summary) in enumerate(pairs):
        others = rng.sample([n for n in names if n != name], 3)
        choices = [*others, name]
        rng.shuffle(choices)
        mc.append(
            {"id": f"m{i}", "question": summary, "choices": choices, "answer": choices.index(name)}
        )
    free = [{"id": f"s{i}", "question": s, "answers": [n]} for i, (n, s) in enumerate(pairs)]
    split = len(pairs) // 4
    template = "Python module summary: {question}\nModule:"
    write(
        out / "stdlib-modules",
        {"name": "stdlib-modules", "type": "multiple_choice", "template": template,
         "normalization": "chars", "num_fewshot": 0},
        {"train": mc[:split], "test": mc[split:]},
    )  # fmt: skip
    write(
        out / "stdlib-modules-answer",
        {"name": "stdlib-modules-answer", "type": "multiple_choice", "template": template,
         "normalization": "answer", "answer_context": "Module:", "num_fewshot": 0},
        {"train": mc[:split], "test": mc[split:]},
    )  # fmt: skip
    write(
        out / "stdlib-summary",
        {"name": "stdlib-summary", "type": "free_form", "template": template,
         "num_fewshot": 3, "max_new_tokens": 8, "stop": ["\n"]},
        {"train": free[:split], "test": free[split:]},
    )  # fmt: skip
    print(f"wrote {len(pairs)} items per task under {out}", file=sys.stderr)


if __name__ == "__main__":
    main(Path(__file__).parent)
