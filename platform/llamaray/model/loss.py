"""Next-token loss fused with the output projection, in chunks of tokens.

The plain path computes (tokens, vocab) logits, upcasts them to fp32, takes log-softmax,
and keeps all of it for the backward pass: at batch 8 x 2048 with LLaMA's 32000 pieces
that is 2 GB of fp32 per micro-batch, written and read several times. Here each chunk
of tokens gets its logits, its loss and its gradients (with respect to the hidden states
and the output weight) in one go while the chunk is hot in cache, and only those
gradients are kept. The matmuls are the same three as before (forward, grad of input,
grad of weight); nothing is recomputed. The same idea as Liger's fused linear cross
entropy and torchtune's chunked loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
_CHUNK_ELEMENTS = 2**22  # logits per chunk: 16 MB in fp32 stays in the last-level cache
_GROUP_ELEMENTS = 2**25  # logit gradients kept for one pair of gradient matmuls (128 MB fp32)


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int = IGNORE_INDEX,
    chunk_tokens: int | None = None,
    group_tokens: int | None = None,
) -> torch.Tensor:
    """mean over non-ignored targets of cross_entropy(hidden @ weight.T, targets), in fp32.

    hidden: (N, dim), weight: (vocab, dim), targets: (N,). Under autocast the matmuls run
    in the autocast dtype, as `nn.Linear` would; softmax and the loss are always fp32.
    `chunk_tokens` tokens share one softmax pass; `group_tokens` (at least a chunk) share one
    pair of gradient matmuls. Both default to sizes set by the vocabulary.
    """
    device_type = hidden.device.type
    compute_dtype = (
        torch.get_autocast_dtype(device_type)
        if torch.is_autocast_enabled(device_type)
        else hidden.dtype
    )
    default_chunk, default_group = chunk_sizes(weight.shape[0])
    chunk = chunk_tokens or default_chunk
    group = max(chunk, group_tokens or default_group)
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _LinearCrossEntropy.apply(
            hidden, weight, targets, ignore_index, chunk, group, compute_dtype
        )
    with torch.autocast(device_type, enabled=False):
        total, count = _chunked_loss(hidden, weight, targets, ignore_index, chunk, compute_dtype)
    return total / count.clamp(min=1)


def chunk_sizes(vocab_size: int) -> tuple[int, int]:
    """(tokens per softmax chunk, tokens per pair of gradient matmuls) at `vocab_size`.

    >>> chunk_sizes(32000)
    (131, 1048)
    """
    chunk = max(1, _CHUNK_ELEMENTS // vocab_size)
    return chunk, max(chunk, _GROUP_ELEMENTS // vocab_size)


def _chunked_loss(hidden, weight, targets, ignore_index, chunk, compute_dtype):
    w = weight.to(compute_dtype)
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    for start in range(0, hidden.shape[0], chunk):
        logits = (hidden[start : start + chunk].to(compute_dtype) @ w.T).float()
        total += F.cross_entropy(
            logits, targets[start : start + chunk], ignore_index=ignore_index, reduction="sum"
        )
    return total, (targets != ignore_index).sum()


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, ignore_index, chunk, group, compute_dtype):
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(compute_dtype)
            grad_hidden = torch.empty_like(hidden)
            # Built from the first group's product rather than zeros: a fresh (vocab, dim)
            # buffer costs a page-faulting pass over ~100 MB on CPU that we need not make.
            grad_weight = None
            total = torch.zeros((), dtype=torch.float32, device=hidden.device)
            # Softmax runs chunk by chunk, but the two gradient matmuls run once per group
            # of chunks: a (vocab, chunk) x (chunk, dim) product with a chunk of ~130 tokens
            # ran at 40% of the speed of one over 1024 tokens (fp32 on CPU), and in bf16
            # each group's weight gradient costs a (vocab, dim) fp32 temporary.
            grads = torch.empty(
                min(group, hidden.shape[0]),
                weight.shape[0],
                dtype=compute_dtype,
                device=hidden.device,
            )  # (group, vocab): d loss / d logits of the group's tokens
            for first in range(0, hidden.shape[0], group):
                h_group = hidden[first : first + group].to(compute_dtype)  # (m, dim)
                g_group = grads[: len(h_group)]  # (m, vocab)
                for start in range(0, len(h_group), chunk):
                    h = h_group[start : start + chunk]  # (n, dim)
                    t = targets[first + start : first + start + len(h)]  # (n,)
                    if compute_dtype == torch.float32:  # logits straight into the gradient rows
                        logits = torch.mm(h, w.T, out=g_group[start : start + len(h)])
                    else:
                        logits = (h @ w.T).float()  # (n, vocab)
                    valid = t != ignore_index
                    safe_t = torch.where(valid, t, 0)
                    target_logit = logits.gather(1, safe_t[:, None]).squeeze(1)  # (n,)
                    # Softmax in place, one exp pass: the buffer becomes the gradient.
                    row_max = logits.amax(dim=-1, keepdim=True)  # (n, 1)
                    probs = logits.sub_(row_max).exp_()  # (n, vocab), unnormalized
                    denom = probs.sum(dim=-1)  # (n,)
                    lse = row_max.squeeze(1) + denom.log()
                    total += ((lse - target_logit) * valid).sum()
                    # d(sum of losses)/d logits = softmax - one_hot(target), 0 for ignored rows.
                    probs /= (denom / valid)[:, None]  # ignored rows: x / inf = 0
                    probs[torch.arange(len(t), device=t.device), safe_t] -= valid.float()
                    if compute_dtype != torch.float32:
                        g_group[start : start + len(h)] = probs
                grad_hidden[first : first + len(h_group)] = g_group @ w  # (m, dim)
                if grad_weight is None:
                    grad_weight = (g_group.T @ h_group).float()  # (vocab, dim)
                elif compute_dtype == torch.float32:  # accumulate in place, no temporary
                    grad_weight.addmm_(g_group.T, h_group)
                else:
                    grad_weight += (g_group.T @ h_group).float()
            if grad_weight is None:  # no tokens at all
                grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
            count = (targets != ignore_index).sum().clamp(min=1)
        # Our own intermediates, not inputs or outputs: held on ctx so backward may scale them
        # in place. A fresh (vocab, dim) result would cost a page-faulting ~100 MB allocation.
        ctx.grad_hidden, ctx.grad_weight, ctx.count = grad_hidden, grad_weight, count
        ctx.weight_dtype = weight.dtype
        return total / count

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        grad_hidden, grad_weight = ctx.grad_hidden, ctx.grad_weight
        del ctx.grad_hidden, ctx.grad_weight  # single use: free with the graph, not later
        scale = grad_output / ctx.count
        return (
            grad_hidden.mul_(scale.to(grad_hidden.dtype)),
            grad_weight.mul_(scale).to(ctx.weight_dtype),
            None,
            None,
            None,
            None,
            None,
        )
