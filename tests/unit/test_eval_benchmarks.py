"""The paper's benchmarks read from small files in their published formats, and the rule
each is scored by, decided on hand-made model outputs (log-likelihoods, generations)."""

from __future__ import annotations

import csv
import json

import pytest

from llamaray.eval.benchmarks import BENCHMARKS, read_benchmark
from llamaray.eval.sandbox import unavailable_reason
from llamaray.eval.scoring import aggregate, build_requests
from llamaray.eval.tasks import TaskError


def jsonl(path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def respond(requests, scores):
    """Responses to `requests`: scores[(item, role, choice)] or a generation per item."""
    return [
        scores[(r.item, r.role, r.choice)] if r.role != "generate" else scores[r.item]
        for r in requests
    ]


# ---- multiple choice -----------------------------------------------------------------


def test_boolq_uses_the_answer_rule(tmp_path):
    file = jsonl(
        tmp_path / "dev.jsonl",
        [
            {"question": "is the sky blue", "passage": "The sky is blue.", "answer": True},
            {"question": "is fire cold", "passage": "Fire is hot.", "answer": False},
        ],
    )
    task = read_benchmark("boolq", file)
    assert task.spec.normalization == "answer"
    requests = build_requests(task)
    first = requests[0]
    assert first.context == "The sky is blue.\nQuestion: is the sky blue?\nAnswer:"
    assert (first.continuation, requests[2].continuation) == (" no", " yes")
    assert requests[1].role == "prior" and requests[1].context == "Answer:"
    # " no" is more likely after any "Answer:" than " yes", and only a little more likely
    # after these questions: the answer rule picks "yes" for item 0, per character "no".
    scores = {}
    for item in (0, 1):
        scores |= {(item, "choice", 0): -1.0, (item, "choice", 1): -1.5}
        scores |= {(item, "prior", 0): -0.5, (item, "prior", 1): -3.0}
    result = aggregate(task, requests, respond(requests, scores))
    assert [r["prediction"] for r in result.records] == [1, 1]
    assert result.metrics["acc"] == 0.5 and result.metrics["acc_chars"] == 0.5
    assert result.metrics["acc_raw"] == 0.5


def test_piqa_reads_the_labels_file_and_uses_chars(tmp_path):
    file = jsonl(
        tmp_path / "valid.jsonl",
        [
            {"goal": "Dry a wet phone", "sol1": "Put it in rice overnight.", "sol2": "Microwave"},
            {"goal": "Open a jar", "sol1": "Tap the lid", "sol2": "Freeze it"},
        ],
    )
    (tmp_path / "valid-labels.lst").write_text("0\n1\n")
    task = read_benchmark("piqa", file)
    assert [i["answer"] for i in task.items()] == [0, 1]
    requests = build_requests(task)
    assert requests[0].context == "Question: Dry a wet phone\nAnswer:"
    assert requests[0].continuation == " Put it in rice overnight."
    # Item 0: the long right answer loses on the total, wins per character.
    scores = {(0, "choice", 0): -10.0, (0, "choice", 1): -6.0}
    scores |= {(1, "choice", 0): -5.0, (1, "choice", 1): -4.0}
    result = aggregate(task, requests, respond(requests, scores))
    assert result.metrics["acc"] == 1.0 and result.metrics["acc_raw"] == 0.5
    (tmp_path / "valid-labels.lst").write_text("0\n")
    with pytest.raises(TaskError, match="1 labels for 2 records"):
        read_benchmark("piqa", file)
    (tmp_path / "valid-labels.lst").write_text("0\n2\n")
    with pytest.raises(TaskError, match=r"valid-labels.lst:2: label '2' is not one of \[0, 1\]"):
        read_benchmark("piqa", file)


def test_siqa_labels_count_from_one(tmp_path):
    record = {"context": "Kai gave Sam a gift.", "question": "How does Sam feel?"}
    record |= {"answerA": "sad", "answerB": "grateful", "answerC": "angry"}
    file = jsonl(tmp_path / "dev.jsonl", [record])
    (tmp_path / "dev-labels.lst").write_text("2\n")
    task = read_benchmark("siqa", file)
    assert task.items()[0]["answer"] == 1 and task.items()[0]["choices"][1] == "grateful"
    assert build_requests(task)[0].context == "Q: Kai gave Sam a gift. How does Sam feel?\nA:"


def test_hellaswag_cleans_contexts_as_the_harness(tmp_path):
    record = {
        "ind": 4,
        "activity_label": "Removing ice from car",
        "ctx_a": "Then, the man writes over the snow.",
        "ctx_b": "then",
        "endings": [", the man [title] continues.", " a woman appears.", " x", " y"],
        "label": 1,
    }
    task = read_benchmark("hellaswag", jsonl(tmp_path / "val.jsonl", [record]))
    item = task.items()[0]
    assert item["question"] == "Removing ice from car: Then, the man writes over the snow. Then"
    assert item["choices"][:2] == [", the man. continues.", "a woman appears."]
    bad = jsonl(tmp_path / "bad.jsonl", [record | {"label": 4}])
    with pytest.raises(TaskError, match=r"bad.jsonl:1: label: 4 is not an index"):
        read_benchmark("hellaswag", bad)


def test_winogrande_scores_the_rest_of_the_sentence_after_each_option(tmp_path):
    record = {
        "qID": "w1",
        "sentence": "The trophy didn't fit in the suitcase because the _ was too big.",
        "option1": "trophy",
        "option2": "suitcase",
        "answer": "1",
    }
    task = read_benchmark("winogrande", jsonl(tmp_path / "dev.jsonl", [record]))
    requests = build_requests(task)
    assert [(r.context, r.continuation) for r in requests] == [
        ("The trophy didn't fit in the suitcase because the trophy", " was too big."),
        ("The trophy didn't fit in the suitcase because the suitcase", " was too big."),
    ]
    result = aggregate(task, requests, [-3.0, -4.0])
    assert result.records[0]["prediction"] == 0 and result.metrics["acc"] == 1.0
    # The same continuation for both: the per-character rule cannot disagree.
    assert result.metrics["acc_chars"] == 1.0
    result = aggregate(task, requests, [-4.0, -3.0])
    assert result.metrics["acc"] == 0.0
    # A shot is the whole sentence with its right option.
    shot = record | {"qID": "w0", "sentence": "Ann thanked Bo because _ helped.", "answer": "2"}
    shot |= {"option1": "Ann", "option2": "Bo"}
    task = read_benchmark(
        "winogrande", tmp_path / "dev.jsonl", fewshot=jsonl(tmp_path / "train.jsonl", [shot])
    )
    context = build_requests(task, num_fewshot=1)[1].context
    assert context == "Ann thanked Bo because Bo helped.\n\n" + requests[1].context
    with pytest.raises(TaskError, match="answer: must be '1' or '2'"):
        read_benchmark("winogrande", jsonl(tmp_path / "x.jsonl", [record | {"answer": ""}]))


def arc_record(key="B", labels="ABCD"):
    return {
        "id": "Mercury_1",
        "question": {
            "stem": "Which gas do plants take in?",
            "choices": [
                {"text": t, "label": label}
                for t, label in zip(
                    ["oxygen", "carbon dioxide", "helium", "neon"], labels, strict=True
                )
            ],
        },
        "answerKey": key,
    }


def test_arc_and_openbookqa_read_the_same_format_with_their_own_rules(tmp_path):
    file = jsonl(tmp_path / "ARC-Challenge-Dev.jsonl", [arc_record(), arc_record("2", "1234")])
    arc = read_benchmark("arc", file)
    assert arc.name == "arc-challenge" and arc.spec.normalization == "chars"
    assert [i["answer"] for i in arc.items()] == [1, 1]
    assert build_requests(arc)[0].context == "Question: Which gas do plants take in?\nAnswer:"
    # ARC is not among the paper's "Answer:"-rule tasks: no prior requests.
    assert {r.role for r in build_requests(arc)} == {"choice"}
    obqa = read_benchmark("openbookqa", file)
    requests = build_requests(obqa)
    assert obqa.spec.normalization == "answer"
    assert requests[0].context == "Which gas do plants take in?"
    assert requests[1].role == "prior" and requests[1].continuation == " oxygen"
    with pytest.raises(TaskError, match=r"answerKey: 'E' is not one of the labels"):
        read_benchmark("arc", jsonl(tmp_path / "bad.jsonl", [arc_record("E")]))
    broken = arc_record()
    del broken["question"]["choices"][2]["text"]
    with pytest.raises(TaskError, match=r"bad.jsonl:1: question.choices\[2\]: text: missing"):
        read_benchmark("arc", jsonl(tmp_path / "bad.jsonl", [broken]))


def test_race_items_carry_the_questions_before_them_answered(tmp_path):
    article = {
        "id": "high1.txt",
        "article": "Tom has a dog.",
        "questions": ["Tom has a  _  .", "What is Tom's pet?"],
        "options": [["cat", "dog", "cow", "pig"], ["a fish", "a dog", "a bird", "none"]],
        "answers": ["B", "B"],
    }
    folder = tmp_path / "RACE" / "test" / "high"
    folder.mkdir(parents=True)
    (folder / "high1.txt").write_text(json.dumps(article))
    task = read_benchmark("race", folder)
    assert task.name == "race-high" and len(task.items()) == 2
    requests = build_requests(task)
    assert requests[0].context == "Article: Tom has a dog.\n\nTom has a  _  ."
    # The last question's prompt is the harness's: earlier cloze answered in its blank.
    assert requests[4].context == "Article: Tom has a dog.\n\nTom has a dog\nWhat is Tom's pet?"
    assert requests[4].continuation == " a fish" and task.spec.normalization == "chars"


def test_mmlu_is_five_shot_from_the_same_subjects_dev_file(tmp_path):
    def write(split, subject, rows):
        folder = tmp_path / "data" / split
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / f"{subject}_{split}.csv", "w", newline="") as f:
            csv.writer(f).writerows(rows)

    for subject in ("anatomy", "abstract_algebra"):
        write("dev", subject, [[f"{subject} dev {i}", "a", "b", "c", "d", "C"] for i in range(6)])
    write("test", "anatomy", [["  Which bone?  ", "femur", "ulna", "skull", "rib", "A"]])
    write("test", "abstract_algebra", [["Order of Z_4?", "1", "2", "3", "4", "D"]])
    task = read_benchmark("mmlu", tmp_path / "data")
    requests = build_requests(task)
    assert len(requests) == 8 and [r.continuation for r in requests[:4]] == [" A", " B", " C", " D"]
    context = requests[4].context  # anatomy (files are read in name order)
    header = "The following are multiple choice questions (with answers) about anatomy.\n\n"
    assert context.startswith(header + "anatomy dev 0\nA. a\nB. b\nC. c\nD. d\nAnswer: C\n\n")
    assert "anatomy dev 4" in context and "anatomy dev 5" not in context
    assert "algebra" not in context
    assert context.endswith("Which bone?\nA. femur\nB. ulna\nC. skull\nD. rib\nAnswer:")
    assert "about abstract algebra." in requests[0].context
    # All choices are one letter: the raw log-likelihood decides.
    scores = {(i, "choice", c): -2.0 for i in (0, 1) for c in range(4)}
    scores |= {(0, "choice", 3): -1.0, (1, "choice", 1): -1.0}
    result = aggregate(task, requests, respond(requests, scores))
    assert [r["prediction"] for r in result.records] == [3, 1]
    assert result.metrics["acc"] == 0.5
    (tmp_path / "data" / "test" / "anatomy_test.csv").write_text("q,a,b,c,d,E\n")
    with pytest.raises(TaskError, match=r"anatomy_test.csv:1: a row is question,A,B,C,D"):
        read_benchmark("mmlu", tmp_path / "data")


