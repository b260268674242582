"""The body of one training process: what each Ray Train worker (or torchrun rank) runs.

Pure torch + torch.distributed: no Ray import. A launcher supplies the three things that
differ between Ray Train, torchrun and a single in-process run (`Launcher`): where
checkpoints come from, how a checkpoint is saved, and where metrics are reported. So the
exact same loop is what `make bench` times under Ray Train and under plain torchrun.

Per step: this rank's share of the step's batch from the run's data feed (`train.batches`:
packed corpus rows for pretraining, instruction/response examples for finetuning), the
paper's schedule, gradient accumulation to the configured batch, a global-norm clip,
non-finite steps skipped or fatal, progress with ETA on rank 0's console, metrics to
MLflow from rank 0 (queued, sent in the background: a logged step waits on no other rank),
periodic validation and checkpoints (written in the background with
`train.async_checkpoint`: the step waits only for the copy to host memory). A finetune
with no checkpoint of its own starts from its base model's weights (`train.base_weights`)
and a fresh optimizer, and measures its validation loss once before the first update
(step 0).
"""

from __future__ import annotations

import math
import os
import resource
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from llamaray.config import ConfigError, RunConfig
from llamaray.model.args import ModelArgs
from llamaray.model.device import pick_device
from llamaray.model.flops import device_peak_flops, mfu, param_count
from llamaray.model.loss import IGNORE_INDEX
from llamaray.parallel.fsdp import step_autocast
from llamaray.train.batches import open_feed
from llamaray.train.checkpoint import TrainState, restore_latest
from llamaray.train.course import check_course, data_digest, trajectory
from llamaray.train.faults import maybe_kill, slow_step
from llamaray.train.launcher import Launcher
from llamaray.train.optim import build_optimizer
from llamaray.train.outputs import log_loss_curve, model_tags, publish_model, registered_name
from llamaray.train.precision import resolve_dtype
from llamaray.train.progress import progress_line, rank0_console
from llamaray.train.schedule import lr_at
from llamaray.train.step import autocast, train_step

UNSENT_METRICS = "unsent_metrics"
"""The train state's entry (in `extra`, rank 0's) with the steps of metrics rank 0 had
logged but not yet sent to MLflow at the checkpoint (`MetricLogger.unsent`). Metrics are
sent in the background about once a second, so a process that dies just after a
checkpoint would lose the last steps' metrics for good: the launch that resumes from the
checkpoint never runs those steps again. It sends the ones the store lacks."""


@dataclass
class WorkerSpec:
    """Everything a worker needs, as plain data (it crosses a process boundary)."""

    config: dict
    """`RunConfig.model_dump()`."""
    corpus_dir: str
    run_dir: str
    """The run's folder in its storage, `<storage_path>/<name>` (a local path or s3://):
    the exported model goes to `hf/` in it, fault-injection markers to `.faults/`. Read and
    written through `llamaray.storage` only, so every node (and the driver) sees the same."""
    tracking_uri: str | None = None
    mlflow_run_id: str | None = None
    proportions: dict[str, float] | None = None
    """Sampling weights as the driver resolved and planned them (`mixture.mixture_weights`);
    None: the worker applies the same rule (runs with no driver)."""
    base: dict | None = None
    """Finetuning: the weights to start from, `{"kind": "checkpoint" | "folder", "path"}`."""
    instructions: dict | None = None
    """Finetuning: the tokenized examples, `{"train", "validation"}` as
    `EncodedInstructions.to_dict()`, plus `vocab_size` and `tokenizer_path`."""
    data_digest: str | None = None
    """What the run trains on, by content (`course.data_digest` of the corpus manifest or
    of the encoded examples): part of the run's course."""


@dataclass
class WorkerResult:
    step: int
    skipped_steps: int
    stopped: str | None
    """Why training stopped before train.steps (non-finite values), or None. A launch that
    ended at train.stop_at_step is not stopped: `step` < train.steps says it is paused."""
    last: dict


