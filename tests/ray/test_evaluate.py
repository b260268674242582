"""End to end: evaluate the newest checkpoint of the shared reference run (pretrained
briefly, tests/ray/conftest.py) on 2 Ray actors, and find the results in MLflow nested
under the training run, equal to an in-process evaluation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from pretrain_helpers import STEPS, config

from llamaray.cli import main
from llamaray.eval.checkpoint import corpus_dir_of, run_target
from llamaray.eval.config import EvalConfig
from llamaray.eval.runner import EVAL_OF_TAG, STEP_TAG, Scorer, evaluate
from llamaray.eval.tasks import load_task
from llamaray.tracking import PARENT_TAG

pytestmark = pytest.mark.ray

TASKS = Path(__file__).parents[2] / "jobs" / "tasks"
LIMIT = 6


@pytest.fixture(scope="module")
def trained(root, reference):
    """The shared reference run (conftest.py) and its config: what is evaluated here."""
    return config(root, reference.name), reference


def eval_runs(client: MlflowClient, training) -> list:
    """The evaluation runs of `training` (other modules nest finetunes under it too)."""
    return client.search_runs(
        [training.info.experiment_id],
        filter_string=f"tags.`{EVAL_OF_TAG}` = '{training.info.run_id}'",
    )


def test_evaluation_lands_under_the_training_run(trained, root, capsys):
    cfg, result = trained
    config_file = root / "reference.yaml"
    config_file.write_text(cfg.to_yaml())
    tasks = ["stdlib-modules", "stdlib-modules-answer", "stdlib-summary"]
    argv = ["eval", "--config", str(config_file), "--workers", "2", "--limit", str(LIMIT)]
    argv += ["--perplexity-rows", "8", "--cpus-per-worker", "0.5"]
    for task in tasks:
        argv += ["--task", str(TASKS / task)]
    assert main(argv) == 0
    assert "logged to MLflow run" in capsys.readouterr().out

    client = MlflowClient(result.tracking_uri)
    training = client.get_run(result.mlflow_run_id)
    (run,) = eval_runs(client, training)
    assert run.info.run_name == f"reference-eval-step-{STEPS}"
    assert run.data.tags[PARENT_TAG] == training.info.run_id
    assert run.data.tags[STEP_TAG] == str(STEPS)
    assert run.info.status == "FINISHED"
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "predictions")}
    assert artifacts == {f"predictions/{t}.jsonl" for t in tasks}

    # The same numbers as one in-process scorer on the same checkpoint.
    target = run_target(cfg)
    assert target.step == STEPS
    local = evaluate(
        target,
        [load_task(TASKS / t) for t in tasks],
        EvalConfig(limit=LIMIT, perplexity_rows=8),
        corpus_dir_of(cfg),
        scorers=[Scorer(target, batch_size=8)],
    ).metrics()
    logged = run.data.metrics
    assert set(logged) == set(local)
    # Sources with held-out rows get perplexity (the small sample may hold none of code).
    assert "ppl/prose/bits_per_byte" in logged
    for name, value in local.items():
        assert logged[name] == pytest.approx(value, abs=1e-5), name
    # A model trained for 6 steps is far from uniform but far from good: a sanity band.
    assert 0 < logged["ppl/prose/bits_per_byte"] < 8
    assert logged["eval/stdlib-modules/n"] == LIMIT

    # The headline metrics also sit in the training run, at the checkpoint's step.
    history = client.get_metric_history(training.info.run_id, "eval/stdlib-modules/acc")
    assert [(m.step, m.value) for m in history] == [(STEPS, local["eval/stdlib-modules/acc"])]
    assert client.get_run(training.info.run_id).info.status == "FINISHED"


def test_harness_results_land_in_the_same_eval_run_and_agree_with_ours(
    trained, root, capsys, monkeypatch, tmp_path
):
    """`llamaray harness --config` on the run's newest checkpoint: lm-evaluation-harness
    reads jobs/tasks/stdlib-modules through its YAML twin, and its acc_norm is our
    per-character accuracy on the same items."""
    pytest.importorskip("lm_eval", reason="the harness extra (pip install '.[harness]')")
    from llamaray.eval.lm import LanguageModel
    from llamaray.eval.scoring import evaluate_task

    cfg, result = trained
    config_file = root / "reference.yaml"
    config_file.write_text(cfg.to_yaml())
    monkeypatch.chdir(TASKS.parents[1])  # the task YAML's data_files are repo-relative
    for name, value in {"HF_HOME": str(tmp_path), "HF_DATASETS_OFFLINE": "1"}.items():
        monkeypatch.setenv(name, value)
    argv = ["harness", "--config", str(config_file), "--tasks", "stdlib_modules"]
    argv += ["--include-path", str(TASKS / "harness"), "--limit", str(LIMIT)]
    assert main(argv) == 0
    assert "logged to MLflow run" in capsys.readouterr().out

    client = MlflowClient(result.tracking_uri)
    training = client.get_run(result.mlflow_run_id)
    (run,) = eval_runs(client, training)
    assert run.info.run_name == f"reference-eval-step-{STEPS}"
    assert run.data.tags[STEP_TAG] == str(STEPS)
    logged = run.data.metrics

    target = run_target(cfg)
    model, tokenizer = target.load()
    ours = evaluate_task(
        LanguageModel(model, tokenizer), load_task(TASKS / "stdlib-modules"), limit=LIMIT
    ).metrics
    assert logged["eval/harness-stdlib_modules/acc_norm"] == pytest.approx(ours["acc"], abs=1e-4)
    assert logged["eval/harness-stdlib_modules/acc"] == pytest.approx(ours["acc_raw"], abs=1e-4)
    predictions = client.download_artifacts(
        run.info.run_id, "predictions/harness-stdlib_modules.jsonl", str(tmp_path)
    )
    records = [json.loads(line) for line in Path(predictions).read_text().splitlines()]
    assert [r["doc_id"] for r in records] == list(range(LIMIT))
    assert all(len(r["responses"]) == 4 for r in records)  # a score per choice
    history = client.get_metric_history(training.info.run_id, "eval/harness-stdlib_modules/acc")
    assert [m.step for m in history] == [STEPS]


def test_bad_eval_input_fails_before_ray_work(trained, root, capsys):
    cfg, _ = trained
    config_file = root / "reference.yaml"
    config_file.write_text(cfg.to_yaml())
    assert main(["eval", "--config", str(config_file), "--step", "5"]) == 2
    assert "no checkpoint at step 5" in capsys.readouterr().err
    assert main(["eval", "--config", str(config_file), "--task", str(root)]) == 2
    assert "no task.yaml" in capsys.readouterr().err
    assert main(["eval", "--config", str(config_file), "--workers", "0"]) == 2
    assert "num_workers" in capsys.readouterr().err


def test_checkpoint_corpus_and_tokenizer_on_s3_are_read_by_the_actors(trained, root, s3_client):
    """No shared disk: with the run's storage and corpus on S3 the driver passes only
    s3:// URIs (it downloads no checkpoint), each Scorer actor fetches the checkpoint and
    tokenizer onto its own node, and the numbers equal those from the local copy."""
    from llamaray import storage

    cfg, _ = trained
    s3_client.create_bucket(Bucket="eval-run")
    storage.upload(root / "checkpoints" / cfg.name, f"s3://eval-run/ckpt/{cfg.name}")
    corpus = "s3://eval-run/corpus"
    storage.upload(corpus_dir_of(cfg), corpus)
    manifest = json.loads(storage.read_text(f"{corpus}/manifest.json"))
    tokenizer = manifest["tokenizer"]["path"]
    if Path(tokenizer).is_absolute():  # corpora written before paths were relative
        manifest["tokenizer"]["path"] = str(Path(tokenizer).relative_to(corpus_dir_of(cfg)))
        storage.write_text(f"{corpus}/manifest.json", json.dumps(manifest))
    on_s3 = cfg.model_copy(
        update={
            "storage": "s3://eval-run/ckpt",
            "data": cfg.data.model_copy(update={"corpus": corpus}),
        }
    )

    target = run_target(on_s3)
    assert target.checkpoint_dir == f"s3://eval-run/ckpt/{cfg.name}/step-{STEPS:08d}"
    assert target.tokenizer_path.startswith(corpus + "/") and target.step == STEPS
    tasks = [load_task(TASKS / "stdlib-modules")]
    opts = EvalConfig(limit=LIMIT, perplexity_rows=8, num_workers=2, cpus_per_worker=0.5)
    remote = evaluate(target, tasks, opts, corpus).metrics()
    local_target = run_target(cfg)
    local = evaluate(
        local_target, tasks, opts, corpus_dir_of(cfg), scorers=[Scorer(local_target, 8)]
    ).metrics()
    assert set(remote) == set(local) and "ppl/prose/bits_per_byte" in remote
    for name, value in local.items():
        assert remote[name] == pytest.approx(value, abs=1e-5), name


def test_sampled_code_on_actors_equals_one_in_process_scorer(trained, tmp_path):
    """`--samples`: the actors draw the samples and run them in the sandbox; the samples
    and pass@k do not depend on the number of actors."""
    from llamaray.eval.benchmarks import read_benchmark
    from llamaray.eval.sandbox import unavailable_reason

    if unavailable_reason():
        pytest.skip(f"no code sandbox: {unavailable_reason()}")
    cfg, _ = trained
    from eval_problems import ADD_PROBLEMS

    file = tmp_path / "HumanEval.jsonl"
    file.write_text("".join(json.dumps(p) + "\n" for p in ADD_PROBLEMS))
    task = read_benchmark("humaneval", file)
    task.spec.max_new_tokens = 12  # a model trained for a few steps writes no solution
    opts = EvalConfig(samples=3, pass_k=[1, 3], perplexity_rows=0, num_workers=2)
    target = run_target(cfg)
    remote = evaluate(target, [task], opts).tasks["humaneval"]
    local = evaluate(target, [task], opts, scorers=[Scorer(target, 8)]).tasks["humaneval"]
    assert remote.records == local.records and len(remote.records) == 3
    assert all(r["n"] == 3 and len(r["passed"]) == 3 for r in remote.records)
    assert set(remote.metrics) == {"pass@1", "pass@3", "n", "samples"}


def test_all_steps_evaluates_every_checkpoint_and_draws_scores_against_tokens(
    trained, root, tmp_path
):
    """`--all-steps`: one evaluation (and eval run, with the results table) per complete
    checkpoint, oldest first; the training run gets each score at each step and the figure
    of scores against training tokens."""
    from matplotlib import image

    from llamaray.eval.runner import SCORES_VS_TOKENS
    from llamaray.train.stored_checkpoints import step_folders

    cfg, result = trained
    config_file = root / "reference-all-steps.yaml"
    config_file.write_text(cfg.to_yaml())
    argv = ["eval", "--config", str(config_file), "--all-steps", "--limit", "2"]
    argv += ["--task", str(TASKS / "stdlib-modules"), "--perplexity-rows", "0", "--workers", "1"]
    assert main(argv) == 0
    steps = sorted(s for s, _ in step_folders(cfg.run_uri))
    assert len(steps) >= 2, steps  # the reference run keeps more than one checkpoint

    client = MlflowClient(result.tracking_uri)
    training = client.get_run(result.mlflow_run_id)
    history = client.get_metric_history(training.info.run_id, "eval/stdlib-modules/acc")
    assert sorted({m.step for m in history}) == steps
    runs = {int(r.data.tags[STEP_TAG]): r for r in eval_runs(client, training)}
    assert set(steps) <= set(runs)
    table = client.download_artifacts(runs[steps[0]].info.run_id, "results.md", str(tmp_path))
    assert "| stdlib-modules |" in Path(table).read_text()
    png = client.download_artifacts(training.info.run_id, SCORES_VS_TOKENS, str(tmp_path))
    assert image.imread(png).shape[0] > 100
