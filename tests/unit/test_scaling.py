"""The scaling planner: the fit recovers a known law, the optima obey their formulas, points
come from a CSV or a real SQLite MLflow store, and `llamaray plan` prints and plots."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

from llamaray.cli import main
from llamaray.config import ModelConfig
from llamaray.model import Llama
from llamaray.plan.planner import make_plan
from llamaray.plan.points import ScalingPoint, collect_mlflow_points, read_csv
from llamaray.plan.presets import nearest_preset
from llamaray.plan.report import format_plan
from llamaray.plan.scaling import (
    ScalingLaw,
    compute_optimal,
    fit_scaling_law,
    inference_optimal,
    tokens_for_loss,
)

CHINCHILLA = ScalingLaw.chinchilla()
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# MLflow's SQLAlchemy store, not this code.
pytestmark = pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy is deprecated")


def synthetic(law: ScalingLaw, noise: float = 0.002, seed: int = 0):
    """5 sizes x 5 token counts spanning the range where both terms of the law matter, with
    seeded multiplicative (log-normal) noise."""
    n, d = np.meshgrid(np.geomspace(1e7, 1e10, 5), np.geomspace(1e9, 1e12, 5))
    n, d = n.ravel(), d.ravel()
    noisy = law.loss(n, d) * np.exp(np.random.default_rng(seed).normal(0, noise, n.size))
    return n, d, noisy


def recovery_problems(fitted: ScalingLaw, truth: ScalingLaw) -> list[str]:
    """What keeps `fitted` from counting as a recovery of `truth`: exponents within 0.02,
    E within 3%."""
    problems = [
        f"{k}: {getattr(fitted, k):.4f} vs {getattr(truth, k):.4f}"
        for k in ("alpha", "beta")
        if abs(getattr(fitted, k) - getattr(truth, k)) > 0.02
    ]
    if abs(fitted.E / truth.E - 1) > 0.03:
        problems.append(f"E: {fitted.E:.4f} vs {truth.E:.4f}")
    return problems


@pytest.mark.slow  # many fits: 10-50 CPU seconds
def test_fit_recovers_a_known_law_from_noisy_losses():
    fit = fit_scaling_law(*synthetic(CHINCHILLA))
    assert recovery_problems(fit.law, CHINCHILLA) == []
    # 0.2% noise: the residuals are that size, not zero and not far larger.
    assert 0.0005 < fit.rms_log_residual < 0.005
    assert fit.n_points == 25


@pytest.mark.slow  # many fits: 10-50 CPU seconds
def test_fit_of_another_law_does_not_pass_as_chinchilla():
    other = ScalingLaw(E=2.5, A=2000.0, B=1000.0, alpha=0.45, beta=0.35)
    fit = fit_scaling_law(*synthetic(other))
    assert recovery_problems(fit.law, other) == []
    assert len(recovery_problems(fit.law, CHINCHILLA)) == 3  # alpha, beta and E all off
    # ...and Chinchilla's law explains the other law's points far worse than the fit does.
    n, d, loss = synthetic(other)
    chinchilla_residual = np.sqrt(np.mean(np.log(CHINCHILLA.loss(n, d) / loss) ** 2))
    assert chinchilla_residual > 20 * fit.rms_log_residual


@pytest.mark.slow  # many fits: 10-50 CPU seconds
def test_huber_loss_keeps_one_outlier_from_moving_the_fit():
    n, d, loss = synthetic(CHINCHILLA)
    loss[7] *= 1.3  # one diverged run
    fit = fit_scaling_law(n, d, loss)
    assert recovery_problems(fit.law, CHINCHILLA) == []
    assert fit.max_abs_log_residual > 0.2  # the outlier is left unexplained, not fitted


def test_fit_refuses_points_that_cannot_determine_the_law():
    n, d, loss = synthetic(CHINCHILLA)
    with pytest.raises(ValueError, match=r"4 point.* at least 5"):
        fit_scaling_law(n[:4], d[:4], loss[:4])
    with pytest.raises(ValueError, match=r"one of model sizes \(N\)"):
        fit_scaling_law(np.full(6, 1e8), d[:6], loss[:6])
    with pytest.raises(ValueError, match="loss must be finite and > 0; point 2"):
        fit_scaling_law(n[:6], d[:6], [3.0, 3.0, -1.0, 3.0, 3.0, 3.0])


@pytest.mark.parametrize("compute", [1e18, 5.76e23, 1e26])
def test_compute_optimum_closed_form_matches_numeric_search(compute):
    opt = compute_optimal(CHINCHILLA, compute)
    n = np.geomspace(1e5, 1e15, 400_001)  # steps of 0.006% in N
    losses = CHINCHILLA.loss(n, compute / (6 * n))
    numeric = n[np.argmin(losses)]
    assert opt.n_params == pytest.approx(numeric, rel=1e-4)
    assert 6 * opt.n_params * opt.tokens == pytest.approx(compute, rel=1e-12)
    assert opt.loss == pytest.approx(losses.min(), rel=1e-9)


def test_compute_optimum_at_chinchillas_budget():
    # The law's own optimum for Gopher's budget: ~32B params on ~3T tokens, i.e. Hoffmann
    # et al.'s approach 3 (their table 3 gives 40B for it; the gap is their rounded fit).
    opt = compute_optimal(CHINCHILLA, 5.76e23)
    assert 30e9 < opt.n_params < 35e9 and 2.7e12 < opt.tokens < 3.3e12


def test_inference_pushes_towards_smaller_models_trained_longer():
    target = 2.0
    plans = [inference_optimal(CHINCHILLA, target, d) for d in (0, 1e11, 1e12, 1e13, 1e14)]
    sizes = [p.n_params for p in plans]
    tokens = [p.tokens for p in plans]
    assert sizes == sorted(sizes, reverse=True) and len(set(sizes)) == len(sizes)
    assert tokens == sorted(tokens) and len(set(tokens)) == len(tokens)
    for p in plans:  # every plan reaches the target loss
        assert CHINCHILLA.loss(p.n_params, p.tokens) == pytest.approx(target, rel=1e-9)
        assert p.training_flops == pytest.approx(6 * p.n_params * p.tokens)
        assert p.inference_flops == pytest.approx(2 * p.n_params * p.inference_tokens)


def test_inference_optimum_also_minimizes_total_flops_numerically():
    target, served = 2.1, 1e13
    best = inference_optimal(CHINCHILLA, target, served)
    n = np.geomspace(1e8, 1e13, 200_001)
    total = 6 * n * tokens_for_loss(CHINCHILLA, n, target) + 2 * n * served
    assert best.n_params == pytest.approx(n[np.nanargmin(total)], rel=1e-3)
    assert best.total_flops == pytest.approx(np.nanmin(total), rel=1e-7)


def test_without_inference_the_answer_is_the_compute_optimal_one():
    budget = 1e22
    opt = compute_optimal(CHINCHILLA, budget)
    same = inference_optimal(CHINCHILLA, opt.loss, inference_tokens=0)
    assert same.n_params == pytest.approx(opt.n_params, rel=1e-5)
    assert same.tokens == pytest.approx(opt.tokens, rel=1e-5)
    assert same.training_flops == pytest.approx(budget, rel=1e-8)


def test_unreachable_target_loss_is_refused():
    for target in (CHINCHILLA.E, CHINCHILLA.E - 0.1):
        with pytest.raises(ValueError, match=r"unreachable.*E = 1\.69"):
            inference_optimal(CHINCHILLA, target, 1e12)


def test_a_law_that_does_not_fall_cannot_plan():
    flat = ScalingLaw(E=2.0, A=10.0, B=10.0, alpha=-0.1, beta=0.3)
    with pytest.raises(ValueError, match=r"alpha=-0\.1 should be > 0"):
        compute_optimal(flat, 1e20)
    with pytest.raises(ValueError, match="compute: 0 FLOPs"):
        compute_optimal(CHINCHILLA, 0)


def test_nearest_preset_by_log_distance():
    assert nearest_preset(6.7e9).name == "7B"
    assert nearest_preset(40e9).name == "33B"  # 40/32.5 is nearer than 65.3/40
    assert nearest_preset(10).name == "debug"


def test_read_csv_points_and_errors(tmp_path):
    good = tmp_path / "points.csv"
    good.write_text("run,n_params,tokens,loss\na,1e8,2e9,3.5\nb,2.5e8,4e9,3.25\n")
    points = read_csv(good)
    assert [(p.n_params, p.tokens, p.loss) for p in points] == [(1e8, 2e9, 3.5), (2.5e8, 4e9, 3.25)]
    assert points[1].source == f"{good}:3"

    (tmp_path / "bad.csv").write_text("n_params,tokens,loss\n1e8,2e9,3.5\n1e8,-5,3.0\n")
    with pytest.raises(ValueError, match=r"bad.csv:3: tokens='-5' is not a positive"):
        read_csv(tmp_path / "bad.csv")
    (tmp_path / "cols.csv").write_text("n,tokens,loss\n1,2,3\n")
    with pytest.raises(ValueError, match=r"missing column.*n_params"):
        read_csv(tmp_path / "cols.csv")
    with pytest.raises(FileNotFoundError, match="no such file"):
        read_csv(tmp_path / "absent.csv")


def _log_run(client, experiment_id, name, params, val_losses, *, parent=None, finish=True):
    tags = {"mlflow.parentRunId": parent} if parent else {}
    run = client.create_run(experiment_id, run_name=name, tags=tags)
    client.log_batch(
        run.info.run_id,
        params=[Param(k, str(v)) for k, v in params.items()],
        metrics=[Metric("val_loss", v, 1000 + i, s) for i, (s, v) in enumerate(val_losses)],
    )
    if finish:
        client.set_terminated(run.info.run_id, "FINISHED")
    return run.info.run_id


def test_points_from_a_real_mlflow_store(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("scaling", artifact_location=(tmp_path / "art").as_uri())
    parent = client.create_run(exp, run_name="grid").info.run_id
    derived = {"derived.n_params": 1000, "derived.batch_tokens": 512}
    _log_run(client, exp, "a", derived, [(10, 4.0), (20, 3.5)], parent=parent)
    # A resumed run logged step 20 twice; the later value counts.
    _log_run(client, exp, "b", derived | {"derived.n_params": 3000},
             [(20, 3.4), (20, 3.3)], parent=parent)  # fmt: skip
    # Logged before the driver recorded derived.n_params: N counted from model.* params.
    model = {
        "model.preset": "debug",
        "model.dim": 32,
        "model.n_layers": 2,
        "model.n_heads": 4,
        "model.n_kv_heads": "None",
        "model.vocab_size": "None",
        "tokenizer.path": "None",
        "tokenizer.vocab_size": 512,
        "train.batch_tokens": 256,
    }
    _log_run(client, exp, "c", model, [(5, 4.5), (10, 4.2)], parent=parent)
    _log_run(client, exp, "no-metric", derived, [], parent=parent)
    _log_run(client, exp, "running", derived, [(10, 2.0)], parent=parent, finish=False)
    _log_run(client, exp, "other-sweep", derived, [(10, 2.5)])

    said: list[str] = []
    points = collect_mlflow_points(uri, "scaling", parent_run_id=parent, say=said.append)
    with torch.device("meta"):
        n_c = Llama(ModelConfig(preset="debug", dim=32, n_layers=2, n_heads=4).args(512))
    expected_c = float(n_c.num_params())
    assert [(p.source, p.n_params, p.tokens, p.loss) for p in points] == [
        ("a@20", 1000.0, 20 * 512.0, 3.5),
        ("b@20", 3000.0, 20 * 512.0, 3.3),
        ("c@10", expected_c, 10 * 256.0, 4.2),
    ]
    assert said == ["run no-metric: skipped, no val_loss metric"]

    every = collect_mlflow_points(uri, "scaling", parent_run_id=parent, all_points=True,
                                  say=said.append)  # fmt: skip
    assert [p.source for p in every] == ["a@10", "a@20", "b@20", "c@5", "c@10"]
    # Without the parent filter the other sweep's run joins (the running one never does).
    everyone = collect_mlflow_points(uri, "scaling", say=said.append)
    assert sorted(p.source for p in everyone) == ["a@20", "b@20", "c@10", "other-sweep@10"]
    with pytest.raises(ValueError, match="no MLflow experiment 'nope'"):
        collect_mlflow_points(uri, "nope")


@pytest.mark.slow  # fits and plots: 10-50 CPU seconds
def test_plan_command_prints_and_plots(tmp_path, capsys):
    n, d, loss = synthetic(CHINCHILLA)
    csv = tmp_path / "points.csv"
    rows = zip(n.tolist(), d.tolist(), loss.tolist(), strict=True)
    csv.write_text("n_params,tokens,loss\n" + "".join(f"{a!r},{b!r},{c!r}\n" for a, b, c in rows))
    plot = tmp_path / "plan.png"
    args = ["plan", "--csv", str(csv), "--compute", "1e22", "--inference-tokens", "1e13"]
    assert main([*args, "--plot", str(plot)]) == 0
    out = capsys.readouterr().out
    fit = fit_scaling_law(n, d, loss).law
    best = compute_optimal(fit, 1e22)
    served = inference_optimal(fit, best.loss, 1e13)
    assert f"alpha = {fit.alpha:.4f}" in out
    assert "compute-optimal for C = 1e+22 training FLOPs" in out
    assert f"N = {best.n_params / 1e9:.3g}B params" in out
    assert f"inference-optimal for loss {best.loss:.4f} and 10T inference tokens" in out
    assert f"N = {served.n_params / 1e9:.3g}B params" in out
    assert plot.read_bytes()[:8] == PNG_MAGIC

    # A target loss the law cannot reach, and too few points: one line, exit code 2.
    assert main([*args[:3], "--target-loss", "1.0"]) == 2
    assert "error: target loss 1 is unreachable" in capsys.readouterr().err
    csv.write_text("n_params,tokens,loss\n" + "1e8,1e9,3.0\n" * 4)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: 4 point(s) cannot determine") and err.count("\n") == 1
    assert main(["plan", "--csv", str(csv)]) == 2
    assert "give a training budget (--compute) or a target loss" in capsys.readouterr().err


@pytest.mark.slow  # many fits: 10-50 CPU seconds
def test_report_warns_when_the_plan_leaves_the_observed_range():
    points = [ScalingPoint(*p) for p in zip(*synthetic(CHINCHILLA), strict=True)]
    inside = make_plan(points, compute=1e22)  # N ~ 6B, D ~ 300B: within 1e7-1e10, 1e9-1e12
    assert "extrapolates" not in format_plan(inside)
    beyond = make_plan(points, compute=1e26)
    text = format_plan(beyond)
    assert "note: the compute-optimal plan extrapolates: N = " in text
    assert f"is x{beyond.compute.n_params / 1e10:.2g} the largest observed" in text
    assert "no loss floor" not in text
    floorless = replace(inside, fit=replace(inside.fit, law=replace(inside.fit.law, E=1e-9)))
    assert "note: E is ~0, the points show no loss floor" in format_plan(floorless)
