"""Schedule, optimizer groups, the training step, FLOPs accounting."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from llamaray.model import Llama, get_preset
from llamaray.model.flops import flops_per_token, mfu, non_embedding_params, param_count
from llamaray.train.optim import build_optimizer, param_groups
from llamaray.train.schedule import lr_at
from llamaray.train.step import train_step


def test_schedule_warmup_peak_cosine_floor():
    peak, warm, total = 3e-4, 2000, 10_000
    assert lr_at(0, peak, warm, total) == pytest.approx(peak / warm)
    assert lr_at(999, peak, warm, total) == pytest.approx(peak / 2)
    assert lr_at(1999, peak, warm, total) == pytest.approx(peak)
    assert lr_at(2000, peak, warm, total) == pytest.approx(peak)
    mid = warm + (total - warm) // 2
    assert lr_at(mid, peak, warm, total) == pytest.approx(peak * (0.1 + 0.9 * 0.5))
    assert lr_at(total, peak, warm, total) == pytest.approx(peak * 0.1)
    assert lr_at(total + 500, peak, warm, total) == pytest.approx(peak * 0.1)
    decay = [lr_at(s, peak, warm, total) for s in range(warm, total + 1, 100)]
    assert all(a >= b for a, b in itertools.pairwise(decay))


def test_weight_decay_on_matrices_not_norms():
    model = Llama(get_preset("debug").args.with_(vocab_size=97))
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim == 2 for p in decay["params"])
    n_layers = model.args.n_layers
    assert len(no_decay["params"]) == 2 * n_layers + 1  # two norms per block + final norm
    opt = build_optimizer(model, lr=1e-3)
    assert opt.defaults["betas"] == (0.9, 0.95)
    assert opt.defaults["fused"]  # one pass per tensor, no temporaries (5x faster on CPU)


def test_train_step_accumulates_like_one_big_batch():
    torch.manual_seed(0)
    rows = torch.randint(0, 97, (4, 17))
    args = get_preset("debug").args.with_(vocab_size=97)
    a, b = Llama(args), Llama(args)
    b.load_state_dict(a.state_dict())
    opt_a, opt_b = build_optimizer(a, 1e-3), build_optimizer(b, 1e-3)
    sa = train_step(a, opt_a, [rows], lr=1e-3)
    sb = train_step(b, opt_b, [rows[:2], rows[2:]], lr=1e-3)
    assert sa.loss == pytest.approx(sb.loss, rel=1e-5)
    assert sa.grad_norm == pytest.approx(sb.grad_norm, rel=1e-4)
    assert sa.tokens == sb.tokens == 4 * 16
    # Adam's first update is about lr * sign(grad): where a gradient is ~0, summation-order
    # noise can flip it, so compare updates to a small fraction of lr (1e-3).
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pa, pb, atol=2e-5, rtol=0)


@pytest.mark.parametrize("grad_clip", [1e-2, 1e6], ids=["clipped", "within-bound"])
def test_train_step_clips_bit_for_bit_as_clip_grad_norm_does(grad_clip, monkeypatch):
    """Gradients within the bound are left alone rather than multiplied by 1.0: the same
    parameters, to the bit, as torch's clip_grad_norm_, whether it clips or not."""
    scaled = []
    scale = torch.nn.utils.clip_grads_with_norm_
    monkeypatch.setattr(
        torch.nn.utils, "clip_grads_with_norm_", lambda *a, **k: (scaled.append(1), scale(*a, **k))
    )
    torch.manual_seed(0)
    rows = torch.randint(0, 97, (2, 17))
    args = get_preset("debug").args.with_(vocab_size=97)
    ours, torchs = Llama(args), Llama(args)
    torchs.load_state_dict(ours.state_dict())
    opt_ours, opt_torch = build_optimizer(ours, 1e-3), build_optimizer(torchs, 1e-3)
    stats = train_step(ours, opt_ours, [rows], lr=1e-3, grad_clip=grad_clip)
    assert len(scaled) == (grad_clip == 1e-2)  # the scaling pass ran only where it clips
    monkeypatch.undo()
    torchs(rows[:, :-1], targets=rows[:, 1:]).backward()
    norm = torch.nn.utils.clip_grad_norm_(torchs.parameters(), grad_clip)
    opt_torch.step()
    assert stats.grad_norm == float(norm)
    assert (float(norm) > grad_clip) == (grad_clip == 1e-2)  # each case is what it says
    for (name, a), b in zip(ours.named_parameters(), torchs.parameters(), strict=True):
        assert torch.equal(a, b), name


def test_non_finite_step_is_not_applied():
    torch.manual_seed(0)
    model = Llama(get_preset("debug").args.with_(vocab_size=97))
    opt = build_optimizer(model, 1e-3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.output.weight[0, 0] = float("nan")
    before["output.weight"][0, 0] = float("nan")
    stats = train_step(model, opt, [torch.randint(0, 97, (2, 9))], lr=1e-3)
    assert not stats.finite and math.isnan(stats.loss)
    for k, v in model.state_dict().items():
        assert torch.equal(v.isnan(), before[k].isnan()), k
        assert torch.equal(v.nan_to_num(), before[k].nan_to_num()), k


@pytest.mark.parametrize("preset", ["debug", "7B", "65B"])
def test_param_count_is_the_built_models(preset):
    """The one parameter count (presets table, derived.n_params, the training line) equals
    what a built model holds, on the meta device; vocabulary and GQA included."""
    args = get_preset(preset).args
    with torch.device("meta"):
        assert param_count(args) == Llama(args).num_params()
        for other in (args.with_(vocab_size=512), args.with_(n_kv_heads=args.n_heads // 2)):
            assert param_count(other) == Llama(other).num_params()


def test_flops_per_token_palm_formula():
    args = get_preset("7B").args
    with torch.device("meta"):
        model = Llama(args)
    assert non_embedding_params(args) == model.num_params(exclude_embedding=True)
    n = model.num_params(exclude_embedding=True)
    assert flops_per_token(args, 2048) == 6 * n + 12 * 32 * 4096 * 2048
    # 7B at 2048 tokens: 6 x 6.61B + 3.2G = 42.9 GFLOPs per token.
    assert flops_per_token(args, 2048) / 1e9 == pytest.approx(42.87, abs=0.01)
    assert mfu(1000, args, 2048, flops_per_token(args, 2048) * 1000) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        mfu(1.0, args, 2048, 0)


def _inf_loss(sign: float):
    def hook(model):  # the loss the model returns, times +-inf
        return model.register_forward_hook(lambda module, args, loss: loss * (sign * math.inf))

    return hook


def _inf_gradient(model):  # a finite loss, one parameter's gradient infinite
    return model.output.weight.register_hook(lambda grad: torch.full_like(grad, math.inf))


@pytest.mark.parametrize(
    "make_non_finite",
    [_inf_loss(1.0), _inf_loss(-1.0), _inf_gradient],
    ids=["+inf loss", "-inf loss", "finite loss, infinite gradient norm"],
)
def test_infinite_steps_are_not_applied_like_nan(make_non_finite):
    torch.manual_seed(0)
    model = Llama(get_preset("debug").args.with_(vocab_size=97))
    opt = build_optimizer(model, 1e-3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    make_non_finite(model)
    stats = train_step(model, opt, [torch.randint(0, 97, (2, 9))], lr=1e-3)
    assert not stats.finite
    assert not (math.isfinite(stats.loss) and math.isfinite(stats.grad_norm)), stats
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k  # no parameter moved
    assert not opt.state  # and Adam took no step: no moments, no step count
