"""(N, D, loss) points for the scaling fit: from past MLflow runs or from a CSV file.

From MLflow, every *finished* run of an experiment (optionally only the children of one
parent run, as a sweep or `jobs/scaling_grid.py` nests them) gives:

- N: the param `derived.n_params` that the pretraining driver logs (parameters counted
  with the corpus tokenizer's vocabulary); for runs logged before it existed, the model
  is rebuilt from the run's `model.*` params on the meta device and counted;
- D: step x `derived.batch_tokens` (tokens seen by that step);
- loss: the metric `val_loss` (held-out loss, all sources) at that step.

By default one point per run, its final validation loss: each run's cosine schedule ends
at its own last step, so only that point is the loss of a run planned for D tokens
(Hoffmann et al. fit those). `all_points=True` adds every intermediate validation, which
gives more points but biases the fit: mid-schedule the learning rate is still high, so
those losses sit above what a run planned for that D would reach.

>>> points = read_csv("points.csv")  # doctest: +SKIP
>>> uri = "sqlite:///runs/scaling/mlflow.db"
>>> points = collect_mlflow_points(uri, "llamaray-scaling")  # doctest: +SKIP
"""

from __future__ import annotations

import csv
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from llamaray.console import logger

PARENT_TAG = "mlflow.parentRunId"
CSV_COLUMNS = ("n_params", "tokens", "loss")


@dataclass(frozen=True)
class ScalingPoint:
    """One observation of the law: a model of `n_params` after `tokens` training tokens."""

    n_params: float
    tokens: float
    loss: float
    source: str = ""
    """Where it came from: an MLflow run name and step, or a CSV file and line."""


def read_csv(path: str | Path) -> list[ScalingPoint]:
    """Points from a CSV file with a header holding n_params, tokens and loss (other columns
    are ignored). Numbers may be written as 1.2e9. A bad value names its line.

    >>> _ = Path("p.csv").write_text("n_params,tokens,loss\\n1e8,2e9,3.1\\n")
    >>> read_csv("p.csv")
    [ScalingPoint(n_params=100000000.0, tokens=2000000000.0, loss=3.1, source='p.csv:2')]
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--csv: no such file {path}")
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in CSV_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(
                f"{path}: missing column(s) {', '.join(missing)}; the header must name "
                f"{', '.join(CSV_COLUMNS)}"
            )
        points = []
        for line, row in enumerate(reader, start=2):  # line 1 is the header
            values = []
            for column in CSV_COLUMNS:
                raw = (row[column] or "").strip()
                try:
                    value = float(raw)
                except ValueError:
                    value = math.nan
                if not (math.isfinite(value) and value > 0):
                    raise ValueError(
                        f"{path}:{line}: {column}={raw!r} is not a positive finite number"
                    )
                values.append(value)
            points.append(ScalingPoint(*values, source=f"{path}:{line}"))
    return points


def collect_mlflow_points(
    tracking_uri: str,
    experiment: str,
    *,
    parent_run_id: str | None = None,
    all_points: bool = False,
    metric: str = "val_loss",
    say: Callable[[str], None] | None = None,
) -> list[ScalingPoint]:
    """Points from the finished runs of `experiment` (children of `parent_run_id` only, when
    given). Runs without the metric or without a usable size are skipped, each with a line
    through `say` (default: the `[plan]` logger) saying why.

    >>> collect_mlflow_points("sqlite:///runs/scaling/mlflow.db", "llamaray-scaling",
    ...                       parent_run_id="4f0c...")  # doctest: +SKIP
    [ScalingPoint(n_params=172352.0, tokens=102400.0, loss=4.21, source='scale-d64-s50@50'), ...]
    """
    from llamaray.tracking import client as mlflow_client

    say = say or logger("plan").info
    client = mlflow_client(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        raise ValueError(f"--experiment: no MLflow experiment {experiment!r} at {tracking_uri}")
    query = "attributes.status = 'FINISHED'"
    if parent_run_id:
        query += f" and tags.`{PARENT_TAG}` = '{parent_run_id}'"
    points: list[ScalingPoint] = []
    token = None
    while True:
        page = client.search_runs(
            [found.experiment_id],
            filter_string=query,
            order_by=["attributes.start_time ASC"],
            max_results=1000,
            page_token=token,
        )
        for run in page:
            points += _run_points(client, run, metric, all_points, say)
        token = page.token
        if not token:
            break
    return points


def _run_points(client, run, metric: str, all_points: bool, say) -> list[ScalingPoint]:
    params = run.data.params
    name = run.info.run_name or run.info.run_id
    try:
        n_params = run_n_params(params)
        batch_tokens = run_batch_tokens(params)
    except ValueError as err:
        say(f"run {name}: skipped, {err}")
        return []
    # A resumed run may log a step twice; the later value is the one that counts.
    by_step: dict[int, tuple[int, float]] = {}
    for m in client.get_metric_history(run.info.run_id, metric):
        if m.step <= 0 or not math.isfinite(m.value):
            continue
        if m.step not in by_step or m.timestamp >= by_step[m.step][0]:
            by_step[m.step] = (m.timestamp, m.value)
    if not by_step:
        say(f"run {name}: skipped, no {metric} metric")
        return []
    steps = sorted(by_step) if all_points else [max(by_step)]
    return [
        ScalingPoint(n_params, step * batch_tokens, by_step[step][1], f"{name}@{step}")
        for step in steps
    ]


def run_n_params(params: dict[str, str]) -> float:
    """N of a run: `derived.n_params`, else counted from its `model.*` params."""
    if params.get("derived.n_params"):
        return float(params["derived.n_params"])
    from llamaray.config import ConfigError, ModelConfig, load_config
    from llamaray.model.flops import param_count

    overrides = [
        f"{key.removeprefix('model.')}={value}"
        for key, value in params.items()
        if key.startswith("model.") and value != "None"
    ]
    if not overrides:
        raise ValueError("no derived.n_params and no model.* params to count parameters from")
    try:
        model = load_config(None, overrides, schema=ModelConfig)
    except ConfigError as err:
        raise ValueError(f"its model.* params do not form a model: {err}") from None
    vocab = params.get("model.vocab_size", "None")
    if vocab == "None":
        # With no tokenizer.path the driver trains one of tokenizer.vocab_size pieces; a
        # given tokenizer's size is not among the params.
        if params.get("tokenizer.path", "None") != "None":
            raise ValueError(
                "no derived.n_params, and the vocabulary of its tokenizer.path is not logged"
            )
        vocab = params.get("tokenizer.vocab_size", "32000")
    return float(param_count(model.args(int(vocab))))


def run_batch_tokens(params: dict[str, str]) -> float:
    """Tokens per step of a run: `derived.batch_tokens`, else train.batch_tokens or the
    preset's."""
    for key in ("derived.batch_tokens", "train.batch_tokens"):
        if params.get(key, "None") != "None":
            return float(params[key])
    from llamaray.model.args import PRESETS

    preset = params.get("model.preset")
    if preset in PRESETS:
        return float(PRESETS[preset].batch_tokens)
    raise ValueError("no derived.batch_tokens, train.batch_tokens or known model.preset param")
