"""The fused, chunked output-projection loss equals the plain logits -> cross-entropy path."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from llamaray.model import Llama, get_preset
from llamaray.model.loss import IGNORE_INDEX, linear_cross_entropy


def plain(hidden, weight, targets):
    return F.cross_entropy((hidden @ weight.T).float(), targets, ignore_index=IGNORE_INDEX)


def inputs(n=37, dim=16, vocab=53, seed=0, ignore=False):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, dim, generator=g, requires_grad=True)
    weight = torch.randn(vocab, dim, generator=g, requires_grad=True)
    targets = torch.randint(0, vocab, (n,), generator=g)
    if ignore:
        targets[::3] = IGNORE_INDEX
    return hidden, weight, targets


@pytest.mark.parametrize(
    ("chunk", "group"),
    [(1, None), (5, None), (37, None), (100, None), (1, 3), (5, 10), (5, 12), (4, 36)],
)
@pytest.mark.parametrize("ignore", [False, True])
def test_value_and_gradients_match_plain_cross_entropy(chunk, group, ignore):
    h1, w1, t = inputs(ignore=ignore)
    h2, w2 = h1.detach().clone().requires_grad_(), w1.detach().clone().requires_grad_()
    fused = linear_cross_entropy(h1, w1, t, chunk_tokens=chunk, group_tokens=group)
    reference = plain(h2, w2, t)
    torch.testing.assert_close(fused, reference, atol=1e-6, rtol=1e-6)
    (2.5 * fused).backward()  # a non-unit upstream gradient must be applied too
    (2.5 * reference).backward()
    torch.testing.assert_close(h1.grad, h2.grad, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(w1.grad, w2.grad, atol=1e-6, rtol=1e-5)
    if ignore:
        assert torch.all(h1.grad[::3] == 0)


def test_no_grad_path_gives_the_same_value():
    h, w, t = inputs(ignore=True)
    with torch.no_grad():
        value = linear_cross_entropy(h, w, t, chunk_tokens=4)
    torch.testing.assert_close(value, plain(h, w, t), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("group", [None, 16, 40])  # one group of all tokens; 4; 2, uneven
def test_bf16_autocast_matches_the_plain_autocast_path(group):
    h1, w1, t = inputs(n=64, dim=32, vocab=101)
    h2, w2 = h1.detach().clone().requires_grad_(), w1.detach().clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused = linear_cross_entropy(h1, w1, t, chunk_tokens=16, group_tokens=group)
        reference = F.cross_entropy(F.linear(h2, w2).float(), t)
    fused.backward()
    reference.backward()
    assert fused.dtype == torch.float32
    torch.testing.assert_close(fused, reference, atol=2e-2, rtol=1e-2)
    assert w1.grad.dtype == torch.float32 and h1.grad.dtype == torch.float32
    torch.testing.assert_close(w1.grad, w2.grad, atol=5e-3, rtol=5e-2)


def test_model_loss_equals_cross_entropy_of_its_logits():
    torch.manual_seed(0)
    model = Llama(get_preset("debug").args.with_(vocab_size=97))
    rows = torch.randint(0, 97, (3, 12))
    loss = model(rows[:, :-1], targets=rows[:, 1:])
    logits = model(rows[:, :-1])
    expected = F.cross_entropy(logits.flatten(0, 1), rows[:, 1:].flatten())
    torch.testing.assert_close(loss, expected, atol=1e-6, rtol=1e-6)


def test_empty_batch_gives_zero_loss_and_zero_gradients():
    h, w, t = inputs(n=0)
    loss = linear_cross_entropy(h, w, t)
    loss.backward()
    assert loss.item() == 0.0 and torch.count_nonzero(w.grad) == 0
