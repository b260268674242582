"""Task files, k-shot prompts, the paper's multiple-choice rules and exact match."""

from __future__ import annotations

import json

import pytest

from llamaray.data.sample_text import write_stdlib_sample
from llamaray.eval.answers import qa_answer
from llamaray.eval.lm import LanguageModel
from llamaray.eval.scoring import (
    aggregate,
    build_requests,
    choose,
    evaluate_task,
    exact_match,
    fewshot_context,
    normalize_answer,
)
from llamaray.eval.tasks import TaskError, load_task
from llamaray.model import Llama, get_preset
from llamaray.tokenizer import train_tokenizer


def write_task(root, spec: dict, splits: dict[str, list[dict]]):
    root.mkdir(parents=True, exist_ok=True)
    (root / "task.yaml").write_text(json.dumps(spec))  # JSON is YAML
    for name, items in splits.items():
        (root / f"{name}.jsonl").write_text("".join(json.dumps(i) + "\n" for i in items))
    return root


def mc_items(n, offset=0):
    return [
        {
            "id": f"q{offset + i}",
            "question": f"which number follows {offset + i}?",
            "choices": [str(offset + i + 1), str(offset + i + 2), "none of these"],
            "answer": 0,
        }
        for i in range(n)
    ]


# ---- the rules, on hand-made items whose right answer is known -------------------------


def test_chars_rule_picks_the_long_answer_the_raw_rule_misses():
    # A long right answer has a lower total log-likelihood only because it has more text.
    choices = ["cat", "a domesticated feline"]
    logprobs = [-6.0, -12.0]  # per character: -2.0 and -0.55
    assert choose(logprobs, choices, "none") == 0
    assert choose(logprobs, choices, "chars") == 1


def test_answer_rule_picks_the_answer_likely_for_this_question_not_in_general():
    # "the same" is a likely phrase anywhere; "carbon dioxide" is likely for this question.
    choices = ["the same", "carbon dioxide"]
    conditional = [-4.0, -10.0]  # per character: -0.5 and -0.71: chars picks the distractor
    prior = [-3.0, -16.0]  # log p(choice | "Answer:")
    assert choose(conditional, choices, "chars") == 0
    assert choose(conditional, choices, "answer", prior) == 1
    with pytest.raises(ValueError, match="needs log p"):
        choose(conditional, choices, "answer")


def test_ties_go_to_the_first_choice_and_unknown_rules_fail():
    assert choose([-1.0, -1.0], ["a", "b"], "none") == 0
    with pytest.raises(ValueError, match="unknown rule"):
        choose([-1.0], ["a"], "bytes")


def test_exact_match_normalizes_like_squad():
    assert normalize_answer("  The Eiffel-Tower!  ") == "eiffeltower"
    assert normalize_answer("An apple, a day") == "apple day"
    assert exact_match("the Paris.", ["London", "paris"])
    assert not exact_match("Paris, France", ["paris"])


def test_aggregate_applies_the_configured_rule(tmp_path):
    task = load_task(
        write_task(
            tmp_path / "t",
            {"name": "t", "type": "multiple_choice", "normalization": "answer"},
            {
                "test": [
                    {
                        "id": 1,
                        "question": "q",
                        "choices": ["the same", "carbon dioxide"],
                        "answer": 1,
                    }
                ]
            },
        )
    )
    requests = build_requests(task)
    assert [(r.role, r.choice) for r in requests] == [
        ("choice", 0),
        ("prior", 0),
        ("choice", 1),
        ("prior", 1),
    ]
    assert requests[1].context == "Answer:" and requests[1].continuation == " the same"
    values = {("choice", 0): -4.0, ("choice", 1): -10.0, ("prior", 0): -3.0, ("prior", 1): -16.0}
    result = aggregate(task, requests, [values[(r.role, r.choice)] for r in requests])
    assert result.metrics["acc"] == 1.0  # the answer rule is right...
    assert result.metrics["acc_chars"] == 0.0  # ...where the chars rule is not
    assert result.records[0]["prediction"] == 1 and result.records[0]["priors"] == [-3.0, -16.0]


# ---- k-shot prompts --------------------------------------------------------------------


@pytest.fixture
def mc_task(tmp_path):
    spec = {"name": "next", "type": "multiple_choice", "num_fewshot": 3}
    return load_task(
        write_task(tmp_path / "next", spec, {"train": mc_items(10, 100), "test": mc_items(6)})
    )


def test_fewshot_prompts_are_seeded_per_item_and_solved(mc_task):
    item = mc_task.items()[0]
    a = fewshot_context(mc_task, item, 3, seed=0)
    assert a == fewshot_context(mc_task, item, 3, seed=0)
    assert a != fewshot_context(mc_task, item, 3, seed=1)
    shots = a.split("\n\n")
    assert len(shots) == 4 and shots[-1] == "Question: which number follows 0?\nAnswer:"
    for shot in shots[:-1]:  # each shot is a solved training item
        n = int(shot.split("follows ")[1].split("?")[0])
        assert n >= 100 and shot.endswith(f"Answer: {n + 1}")
    # Other items get other shots; requests use the task's num_fewshot unless overridden.
    assert fewshot_context(mc_task, mc_task.items()[1], 3, 0).split("\n\n")[:-1] != shots[:-1]
    assert build_requests(mc_task)[0].context == a
    assert build_requests(mc_task, num_fewshot=0)[0].context == shots[-1]