# ---- free form -----------------------------------------------------------------------


def test_closed_book_qa_prompt_and_the_papers_answer_cut(tmp_path):
    train = jsonl(
        tmp_path / "train.jsonl",
        [{"question": "who sang who wants to be a millionaire", "answer": ["Frank Sinatra"]}],
    )
    test = jsonl(
        tmp_path / "test.jsonl",
        [
            {"question": "who wrote the origin of species", "answer": ["Charles Darwin"]},
            {"question": "capital of france", "answer": ["Paris"]},
            {"question": "largest ocean", "answer": ["the Pacific Ocean", "Pacific"]},
        ],
    )
    task = read_benchmark("naturalquestions", test, fewshot=train, num_fewshot=1)
    requests = build_requests(task)
    assert requests[0].context == (
        "Answer these questions:\nQ: who sang who wants to be a millionaire\nA: Frank Sinatra\n"
        "Q: who wrote the origin of species\nA:"
    )
    generations = {0: " Charles Darwin. He was", 1: " Paris, France", 2: " The Pacific\nQ: x"}
    result = aggregate(task, requests, respond(requests, generations))
    assert [r["prediction"] for r in result.records] == [
        " Charles Darwin",
        " Paris",
        " The Pacific",
    ]
    assert result.metrics["exact_match"] == 1.0
    generations = {0: " Darwin", 1: " Lyon.", 2: " Atlantic"}
    assert aggregate(task, requests, respond(requests, generations)).metrics["exact_match"] == 0


