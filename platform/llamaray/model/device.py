"""Where tensors go: the one "CUDA if available" rule.

>>> pick_device("cpu")
device(type='cpu')
>>> pick_device("auto").type in ("cuda", "cpu")
True
"""

from __future__ import annotations

import torch


def pick_device(name: str | torch.device | None = "auto", setting: str = "device") -> torch.device:
    """`auto` (or None): the CUDA device when one is visible, else the CPU. `cuda` without
    a visible device fails naming `setting`; any other name (`cpu`, `cuda:1`) is taken as
    given."""
    name = "auto" if name is None else str(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"{setting}={name} but no CUDA device is visible; use auto or cpu")
    return torch.device(name)