def test_an_item_is_never_its_own_shot(tmp_path):
    spec = {"name": "self", "type": "multiple_choice", "fewshot_split": "test"}
    task = load_task(write_task(tmp_path / "s", spec, {"test": mc_items(4)}))
    for seed in range(20):
        for item in task.items():
            context = fewshot_context(task, item, 3, seed)
            assert context.count(item["question"]) == 1
    with pytest.raises(ValueError, match="4-shot needs 4 examples"):
        fewshot_context(task, task.items()[0], 4, 0)


# ---- task files ------------------------------------------------------------------------


def test_bad_task_files_name_the_file_line_and_field(tmp_path):
    good = mc_items(1)[0]
    root = write_task(tmp_path / "bad", {"name": "b", "type": "multiple_choice"}, {"test": []})
    (root / "test.jsonl").write_text(json.dumps(good) + "\n{not json\n")
    with pytest.raises(TaskError, match=r"test.jsonl:2: not JSON"):
        load_task(root)
    (root / "test.jsonl").write_text(json.dumps(good | {"answer": 3}) + "\n")
    with pytest.raises(TaskError, match=r"test.jsonl:1: .*answer 3 is not an index of 3"):
        load_task(root)
    (root / "test.jsonl").write_text(json.dumps({"id": 1, "question": "q"}) + "\n")
    with pytest.raises(TaskError, match=r"test.jsonl:1: choices: Field required"):
        load_task(root)
    (root / "test.jsonl").write_text(json.dumps(good) + "\n" + json.dumps(good) + "\n")
    with pytest.raises(TaskError, match=r"test\.jsonl:2: duplicate id 'q0'"):
        load_task(root)
    (root / "test.jsonl").write_text(json.dumps(good) + "\n")
    (root / "task.yaml").write_text(json.dumps({"name": "b", "type": "essay"}))
    with pytest.raises(TaskError, match=r"task\.yaml: type"):
        load_task(root)
    (root / "task.yaml").write_text(
        json.dumps({"name": "b", "type": "multiple_choice", "template": "{query}"})
    )
    with pytest.raises(TaskError, match="template: KeyError"):
        load_task(root)
    spec = {"name": "b", "type": "multiple_choice", "num_fewshot": 2}
    (root / "task.yaml").write_text(json.dumps(spec))
    with pytest.raises(TaskError, match=r"no train\.jsonl"):
        load_task(root)
    with pytest.raises(TaskError, match=r"no task\.yaml"):
        load_task(tmp_path)


# ---- through a real model --------------------------------------------------------------


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval-scoring")
    sample = write_stdlib_sample(root / "corpus", 200_000)
    tokenizer = train_tokenizer([sample["prose"]], root / "tok", vocab_size=600)
    model = Llama(get_preset("debug").args.with_(vocab_size=tokenizer.vocab_size))
    model.init_weights(seed=5)
    return LanguageModel(model.eval(), tokenizer, batch_size=8)


def test_multiple_choice_scores_are_the_models_log_likelihoods(lm, mc_task):
    result = evaluate_task(lm, mc_task, seed=0)
    assert result.metrics["n"] == 6
    correct = 0
    for item, record in zip(mc_task.items(), result.records, strict=True):
        context = fewshot_context(mc_task, item, 3, 0)
        expected = [
            r.logprob for r in lm.loglikelihood([(context, " " + c) for c in item["choices"]])
        ]
        assert record["logprobs"] == pytest.approx(expected, abs=1e-5)
        pick = max(range(3), key=lambda c: (expected[c] / len(item["choices"][c]), -c))
        assert record["prediction"] == pick
        correct += pick == item["answer"]
    assert result.metrics["acc"] == pytest.approx(correct / 6)


def test_free_form_exact_match_counts_the_greedy_answers(lm, tmp_path):
    questions = [f"name item {i}" for i in range(4)]
    spec = {"name": "ff", "type": "free_form", "max_new_tokens": 4, "stop": ["\n"]}
    prompts = [f"Question: {q}\nAnswer:" for q in questions]
    greedy = lm.generate_until(prompts, max_new_tokens=4, stop=["\n"])
    answers = [qa_answer(g) for g in greedy]  # the paper's cut: first dot or comma
    # Items 0 and 2 have the model's own answer (with other case and punctuation) as gold.
    items = [
        {"id": i, "question": q, "answers": [answers[i].upper() + "." if i % 2 == 0 else "zzz"]}
        for i, q in enumerate(questions)
    ]
    assert normalize_answer(answers[0]) and normalize_answer(answers[2])
    task = load_task(write_task(tmp_path / "ff", spec, {"test": items}))
    result = evaluate_task(lm, task)
    assert [r["generation"] for r in result.records] == greedy
    assert [r["prediction"] for r in result.records] == answers
    assert result.metrics["exact_match"] == 0.5
