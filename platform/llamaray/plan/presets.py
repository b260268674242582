"""The size presets by parameter count, to name the preset nearest a planned N.

>>> nearest_preset(6.7e9).name
'7B'
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache


@dataclass(frozen=True)
class PresetSize:
    name: str
    n_params: int


@cache
def preset_sizes() -> tuple[PresetSize, ...]:
    """Every preset's parameter count with its own vocabulary (as `llamaray presets`
    counts them)."""
    from llamaray.model import PRESETS
    from llamaray.model.flops import param_count

    return tuple(PresetSize(p.name, param_count(p.args)) for p in PRESETS.values())


def nearest_preset(n_params: float) -> PresetSize:
    """The preset closest to `n_params` on a log scale (2x too big is as far as 2x too
    small)."""
    return min(preset_sizes(), key=lambda p: abs(math.log(p.n_params / n_params)))
