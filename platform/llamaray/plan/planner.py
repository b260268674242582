"""One plan: fit the law to points, then the compute-optimal and inference-optimal sizes.

>>> from llamaray.plan.points import read_csv
>>> plan = make_plan(read_csv("points.csv"), compute=1e21, inference_tokens=1e12)  # doctest: +SKIP
>>> plan.inference.n_params < plan.same_loss.n_params  # doctest: +SKIP
True
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from llamaray.plan.points import ScalingPoint
from llamaray.plan.presets import PresetSize, nearest_preset
from llamaray.plan.scaling import (
    ComputeOptimum,
    InferenceOptimum,
    ScalingFit,
    compute_optimal,
    fit_scaling_law,
    inference_optimal,
)


@dataclass(frozen=True)
class Plan:
    points: tuple[ScalingPoint, ...]
    fit: ScalingFit
    compute: ComputeOptimum | None
    """Least loss for the training budget; None when no budget was given."""
    inference: InferenceOptimum
    """Least training + inference FLOPs for the target loss and inference tokens."""
    same_loss: InferenceOptimum
    """The compute-optimal model for the same target loss (no inference counted), to
    compare the inference-optimal one with."""
    compute_preset: PresetSize | None
    inference_preset: PresetSize


def make_plan(
    points: Sequence[ScalingPoint],
    *,
    compute: float | None = None,
    target_loss: float | None = None,
    inference_tokens: float = 0.0,
) -> Plan:
    """Fit, then plan. The target loss defaults to what the compute-optimal model for
    `compute` reaches: "the same quality, but served for `inference_tokens`"."""
    if compute is None and target_loss is None:
        raise ValueError("give a training budget (--compute) or a target loss (--target-loss)")
    fit = fit_scaling_law(
        [p.n_params for p in points], [p.tokens for p in points], [p.loss for p in points]
    )
    best = compute_optimal(fit.law, compute) if compute is not None else None
    target = target_loss if target_loss is not None else best.loss
    inference = inference_optimal(fit.law, target, inference_tokens)
    same_loss = inference_optimal(fit.law, target, 0.0)
    return Plan(
        points=tuple(points),
        fit=fit,
        compute=best,
        inference=inference,
        same_loss=same_loss,
        compute_preset=nearest_preset(best.n_params) if best else None,
        inference_preset=nearest_preset(inference.n_params),
    )
