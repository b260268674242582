"""A run's course: what decides its trajectory, recorded in every checkpoint, and the check
that relaunching a run name continues the same run.

Relaunching a name resumes it from its newest checkpoint. If the new launch brings another
seed, token budget (`train.steps`: the cosine schedule's length), mixture, corpus, model
or optimizer, the run would go on from step k on a trajectory that no uninterrupted run
would take, under the same name, without anyone having said so. So each checkpoint
records its course (`trajectory`: named fields, readable in `train_state.json`) and a
relaunch whose course differs is refused before any training, with each change named
(`check_course`). What the user changes on purpose is listed in `train.allow_changes`;
the driver records those changes in MLflow.

Not part of the course: how the work is laid out (workers, tensor parallel degree, micro
batch size, activation checkpointing, attention kernel), run control (logging,
checkpoint cadence, `stop_at_step`, failures allowed) and where things are (output and
storage paths). The corpus and a finetune's examples count by content (`data_digest`),
not by path: a corpus rebuilt in place with other contents is another corpus.

    >>> cfg = RunConfig()
    >>> before = trajectory(cfg, "corpus-a")
    >>> after = trajectory(cfg.model_copy(update={"train": cfg.train.model_copy(
    ...     update={"steps": 200})}), "corpus-b")
    >>> course_changes(before, after)
    ['data.corpus: corpus-a -> corpus-b', 'train.steps: 100000 -> 200']
"""

from __future__ import annotations

import hashlib
import json

from llamaray.config import ConfigError, ModelConfig, RunConfig

_LAYOUT_MODEL_FIELDS = {"attention", "activation_checkpointing", "compile"}
_TRAIN_FIELDS = ("steps", "seq_len", "batch_tokens", "dtype", "seed")
_FINETUNE_FIELDS = ("template", "template_with_input", "validation_fraction")


def course_fields() -> list[str]:
    """Every field name a course holds: what `train.allow_changes` may name."""
    model = [f"model.{k}" for k in ModelConfig.model_fields if k not in _LAYOUT_MODEL_FIELDS]
    return sorted(
        model
        + [f"optimizer.{k}" for k in ("lr", "beta1", "beta2", "eps", "weight_decay",
                                      "grad_clip", "warmup_steps", "final_lr_ratio")]
        + [f"train.{k}" for k in _TRAIN_FIELDS]
        + [f"finetune.{k}" for k in _FINETUNE_FIELDS]
        + ["data.corpus", "data.proportions", "data.eval_rows", "tokenizer.vocab_size"]
    )  # fmt: skip


def trajectory(cfg: RunConfig, data_digest: str | None) -> dict[str, str]:
    """The run's course: each field that decides its trajectory, as text. Values the
    config leaves to a preset (learning rate, batch tokens, sequence length) are the
    resolved ones, so naming a preset's value explicitly is no change."""
    model = cfg.model.model_dump(exclude=_LAYOUT_MODEL_FIELDS)
    optimizer = cfg.optimizer.model_dump() | {"lr": cfg.peak_lr}
    train = {"steps": cfg.train.steps, "seq_len": cfg.train.seq_len,
             "batch_tokens": cfg.batch_tokens, "dtype": cfg.train.dtype,
             "seed": cfg.train.seed}  # fmt: skip
    course = {f"model.{k}": v for k, v in model.items()}
    course |= {f"optimizer.{k}": v for k, v in optimizer.items()}
    course |= {f"train.{k}": v for k, v in train.items()}
    if cfg.finetune is not None:
        course |= {f"finetune.{k}": getattr(cfg.finetune, k) for k in _FINETUNE_FIELDS}
    course |= {
        "data.corpus": data_digest,
        "data.proportions": cfg.data.proportions,
        "data.eval_rows": cfg.data.eval_rows,
        "tokenizer.vocab_size": cfg.tokenizer.vocab_size,
    }
    return {k: json.dumps(v, sort_keys=True) if not isinstance(v, str) else v
            for k, v in sorted(course.items())}  # fmt: skip


def data_digest(content: object) -> str:
    """A short digest of what a run trains on (a corpus manifest, a finetune's encoded
    examples), as JSON: equal contents give equal digests wherever they are stored."""
    text = json.dumps(content, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def course_changes(saved: dict[str, str], now: dict[str, str]) -> list[str]:
    """`field: before -> after` for each field whose value differs (a field only one side
    has counts as a change from or to `(unset)`)."""
    return [
        f"{k}: {saved.get(k, '(unset)')} -> {now.get(k, '(unset)')}"
        for k in sorted(saved.keys() | now.keys())
        if saved.get(k) != now.get(k)
    ]


def check_course(
    saved: dict[str, str] | None, now: dict[str, str], allowed: list[str], where: str
) -> list[str]:
    """The changes between a checkpoint's course `saved` and this launch's `now` that
    `allowed` (train.allow_changes) permits; ConfigError naming every other one. `saved`
    None (a checkpoint written before courses were recorded) checks nothing."""
    unknown = sorted(set(allowed) - set(course_fields()))
    if unknown:
        raise ConfigError(
            f"train.allow_changes: {', '.join(unknown)} not a course field; the fields are "
            + ", ".join(course_fields())
        )
    if saved is None:
        return []
    changes = course_changes(saved, now)
    refused = [c for c in changes if c.split(":", 1)[0] not in allowed]
    if refused:
        raise ConfigError(
            f"this launch would change the course of the run it resumes ({where}):\n"
            + "\n".join(f"  {c}" for c in refused)
            + "\n  relaunch with the run's own settings, give the run another name, or list "
            "the fields you change on purpose in train.allow_changes (e.g. "
            f"train.allow_changes=[{refused[0].split(':', 1)[0]}])"
        )
    return changes


def relaunch_changes(cfg: RunConfig, course: dict[str, str]) -> list[str]:
    """On the driver, before any training: `check_course` against the newest checkpoint of
    run `cfg.name` in its storage (its `train_state.json`, read without the tensors).
    A run with no checkpoint yet changes nothing."""
    from llamaray import storage
    from llamaray.train.checkpoint import TRAIN_STATE
    from llamaray.train.stored_checkpoints import step_folders

    saved, where = None, ""
    for step, uri in step_folders(cfg.run_uri):
        try:
            state = json.loads(storage.read_text(storage.join(uri, TRAIN_STATE)))
        except (FileNotFoundError, ValueError):
            continue  # never completed; the workers pass over it too
        saved = (state.get("extra") or {}).get("course")
        where = f"run {cfg.name!r} at step {step}, {uri}"
        break
    return check_course(saved, course, cfg.train.allow_changes, where)
