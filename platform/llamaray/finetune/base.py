"""What a finetune starts from: `finetune.base` resolved (a run's newest complete
checkpoint, a checkpoint folder, or a Meta / Hugging Face model folder), checked against
this config's model, and the tokenizer that goes with it. No Ray, no MLflow writes."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from llamaray import storage
from llamaray.config import ConfigError, RunConfig

BASE_TAG = "llamaray.finetune_base"
KIND_TAG = "llamaray.kind"


@dataclass(frozen=True)
class FinetuneBase:
    """What a finetune starts from, as the driver resolved `finetune.base`."""

    kind: str
    """"checkpoint" (a DCP step folder) or "folder" (Meta / Hugging Face)."""
    path: str
    run_name: str | None
    """The training run it belongs to (its MLflow run is the finetune's parent); None for a
    model folder."""
    step: int | None = None

    def spec(self) -> dict:
        return {"kind": self.kind, "path": self.path}

    def describe(self) -> str:
        if self.kind == "checkpoint":
            return f"run {self.run_name!r} at step {self.step} ({self.path})"
        return f"model folder {self.path}"


# ---------------------------------------------------------------------------- the base


def resolve_base(cfg: RunConfig) -> FinetuneBase:
    """`finetune.base` as a concrete, verified checkpoint folder or model folder, by URI
    (a local path, or `s3://`): the ranks fetch it onto their own nodes.

    An existing path (local or `s3://`) is taken as a path: a step folder
    (`train_state.json`), a run's checkpoint folder holding step folders (the newest
    complete one), or a Meta / Hugging Face folder. Anything else is a run name, looked up
    under `cfg.storage_path` (local or S3).
    """
    from llamaray.train.stored_checkpoints import step_folders

    given = cfg.finetune.base
    if storage.is_s3(given):
        uri = given.rstrip("/")
        if not storage.list_files(uri):
            raise ConfigError(f"finetune.base: nothing under {uri}")
        return _base_at(uri, uri.rsplit("/", 1)[-1])
    path = Path(given).expanduser()
    if path.is_dir():
        return _base_at(str(path.resolve()), path.resolve().name)
    if "/" in given or given.startswith("."):
        raise ConfigError(f"finetune.base: {given} does not exist")
    root = storage.join(cfg.storage_path, given)
    if not step_folders(root):
        raise ConfigError(
            f"finetune.base: {given!r} is not a folder, and no run of that name has "
            f"checkpoints under {cfg.storage_path}"
        )
    return _newest_complete(root, given)


def _base_at(uri: str, name: str) -> FinetuneBase:
    """The base at an existing folder `uri` named `name`: a step folder (its run is the
    parent folder), a run's folder of step folders, or a model folder."""
    from llamaray.train.stored_checkpoints import is_step_folder, step_folders

    if is_step_folder(uri):
        return _verified(uri, _parent_name(uri))
    if step_folders(uri):
        return _newest_complete(uri, name)
    try:
        folder_format(uri)
    except (FileNotFoundError, ValueError) as err:
        raise ConfigError(
            f"finetune.base: {uri} is neither a checkpoint (train_state.json, "
            f"step-NNNNNNNN folders) nor a model folder: {err}"
        ) from None
    return FinetuneBase("folder", uri, None)


def _parent_name(uri: str) -> str:
    return uri.rstrip("/").rsplit("/", 2)[-2] if storage.is_s3(uri) else Path(uri).parent.name


def folder_format(uri: str) -> str:
    """ "meta" or "hf" for a model folder, local or in S3 (`formats.detect_format`'s rule)."""
    if not storage.is_s3(uri):
        from llamaray.model.formats import detect_format

        return detect_format(uri)
    from llamaray.model.formats import HF_CONFIG, META_PARAMS

    has_meta = storage.exists(storage.join(uri, META_PARAMS))
    has_hf = storage.exists(storage.join(uri, HF_CONFIG))
    if has_meta == has_hf:
        what = "both" if has_meta else "neither"
        raise ValueError(f"{uri} holds {what} of {META_PARAMS} and {HF_CONFIG}")
    return "meta" if has_meta else "hf"


def _verified(uri: str, run_name: str) -> FinetuneBase:
    from llamaray.train.checkpoint import CheckpointError
    from llamaray.train.stored_checkpoints import verify_stored

    try:
        state = verify_stored(uri)
    except CheckpointError as err:
        raise ConfigError(f"finetune.base: incomplete checkpoint: {err}") from None
    return FinetuneBase("checkpoint", uri, run_name, state.step)


def _newest_complete(root: str, run_name: str) -> FinetuneBase:
    from llamaray.train.checkpoint import CheckpointError
    from llamaray.train.stored_checkpoints import newest_stored

    try:
        uri, state = newest_stored(root)
    except CheckpointError as err:
        raise ConfigError(
            f"finetune.base: run {run_name!r} has no complete checkpoint ({err})"
        ) from None
    return FinetuneBase("checkpoint", uri, run_name, state.step)


