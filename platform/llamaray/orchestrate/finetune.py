"""The finetuning driver: base model + instruction JSONL -> Ray Train -> MLflow child run.

`llamaray finetune --config jobs/configs/finetune-demo.yaml` (or `python jobs/finetune.py`)
checks everything before any Ray work, in this order:

1. the instruction files: every bad line is named as `file:line: field: reason`;
2. the base (`finetune.base`): a training run name (its newest complete checkpoint under
   the storage path), a checkpoint folder, or a Meta / Hugging Face model folder; its
   tensors must have the shapes of this config's model;
3. the tokenizer: `finetune.tokenizer`, else the base's (a model folder's tokenizer.model,
   or the tokenizer the base run logged to MLflow);
4. tokenization with the prompt template, prompt tokens masked, truncation counted.

Then it opens the MLflow run as a child of the base run (found by the base's run name in
the experiment; a plain model folder has no run, and the finetune is logged without a
parent) and launches the same Ray Train + FSDP workers as pretraining (`pretrain.launch`),
with the encoded examples and the base in the `WorkerSpec`. The workers load the base's
weights when the run has no checkpoint of its own; once it has, a relaunch of the same
`name` resumes it like a pretraining run.

    >>> cfg = load_config("jobs/configs/finetune-demo.yaml")  # doctest: +SKIP
    >>> result = finetune(cfg)  # doctest: +SKIP
    >>> result.metrics["val_loss"]  # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from llamaray import storage
from llamaray.config import ConfigError, RunConfig
from llamaray.console import logger
from llamaray.data.instructions import EncodedInstructions

log = logger()  # the drivers' lines: [llamaray] ...

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


# ------------------------------------------------------------------------ the examples


@dataclass
class InstructionData:
    train: EncodedInstructions
    validation: EncodedInstructions

    def stats(self) -> dict:
        return {"train": self.train.stats(), "validation": self.validation.stats()}


def read_instructions(cfg: RunConfig) -> tuple[list, list]:
    """(train, validation) examples; InstructionDataError naming each bad file:line."""
    from llamaray.data.instructions import read_examples, split_examples

    ft = cfg.finetune

    def read(uri: str) -> list:
        # Read here, on the driver, and shipped encoded in the WorkerSpec: a local file is
        # needed only where the driver runs; s3:// is fetched.
        if not storage.is_s3(uri):
            return read_examples(uri)
        with storage.local_copy(uri) as local:
            return read_examples(local)

    examples = read(ft.train_file)
    if ft.validation_file:
        return examples, read(ft.validation_file)
    if len(examples) < 2:
        raise ConfigError(f"finetune.train_file: {ft.train_file} has too few examples to split")
    return split_examples(examples, ft.validation_fraction, cfg.train.seed)


def encode_instructions(cfg: RunConfig, examples: tuple[list, list], tokenizer) -> InstructionData:
    from llamaray.data.instructions import Template, encode_examples

    ft = cfg.finetune
    template = Template(ft.template, ft.template_with_input)
    train, val = (encode_examples(e, tokenizer, template, cfg.train.seq_len) for e in examples)
    for name, part in (("train", train), ("validation", val)):
        s = part.stats()
        log.info(
            f"{name}: {s['examples']} examples, {s['response_tokens']} response tokens; "
            f"{s['truncated']} truncated to train.seq_len+1={cfg.train.seq_len + 1} tokens, "
            f"{s['dropped']} dropped (prompt alone fills the row)"
        )
        if part.dropped:
            more = " ..." if len(part.dropped) > 5 else ""
            log.info(f"  dropped: {', '.join(part.dropped[:5])}{more}")
    if len(train) < cfg.rows_per_step:
        raise ConfigError(
            f"finetune.train_file: {len(train)} usable training examples cannot fill one step "
            f"of {cfg.rows_per_step} (train.batch_tokens / train.seq_len); lower "
            "train.batch_tokens or add examples"
        )
    if len(val) == 0:
        raise ConfigError(
            "finetune.validation_file: no usable held-out example (set validation_file or "
            "validation_fraction > 0)"
        )
    return InstructionData(train, val)


# ------------------------------------------------------------------------------ MLflow


def open_finetune_tracking(cfg: RunConfig, plan: FinetunePlan) -> tuple[str, str | None]:
    """(finetune run id, parent run id): the run nested under the base's run when there is
    one, with the config, the base, the instruction set's counts and the tokenizer."""
    from llamaray import tracking
    from llamaray.model.flops import param_count
    from llamaray.tracking import find_run, flatten, open_run

    uri, base, data = plan.tracking_uri, plan.base, plan.data
    parent = cfg.tracking.parent_run_id
    if parent is None and base.run_name:
        parent = find_run(uri, cfg.tracking.experiment, base.run_name)
        if parent is None:
            log.info(
                f"the base run {base.run_name!r} has no MLflow run in experiment "
                f"{cfg.tracking.experiment!r}: logging the finetune without a parent"
            )
    elif parent is None:
        log.info("the base is a model folder, not a run: logging the finetune without a parent")
    run_id, created = open_run(uri, cfg.tracking.experiment, cfg.name, parent_run_id=parent)
    client = tracking.client(uri)
    if created:
        params = flatten(cfg.model_dump(exclude={"faults", "data", "tokenizer"}))
        params |= {
            "derived.grad_accum_steps": str(cfg.grad_accum_steps),
            "derived.peak_lr": str(cfg.peak_lr),
            "derived.examples_per_step": str(cfg.rows_per_step),
            "derived.n_params": str(param_count(cfg.model.args(plan.vocab_size))),
            "derived.base": base.describe(),
        }
        for split, stats in data.stats().items():
            params |= {f"data.{split}.{k}": str(v) for k, v in stats.items()}
        tracking.log_params(uri, run_id, params)
    else:
        log.info(f"MLflow run {run_id} exists for {cfg.name!r}: continuing it")
    client.set_tag(run_id, KIND_TAG, "finetune")
    client.set_tag(run_id, BASE_TAG, base.path)
    client.log_text(run_id, cfg.to_yaml(), "config.yaml")
    summary = data.stats() | {
        "base": asdict(base),
        "dropped": {"train": data.train.dropped, "validation": data.validation.dropped},
    }
    client.log_dict(run_id, summary, "data/instructions.json")
    with storage.local_copy(plan.tokenizer_path) as local:
        client.log_artifact(run_id, str(local), "tokenizer")
    return run_id, parent


