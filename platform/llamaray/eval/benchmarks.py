"""The LLaMA paper's benchmarks, read from the files they are published in, as `Task`s
scored by the rule the paper uses for each (docs/evaluation.md has the table).

Nothing is downloaded: each reader takes local files in the benchmark's own format. A
record that does not fit is a `TaskError` naming `file:line` and the field.

    >>> read_benchmark("arc", "ARC-Easy/ARC-Easy-Test.jsonl")  # doctest: +SKIP
    >>> read_benchmark("piqa", "piqa/valid.jsonl")  # + valid-labels.lst  # doctest: +SKIP
    >>> read_benchmark("mmlu", "mmlu/data")  # test/*_test.csv, shots: dev/  # doctest: +SKIP

Prompts are lm-evaluation-harness's for the tasks it also has (BoolQ, PIQA, SIQA,
HellaSwag, WinoGrande, ARC, OpenBookQA, RACE, MMLU), character for character, so the
same model gives the same log-likelihoods through either: tests/unit/
test_eval_benchmarks_harness.py runs the harness's own task YAML on the same records and
compares every request; the adapter's agreement with the harness is tests/unit/
test_harness.py. The closed-book QA prompt is the paper's (its
appendix A); GSM8k, MATH, HumanEval and MBPP follow the papers the LLaMA paper follows
for them (Minerva, Codex, Austin et al.).
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from llamaray.eval.answers import last_boxed, normalize_number
from llamaray.eval.tasks import Task, TaskError, TaskSpec, jsonl_records


@dataclass(frozen=True)
class Benchmark:
    reader: Callable[..., Task]
    shots: str
    """What the paper reports (the reader's default number of shots is the first)."""
    metric: str
    rule: str


# ---- file helpers --------------------------------------------------------------------


def _lines(path: Path) -> Iterator[tuple[str, dict]]:
    """(where, record) for each non-empty line of a JSONL file (`tasks.jsonl_records`)."""
    return jsonl_records(path)


def _field(record: dict, where: str, path: str, kind: type | tuple = str):
    """record["a"]["b"] for path "a.b", checked to be of `kind`."""
    value = record
    for key in path.split("."):
        if not isinstance(value, dict) or key not in value:
            raise TaskError(f"{where}: {path}: missing")
        value = value[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise TaskError(f"{where}: {path}: must be {names}, got {type(value).__name__}")
    return value


def _labels(path: Path, count: int, allowed: range) -> list[int]:
    """A `.lst` label file: one integer per line, one line per record."""
    if not path.is_file():
        raise TaskError(f"{path}: no label file (pass labels=<file>)")
    labels = []
    for number, line in enumerate(path.read_text().split(), 1):
        if not line.lstrip("-").isdigit() or int(line) not in allowed:
            raise TaskError(f"{path}:{number}: label {line!r} is not one of {list(allowed)}")
        labels.append(int(line))
    if len(labels) != count:
        raise TaskError(f"{path}: {len(labels)} labels for {count} records")
    return labels


def _task(spec: TaskSpec, test: list[dict], train: list[dict] | None, path: Path) -> Task:
    if not test:
        raise TaskError(f"{path}: no items")
    return Task(spec, {"test": test, "train": train or []}, path)


def _split(path: Path | None, read: Callable[[Path], list[dict]]) -> list[dict] | None:
    return read(Path(path)) if path is not None else None


def _default_labels(path: Path) -> Path:
    return path.with_name(f"{path.stem}-labels.lst")


# ---- common sense reasoning (zero-shot in the paper) ---------------------------------


def read_boolq(path, fewshot=None) -> Task:
    """BoolQ JSONL: {"question", "passage", "answer": bool}. Rule: answer (the paper)."""

    def read(file: Path) -> list[dict]:
        return [
            {
                "id": where,
                "question": _field(r, where, "question"),
                "passage": _field(r, where, "passage"),
                "choices": ["no", "yes"],
                "answer": int(_field(r, where, "answer", bool)),
            }
            for where, r in _lines(file)
        ]

    spec = TaskSpec(
        name="boolq",
        type="multiple_choice",
        template="{passage}\nQuestion: {question}?\nAnswer:",
        normalization="answer",
    )
    return _task(spec, read(Path(path)), _split(fewshot, read), Path(path))


def _two_file_reader(fields: tuple[str, ...], choice_fields: tuple[str, ...], first: int):
    """PIQA and SIQA: records in JSONL, the labels in a `.lst` beside them."""

    def read(file: Path, labels: Path | None = None) -> list[dict]:
        records = list(_lines(file))
        allowed = range(first, first + len(choice_fields))
        gold = _labels(Path(labels) if labels else _default_labels(file), len(records), allowed)
        return [
            {
                "id": where,
                **{f: _field(r, where, f) for f in fields},
                "choices": [_field(r, where, c) for c in choice_fields],
                "answer": label - first,
            }
            for (where, r), label in zip(records, gold, strict=True)
        ]

    return read


_read_piqa = _two_file_reader(("goal",), ("sol1", "sol2"), 0)
_read_siqa = _two_file_reader(("context", "question"), ("answerA", "answerB", "answerC"), 1)


def read_piqa(path, labels=None, fewshot=None, fewshot_labels=None) -> Task:
    """PIQA: {"goal", "sol1", "sol2"} JSONL + labels (0/1) in `<stem>-labels.lst`."""
    spec = TaskSpec(name="piqa", type="multiple_choice", template="Question: {goal}\nAnswer:")
    train = _read_piqa(Path(fewshot), fewshot_labels) if fewshot else None
    return _task(spec, _read_piqa(Path(path), labels), train, Path(path))


def read_siqa(path, labels=None, fewshot=None, fewshot_labels=None) -> Task:
    """Social IQa: {"context", "question", "answerA".."answerC"} JSONL + labels (1-3) in
    `<stem>-labels.lst`."""
    spec = TaskSpec(name="siqa", type="multiple_choice", template="Q: {context} {question}\nA:")
    train = _read_siqa(Path(fewshot), fewshot_labels) if fewshot else None
    return _task(spec, _read_siqa(Path(path), labels), train, Path(path))


def _hellaswag_clean(text: str) -> str:
    # As the harness: WikiHow's "[title]" and other bracketed artifacts go.
    text = text.strip().replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def read_hellaswag(path, fewshot=None) -> Task:
    """HellaSwag JSONL: {"activity_label", "ctx_a", "ctx_b", "endings", "label"}."""

    def read(file: Path) -> list[dict]:
        items = []
        for where, r in _lines(file):
            endings = _field(r, where, "endings", list)
            label = _field(r, where, "label", int)
            if not 0 <= label < len(endings):
                raise TaskError(f"{where}: label: {label} is not an index of the endings")
            ctx = _field(r, where, "ctx_a") + " " + _field(r, where, "ctx_b").capitalize()
            items.append(
                {
                    "id": where,
                    "question": _hellaswag_clean(_field(r, where, "activity_label") + ": " + ctx),
                    "choices": [_hellaswag_clean(str(e)) for e in endings],
                    "answer": label,
                }
            )
        return items

    spec = TaskSpec(name="hellaswag", type="multiple_choice", template="{question}")
    return _task(spec, read(Path(path)), _split(fewshot, read), Path(path))


def read_winogrande(path, fewshot=None) -> Task:
    """WinoGrande JSONL: {"sentence" with one "_", "option1", "option2", "answer": "1"|"2"}.
    Partial scoring: the sentence up to the blank with each option is the prompt, the rest
    of the sentence is what is scored (the harness's, and GPT-3's, evaluation)."""

    def read(file: Path) -> list[dict]:
        items = []
        for where, r in _lines(file):
            sentence = _field(r, where, "sentence")
            if sentence.count("_") != 1:
                raise TaskError(f"{where}: sentence: needs exactly one '_' (the blank)")
            answer = _field(r, where, "answer")
            if answer not in ("1", "2"):
                raise TaskError(f"{where}: answer: must be '1' or '2', got {answer!r}")
            options = [_field(r, where, "option1"), _field(r, where, "option2")]
            blank = sentence.index("_")
            items.append(
                {
                    "id": r.get("qID", where),
                    "question": sentence,
                    "choices": options,
                    "answer": int(answer) - 1,
                    "contexts": [sentence[:blank] + option for option in options],
                    "target": sentence[blank + 1 :].strip(),
                }
            )
        return items

    spec = TaskSpec(
        name="winogrande", type="multiple_choice", template="{question}", normalization="none"
    )
    return _task(spec, read(Path(path)), _split(fewshot, read), Path(path))


def _read_arc_style(file: Path) -> list[dict]:
    """ARC / OpenBookQA JSONL: {"id", "question": {"stem", "choices": [{"text", "label"}]},
    "answerKey"}."""
    items = []
    for where, r in _lines(file):
        choices = _field(r, where, "question.choices", list)
        at = [f"{where}: question.choices[{j}]" for j in range(len(choices))]
        labels = [_field(c, w, "label") for c, w in zip(choices, at, strict=True)]
        texts = [_field(c, w, "text") for c, w in zip(choices, at, strict=True)]
        key = _field(r, where, "answerKey").strip()
        if key not in labels:
            raise TaskError(f"{where}: answerKey: {key!r} is not one of the labels {labels}")
        items.append(
            {
                "id": r.get("id", where),
                "question": _field(r, where, "question.stem"),
                "choices": texts,
                "answer": labels.index(key),
            }
        )
    return items


def read_arc(path, fewshot=None, name: str | None = None) -> Task:
    """ARC (easy or challenge) JSONL. Rule: chars (the paper names only OpenBookQA and BoolQ
    for the answer rule)."""
    name = name or ("arc-challenge" if "challenge" in str(path).lower() else "arc-easy")
    spec = TaskSpec(name=name, type="multiple_choice", template="Question: {question}\nAnswer:")
    return _task(spec, _read_arc_style(Path(path)), _split(fewshot, _read_arc_style), Path(path))


def read_openbookqa(path, fewshot=None) -> Task:
    """OpenBookQA JSONL (ARC's format); the prompt is the bare question stem, as in the
    harness. Rule: answer (the paper)."""
    spec = TaskSpec(
        name="openbookqa", type="multiple_choice", template="{question}", normalization="answer"
    )
    return _task(spec, _read_arc_style(Path(path)), _split(fewshot, _read_arc_style), Path(path))


# ---- reading comprehension -----------------------------------------------------------


def _race_files(path: Path) -> list[Path]:
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
    if path.is_file():
        return [path]
    raise TaskError(f"{path}: no such file or folder")


def read_race(path, name: str | None = None) -> Task:
    """RACE: one JSON file per article, {"article", "questions", "options", "answers"}, in a
    folder (RACE/test/high) or one file. Every question is an item; its prompt is the
    article and the questions before it, answered, as GPT-3 and the harness build it (the
    harness scores only the last question of each article: those items are identical)."""
    path = Path(path)
    items = []
    for file in _race_files(path):
        where = str(file)
        try:
            r = json.loads(file.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise TaskError(f"{where}: not JSON ({err})") from None
        if not isinstance(r, dict):
            raise TaskError(f"{where}: an article must be a JSON object")
        article = _field(r, where, "article")
        questions = _field(r, where, "questions", list)
        options = _field(r, where, "options", list)
        answers = _field(r, where, "answers", list)
        if not len(questions) == len(options) == len(answers):
            raise TaskError(f"{where}: questions, options and answers differ in length")
        text = "Article: " + article + "\n\n"
        for j, (question, opts, answer) in enumerate(zip(questions, options, answers, strict=True)):
            if answer not in ("A", "B", "C", "D") or len(opts) != 4:
                raise TaskError(f"{where}: question {j}: needs 4 options and an answer A-D")
            gold = "ABCD".index(answer)
            items.append(
                {
                    "id": f"{r.get('id', file.name)}/{j}",
                    "question": question,
                    "prompt": text + question,
                    "choices": list(opts),
                    "answer": gold,
                }
            )
            if question[-6:] == "  _  .":  # a cloze: the answer goes in the blank
                text += question[:-5] + opts[gold] + "\n"
            else:
                text += "Question: " + question + "\n" + "Answer: " + opts[gold] + "\n"
    name = name or ("race-" + path.name if path.name in ("high", "middle") else "race")
    spec = TaskSpec(name=name, type="multiple_choice", template="{prompt}")
    return _task(spec, items, None, path)


# ---- closed-book question answering --------------------------------------------------

_CLOSED_BOOK = {
    "type": "free_form",
    "description": "Answer these questions:\n",
    "template": "Q: {question}\nA:",
    "fewshot_delimiter": "\n",
    "stop": ["\n"],
    "max_new_tokens": 32,
    "answer_format": "qa",
}


def read_naturalquestions(path, fewshot=None, num_fewshot: int = 0) -> Task:
    """NaturalQuestions-open JSONL: {"question", "answer": [aliases]}. Exact match after the
    paper's normalization against any alias; 0/1/5/64-shot in the paper."""

    def read(file: Path) -> list[dict]:
        items = []
        for where, r in _lines(file):
            answers = _field(r, where, "answer", list)
            if not answers or not all(isinstance(a, str) for a in answers):
                raise TaskError(f"{where}: answer: must be a non-empty list of strings")
            question = _field(r, where, "question")
            items.append({"id": where, "question": question, "answers": answers})
        return items

    spec = TaskSpec(name="naturalquestions", num_fewshot=num_fewshot, **_CLOSED_BOOK)
    return _task(spec, read(Path(path)), _split(fewshot, read), Path(path))


def _triviaqa_records(file: Path) -> Iterator[tuple[str, dict]]:
    """The published JSON ({"Data": [...]}) or one record per line."""
    if file.suffix == ".jsonl":
        yield from _lines(file)
        return
    if not file.is_file():
        raise TaskError(f"{file}: no such file")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise TaskError(f"{file}: not JSON ({err.msg})") from None
    records = _field(data, str(file), "Data", list) if isinstance(data, dict) else None
    if records is None:
        raise TaskError(f"{file}: expected TriviaQA's {{'Data': [...]}}")
    for i, r in enumerate(records):
        yield f"{file}:Data[{i}]", r


def read_triviaqa(path, fewshot=None, num_fewshot: int = 0) -> Task:
    """TriviaQA: {"Question", "Answer": {"Value", "Aliases"}, "QuestionId"} records. Exact
    match against the value or any alias; 0/1/5/64-shot in the paper."""

    def read(file: Path) -> list[dict]:
        items = []
        for where, r in _triviaqa_records(file):
            aliases = _field(r, where, "Answer.Aliases", list)
            answers = list(dict.fromkeys([_field(r, where, "Answer.Value"), *aliases]))
            items.append(
                {
                    "id": r.get("QuestionId", where),
                    "question": _field(r, where, "Question"),
                    "answers": answers,
                }
            )
        return items

    spec = TaskSpec(name="triviaqa", num_fewshot=num_fewshot, **_CLOSED_BOOK)
    return _task(spec, read(Path(path)), _split(fewshot, read), Path(path))


# ---- mathematical reasoning ----------------------------------------------------------


def read_gsm8k(path, fewshot=None, num_fewshot: int = 8) -> Task:
    """GSM8k JSONL: {"question", "answer": "...reasoning...\\n#### 72"}. The final answer
    is the number after "####"; shots are training solutions without the calculator
    annotations ("<<48/2=24>>"). 8-shot (Minerva's setup, which the paper uses)."""

    def read(file: Path) -> list[dict]:
        items = []
        for where, r in _lines(file):
            solution = _field(r, where, "answer")
            if "####" not in solution:
                raise TaskError(f"{where}: answer: no '#### <number>' final answer")
            items.append(
                {
                    "id": where,
                    "question": _field(r, where, "question"),
                    "solution": re.sub(r"<<[^>]*>>", "", solution),
                    "answers": [normalize_number(solution.rsplit("####", 1)[1])],
                }
            )
        return items

    spec = TaskSpec(
        name="gsm8k",
        type="free_form",
        template="Question: {question}\nAnswer:",
        num_fewshot=num_fewshot,
        stop=["\n\n", "Question:"],
        max_new_tokens=256,
        answer_format="gsm8k",
    )
    return _task(spec, read(Path(path)), _split(fewshot, read), Path(path))


def _read_math(path: Path) -> list[dict]:
    """MATH: one JSON file per problem ({"problem", "solution", "level", "type"}) in a
    folder tree (MATH/test/algebra/1.json), or JSONL of the same records."""
    if path.is_file() and path.suffix == ".jsonl":
        records = list(_lines(path))
    else:
        records = []
        for file in _race_files(path):  # any file in the tree
            if file.suffix != ".json":
                continue
            try:
                records.append((str(file), json.loads(file.read_text(encoding="utf-8"))))
            except json.JSONDecodeError as err:
                raise TaskError(f"{file}: not JSON ({err.msg})") from None
    items = []
    for where, r in records:
        solution = _field(r, where, "solution")
        boxed = last_boxed(solution)
        if boxed is None:
            raise TaskError(f"{where}: solution: no \\boxed{{...}} final answer")
        items.append(
            {
                "id": where,
                "question": _field(r, where, "problem"),
                "solution": solution,
                "answers": [boxed],
                "level": r.get("level"),
                "subject": r.get("type"),
            }
        )
    return items


def read_math(path, fewshot=None, num_fewshot: int = 4) -> Task:
    """MATH (Hendrycks et al.); the final answer is the solution's last \\boxed{}. 4-shot
    (Minerva's setup)."""
    spec = TaskSpec(
        name="math",
        type="free_form",
        template="Problem:\n{question}\n\nSolution:",
        num_fewshot=num_fewshot,
        stop=["\n\nProblem:"],
        max_new_tokens=512,
        answer_format="math",
    )
    return _task(spec, _read_math(Path(path)), _split(fewshot, _read_math), Path(path))


# ---- code generation -----------------------------------------------------------------


def read_humaneval(path) -> Task:
    """HumanEval JSONL: {"task_id", "prompt", "test", "entry_point"}; the model continues
    the prompt (signature and docstring), zero-shot, stopping where Codex's evaluation
    stops (a new top-level statement)."""
    items = []
    for where, r in _lines(Path(path)):
        prompt = _field(r, where, "prompt")
        entry = _field(r, where, "entry_point")
        items.append(
            {
                "id": r.get("task_id", where),
                "question": prompt,
                "prefix": prompt,
                "test": _field(r, where, "test") + f"\n\ncheck({entry})",
                "solution": r.get("canonical_solution", ""),
            }
        )
    spec = TaskSpec(
        name="humaneval",
        type="code",
        template="{question}",
        target_delimiter="",
        stop=["\nclass", "\ndef", "\n#", "\nif", "\nprint"],
        max_new_tokens=512,
    )
    return _task(spec, items, None, Path(path))


MBPP_SHOTS = (2, 3, 4)
"""Austin et al.'s prompt examples (task ids 2-4); the test split is ids 11-510."""


def read_mbpp(path, num_fewshot: int = 3) -> Task:
    """MBPP JSONL: {"task_id", "text", "code", "test_list", "test_setup_code"}; 3-shot with
    tasks 2-4 as Austin et al.; the items scored are ids 11-510 when the file holds them
    (mbpp.jsonl holds all 974), else every task but the shots."""
    items = []
    for where, r in _lines(Path(path)):
        tests = [str(t) for t in _field(r, where, "test_list", list)]
        task_id = _field(r, where, "task_id", int)
        items.append(
            {
                "id": task_id,
                "question": _field(r, where, "text"),
                "tests": "\n".join(tests),
                "prefix": "",
                "test": str(r.get("test_setup_code") or "") + "\n" + "\n".join(tests),
                "solution": _field(r, where, "code").replace("\r\n", "\n") + "\n[DONE]",
            }
        )
    shots = [i for i in items if i["id"] in MBPP_SHOTS]
    rest = [i for i in items if i["id"] not in MBPP_SHOTS]
    test = [i for i in rest if 11 <= i["id"] <= 510] or rest
    spec = TaskSpec(
        name="mbpp",
        type="code",
        template="You are an expert Python programmer, and here is your task: {question} "
        "Your code should pass these tests:\n\n{tests}\n[BEGIN]\n",
        target_delimiter="",
        fewshot_sampler="first",
        num_fewshot=num_fewshot,
        stop=["[DONE]"],
        max_new_tokens=512,
    )
    return _task(spec, test, shots, Path(path))


# ---- MMLU ----------------------------------------------------------------------------


def _read_mmlu_split(folder: Path, split: str) -> list[dict]:
    files = sorted(folder.glob(f"*_{split}.csv"))
    if not files:
        raise TaskError(f"{folder}: no *_{split}.csv files (MMLU's data/{split}/)")
    items = []
    for file in files:
        subject = file.name.removesuffix(f"_{split}.csv")
        with open(file, newline="", encoding="utf-8") as f:
            for number, row in enumerate(csv.reader(f), 1):
                where = f"{file}:{number}"
                if len(row) != 6 or row[5] not in ("A", "B", "C", "D"):
                    raise TaskError(
                        f"{where}: a row is question,A,B,C,D,answer with answer A-D; got {row!r}"
                    )
                items.append(
                    {
                        "id": where,
                        "subject": subject,
                        "subject_name": subject.replace("_", " "),
                        "question": row[0].strip(),
                        **dict(zip("ABCD", row[1:5], strict=True)),
                        "choices": ["A", "B", "C", "D"],
                        "answer": "ABCD".index(row[5]),
                    }
                )
    return items


def read_mmlu(path, split: str = "test", num_fewshot: int = 5) -> Task:
    """MMLU's CSV (no header: question, A, B, C, D, answer), one file per subject, in
    `<path>/<split>/<subject>_<split>.csv`; the shots are the first five of the same
    subject's `<path>/dev/` file, as the benchmark provides them. Accuracy over every
    question of every subject."""
    path = Path(path)
    spec = TaskSpec(
        name="mmlu",
        type="multiple_choice",
        description="The following are multiple choice questions (with answers) about "
        "{subject_name}.\n\n",
        template="{question}\nA. {A}\nB. {B}\nC. {C}\nD. {D}\nAnswer:",
        normalization="none",
        num_fewshot=num_fewshot,
        fewshot_sampler="first",
        fewshot_group="subject",
    )
    train = _read_mmlu_split(path / "dev", "dev") if num_fewshot else None
    return _task(spec, _read_mmlu_split(path / split, split), train, path)


# ---- the registry --------------------------------------------------------------------

BENCHMARKS: dict[str, Benchmark] = {
    "boolq": Benchmark(read_boolq, "0", "acc", "answer"),
    "piqa": Benchmark(read_piqa, "0", "acc", "chars"),
    "siqa": Benchmark(read_siqa, "0", "acc", "chars"),
    "hellaswag": Benchmark(read_hellaswag, "0", "acc", "chars"),
    "winogrande": Benchmark(read_winogrande, "0", "acc", "partial"),
    "arc": Benchmark(read_arc, "0", "acc", "chars"),
    "openbookqa": Benchmark(read_openbookqa, "0", "acc", "answer"),
    "race": Benchmark(read_race, "0", "acc", "chars"),
    "naturalquestions": Benchmark(read_naturalquestions, "0, 1, 5, 64", "exact_match", "qa"),
    "triviaqa": Benchmark(read_triviaqa, "0, 1, 5, 64", "exact_match", "qa"),
    "gsm8k": Benchmark(read_gsm8k, "8", "maj1@1, maj1@100", "gsm8k"),
    "math": Benchmark(read_math, "4", "maj1@1, maj1@256", "math"),
    "humaneval": Benchmark(read_humaneval, "0", "pass@1, pass@100", "sandbox"),
    "mbpp": Benchmark(read_mbpp, "3", "pass@1, pass@80", "sandbox"),
    "mmlu": Benchmark(read_mmlu, "5", "acc", "none (letter)"),
}


def read_benchmark(name: str, path, **options) -> Task:
    """The benchmark `name` (a key of `BENCHMARKS`) from its published files at `path`."""
    if name not in BENCHMARKS:
        raise TaskError(f"unknown benchmark {name!r}; one of {', '.join(BENCHMARKS)}")
    return BENCHMARKS[name].reader(path, **options)
