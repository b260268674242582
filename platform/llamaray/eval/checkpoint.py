"""What to evaluate, as a plain single-process model: a training run's checkpoint at a
step (the newest complete one by default), or an exported Meta / Hugging Face folder.

A training checkpoint holds DCP shards of the model and optimizer written by any number
of ranks; DCP reads just the model's tensors into an unsharded model here, with no
process group. The architecture is the run's config; the vocabulary size is read from
the checkpoint's own embedding table, and the tokenizer is the run's corpus tokenizer.

No node shares a disk with another: the driver only finds and checks what to evaluate in
the run's storage (local, or `s3://`) and passes URIs on; each process that loads the
model (a `Scorer` actor on whichever node Ray placed it) reads the checkpoint's model
tensors from storage, and fetches a model folder and the tokenizer onto its own disk
(`EvalTarget.load`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from llamaray import storage
from llamaray.config import RunConfig
from llamaray.model import Llama
from llamaray.tokenizer import Tokenizer
from llamaray.train.checkpoint import CheckpointError

MODEL_PREFIX = "model."


@dataclass
class EvalTarget:
    """Where the weights come from, as plain data (it travels to Ray actors): URIs that
    every node can open (a local path on one machine, `s3://` on a cluster)."""

    checkpoint_dir: str | None
    """A step folder whose completeness the driver checked; None: `model_dir`."""
    model_dir: str | None
    tokenizer_path: str
    step: int | None
    config: dict | None = None
    """`RunConfig.model_dump()` of the training run (the architecture)."""

    def load(self, device: str = "cpu") -> tuple[Llama, Tokenizer]:
        """The model and tokenizer, read from storage by this process, on its own node."""
        tokenizer = load_tokenizer(self.tokenizer_path)
        if self.model_dir:
            with storage.local_copy(self.model_dir) as folder:
                return Llama.from_pretrained(folder, device=device), tokenizer
        cfg = RunConfig.model_validate(self.config)
        return load_dcp_model(self.checkpoint_dir, cfg, device), tokenizer


def load_tokenizer(uri: str) -> Tokenizer:
    """A tokenizer.model from a local path or S3. One from S3 keeps its URI as its name
    (the harness's request cache keys on it), not the temporary copy's path."""
    with storage.local_copy(uri) as local:
        tokenizer = Tokenizer(local)
    if storage.is_s3(uri):
        tokenizer.path = uri  # a str: Path would fold the // of s3://
    return tokenizer


def load_dcp_model(step_dir: str | Path, cfg: RunConfig, device: str = "cpu") -> Llama:
    """The model tensors of a DCP checkpoint (a local folder or `s3://`, read in place:
    only the model's bytes, never the optimizer state) in an unsharded `Llama`."""
    import torch.distributed.checkpoint as dcp

    from llamaray.train.safe_dcp import SafeLoadPlanner
    from llamaray.train.stored_checkpoints import dcp_reader

    uri = os.fspath(step_dir)
    metadata = dcp_reader(uri).read_metadata()
    embedding = metadata.state_dict_metadata.get(MODEL_PREFIX + "tok_embeddings.weight")
    if embedding is None:
        raise CheckpointError(f"{uri}: no model tensors in this checkpoint")
    vocab_size = embedding.size[0]
    with torch.device("meta"):
        model = Llama(cfg.model.args(vocab_size), attention_backend="sdpa")
    model.to_empty(device=device)
    state = {MODEL_PREFIX + k: v for k, v in model.state_dict().items()}
    # Reads only the keys asked for.
    dcp.load(state, storage_reader=dcp_reader(uri), planner=SafeLoadPlanner())
    model.load_state_dict({k.removeprefix(MODEL_PREFIX): v for k, v in state.items()})
    return model.eval()


def run_target(cfg: RunConfig, step: int | None = None) -> EvalTarget:
    """The newest complete checkpoint of run `cfg.name` (or the one at `step`) in the run's
    storage, and the run's tokenizer, as URIs; nothing is downloaded here."""
    from llamaray.train.stored_checkpoints import newest_stored, step_folders, verify_stored

    run_root = cfg.run_uri
    candidates = step_folders(run_root)
    if not candidates:
        raise FileNotFoundError(f"run {cfg.name!r} has no checkpoints under {run_root}")
    try:
        if step is None:
            uri, state = newest_stored(run_root)
        else:
            found = [u for s, u in candidates if s == step]
            if not found:
                raise FileNotFoundError(f"run {cfg.name!r} has no checkpoint at step {step}")
            uri, state = found[0], verify_stored(found[0])
    except CheckpointError as err:
        raise CheckpointError(f"no complete checkpoint of {cfg.name!r}: {err}") from None
    return EvalTarget(uri, None, _tokenizer_of(cfg), state.step, cfg.model_dump())


def folder_target(model_dir: str | Path, tokenizer: str | Path | None = None) -> EvalTarget:
    """An exported Meta or Hugging Face folder, local or `s3://` (with its tokenizer.model
    unless given)."""
    model_dir = os.fspath(model_dir)
    if not storage.is_s3(model_dir):
        model_dir = str(Path(model_dir).resolve())
    tokenizer_path = (
        os.fspath(tokenizer) if tokenizer else storage.join(model_dir, "tokenizer.model")
    )
    if not storage.exists(tokenizer_path):
        raise FileNotFoundError(f"no tokenizer at {tokenizer_path}; pass --tokenizer")
    return EvalTarget(None, model_dir, tokenizer_path, None)


def corpus_dir_of(cfg: RunConfig) -> str:
    """The run's prepared corpus: `data.corpus`, or where `data.prepare` put it."""
    from llamaray.data.corpus_layout import MANIFEST, corpus_location

    if cfg.data.corpus:
        return cfg.data.corpus
    out = corpus_location(cfg.output_dir, cfg.data.prepare.name)
    if not storage.exists(storage.join(out, MANIFEST)):
        raise FileNotFoundError(f"the run's corpus {out} is not prepared (no manifest.json)")
    return out


def _tokenizer_of(cfg: RunConfig) -> str:
    """The URI of the run's corpus tokenizer (the manifest's path, relative to the corpus)."""
    from llamaray.data.packed_corpus import CorpusRows

    uri = CorpusRows.open(corpus_dir_of(cfg)).tokenizer_uri
    if not uri or not storage.exists(uri):
        raise FileNotFoundError(f"the run's tokenizer {uri} is missing")
    return uri
