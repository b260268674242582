"""Our benchmark readers build the very requests lm-evaluation-harness builds for the same
tasks: the harness's own task YAML (its templates, its Python preprocessing) is run on the
same records, in the form its Hugging Face datasets hold them, and every (context,
continuation) string pair must be equal. Equal strings through the one `LanguageModel`
give equal log-likelihoods, so our scores equal the harness's (the adapter's own agreement
with the harness, within 1e-4, is tests/unit/test_harness.py)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from llamaray.eval.benchmarks import read_benchmark
from llamaray.eval.scoring import build_requests

lm_eval = pytest.importorskip("lm_eval", reason="the harness extra (pip install '.[harness]')")

TASKS = Path(lm_eval.__file__).parent / "tasks"


pytestmark = pytest.mark.usefixtures("hf_offline")


def jsonl(path: Path, records) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def harness_requests(
    yaml_file: str, files: dict[str, Path], test: str, num_fewshot: int = 0, fewshot=None
):
    """(doc index, choice index) -> (context, continuation), from the harness's task."""
    from lm_eval.api.task import ConfigurableTask
    from lm_eval.tasks._yaml_loader import load_yaml

    config = load_yaml(TASKS / yaml_file)
    for key in ("tag", "group", "training_split", "validation_split", "test_split"):
        config.pop(key, None)
    config |= {
        "dataset_path": "json",
        "dataset_name": None,
        "dataset_kwargs": {"data_files": {k: str(v) for k, v in files.items()}},
        "test_split": test,
        "fewshot_split": fewshot,
        "num_fewshot": num_fewshot,
    }
    task = ConfigurableTask(config=config)
    assert task.config.num_fewshot == num_fewshot
    task.set_fewshot_seed(0)
    task.build_all_requests(rank=0, world_size=1)
    out = {(i.doc_id, i.idx): tuple(i.arguments) for i in task.instances}
    assert out  # something to compare
    return out


def ours(task, num_fewshot: int = 0, items=None):
    requests = [r for r in build_requests(task, num_fewshot=num_fewshot) if r.role == "choice"]
    keep = range(len(task.items())) if items is None else items
    index = {i: n for n, i in enumerate(keep)}
    return {
        (index[r.item], r.choice): (r.context, r.continuation) for r in requests if r.item in index
    }


def test_boolq_piqa_siqa(tmp_path):
    boolq = [{"question": "is fire hot", "passage": "Fire is hot.", "answer": True}]
    hf = [{"question": "is fire hot", "passage": "Fire is hot.", "label": 1, "idx": 0}]
    expected = harness_requests(
        "super_glue/boolq/default.yaml", {"v": jsonl(tmp_path / "hf-boolq.jsonl", hf)}, "v"
    )
    assert ours(read_benchmark("boolq", jsonl(tmp_path / "boolq.jsonl", boolq))) == expected

    piqa = [{"goal": "Dry a phone", "sol1": "Use rice.", "sol2": "Use an oven."}]
    (tmp_path / "piqa-labels.lst").write_text("0\n")
    expected = harness_requests(
        "piqa/piqa.yaml", {"v": jsonl(tmp_path / "hf-piqa.jsonl", [piqa[0] | {"label": 0}])}, "v"
    )
    assert ours(read_benchmark("piqa", jsonl(tmp_path / "piqa.jsonl", piqa))) == expected

    siqa = [{"context": "Kai smiled.", "question": "Why?", "answerA": "a", "answerB": "b"}]
    siqa[0]["answerC"] = "c"
    (tmp_path / "siqa-labels.lst").write_text("3\n")
    expected = harness_requests(
        "siqa/siqa.yaml", {"v": jsonl(tmp_path / "hf-siqa.jsonl", [siqa[0] | {"label": "3"}])}, "v"
    )
    assert ours(read_benchmark("siqa", jsonl(tmp_path / "siqa.jsonl", siqa))) == expected