def test_triviaqa_reads_the_published_json_and_matches_any_alias(tmp_path):
    data = {
        "Data": [
            {
                "Question": "Which planet is the red planet?",
                "QuestionId": "tc_1",
                "Answer": {"Value": "Mars", "Aliases": ["Mars", "Planet Mars", "The Red Planet"]},
            }
        ]
    }
    (tmp_path / "unfiltered-web-dev.json").write_text(json.dumps(data))
    task = read_benchmark("triviaqa", tmp_path / "unfiltered-web-dev.json")
    item = task.items()[0]
    assert item["id"] == "tc_1" and item["answers"] == ["Mars", "Planet Mars", "The Red Planet"]
    requests = build_requests(task)
    assert requests[0].context == "Answer these questions:\nQ: Which planet is the red planet?\nA:"
    for generation, hit in [(" planet mars.", True), (" red planet", True), (" Venus", False)]:
        assert aggregate(task, requests, [generation]).metrics["exact_match"] == hit
    (tmp_path / "bad.json").write_text(json.dumps({"Data": [{"Question": "q"}]}))
    with pytest.raises(TaskError, match=r"bad.json:Data\[0\]: Answer.Aliases: missing"):
        read_benchmark("triviaqa", tmp_path / "bad.json")


def test_gsm8k_compares_the_number_after_the_marks(tmp_path):
    solution = "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n48+24 = <<48+24=72>>72\n#### 72"
    train = jsonl(tmp_path / "train.jsonl", [{"question": "How many clips?", "answer": solution}])
    test = jsonl(
        tmp_path / "test.jsonl",
        [{"question": "What is 1000 + 7?", "answer": "1000 + 7 = 1007\n#### 1,007"}],
    )
    task = read_benchmark("gsm8k", test, fewshot=train, num_fewshot=1)
    context = build_requests(task)[0].context
    assert context.startswith("Question: How many clips?\nAnswer: Natalia sold 48/2 = 24 clips")
    assert "<<" not in context and context.endswith("Question: What is 1000 + 7?\nAnswer:")
    for generation, hit in [
        (" 1000 + 7 = 1007\n#### 1007", True),
        (" It is $1,007.00", True),  # no marks: the last number
        (" 1000 + 7 = 1008\n#### 1008", False),
        (" I do not know", False),
    ]:
        assert aggregate(task, build_requests(task), [generation]).metrics["exact_match"] == hit
    with pytest.raises(TaskError, match="answer: no '#### <number>'"):
        read_benchmark("gsm8k", jsonl(tmp_path / "bad.jsonl", [{"question": "q", "answer": "7"}]))


