"""n samples per problem with temperature and top-p (the KV-cache generation), pass@k of
sampled code through the sandbox, maj1@k of sampled answers, and the runner's sampled path
with in-process scorers (the Ray actors run the same `Scorer`)."""

from __future__ import annotations

import json

import pytest

from eval_problems import ADD_PROBLEMS
from llamaray.data.sample_text import write_stdlib_sample
from llamaray.eval.benchmarks import read_benchmark
from llamaray.eval.checkpoint import folder_target
from llamaray.eval.config import EvalConfig
from llamaray.eval.estimators import pass_at_k
from llamaray.eval.lm import LanguageModel
from llamaray.eval.runner import Scorer, evaluate
from llamaray.eval.sampling import sample_requests, score_samples
from llamaray.eval.sandbox import unavailable_reason
from llamaray.eval.scoring import build_requests
from llamaray.model import Llama, get_preset
from llamaray.model.formats import save_hf
from llamaray.tokenizer import train_tokenizer

needs_sandbox = pytest.mark.skipif(unavailable_reason() is not None, reason="no code sandbox")

HUMANEVAL = ADD_PROBLEMS


def jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """An exported debug model with its tokenizer: what `folder_target` loads."""
    root = tmp_path_factory.mktemp("eval-sampling")
    sample = write_stdlib_sample(root / "corpus", 100_000)
    tokenizer = train_tokenizer([sample["prose"]], root / "tok", vocab_size=400)
    model = Llama(get_preset("debug").args.with_(vocab_size=tokenizer.vocab_size, max_seq_len=96))
    model.init_weights(seed=2)
    out = save_hf(model.eval(), root / "hf")
    (out / "tokenizer.model").write_bytes(tokenizer.path.read_bytes())
    return out


@pytest.fixture(scope="module")
def lm(folder):
    model, tokenizer = folder_target(folder).load("cpu")
    return LanguageModel(model, tokenizer, batch_size=3)


@pytest.fixture
def humaneval(tmp_path):
    return read_benchmark("humaneval", jsonl(tmp_path / "HumanEval.jsonl", HUMANEVAL))


def test_samples_are_seeded_per_item_whatever_else_is_sampled(lm, humaneval):
    requests = build_requests(humaneval)
    opts = {"temperature": 1.0, "top_p": 0.95, "max_new_tokens": 6, "stop": ["\n\n\n"]}
    alone = sample_requests(lm, requests[1:2], 5, seed=0, **opts)
    together = sample_requests(lm, requests, 5, seed=0, **opts)
    assert together[1] == alone[0] and len(together[1]) == 5
    assert len(set(together[1])) > 1  # five draws, not one draw five times (batch of 3 + 2)
    assert sample_requests(lm, requests[1:2], 5, seed=1, **opts) != alone
    greedy = lm.generate_until([requests[1].context], max_new_tokens=6, stop=["\n\n\n"])
    assert sample_requests(lm, requests[1:2], 2, seed=0, **opts | {"temperature": 1e-6}) == [
        greedy * 2
    ]  # temperature -> 0 is greedy


@needs_sandbox
def test_pass_at_k_of_sampled_code_runs_each_sample(humaneval):
    requests = build_requests(humaneval)
    right, wrong = "    return a + b\n", "    return a - b\n"
    samples = [[right, right, wrong, wrong, wrong], [wrong] * 5, [right] * 5]
    result = score_samples(humaneval, requests, samples, ks=[1, 2, 100])
    assert [r["correct"] for r in result.records] == [2, 0, 5]
    assert result.records[0]["passed"] == [True, True, False, False, False]
    assert result.metrics["pass@1"] == pytest.approx((0.4 + 0 + 1) / 3)
    assert result.metrics["pass@2"] == pytest.approx((pass_at_k(5, 2, 2) + 0 + 1) / 3)
    assert "pass@100" not in result.metrics  # more than the 5 samples
    with pytest.raises(ValueError, match="no k in"):
        score_samples(humaneval, requests, samples, ks=[10])


def test_maj1_at_k_votes_over_the_final_answers(tmp_path):
    test = [{"question": f"q{i}", "answer": f"so\n#### {i}"} for i in (4, 7)]
    task = read_benchmark("gsm8k", jsonl(tmp_path / "test.jsonl", test), num_fewshot=0)
    requests = build_requests(task)
    samples = [
        ["#### 5", "It is 4.", "#### 4", "#### 5", "#### 4"],  # 4 wins 3-2 over all five
        ["#### 7", "no idea", "no idea", "#### 1,000", "#### 1000"],  # 1000 wins at k=5
    ]
    result = score_samples(task, requests, samples, ks=[1, 3, 5])
    assert result.records[0]["answers"] == ["5", "4", "4", "5", "4"]
    assert [r["maj1@1"] for r in result.records] == [False, True]
    assert [r["maj1@3"] for r in result.records] == [True, True]  # 4 by 2-1; 7 alone
    assert [r["maj1@5"] for r in result.records] == [True, False]
    assert result.metrics["maj1@5"] == 0.5 and result.metrics["samples"] == 5


@needs_sandbox
def test_runner_samples_on_scorers_and_the_result_does_not_depend_on_their_number(
    folder, humaneval
):
    import torch

    threads = torch.get_num_threads()  # an in-process Scorer sets 1, as an actor does
    target = folder_target(folder)
    opts = EvalConfig(samples=4, temperature=0.8, top_p=0.95, pass_k=[1, 4], perplexity_rows=0)
    humaneval.spec.max_new_tokens = 8
    one = evaluate(target, [humaneval], opts, scorers=[Scorer(target, 3)])
    two = evaluate(target, [humaneval], opts, scorers=[Scorer(target, 3), Scorer(target, 3)])
    torch.set_num_threads(threads)
    a, b = one.tasks["humaneval"], two.tasks["humaneval"]
    assert a.records == b.records and len(a.records) == 3
    assert all(r["n"] == 4 for r in a.records)
    assert set(a.metrics) == {"pass@1", "pass@4", "n", "samples"}
    assert one.metrics()["eval/humaneval/pass_at_4"] == a.metrics["pass@4"]  # MLflow-safe
    # No samples: one greedy completion per problem, run the same way.
    greedy = evaluate(
        target, [humaneval], EvalConfig(perplexity_rows=0), scorers=[Scorer(target, 3)]
    )
    torch.set_num_threads(threads)
    model, tokenizer = target.load("cpu")
    expected = LanguageModel(model, tokenizer).generate_until(
        [r.context for r in build_requests(humaneval)], max_new_tokens=8, stop=humaneval.spec.stop
    )
    records = greedy.tasks["humaneval"].records
    assert [r["completion"] for r in records] == expected
    assert set(greedy.tasks["humaneval"].metrics) == {"pass@1", "n"}


def test_sampling_options_are_checked():
    with pytest.raises(ValueError, match="temperature"):
        EvalConfig(samples=4, temperature=0)
    with pytest.raises(ValueError, match="each k must be >= 1"):
        EvalConfig(pass_k=[0])
    with pytest.raises(ValueError, match="unknown benchmark"):
        EvalConfig(benchmarks=["squad=x.jsonl"])
    with pytest.raises(ValueError, match="give name=path"):
        EvalConfig(benchmarks=["arc"])
