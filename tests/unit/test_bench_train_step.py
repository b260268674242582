"""The training-step benchmark's kernel floor times the model's own matmuls, every one of
them, and the benchmark reports it beside each step (figures in docs/benchmarks.md)."""

from __future__ import annotations

import pytest

from llamaray.bench import train_step
from llamaray.bench.kernel_floor import kernel_floor
from llamaray.model import get_preset
from llamaray.model.flops import non_embedding_params


@pytest.mark.parametrize(("batch", "seq_len", "vocab"), [(3, 16, 300), (2, 64, 70_000)])
def test_the_floor_times_every_matmul_of_the_step(batch, seq_len, vocab):
    """The products timed compute 6 x tokens x the parameters that take part in matmuls
    (norms aside): grouped-query heads, the SwiGLU width and the output projection's
    chunks and groups (a remainder each; a vocabulary of 70 000 makes chunks of 59 and
    groups of 479 tokens) all timed, none twice."""
    args = get_preset("debug").args.with_(vocab_size=vocab, n_heads=4, n_kv_heads=2)
    floor = kernel_floor(args, batch, seq_len, "fp32", repeats=1)
    norms = (2 * args.n_layers + 1) * args.dim
    assert floor.matmul_flops == 6 * batch * seq_len * (non_embedding_params(args) - norms)
    assert floor.matmul_s > 0 and floor.attention_s > 0


def test_the_benchmark_reports_the_floor_beside_each_step(capsys):
    report = train_step.main(
        ["--presets", "debug", "--dtypes", "fp32,bf16", "--vocab-size", "256", "--batch", "1",
         "--seq-len", "16", "--rounds", "1", "--steps-per-round", "1", "--warmup", "0",
         "--no-reference"]
    )  # fmt: skip
    rows = {(r["dtype"], r["model"]): r for r in report["results"]}
    assert set(rows) == {("fp32", "ours"), ("bf16", "ours")}
    for row in rows.values():
        assert row["floor_matmul_s"] > 0 and row["floor_attention_s"] > 0
        # The floor's share of the peak: what its step time would give.
        assert row["floor_of_peak"] == pytest.approx(
            row["of_peak"] * row["step_s"] / row["floor_s"]
        )
    out = capsys.readouterr().out
    floor_table = out[out.index("# kernel floor") :]
    assert [line.split()[:2] for line in floor_table.splitlines() if line.startswith("debug")] == [
        ["debug", "fp32"],
        ["debug", "bf16"],
    ]


def test_a_floor_above_the_step_is_called_invalid(monkeypatch, capsys):
    """The floor is a part of the step: above it, only load while it was timed can have
    put it, and the benchmark says so rather than print an 'at most' below the step's."""
    from llamaray.bench.kernel_floor import KernelFloor

    monkeypatch.setattr(train_step, "kernel_floor", lambda *a, **k: KernelFloor(60.0, 60.0, 1))
    train_step.main(
        ["--presets", "debug", "--dtypes", "fp32", "--vocab-size", "256", "--batch", "1",
         "--seq-len", "16", "--rounds", "1", "--steps-per-round", "1", "--warmup", "0",
         "--no-reference"]
    )  # fmt: skip
    assert "# WARNING: the floor is above the step for debug fp32" in capsys.readouterr().out