def test_math_reads_a_folder_of_problems_and_compares_boxed_answers(tmp_path):
    folder = tmp_path / "MATH" / "test" / "algebra"
    folder.mkdir(parents=True)
    problem = {
        "problem": "What is $1/2 + 0$?",
        "level": "Level 1",
        "type": "Algebra",
        "solution": "It is $\\boxed{\\frac{1}{2}}$.",
    }
    (folder / "1.json").write_text(json.dumps(problem))
    task = read_benchmark("math", tmp_path / "MATH" / "test", num_fewshot=0)
    assert task.items()[0]["answers"] == ["\\frac{1}{2}"]
    requests = build_requests(task)
    assert requests[0].context == "Problem:\nWhat is $1/2 + 0$?\n\nSolution:"
    for generation, hit in [
        (" So $x = \\boxed{\\dfrac12}$.", True),
        (" The final answer is $0.5$. I hope it is correct.", True),
        (" \\boxed{\\frac{1}{3}}", False),
        (" no idea", False),
    ]:
        assert aggregate(task, requests, [generation]).metrics["exact_match"] == hit


# ---- code ----------------------------------------------------------------------------

needs_sandbox = pytest.mark.skipif(unavailable_reason() is not None, reason="no code sandbox")

HUMANEVAL = {
    "task_id": "HumanEval/0",
    "prompt": 'def add(a, b):\n    """Add two numbers."""\n',
    "canonical_solution": "    return a + b\n",
    "test": (
        "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n"
    ),
    "entry_point": "add",
}