def test_hellaswag_and_winogrande(tmp_path):
    record = {
        "ind": 4,
        "activity_label": "Removing ice from car",
        "ctx_a": "Then, the man writes over the snow [header] covering the window.",
        "ctx_b": "a woman",
        "endings": [", the man [title] continues.", " a woman appears.", " x", " y  z"],
        "label": 1,
    }
    hf = record | {"label": "1", "ctx": record["ctx_a"] + " " + record["ctx_b"]}
    hf |= {"source_id": "s", "split": "val", "split_type": "indomain"}
    expected = harness_requests(
        "hellaswag/hellaswag.yaml", {"v": jsonl(tmp_path / "hf-hs.jsonl", [hf])}, "v"
    )
    assert ours(read_benchmark("hellaswag", jsonl(tmp_path / "hs.jsonl", [record]))) == expected

    wino = {"sentence": "The cup broke the _ because it was hard.", "option1": "cup"}
    wino |= {"option2": "glass", "answer": "1"}
    expected = harness_requests(
        "winogrande/default.yaml", {"v": jsonl(tmp_path / "hf-wg.jsonl", [wino])}, "v"
    )
    assert ours(read_benchmark("winogrande", jsonl(tmp_path / "wg.jsonl", [wino]))) == expected


def test_arc_and_openbookqa(tmp_path):
    choices = [
        {"text": t, "label": lab} for t, lab in zip(["oxygen", "CO2", "helium"], "ABC", strict=True)
    ]
    record = {"id": "q1", "question": {"stem": "Plants take in?", "choices": choices}}
    record["answerKey"] = "B"
    hf_choices = {"text": ["oxygen", "CO2", "helium"], "label": ["A", "B", "C"]}
    file = jsonl(tmp_path / "arc.jsonl", [record])
    hf = {"id": "q1", "question": "Plants take in?", "choices": hf_choices, "answerKey": "B"}
    expected = harness_requests("arc/arc_easy.yaml", {"v": jsonl(tmp_path / "a.jsonl", [hf])}, "v")
    assert ours(read_benchmark("arc", file)) == expected
    hf = {"id": "q1", "question_stem": "Plants take in?", "choices": hf_choices, "answerKey": "B"}
    expected = harness_requests(
        "openbookqa/openbookqa.yaml", {"v": jsonl(tmp_path / "o.jsonl", [hf])}, "v"
    )
    assert ours(read_benchmark("openbookqa", file)) == expected


def test_race_last_question_of_each_article(tmp_path):
    article = {
        "id": "high1.txt",
        "article": "Tom has a dog. It is brown.",
        "questions": ["Tom has a  _  .", "What color is it?", "Who owns it?"],
        "options": [["cat", "dog", "cow", "pig"], ["red", "brown", "blue", "green"]],
        "answers": ["B", "B", "A"],
    }
    article["options"].append(["Tom", "Ann", "Bo", "nobody"])
    (tmp_path / "high").mkdir()
    (tmp_path / "high" / "high1.txt").write_text(json.dumps(article))
    problems = [
        {"question": q, "options": o, "answer": a}
        for q, o, a in zip(
            article["questions"], article["options"], article["answers"], strict=True
        )
    ]
    hf = {"article": article["article"], "problems": repr(problems)}
    expected = harness_requests("race/race.yaml", {"t": jsonl(tmp_path / "r.jsonl", [hf])}, "t")
    assert ours(read_benchmark("race", tmp_path / "high"), items=[2]) == expected


def test_mmlu_five_shot(tmp_path):
    dev = [[f"dev question {i}", "a", "b", "c", "d", "ABCD"[i % 4]] for i in range(6)]
    test = [["  Which bone is longest?  ", "femur", "ulna", "skull", "rib", "A"]]
    for split, rows in (("dev", dev), ("test", test)):
        (tmp_path / "data" / split).mkdir(parents=True)
        with open(tmp_path / "data" / split / f"anatomy_{split}.csv", "w", newline="") as f:
            csv.writer(f).writerows(rows)

    def hf(rows):
        return [
            {
                "question": r[0],
                "subject": "anatomy",
                "choices": r[1:5],
                "answer": "ABCD".index(r[5]),
            }
            for r in rows
        ]

    files = {
        "test": jsonl(tmp_path / "t.jsonl", hf(test)),
        "dev": jsonl(tmp_path / "d.jsonl", hf(dev)),
    }
    expected = harness_requests("mmlu/default/mmlu_anatomy.yaml", files, "test", 5, "dev")
    assert ours(read_benchmark("mmlu", tmp_path / "data"), num_fewshot=5) == expected
