"""A single-process training loop over packed token rows.

This is the loop a researcher runs on one machine and the body the distributed trainer
wraps: build the model, draw deterministic batches, step with the paper's schedule,
print progress with an ETA, evaluate held-out loss. It imports no Ray.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from llamaray.config import RunConfig
from llamaray.model import Llama, ModelArgs
from llamaray.model.flops import flops_per_token
from llamaray.parallel.activation_checkpoint import apply_activation_checkpointing
from llamaray.train.optim import build_optimizer
from llamaray.train.schedule import lr_at
from llamaray.train.step import evaluate_loss, train_step


@dataclass
class TrainResult:
    model: Llama
    history: list[dict] = field(default_factory=list)
    val_loss: float | None = None
    skipped_steps: int = 0


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device=cuda but no CUDA device is visible; use auto or cpu")
    return torch.device(name)


def build_model(args: ModelArgs, device: torch.device, attention: str, checkpointing: str) -> Llama:
    """Build on the meta device, materialize on `device`, initialize, wrap for checkpointing."""
    with torch.device("meta"):
        model = Llama(args, attention_backend=attention)
    model.to_empty(device=device)
    model.init_weights()
    apply_activation_checkpointing(model, checkpointing)
    return model


def batch_indices(n_rows: int, rows_per_step: int, step: int, seed: int) -> np.ndarray:
    """Rows for `step`: epochs are seeded permutations, so a resumed run draws the same."""
    epoch_len = n_rows // rows_per_step
    if epoch_len == 0:
        raise ValueError(f"{n_rows} training rows cannot fill one step of {rows_per_step} rows")
    epoch, offset = divmod(step, epoch_len)
    order = np.random.default_rng([seed, epoch]).permutation(n_rows)
    return order[offset * rows_per_step : (offset + 1) * rows_per_step]


def train_local(
    cfg: RunConfig,
    train_rows: np.ndarray,
    val_rows: np.ndarray | None = None,
    vocab_size: int | None = None,
    log: Callable[[str], None] | None = None,
) -> TrainResult:
    """Train a model on packed (n, seq_len + 1) rows in this process, as `cfg` says.

    `vocab_size` is the tokenizer's (model.vocab_size in the config wins when set).
    """
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    t = cfg.train
    if train_rows.shape[1] != t.seq_len + 1:
        raise ValueError(
            f"rows have {train_rows.shape[1]} tokens; train.seq_len+1 = {t.seq_len + 1}"
        )
    torch.manual_seed(t.seed)
    device = pick_device(t.device)
    args = cfg.model_args(vocab_size)
    if train_rows.max() >= args.vocab_size:
        raise ValueError(
            f"token id {train_rows.max()} is outside the vocabulary ({args.vocab_size})"
        )
    model = build_model(args, device, cfg.model.attention, cfg.model.activation_checkpointing)
    optimizer = build_optimizer(
        model, cfg.peak_lr, (cfg.optimizer.beta1, cfg.optimizer.beta2),
        cfg.optimizer.weight_decay, cfg.optimizer.eps,
    )  # fmt: skip
    rows = torch.from_numpy(train_rows.astype(np.int64))
    micro, accum = t.micro_batch_size, cfg.grad_accum_steps
    fpt = flops_per_token(args, t.seq_len)
    log(
        f"training {cfg.model.preset} ({model.num_params() / 1e6:.1f}M params, vocab "
        f"{args.vocab_size}) on {device}: {t.steps} steps x {cfg.batch_tokens} tokens, "
        f"{len(rows)} rows of {t.seq_len}+1"
    )
    result = TrainResult(model)
    start = time.perf_counter()
    for step in range(t.steps):
        idx = batch_indices(len(rows), micro * accum, step, t.seed)
        micro_batches = [rows[idx[i * micro : (i + 1) * micro]] for i in range(accum)]
        lr = lr_at(
            step, cfg.peak_lr, cfg.optimizer.warmup_steps, t.steps, cfg.optimizer.final_lr_ratio
        )
        step_start = time.perf_counter()
        stats = train_step(model, optimizer, micro_batches, lr, cfg.optimizer.grad_clip, t.dtype)
        step_time = time.perf_counter() - step_start
        if not stats.finite:
            result.skipped_steps += 1
        record = asdict(stats) | {"step": step + 1, "tokens_per_s": stats.tokens / step_time}
        result.history.append(record)
        if (step + 1) % t.log_every == 0 or step + 1 == t.steps:
            elapsed = time.perf_counter() - start
            eta = elapsed / (step + 1) * (t.steps - step - 1)
            log(
                f"step {step + 1:>6}/{t.steps}  loss {stats.loss:7.4f}  lr {lr:.2e}  "
                f"grad {stats.grad_norm:6.3f}  {record['tokens_per_s']:8.0f} tok/s  "
                f"{record['tokens_per_s'] * fpt / 1e9:6.2f} GFLOP/s  eta {eta:5.0f}s"
            )
    if val_rows is not None and len(val_rows):
        val = torch.from_numpy(val_rows.astype(np.int64))
        result.val_loss = evaluate_loss(model, list(val.split(max(1, micro))), t.dtype)
        log(f"validation loss {result.val_loss:.4f} on {len(val)} held-out rows")
    return result