@needs_sandbox
def test_humaneval_runs_the_completion_against_its_tests(tmp_path):
    second = HUMANEVAL | {"task_id": "HumanEval/1"}
    task = read_benchmark("humaneval", jsonl(tmp_path / "HumanEval.jsonl", [HUMANEVAL, second]))
    requests = build_requests(task)
    assert requests[0].context == HUMANEVAL["prompt"]
    assert "\ndef" in task.spec.stop  # a new top-level function ends the completion
    result = aggregate(task, requests, ["    return a + b\n", "    return a - b\n"])
    assert [r["passed"] for r in result.records] == [True, False]
    assert result.metrics["pass@1"] == 0.5


@needs_sandbox
def test_mbpp_is_three_shot_from_tasks_two_to_four(tmp_path):
    def task(i, text, code, tests):
        return {"task_id": i, "text": text, "code": code, "test_list": tests}

    records = [
        task(1, "unused", "def f(): pass", ["assert True"]),
        *(
            task(i, f"shot {i}", f"def s{i}():\r\n    return {i}", [f"assert s{i}() == {i}"])
            for i in (2, 3, 4)
        ),
        task(
            11, "Write a function to square x.", "def sq(x):\n    return x*x", ["assert sq(3) == 9"]
        ),
    ]
    mbpp = read_benchmark("mbpp", jsonl(tmp_path / "mbpp.jsonl", records))
    assert [i["id"] for i in mbpp.items()] == [11]
    context = build_requests(mbpp)[0].context
    assert context.startswith(
        "You are an expert Python programmer, and here is your task: shot 2 Your code should "
        "pass these tests:\n\nassert s2() == 2\n[BEGIN]\ndef s2():\n    return 2\n[DONE]\n\n"
    )
    assert context.index("shot 3") < context.index("shot 4")
    assert context.endswith("\n\nassert sq(3) == 9\n[BEGIN]\n") and "unused" not in context
    right = aggregate(mbpp, build_requests(mbpp), ["def sq(x):\n    return x ** 2\n"])
    wrong = aggregate(mbpp, build_requests(mbpp), ["def sq(x):\n    return x + x\n"])
    assert right.metrics["pass@1"] == 1.0 and wrong.metrics["pass@1"] == 0.0


def test_every_benchmark_has_a_reader_and_unknown_names_are_refused():
    assert set(BENCHMARKS) >= {
        "boolq", "piqa", "siqa", "hellaswag", "winogrande", "arc", "openbookqa", "race",
        "naturalquestions", "triviaqa", "humaneval", "mbpp", "gsm8k", "math", "mmlu",
    }  # fmt: skip
    with pytest.raises(TaskError, match="unknown benchmark 'squad'"):
        read_benchmark("squad", "x")


def test_eval_cli_refuses_bad_benchmarks_before_any_work(tmp_path, capsys):
    from llamaray.cli import main

    assert main(["eval", "--model", str(tmp_path), "--benchmark", "squad=x.jsonl"]) == 2
    assert "unknown benchmark" in capsys.readouterr().err
    bad = jsonl(tmp_path / "ARC-Easy-Test.jsonl", [arc_record("E")])
    assert main(["eval", "--model", str(tmp_path), "--benchmark", f"arc={bad}"]) == 2
    assert "answerKey: 'E' is not one of the labels" in capsys.readouterr().err