def worker_device(name: str) -> torch.device:
    """`train.device` for this rank (`model.device.pick_device`): on CUDA, the device of
    its local rank."""
    if pick_device(name, setting="train.device").type == "cpu":
        return torch.device("cpu")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def build_parallel_model(cfg: RunConfig, args: ModelArgs, device: torch.device):
    """Meta-device build -> tensor parallel -> activation checkpointing -> compile -> FSDP2
    (HSDP with parallel.replicate > 1; none without data parallelism: `worth_sharding`)
    -> materialize on `device` with the same weights an unsharded build would get."""
    from llamaray.model import Llama
    from llamaray.parallel.activation_checkpoint import apply_activation_checkpointing
    from llamaray.parallel.compile import apply_compile
    from llamaray.parallel.fsdp import apply_fsdp, bf16_by_fsdp, worth_sharding
    from llamaray.parallel.init import materialize
    from llamaray.parallel.mesh import build_mesh, fsdp_mesh

    world, tp = dist.get_world_size(), cfg.parallel.tensor
    mesh = build_mesh(device.type, world, tp, cfg.parallel.replicate)
    with torch.device("meta"):
        model = Llama(args, attention_backend=cfg.model.attention)
    if tp > 1:
        from llamaray.parallel.tensor import apply_tensor_parallel

        apply_tensor_parallel(model, mesh["tp"])
    apply_activation_checkpointing(model, cfg.model.activation_checkpointing)
    if cfg.model.compile:
        apply_compile(model)
    dp = mesh["dp"].size()  # the one count of data-parallel ranks (run_worker's too)
    if worth_sharding(dp):
        dtype = resolve_dtype(cfg.train.dtype, device, args.dim)
        apply_fsdp(
            model,
            fsdp_mesh(mesh),
            param_dtype=torch.bfloat16 if bf16_by_fsdp(dtype, device, dp) else torch.float32,
            reshard_after_forward=cfg.parallel.reshard_after_forward,
            prefetch=cfg.parallel.prefetch,
        )
    materialize(model, device, seed=cfg.train.seed)
    return model, mesh


def _peak_flops(cfg: RunConfig, device: torch.device) -> float | None:
    if cfg.train.peak_tflops:
        return cfg.train.peak_tflops * 1e12
    if device.type != "cuda":
        return None
    if resolve_dtype(cfg.train.dtype, device, cfg.model.args().dim) != "bf16":
        return None
    return device_peak_flops(torch.cuda.get_device_name(device), "bf16")


