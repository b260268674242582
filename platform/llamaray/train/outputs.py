"""What a finished run leaves for later, written into its storage and MLflow rather than
onto the disk of rank 0's node: the model in Hugging Face format (with its tokenizer) and
the loss curve."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from llamaray.console import logger
from llamaray.model.args import ModelArgs


def model_uri(run_dir: str) -> str:
    """Where a run's exported model (Hugging Face format) lives in its storage."""
    from llamaray.storage import join

    return join(run_dir, "hf")


def publish_model(
    model: torch.nn.Module,
    args: ModelArgs,
    rank: int,
    tokenizer: str | None,
    run_dir: str,
    tracker=None,
    *,
    register_as: str | None = None,
    tags: dict[str, str] | None = None,
    step: int = 0,
) -> str | None:
    """Export the model (collective) and, on rank 0, put the folder into the run's storage
    at `model_uri(run_dir)` (replacing an earlier export) and into MLflow as the run's model
    (`tracking.log_model`: a pyfunc that generates text), registered as a new version of
    `register_as` when given (not while the tracking server is away: the tracker warns, the
    storage copy stands). The folder is written to a temporary directory on rank 0's node
    and removed after: nothing is left on a disk only that node has. Returns the model's
    URI on rank 0, else None."""
    from llamaray import storage

    with tempfile.TemporaryDirectory(prefix="llamaray-export-") as tmp:
        folder = export_hf(model, args, Path(tmp) / "hf", rank, tokenizer)
        if folder is None:
            return None
        target = model_uri(run_dir)
        storage.delete_tree(target)
        storage.upload(folder, target)
        if tracker:
            tracker.flush()  # the model records the run's metrics at `step`: send them first
            tracker.model(folder, register_as, tags or {}, step)
    return target


def registered_name(cfg) -> str | None:
    """The Model Registry name a run's final model is registered under: `tracking.model_name`,
    else the run's name; None when `tracking.register_model` is off. A finetune is a model of
    its own unless `tracking.model_name` names its base's (then it is that model's next
    version): its weights and prompt format differ from the base's, so "the latest version"
    of the base must not silently become the finetune."""
    if not cfg.tracking.register_model:
        return None
    return cfg.tracking.model_name or cfg.name


def model_tags(cfg, data_digest: str | None) -> dict[str, str]:
    """What the logged model and its registered version are tagged with: the run that made
    it, its preset and data (by content), and for a finetune, its base."""
    from llamaray.tracking import RUN_NAME_TAG

    tags = {RUN_NAME_TAG: cfg.name, "llamaray.model.preset": str(cfg.model.preset)}
    if data_digest:
        tags["llamaray.data_digest"] = data_digest
    if cfg.finetune is not None:
        tags["llamaray.finetune.base"] = cfg.finetune.base
    return tags


def export_hf(
    model: torch.nn.Module, args: ModelArgs, out_dir: Path, rank: int, tokenizer: str | None = None
) -> Path | None:
    """Gather the full weights (collective) and write them in Hugging Face format on rank 0,
    with the tokenizer (a local path or s3:// URI) beside them so the folder is
    self-contained."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from llamaray.model import Llama
    from llamaray.model.formats import save_hf, write_hf_tokenizer

    full = get_model_state_dict(
        model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )
    if rank != 0:
        return None
    with torch.device("meta"):
        plain = Llama(args)
    plain.load_state_dict(full, assign=True)
    out = save_hf(plain, out_dir)
    if tokenizer:
        from llamaray import storage

        if storage.exists(tokenizer):
            with storage.local_copy(tokenizer) as local:
                write_hf_tokenizer(out, local, args.max_seq_len)
        else:  # e.g. a path only the driver's disk has: say so rather than ship a half folder
            logger("train").warning(f"tokenizer {tokenizer} not found; exported without it")
    return out


def log_loss_curve(tracker, history: list[dict], name: str) -> None:
    """The loss curve from MLflow's stored history, which spans earlier launches too, and
    this launch's `history` (which holds the steps still queued while the server was away).
    While the server is away nothing is logged; the tracker says so."""
    from llamaray.tracking import loss_curve_png

    points: dict[int, dict] = {h["step"]: dict(h) for h in history}
    for key in ("loss", "val_loss"):
        for m in tracker.history(key):
            points.setdefault(m.step, {"step": m.step})[key] = m.value
    with tempfile.TemporaryDirectory() as tmp:
        path = loss_curve_png(
            sorted(points.values(), key=lambda h: h["step"]), Path(tmp) / "loss_curve.png", name
        )
        tracker.artifact(path)
