"""The paper-style results table (benchmark, shots, metric, score), and that it lands in
MLflow as artifacts of the eval run (a local SQLite store, through llamaray.tracking)."""

from __future__ import annotations

import csv
import io
from pathlib import Path

from llamaray import tracking
from llamaray.eval.report import csv_text, markdown, rows_of
from llamaray.eval.runner import EvalResult, log_evaluation
from llamaray.eval.scoring import TaskResult


def result() -> EvalResult:
    out = EvalResult(step=10)
    out.tasks["arc-easy"] = TaskResult(
        "arc-easy", {"acc": 0.25, "acc_chars": 0.25, "acc_raw": 0.2, "n": 4}, shots=0
    )
    out.tasks["humaneval"] = TaskResult(
        "humaneval", {"pass@1": 0.125, "pass@10": 0.75, "n": 4, "samples": 10}, shots=0
    )
    out.tasks["harness-piqa"] = TaskResult("harness-piqa", {"acc": 0.5})  # shots unknown
    return out


def test_the_table_holds_the_headline_scores_only():
    rows = rows_of(result().tasks)
    assert [(r.benchmark, r.metric) for r in rows] == [
        ("arc-easy", "acc"),
        ("humaneval", "pass@1"),
        ("humaneval", "pass@10"),
        ("harness-piqa", "acc"),
    ]
    table = markdown(rows)
    assert (
        "| humaneval | 0 | pass@1 | 12.5 |" in table and "| harness-piqa |  | acc | 50.0 |" in table
    )
    parsed = list(csv.DictReader(io.StringIO(csv_text(rows))))
    assert parsed[1] == {
        "benchmark": "humaneval",
        "shots": "0",
        "metric": "pass@1",
        "score": "0.125",
    }


def test_the_table_is_an_artifact_of_the_eval_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    run_id = log_evaluation(uri, "exp", "demo", result(), None)
    client = tracking.client(uri)
    assert {"results.md", "results.csv", "results.json"} <= {
        a.path for a in client.list_artifacts(run_id)
    }
    table = Path(client.download_artifacts(run_id, "results.md", str(tmp_path))).read_text()
    assert table == markdown(rows_of(result().tasks))
    metrics = client.get_run(run_id).data.metrics
    assert metrics["eval/humaneval/pass_at_10"] == 0.75  # "@" is not allowed in MLflow names


def test_scores_against_training_tokens_land_in_the_training_run(tmp_path, monkeypatch):
    """Each evaluated checkpoint adds a point per headline score to the training run; the
    figure (the paper's figure 2) is redrawn from them, x = step x batch tokens."""
    from matplotlib import image

    from llamaray.eval.runner import SCORES_VS_TOKENS

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    training, _ = tracking.open_run(uri, "exp", "demo", artifact_root=tmp_path / "a")
    tracking.log_params(uri, training, {"derived.batch_tokens": "4096"})
    for step, acc in ((100, 0.25), (200, 0.5)):
        evaluated = result()
        evaluated.step = step
        evaluated.tasks["arc-easy"].metrics["acc"] = acc
        log_evaluation(uri, "exp", "demo", evaluated, training)
    history = tracking.metric_history(uri, training, "eval/arc-easy/acc")
    assert [(m.step, m.value) for m in history] == [(100, 0.25), (200, 0.5)]
    assert [m.step for m in tracking.metric_history(uri, training, "eval/humaneval/pass_at_1")] == [
        100,
        200,
    ]
    client = tracking.client(uri)
    png = client.download_artifacts(training, SCORES_VS_TOKENS, str(tmp_path))
    height, width = image.imread(png).shape[:2]
    # One panel per headline score: arc-easy acc, humaneval pass@1, harness-piqa acc.
    assert (width, height) == (3 * 420, 320)