def _memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def run_worker(spec: WorkerSpec, launcher: Launcher) -> WorkerResult:
    """Train as `spec.config` says, from the newest complete checkpoint if there is one.

    The process group must be initialized (Ray Train and torchrun do it;
    `ensure_process_group` does it for a single in-process run).
    """
    cfg = RunConfig.model_validate(spec.config)
    t, rank, world = cfg.train, dist.get_rank(), dist.get_world_size()
    say = rank0_console(rank)
    device = worker_device(t.device)
    if device.type == "cpu":
        torch.set_num_threads(max(1, math.floor(t.cpus_per_worker)))
    torch.manual_seed(t.seed)

    feed = open_feed(cfg, spec.corpus_dir, spec.instructions, spec.proportions)
    args = cfg.model.args(feed.vocab_size)
    model, mesh = build_parallel_model(cfg, args, device)
    opt = cfg.optimizer
    optimizer = build_optimizer(
        model, cfg.peak_lr, (opt.beta1, opt.beta2), opt.weight_decay, opt.eps
    )

    course = trajectory(cfg, spec.data_digest)
    state = restore_latest(
        launcher.checkpoint_candidates(), model, optimizer, say, t.start_over_if_damaged
    )
    if state is None:
        if spec.base is not None:
            from llamaray.train.base_weights import load_base_weights

            load_base_weights(model, spec.base)
            say(f"starting from the base model {spec.base['path']} (fresh optimizer)")
        state = TrainState(step=0, world_size=world, rows_per_step=cfg.rows_per_step)
    else:
        # The driver checked the newest checkpoint's course before launching; this checks
        # the one actually loaded (an older one when the newest was damaged) and runs
        # without a driver (torchrun).
        check_course(state.extra.get("course"), course, t.allow_changes,
                     f"its checkpoint at step {state.step}")  # fmt: skip
        if state.rows_per_step and state.rows_per_step != cfg.rows_per_step:
            raise ValueError(
                f"the checkpoint was trained with {state.rows_per_step} rows per step, this "
                f"config has {cfg.rows_per_step}: its data position would not carry over"
            )
    state.world_size, state.rows_per_step = world, cfg.rows_per_step
    state.extra["course"], state.config_hash = course, data_digest(course)
    dtype = resolve_dtype(t.dtype, device, args.dim)  # `auto` probes once per process
    trained_in = state.extra.get("dtype", dtype)
    if t.dtype == "auto" and trained_in != dtype:  # resolved otherwise on this hardware
        raise ConfigError(
            f"train.dtype: auto means {dtype} here, but the checkpoint at step {state.step} "
            f"was trained in {trained_in}; set train.dtype: {trained_in} to resume as it was"
        )
    state.extra["dtype"] = dtype

    dp, dp_rank = cfg.data_parallel, mesh["dp"].get_local_rank()
    batches = feed.batches(dp_rank, dp, start_step=state.step)
    val_sets = feed.validation_batches(dp_rank, dp, t.micro_batch_size)
    # Steps the launch that wrote this checkpoint logged but had not sent when it ended (a
    # node lost, a server away): its rank 0 kept them in the checkpoint.
    carried = state.extra.pop(UNSENT_METRICS, [])
    tracker = None
    if rank == 0 and spec.mlflow_run_id:
        from llamaray.tracking import MetricLogger

        tracker = MetricLogger(spec.tracking_uri, spec.mlflow_run_id, cfg.tracking.system_metrics)
        tracker.resend(carried)

    peak = _peak_flops(cfg, device)
    last_step = min(t.steps, t.stop_at_step or t.steps)
    # The mesh's count, as build_parallel_model decided FSDP by: bf16 is FSDP's or autocast's.
    autocast_dtype = step_autocast(dtype, device, mesh["dp"].size())
    n_params = param_count(args)
    per_step = f"{cfg.batch_tokens} tokens/step"
    if cfg.finetune is not None:  # a row is one example, padded: its tokens are not all used
        per_step = f"{cfg.rows_per_step} examples/step"
    say(
        f"training {cfg.model.preset} ({n_params / 1e6:.1f}M params, vocab {args.vocab_size}) "
        f"on {world} x {device.type} (dp {dp} x tp {cfg.parallel.tensor}): steps "
        f"{state.step + 1}..{last_step} of {t.steps}, {per_step} "
        f"({cfg.grad_accum_steps} x {t.micro_batch_size} rows of {t.seq_len} per worker); "
        f"data: {feed.describe()}"
    )

    def average(x: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(x, op=dist.ReduceOp.AVG)
        return x

    # Collective, once per start: the launcher learns the step the ranks resumed from (Ray
    # Train's failure notes count from it until the next checkpoint or validation).
    launcher.report({"step": state.step, "started": True})
    history: list[dict] = []
    stopped: str | None = None
    last: dict = {}
    start, first_step = time.perf_counter(), state.step
    try:
        if cfg.finetune is not None and state.step == 0 and val_sets:
            # The base model's response loss: what the finetune is measured against.
            last = {"step": 0} | validation_losses(model, val_sets, autocast_dtype, device)
            history.append(last)
            say(f"step      0/{t.steps}  val {last['val_loss']:.4f} (the base model)")
            if tracker:
                tracker.log({k: v for k, v in last.items() if k != "step"}, 0)
            launcher.log(last)
            launcher.report(last | {"stopped": ""})
        for step in range(state.step, last_step):
            batch = next(batches)
            micro_batches = [_as_tensors(mb) for mb in batch.micro_batches]
            lr = lr_at(step, cfg.peak_lr, opt.warmup_steps, t.steps, opt.final_lr_ratio)
            step_start = time.perf_counter()
            stats = train_step(
                model, optimizer, micro_batches, lr, opt.grad_clip, autocast_dtype,
                average=average, inject_nan=(step + 1) in cfg.faults.nan_at_steps,
                defer_gradient_sync=cfg.parallel.defer_gradient_sync,
            )  # fmt: skip
            step_time = time.perf_counter() - step_start
            state.step = step + 1
            if not stats.finite:
                state.skipped_steps += 1
                say(f"step {state.step}: non-finite loss or gradient norm, update skipped")
                if t.nan_policy == "stop":
                    stopped = f"non-finite loss or gradient norm at step {state.step}"
                elif state.skipped_steps > t.max_skipped_steps:
                    stopped = (
                        f"{state.skipped_steps} steps skipped for non-finite values (more "
                        f"than train.max_skipped_steps={t.max_skipped_steps}), last at step "
                        f"{state.step}"
                    )
            tokens_per_s = batch.tokens / step_time
            last = {
                "step": state.step,
                "loss": stats.loss,
                "lr": lr,
                "grad_norm": stats.grad_norm,
                "tokens_per_s": tokens_per_s,
                "step_time_s": step_time,
                "memory_gb": _memory_gb(device),
                "skipped_steps": state.skipped_steps,
                # A fingerprint of the rows this step (rank 0's share): resumed and
                # uninterrupted runs can be checked to read the same data.
                "rows_crc": float(batch.fingerprint),
            }
            if peak:
                # The whole step's tokens against the peak of every device that ran it.
                last["mfu"] = mfu(batch.computed_tokens / step_time, args, t.seq_len, peak * world)
            evaluate = state.step == t.steps or (t.eval_every and state.step % t.eval_every == 0)
            if evaluate and val_sets and not stopped:
                last |= validation_losses(model, val_sets, autocast_dtype, device)
            checkpoint = (
                state.step == last_step
                or stopped is not None
                or (t.checkpoint_every and state.step % t.checkpoint_every == 0)
            )
            log_now = checkpoint or evaluate or state.step % t.log_every == 0
            if log_now:
                history.append(last)
                done = state.step - first_step
                eta = (time.perf_counter() - start) / done * (last_step - state.step)
                say(progress_line(last, t.steps, eta))
                if tracker:
                    tracker.log({k: v for k, v in last.items() if k != "step"}, state.step)
                launcher.log(last)
            # The collective reports: a checkpoint, or a validation (Tune's metric). Logged
            # steps alone never wait on other ranks or on Ray Train's controller.
            if checkpoint:
                report = last | {"stopped": stopped or ""}
                if tracker:  # metrics of steps up to this one, if the process dies unsent
                    state.extra[UNSENT_METRICS] = tracker.unsent()
                stall = time.perf_counter()
                launcher.save_checkpoint(model, optimizer, state, report, t.async_checkpoint)
                stall = time.perf_counter() - stall
                if tracker:
                    tracker.log({"checkpoint_stall_s": stall}, state.step)
            elif "val_loss" in last and evaluate:
                launcher.report(last | {"stopped": ""})
            maybe_kill(cfg, rank, state.step, spec.run_dir, launcher.wait_for_checkpoints)
            slow_step(cfg)
            if stopped:
                say(f"stopping: {stopped}")
                break
        launcher.wait_for_checkpoints()
        complete = stopped is None and state.step == t.steps
        if complete and cfg.tracking.export_hf:
            publish_model(
                model,
                args,
                rank,
                feed.tokenizer_path,
                spec.run_dir,
                tracker,
                register_as=registered_name(cfg),
                tags=model_tags(cfg, spec.data_digest),
                step=state.step,
            )
        if tracker:
            log_loss_curve(tracker, history, cfg.name)
    except BaseException:
        if tracker:
            tracker.finish("FAILED")
        raise
    finally:
        batches.close()
    if tracker:
        tracker.finish("FINISHED" if complete else "KILLED")
    return WorkerResult(state.step, state.skipped_steps, stopped, last)


@torch.no_grad()
def validation_losses(
    model: torch.nn.Module,
    val_sets: dict[str, list],
    dtype: str,
    device: torch.device,
) -> dict[str, float]:
    """Mean loss per held-out set and over all of them, from this rank's micro-batches of
    each (`TrainingFeed.validation_batches`): token rows, every target counted, or
    (inputs, targets) pairs, only targets that are not -100 counted (response loss).
    Collective: every rank passes the same number of micro-batches per set.
    """
    was_training = model.training
    model.eval()
    sums = []
    names = []
    for name, micro_batches in val_sets.items():
        total = torch.zeros((), dtype=torch.float64)
        count = 0.0
        for batch in micro_batches:
            if isinstance(batch, tuple):
                inputs, targets = (torch.from_numpy(x).to(device) for x in batch)
                weight = float((targets != IGNORE_INDEX).sum())
            else:
                batch = torch.from_numpy(batch).to(device)
                inputs, targets = batch[:, :-1], batch[:, 1:]
                weight = len(batch)
            with autocast(device, dtype):
                loss = model(inputs, targets=targets)
            total += loss.double().cpu() * weight
            count += weight
        sums.append(torch.stack([total, torch.tensor(count, dtype=torch.float64)]))
        names.append(name)
    model.train(was_training)
    if not sums:
        return {}
    # Tensor-parallel peers hold the same sums; they scale numerator and denominator alike.
    totals = torch.stack(sums)
    dist.all_reduce(totals)
    out = {f"val_loss/{n}": float(s / c) for n, (s, c) in zip(names, totals.tolist(), strict=True)}
    out["val_loss"] = float(totals[:, 0].sum() / totals[:, 1].sum())
    return out


def _as_tensors(batch):
    """A feed's numpy micro-batch (rows, or an (inputs, targets) pair) as torch tensors."""
    if isinstance(batch, tuple):
        return tuple(torch.from_numpy(x) for x in batch)
    return torch.from_numpy(batch)
