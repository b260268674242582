"""The scaling planner: fit L(N, D) = E + A/N^alpha + B/D^beta to runs, then choose a size.

| module | what it holds |
|---|---|
| `scaling.py` | the law, its fit (Chinchilla's approach 3), compute- and inference-optimal sizes |
| `points.py` | (N, D, loss) points from finished MLflow runs or a CSV file |
| `presets.py` | the size presets' parameter counts; the nearest preset to a planned N |
| `planner.py` | `make_plan`: fit, then both optima for a budget / target loss |
| `report.py` | the plan as text and as a two-panel plot |
| `cli.py` | `llamaray plan` |

>>> from llamaray.plan import make_plan, read_csv, format_plan
>>> print(format_plan(make_plan(read_csv("points.csv"), compute=1e21)))  # doctest: +SKIP
"""

from llamaray.plan.planner import Plan, make_plan
from llamaray.plan.points import ScalingPoint, collect_mlflow_points, read_csv
from llamaray.plan.report import format_plan, plot_plan
from llamaray.plan.scaling import (
    ComputeOptimum,
    InferenceOptimum,
    ScalingFit,
    ScalingLaw,
    compute_optimal,
    fit_scaling_law,
    inference_optimal,
)

__all__ = [
    "ComputeOptimum",
    "InferenceOptimum",
    "Plan",
    "ScalingFit",
    "ScalingLaw",
    "ScalingPoint",
    "collect_mlflow_points",
    "compute_optimal",
    "fit_scaling_law",
    "format_plan",
    "inference_optimal",
    "make_plan",
    "plot_plan",
    "read_csv",
]
