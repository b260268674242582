"""Which dtype a run trains in when `train.dtype` is `auto`: the one place that decides.

On CUDA, bf16 wherever the GPU supports it. On CPU the answer depends on the chip: with
AMX (Sapphire Rapids and later Xeons) a bf16 matmul runs several times faster than fp32;
without it, bf16 is emulated and slower. The device type cannot tell those apart, so a
short probe times one matmul at the model's width in each dtype and picks bf16 only when
it is clearly faster. The probe runs once per process and width (well under a second).
"""

from __future__ import annotations

import functools
import time

import torch

DTYPE_SETTINGS: tuple[str, ...] = ("fp32", "bf16", "auto")
_TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}

# bf16 autocast also pays for casting weights and activations, so a bf16 matmul that is
# barely faster than fp32 makes the whole step slower; ask for a clear margin.
BF16_MIN_SPEEDUP = 1.25
_PROBE_ROWS = 1024  # tokens per probe matmul: a micro-batch's worth, as in the step


def resolve_dtype(setting: str, device: torch.device, width: int) -> str:
    """The dtype ("fp32" or "bf16") that `train.dtype: setting` means on `device` for a
    model of hidden size `width`.

    >>> resolve_dtype("fp32", torch.device("cpu"), 768)
    'fp32'
    """
    if setting not in DTYPE_SETTINGS:
        raise ValueError(f"unknown dtype {setting!r}; choose one of {DTYPE_SETTINGS}")
    if setting != "auto":
        return setting
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    if device.type == "cpu":
        return "bf16" if _cpu_bf16(width) else "fp32"
    return "fp32"


@functools.cache
def _cpu_bf16(width: int) -> bool:
    return _ranks_agree(cpu_bf16_speedup(width) >= BF16_MIN_SPEEDUP)


def _ranks_agree(bf16_here: bool) -> bool:
    """bf16 only if every rank's probe chose it (collective when a process group is up):
    ranks that computed in different dtypes would not be training one model. Each rank
    asks at the same point, its first resolution for a width (`_cpu_bf16` keeps the
    answer)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return bf16_here
    flag = torch.tensor([int(bf16_here)])
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


@functools.cache
def cpu_bf16_speedup(width: int) -> float:
    """bf16 over fp32 matmul throughput on this CPU for a (1024, width) x (width, 4 width)
    product (the MLP's shape), measured once per process and width. The two dtypes are timed
    alternately, best of each kept, so a burst of other load cannot favour one of them."""
    best = {"fp32": 0.0, "bf16": 0.0}
    for _ in range(3):
        for dtype in best:
            flops = matmul_flops(max(width, 64), dtype, rows=_PROBE_ROWS, repeats=1, wide=4)
            best[dtype] = max(best[dtype], flops)
    return best["bf16"] / best["fp32"]


def matmul_flops(
    size: int,
    dtype: str,
    rows: int | None = None,
    repeats: int = 5,
    device: str = "cpu",
    wide: int = 1,
) -> float:
    """Best FLOP/s of a (rows, size) x (size, wide * size) matmul (rows defaults to size: a
    square product, the usual way to state a peak) over `repeats` timed runs."""
    rows = rows or size
    generator = torch.Generator(device=device).manual_seed(0)
    torch_dtype = _TORCH_DTYPES[dtype]
    a = torch.randn(rows, size, generator=generator, device=device).to(torch_dtype)
    b = torch.randn(size, wide * size, generator=generator, device=device).to(torch_dtype)
    torch.mm(a, b)  # first call: kernel selection and packing buffers, not timed
    work = 2 * rows * size * wide * size
    # Enough products per timing that one run lasts a few milliseconds at any size.
    per_timing = max(1, int(1e9 // work))
    best = float("inf")
    for _ in range(repeats):
        if device != "cpu":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(per_timing):
            torch.mm(a, b)
        if device != "cpu":
            torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - start) / per_timing)
    return work / best
