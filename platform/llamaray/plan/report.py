"""A plan as text (fitted law, points, the two optima) and as a two-panel plot.

>>> print(format_plan(plan))  # doctest: +SKIP
>>> plot_plan(plan, "scaling.png")  # doctest: +SKIP
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from llamaray.plan.planner import Plan
from llamaray.plan.scaling import HUBER_DELTA, compute_optimal, smallest_model, tokens_for_loss


def count(x: float) -> str:
    """1.87e6 -> '1.87M': parameter and token counts as people say them."""
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{suffix}"
    return f"{x:.3g}"


def format_plan(plan: Plan) -> str:
    """The fitted law, each point against it, and the planned sizes."""
    law, fit = plan.fit.law, plan.fit
    lines = [
        f"fitted L(N, D) = E + A/N^alpha + B/D^beta on {fit.n_points} points "
        f"(Huber delta {HUBER_DELTA:g} on log loss, best of {fit.starts} L-BFGS starts)",
        f"  E = {law.E:.4g}",
        f"  A = {law.A:.4g}   alpha = {law.alpha:.4f}",
        f"  B = {law.B:.4g}   beta  = {law.beta:.4f}",
        f"  residuals of log loss: rms {fit.rms_log_residual:.4f}, "
        f"max {fit.max_abs_log_residual:.4f} (0.01 is about 1% of the loss)",
        "",
        f"  {'point':24} {'N':>8} {'D':>8} {'loss':>7} {'fitted':>7} {'error':>7}",
    ]
    for p in sorted(plan.points, key=lambda p: (p.n_params, p.tokens)):
        pred = law.loss(p.n_params, p.tokens)
        lines.append(
            f"  {p.source[:24]:24} {count(p.n_params):>8} {count(p.tokens):>8} {p.loss:7.4f} "
            f"{pred:7.4f} {(pred - p.loss) / p.loss:+7.2%}"
        )
    if law.E / min(p.loss for p in plan.points) < 1e-3:
        lines.append(
            "  note: E is ~0, the points show no loss floor; the fit extends their power laws "
            "indefinitely (more and larger runs are needed to place E)"
        )
    lines.append("")
    if plan.compute is not None:
        c = plan.compute
        lines += [
            f"compute-optimal for C = {c.compute:.3g} training FLOPs (C = 6 N D):",
            f"  N = {count(c.n_params)} params, D = {count(c.tokens)} tokens "
            f"({c.tokens / c.n_params:.1f} tokens/param), predicted loss {c.loss:.4f}",
            f"  nearest preset: {_preset(plan.compute_preset, c.n_params)}",
            "",
        ]
    i, s = plan.inference, plan.same_loss
    lines += [
        f"inference-optimal for loss {i.target_loss:.4f} and {count(i.inference_tokens)} "
        "inference tokens (2 N FLOPs each):",
        f"  N = {count(i.n_params)} params, D = {count(i.tokens)} tokens "
        f"({i.tokens / i.n_params:.1f} tokens/param)",
        f"  FLOPs: training {i.training_flops:.3g} + inference {i.inference_flops:.3g} "
        f"= {i.total_flops:.3g}",
        f"  nearest preset: {_preset(plan.inference_preset, i.n_params)}",
        f"  vs the compute-optimal model for that loss (N = {count(s.n_params)}, "
        f"D = {count(s.tokens)}): N x{i.n_params / s.n_params:.2f}, "
        f"D x{i.tokens / s.tokens:.2f}, total FLOPs x{i.total_flops / _total(s, i):.2f}",
    ]
    lines += _extrapolation(plan)
    return "\n".join(lines)


def _extrapolation(plan: Plan) -> list[str]:
    """A warning for each planned N or D outside the range the points cover."""
    n_lo, n_hi = min(p.n_params for p in plan.points), max(p.n_params for p in plan.points)
    d_lo, d_hi = min(p.tokens for p in plan.points), max(p.tokens for p in plan.points)
    planned = [("inference-optimal", plan.inference.n_params, plan.inference.tokens)]
    if plan.compute is not None:
        planned.insert(0, ("compute-optimal", plan.compute.n_params, plan.compute.tokens))
    out = []
    for name, n, d in planned:
        outside = []
        for what, x, lo, hi in (("N", n, n_lo, n_hi), ("D", d, d_lo, d_hi)):
            if x > hi:
                outside.append(f"{what} = {count(x)} is x{x / hi:.2g} the largest observed")
            elif x < lo:
                outside.append(f"{what} = {count(x)} is x{x / lo:.2g} the smallest observed")
        if outside:
            out.append(f"note: the {name} plan extrapolates: {'; '.join(outside)}")
    return ["", *out] if out else []


def _total(same_loss, inference) -> float:
    """The compute-optimal model's training FLOPs plus its cost of serving the same
    tokens."""
    return same_loss.training_flops + 2 * same_loss.n_params * inference.inference_tokens


def _preset(preset, n: float) -> str:
    if preset is None:
        return "-"
    ratio = preset.n_params / n
    return f"{preset.name} ({count(preset.n_params)} params, x{ratio:.2g} the planned N)"


def plot_plan(plan: Plan, path: str | Path) -> Path:
    """Left: observed loss against tokens for each model size, the fitted curves, the
    compute-optimal frontier and the planned points. Right: FLOPs against N for the target
    loss (training, inference, total) with the inference- and compute-optimal N."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    law = plan.fit.law
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5), dpi=100)

    sizes = sorted({p.n_params for p in plan.points})
    tokens = [p.tokens for p in plan.points]
    d_lo, d_hi = min(tokens) / 2, max(tokens) * 2
    for d in (plan.compute.tokens if plan.compute else None, plan.inference.tokens):
        if d is not None:
            d_lo, d_hi = min(d_lo, d / 2), max(d_hi, d * 2)
    d_grid = np.geomspace(d_lo, d_hi, 200)
    colors = plt.cm.viridis(np.linspace(0, 0.9, len(sizes)))
    for n, color in zip(sizes, colors, strict=True):
        mine = [p for p in plan.points if p.n_params == n]
        left.scatter([p.tokens for p in mine], [p.loss for p in mine], color=color, zorder=3)
        left.plot(d_grid, law.loss(n, d_grid), color=color, lw=1, label=f"N = {count(n)}")
    # The frontier: for each budget, the loss of its compute-optimal (N, D), drawn at D.
    s = law.alpha + law.beta
    g = (law.alpha * law.A / (law.beta * law.B)) ** (1 / s)
    budgets = 6 * (d_grid * g) ** (s / law.alpha)  # the C whose D_opt is each grid D
    frontier = [compute_optimal(law, c) for c in budgets]
    left.plot(
        [f.tokens for f in frontier], [f.loss for f in frontier], "k--", lw=1.2,
        label="compute-optimal frontier",
    )  # fmt: skip
    if plan.compute is not None:
        c = plan.compute
        left.plot(c.tokens, c.loss, "r*", ms=14, zorder=4,
                  label=f"C = {c.compute:.2g}: N = {count(c.n_params)}")  # fmt: skip
    i = plan.inference
    left.plot(i.tokens, i.target_loss, "mD", ms=8, zorder=4,
              label=f"inference-optimal: N = {count(i.n_params)}")  # fmt: skip
    observed = [p.loss for p in plan.points]
    top = max(observed) * 1.1
    bottom = min([*observed, i.target_loss] + ([plan.compute.loss] if plan.compute else []))
    left.set_ylim(max(law.E, bottom * 0.9), top)
    left.set_xscale("log")
    left.set_xlabel("training tokens D")
    left.set_ylabel("validation loss (nats/token)")
    left.set_title(
        f"L = {law.E:.3g} + {law.A:.3g}/N^{law.alpha:.3f} + {law.B:.3g}/D^{law.beta:.3f}"
    )
    left.grid(alpha=0.3, which="both")
    left.legend(fontsize=8)

    # Right: the cost of reaching the target loss at each N.
    n_min = smallest_model(law, i.target_loss)
    n_hi = max(i.n_params, plan.same_loss.n_params) * 30
    n_grid = np.geomspace(n_min * 1.02, n_hi, 300)
    train = 6 * n_grid * tokens_for_loss(law, n_grid, i.target_loss)
    serve = 2 * n_grid * i.inference_tokens
    right.plot(n_grid, train, label="training 6 N D(N)")
    if i.inference_tokens > 0:
        right.plot(n_grid, serve, label=f"inference 2 N x {count(i.inference_tokens)}")
    right.plot(n_grid, train + serve, "k", lw=2, label="total")
    right.axvline(i.n_params, color="m", ls="-", label=f"inference-optimal N = {count(i.n_params)}")
    right.axvline(plan.same_loss.n_params, color="r", ls=":",
                  label=f"compute-optimal N = {count(plan.same_loss.n_params)}")  # fmt: skip
    right.set_xscale("log")
    right.set_yscale("log")
    # The training cost shoots up near the smallest feasible N: show two decades above.
    right.set_ylim(min(i.total_flops, plan.same_loss.training_flops) / 3, i.total_flops * 100)
    right.set_xlabel("parameters N")
    right.set_ylabel("FLOPs to reach the target loss")
    right.set_title(
        f"target loss {i.target_loss:.3f}, {count(i.inference_tokens)} inference tokens"
    )
    right.grid(alpha=0.3, which="both")
    right.legend(fontsize=8)

    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