# ------------------------------------------------------------------------------ driver


@dataclass
class FinetunePlan:
    """What the driver checked and prepared before any Ray work."""

    base: FinetuneBase
    tokenizer_path: str
    """A local path or s3:// URI every node can read."""
    vocab_size: int
    """The base's embedding rows."""
    data: InstructionData
    tracking_uri: str | None

    def instructions(self) -> dict:
        """The `WorkerSpec.instructions` payload."""
        return {
            "train": self.data.train.to_dict(),
            "validation": self.data.validation.to_dict(),
            "vocab_size": self.vocab_size,
            "tokenizer_path": self.tokenizer_path,
        }


def prepare_finetune(cfg: RunConfig) -> FinetunePlan:
    """Everything checked and encoded, with no Ray: the data first (bad lines are the usual
    mistake), then the base, its tokenizer and architecture."""
    from llamaray.tracking import tracking_uri

    if cfg.finetune is None:
        raise ConfigError(
            "finetune: the config has no finetune section (set finetune.base and "
            "finetune.train_file)"
        )
    examples = read_instructions(cfg)
    base = resolve_base(cfg)
    log.info(f"base: {base.describe()}")
    uri = tracking_uri(cfg.tracking.uri, cfg.output_dir) if cfg.tracking.enabled else None
    tokenizer_path = base_tokenizer(cfg, base, uri)
    tokenizer = load_tokenizer(tokenizer_path)
    vocab = check_architecture(cfg, base, tokenizer.vocab_size)
    data = encode_instructions(cfg, examples, tokenizer)
    return FinetunePlan(base, tokenizer_path, vocab, data, uri)


def require_finetune_shared_state(cfg: RunConfig, plan: FinetunePlan) -> None:
    """ConfigError on a cluster whose nodes share no disk when what the ranks read or write
    is on the driver's disk: the storage (checkpoints, the export), the base and its
    tokenizer, and the tracking store the ranks log to (`placement`). The instruction files
    are read here, on the driver, and need not be shared."""
    from llamaray.placement import require_shared_state, shared_filesystem_opted

    paths = {
        "storage": cfg.storage_path,
        "finetune.base": plan.base.path,
        "finetune.tokenizer": plan.tokenizer_path,
    }
    require_shared_state(paths, plan.tracking_uri, shared_filesystem_opted(cfg))


def finetune(cfg: RunConfig, callbacks: Sequence = ()):
    """Finetune `cfg.finetune.base` on `cfg.finetune.train_file` as run `cfg.name` on the
    Ray cluster (relaunching the name resumes it); returns `pretrain.PretrainResult`.

    >>> finetune(load_config("jobs/configs/finetune-demo.yaml"))  # doctest: +SKIP
    """
    from llamaray.orchestrate.pretrain import launch
    from llamaray.ray_session import start_ray
    from llamaray.train.worker import WorkerSpec

    plan = prepare_finetune(cfg)
    start_ray()
    require_finetune_shared_state(cfg, plan)  # seconds after joining, before any work
    run_id = None
    if plan.tracking_uri:
        run_id, parent = open_finetune_tracking(cfg, plan)
        log.info(f"MLflow run {run_id}" + (f", a child of {parent}" if parent else ""))
    spec = WorkerSpec(
        cfg.model_dump(),
        corpus_dir="",
        run_dir=cfg.run_uri,
        tracking_uri=plan.tracking_uri,
        mlflow_run_id=run_id,
        base=plan.base.spec(),
        instructions=plan.instructions(),
    )
    return launch(cfg, spec, callbacks=callbacks)


# --------------------------------------------------------------------------------- CLI


def add_finetune_parser(sub) -> None:
    p = sub.add_parser(
        "finetune",
        help="instruction-finetune a base model on Ray Train (loss on responses only); "
        "relaunching a run name resumes it",
    )
    p.add_argument("--config", default=None, help="YAML file with a finetune section")
    p.add_argument("--print-config", action="store_true", help="print the resolved config, exit")
    p.add_argument("overrides", nargs="*", help="key.path=value, e.g. finetune.base=demo")
    p.set_defaults(func=cmd_finetune)


def cmd_finetune(opts: argparse.Namespace) -> int:
    """`llamaray finetune`: exit 0 done (or paused), 1 stopped on non-finite values, 2 bad
    config or data (one message, before any Ray work)."""
    from llamaray.config import load_config

    cfg = load_config(opts.config, opts.overrides)
    if opts.print_config:
        print(cfg.to_yaml())
        return 0
    from llamaray.orchestrate.pretrain import TrainingStopped

    try:
        out = finetune(cfg)
    except TrainingStopped as err:
        print(f"finetuning stopped: {err}", file=sys.stderr)
        return 1
    val = out.metrics.get("val_loss")
    shown = f", held-out response loss {val:.4f}" if isinstance(val, float) else ""
    print(f"step {out.step} of finetune {out.name}{shown}; outputs in {out.run_uri}")
    return 0
