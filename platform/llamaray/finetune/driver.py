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
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from llamaray import storage
from llamaray.config import ConfigError, RunConfig
from llamaray.console import logger
from llamaray.data.instructions import EncodedInstructions
from llamaray.finetune.base import (
    BASE_TAG,
    KIND_TAG,
    FinetuneBase,
    base_tokenizer,
    check_architecture,
    load_tokenizer,
    resolve_base,
)

log = logger()  # the drivers' lines: [llamaray] ...


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
    client.log_text(run_id, tracking.redact(cfg.to_yaml()), "config.yaml")  # no credentials
    summary = data.stats() | {
        "base": asdict(base),
        "dropped": {"train": data.train.dropped, "validation": data.validation.dropped},
    }
    client.log_dict(run_id, summary, "data/instructions.json")
    with storage.local_copy(plan.tokenizer_path) as local:
        client.log_artifact(run_id, str(local), "tokenizer")
    return run_id, parent


def record_instruction_dataset(cfg: RunConfig, plan: FinetunePlan, run_id: str, digest: str):
    """The instruction set (by the digest of its tokenized examples, the run's course) as
    the MLflow run's dataset input, with its counts per split."""
    from llamaray import tracking

    tracking.log_dataset(
        plan.tracking_uri,
        run_id,
        name=cfg.finetune.train_file.rstrip("/").rsplit("/", 1)[-1],
        digest=digest,
        source=cfg.finetune.train_file,
        profile=plan.data.stats(),
        context="training",
    )


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
    from llamaray.tracking import require_tracking, tracking_uri

    if cfg.finetune is None:
        raise ConfigError(
            "finetune: the config has no finetune section (set finetune.base and "
            "finetune.train_file)"
        )
    examples = read_instructions(cfg)
    base = resolve_base(cfg)
    log.info(f"base: {base.describe()}")
    uri = tracking_uri(cfg.tracking.uri, cfg.output_dir) if cfg.tracking.enabled else None
    if uri:
        require_tracking(uri)  # the base's run is looked up in it: fail fast, before Ray
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
    from llamaray.orchestrate.pretrain import launch, record_course_changes
    from llamaray.ray_session import start_ray
    from llamaray.train.course import data_digest, relaunch_changes, trajectory
    from llamaray.train.worker import WorkerSpec

    plan = prepare_finetune(cfg)
    examples = plan.instructions()
    digest = data_digest({split: examples[split] for split in ("train", "validation")})
    changes = relaunch_changes(cfg, trajectory(cfg, digest))  # refuses a changed course
    start_ray()
    require_finetune_shared_state(cfg, plan)  # seconds after joining, before any work
    run_id = None
    if plan.tracking_uri:
        run_id, parent = open_finetune_tracking(cfg, plan)
        log.info(f"MLflow run {run_id}" + (f", a child of {parent}" if parent else ""))
        record_instruction_dataset(cfg, plan, run_id, digest)
        record_course_changes(plan.tracking_uri, run_id, changes)
    spec = WorkerSpec(
        cfg.model_dump(),
        corpus_dir="",
        run_dir=cfg.run_uri,
        tracking_uri=plan.tracking_uri,
        mlflow_run_id=run_id,
        base=plan.base.spec(),
        instructions=examples,
        data_digest=digest,
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
        from llamaray.tracking import redact

        print(redact(cfg.to_yaml()))  # a tracking.uri's credentials are not printed
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