def base_shapes(base: FinetuneBase, tokenizer_vocab: int) -> tuple[dict[str, tuple], dict]:
    """(tensor name -> shape, architecture settings that shapes do not show) of the base,
    read without loading its weights (from storage: DCP's metadata, or the folder's
    config.json / params.json)."""
    if base.kind == "checkpoint":
        from llamaray.train.stored_checkpoints import model_metadata

        metadata = model_metadata(base.path).state_dict_metadata
        shapes = {
            k.removeprefix("model."): tuple(v.size)
            for k, v in metadata.items()
            if k.startswith("model.") and hasattr(v, "size")
        }
        return shapes, {}
    from llamaray.model.formats import (
        HF_CONFIG,
        META_PARAMS,
        args_from_hf_config,
        args_from_meta_params,
    )

    if folder_format(base.path) == "hf":
        args = args_from_hf_config(
            json.loads(storage.read_text(storage.join(base.path, HF_CONFIG)))
        )
    else:
        params = json.loads(storage.read_text(storage.join(base.path, META_PARAMS)))
        args = args_from_meta_params(params, vocab_rows=tokenizer_vocab)
    return _shapes_of(args), {"norm_eps": args.norm_eps, "rope_theta": args.rope_theta}


def _shapes_of(args) -> dict[str, tuple]:
    import torch

    from llamaray.model import Llama

    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in Llama(args).state_dict().items()}


def check_architecture(cfg: RunConfig, base: FinetuneBase, tokenizer_vocab: int) -> int:
    """The model vocabulary (the base's embedding rows); ConfigError unless the config's
    model has the base's shapes and the tokenizer fits the base's vocabulary."""
    shapes, settings = base_shapes(base, tokenizer_vocab)
    embedding = shapes.get("tok_embeddings.weight")
    if embedding is None:
        raise ConfigError(f"finetune.base: {base.path} holds no model weights")
    vocab = embedding[0]
    if tokenizer_vocab > vocab:
        raise ConfigError(
            f"finetune.tokenizer: {tokenizer_vocab} pieces, but the base's embedding has only "
            f"{vocab} rows: not the base's tokenizer"
        )
    args = cfg.model.args(vocab)
    ours = _shapes_of(args)
    problems = [
        f"{name}: {tuple(shapes[name])} in the base, {shape} here"
        for name, shape in ours.items()
        if name in shapes and tuple(shapes[name]) != shape
    ]
    problems += [f"{name}: missing in the base" for name in ours if name not in shapes]
    problems += [f"{name}: in the base, not in this model" for name in shapes if name not in ours]
    problems += [
        f"{key}: {value} in the base, {getattr(args, key)} here"
        for key, value in settings.items()
        if value != getattr(args, key)
    ]
    if problems:
        shown = problems[:6] + ([f"... and {len(problems) - 6} more"] if len(problems) > 6 else [])
        raise ConfigError(
            f"model: this config's model (preset {cfg.model.preset}) is not the base's "
            f"architecture ({base.describe()}); set model.* to match it:\n"
            + "\n".join(f"  {p}" for p in shown)
        )
    return vocab


# ----------------------------------------------------------------------- the tokenizer


def base_tokenizer(cfg: RunConfig, base: FinetuneBase, uri: str | None) -> str:
    """The URI (local path or `s3://`) the ranks read the tokenizer from: `s3://`
    `finetune.tokenizer` as given; else a model folder's tokenizer.model; else a copy in
    this run's storage folder (`<storage>/<name>/base-tokenizer/`) of a `finetune.tokenizer`
    on the driver's disk, or of the tokenizer the base run logged to MLflow. The workers,
    on nodes of their own, read it from there (the exported model carries it)."""
    given = cfg.finetune.tokenizer
    if given:
        if not storage.exists(given):
            raise ConfigError(f"finetune.tokenizer: {given} does not exist")
        if storage.is_s3(given):
            return given
        # A file only this driver's node has: the ranks read the copy in the run's storage.
        target = _base_tokenizer_uri(cfg)
        storage.upload(Path(given).expanduser().resolve(), target)
        return target
    if base.kind == "folder":
        path = storage.join(base.path, "tokenizer.model")
        if not storage.exists(path):
            raise ConfigError(f"finetune.tokenizer: {base.path} has no tokenizer.model; set it")
        return path
    from llamaray.tracking import find_run

    run_id = find_run(uri, cfg.tracking.experiment, base.run_name) if uri else None
    if run_id is None:
        raise ConfigError(
            f"finetune.tokenizer: the base run {base.run_name!r} has no MLflow run in "
            f"experiment {cfg.tracking.experiment!r} to take its tokenizer from; set "
            "finetune.tokenizer to its tokenizer.model"
        )
    import tempfile

    from llamaray.tracking import client as mlflow_client

    client = mlflow_client(uri)
    logged = [
        a.path for a in client.list_artifacts(run_id, "tokenizer") if a.path.endswith(".model")
    ]
    if not logged:
        raise ConfigError(
            f"finetune.tokenizer: the base run {base.run_name!r} logged no tokenizer; set "
            "finetune.tokenizer to its tokenizer.model"
        )
    target = _base_tokenizer_uri(cfg)
    with tempfile.TemporaryDirectory(prefix="llamaray-tokenizer-") as tmp:
        storage.upload(client.download_artifacts(run_id, logged[0], tmp), target)
    return target


def _base_tokenizer_uri(cfg: RunConfig) -> str:
    """Where the driver puts the tokenizer the ranks read: in the run's storage folder."""
    return storage.join(cfg.run_uri, "base-tokenizer", "tokenizer.model")


def load_tokenizer(uri: str):
    """A `Tokenizer` from a local path or S3 (its model bytes travel when pickled)."""
    from llamaray.tokenizer import Tokenizer

    with storage.local_copy(uri) as local:
        return Tokenizer(local)
