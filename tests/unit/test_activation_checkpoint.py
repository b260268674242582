"""none / full / selective checkpointing: same gradients, different recomputation."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from llamaray.model import Llama, get_preset
from llamaray.parallel.activation_checkpoint import apply_activation_checkpointing, save_output

aten = torch.ops.aten


class OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.counts: dict = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func] = self.counts.get(func, 0) + 1
        return func(*args, **(kwargs or {}))


def run(mode: str):
    torch.manual_seed(0)
    model = Llama(get_preset("debug").args.with_(vocab_size=97))
    apply_activation_checkpointing(model, mode)
    tokens = torch.randint(0, 97, (2, 24))
    loss = torch.nn.functional.cross_entropy(model(tokens).flatten(0, 1), tokens.flatten())
    with OpCounter() as counter:
        loss.backward()
    grads = {
        n.replace("_checkpoint_wrapped_module.", ""): p.grad for n, p in model.named_parameters()
    }
    return model, grads, counter.counts


@pytest.fixture(scope="module")
def runs():
    return {mode: run(mode) for mode in ("none", "full", "selective")}


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_gradients_agree_with_no_checkpointing(runs, mode):
    _, expected, _ = runs["none"]
    _, got, _ = runs[mode]
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=1e-6, rtol=1e-5, msg=name)


def test_state_dict_keys_unchanged_by_wrapping(runs):
    assert list(runs["selective"][0].state_dict()) == list(runs["none"][0].state_dict())


def test_selective_recomputes_cheap_ops_but_no_matmul(runs):
    mm_backward = runs["none"][2][aten.mm.default]
    # Full recomputes every block's forward matmuls in the backward pass...
    assert runs["full"][2][aten.mm.default] > mm_backward
    assert runs["full"][2].get(aten.silu.default, 0) > 0
    # ...selective replays the block but serves saved matmul outputs instead of recomputing,
    # while SiLU (cheap) is recomputed.
    assert runs["selective"][2][aten.mm.default] == mm_backward
    assert runs["selective"][2].get(aten.silu.default, 0) > 0
    assert runs["none"][2].get(aten.silu.default, 0) == 0


def test_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="choose one of"):
        apply_activation_checkpointing(Llama(get_preset("debug").args.with_(vocab_size=97)), "some")


# ------------------------------------------------- which kernels' outputs selective keeps

SDPA_CPU = aten._scaled_dot_product_flash_attention_for_cpu.default


def test_selective_saves_the_attention_output_of_every_block(runs):
    n_layers = get_preset("debug").args.n_layers
    # Full replays each block's attention kernel in the backward pass; selective serves
    # the output saved in the forward pass, so the kernel never runs again.
    assert runs["full"][2].get(SDPA_CPU, 0) == n_layers
    assert runs["selective"][2].get(SDPA_CPU, 0) == 0


@pytest.mark.parametrize(
    "qualified",
    [
        "aten::mm",
        "aten::addmm",
        "aten::bmm",
        "aten::_scaled_dot_product_flash_attention",
        "aten::_scaled_dot_product_flash_attention_for_cpu",
        "aten::_scaled_dot_product_efficient_attention",
        "aten::_scaled_dot_product_cudnn_attention",
        "aten::_flash_attention_forward",
        "aten::_efficient_attention_forward",
        "xformers_flash::flash_fwd",
        "xformers_flash3::flash_fwd",
        "xformers::efficient_attention_forward_cutlass",
        "xformers::efficient_attention_forward_ck",
    ],
)
def test_policy_saves_matmuls_and_attention_kernels(qualified):
    assert save_output(*qualified.split("::"))


@pytest.mark.parametrize(
    "qualified",
    [
        "aten::silu",
        "aten::mul",
        "aten::add",
        "aten::_to_copy",
        "aten::_scaled_dot_product_flash_attention_backward",
        "xformers_flash::flash_bwd",
        "xformers_flash3::flash_bwd",
        "mylib::mm",
    ],
)
def test_policy_recomputes_cheap_ops_and_never_saves_backward_kernels(qualified):
    assert not save_output(*qualified.split("::"))


# Ops under xformers' own names, with a CPU body, so the policy meets them exactly as it
# does on a GPU: as OpOverloads of the `xformers_flash` / `xformers_flash3` namespaces.
XFORMERS_FLASH_OPS = ("xformers_flash::flash_fwd", "xformers_flash3::flash_fwd")
KERNEL_CALLS: dict[str, int] = {}


def _define_attention_op(qualified: str):
    def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        KERNEL_CALLS[qualified] = KERNEL_CALLS.get(qualified, 0) + 1
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)

    op = torch.library.custom_op(qualified, mutates_args=())(attention)

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    def backward(ctx, grad):
        inputs = [t.detach().requires_grad_() for t in ctx.saved_tensors]
        with torch.enable_grad():
            out = torch.nn.functional.scaled_dot_product_attention(*inputs, is_causal=True)
        return torch.autograd.grad(out, inputs, grad)

    op.register_autograd(backward, setup_context=setup_context)
    return op


@pytest.fixture(scope="module")
def xformers_named_ops():
    namespaces = {q.split("::")[0] for q in XFORMERS_FLASH_OPS}
    if any(hasattr(getattr(torch.ops, ns), "flash_fwd") for ns in namespaces):
        pytest.skip("xformers' own flash kernels are loaded in this process")
    return {qualified: _define_attention_op(qualified) for qualified in XFORMERS_FLASH_OPS}


class _AttentionBlock(torch.nn.Module):
    def __init__(self, kernel):
        super().__init__()
        self.kernel = kernel
        self.proj = torch.nn.Linear(8, 8, bias=False)

    def forward(self, x):  # (B, H, T, D)
        return self.proj(self.kernel(x, x * 2, x * 3))


@pytest.mark.parametrize("qualified", XFORMERS_FLASH_OPS)
def test_selective_saves_xformers_flash_kernels(xformers_named_ops, qualified):
    model = torch.nn.Module()
    model.layers = torch.nn.ModuleDict({"0": _AttentionBlock(xformers_named_ops[qualified])})
    apply_activation_checkpointing(model, "selective")
    x = torch.randn(2, 2, 6, 8, requires_grad=True)
    KERNEL_CALLS.clear()
    model.layers["0"](x).sum().backward()
    # Once in the forward pass; a missed name would show a second call, the recomputation.
    assert {qualified: 1} == KERNEL_CALLS
    assert x.grad is not None and x.grad.abs().sum() > 0
