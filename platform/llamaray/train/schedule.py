"""The paper's learning-rate schedule as a pure function of the step."""

from __future__ import annotations

import math


def lr_at(
    step: int, peak_lr: float, warmup_steps: int, total_steps: int, final_ratio: float = 0.1
) -> float:
    """Linear warmup to `peak_lr` over `warmup_steps`, then cosine decay to
    `final_ratio * peak_lr` at `total_steps`, constant after that.

    Step 0 gets peak/warmup rather than 0 so the first update already moves the weights.

    >>> lr_at(0, 3e-4, 2000, 100_000) == 3e-4 / 2000
    True
    >>> round(lr_at(100_000, 3e-4, 2000, 100_000), 12)  # final_ratio=0.1 of the peak
    3e-05
    """
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    if step >= total_steps:
        return peak_lr * final_ratio
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    return peak_lr * (final_ratio + (1.0 - final_ratio) * cosine)
