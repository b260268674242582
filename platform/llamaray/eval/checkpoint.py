"""What to evaluate, as a plain single-process model: a training run's checkpoint at a
step (the newest complete one by default), or an exported Meta / Hugging Face folder.

A training checkpoint holds DCP shards of the model and optimizer written by any number
of ranks; DCP reads just the model's tensors into an unsharded model here, with no
process group. The architecture is the run's config; the vocabulary size is read from
the checkpoint's own embedding table, and the tokenizer is the run's corpus tokenizer.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from llamaray.config import RunConfig
from llamaray.model import Llama
from llamaray.tokenizer import Tokenizer
from llamaray.train.checkpoint import STEP_DIR, CheckpointError, newest_complete, step_dirs

MODEL_PREFIX = "model."


@dataclass
class EvalTarget:
    """Where the weights come from, as plain data (it travels to Ray actors)."""

    checkpoint_dir: str | None
    """A local, verified step folder; None: `model_dir`."""
    model_dir: str | None
    tokenizer_path: str
    step: int | None
    config: dict | None = None
    """`RunConfig.model_dump()` of the training run (the architecture)."""

    def load(self, device: str = "cpu") -> tuple[Llama, Tokenizer]:
        tokenizer = Tokenizer(self.tokenizer_path)
        if self.model_dir:
            return Llama.from_pretrained(self.model_dir, device=device), tokenizer
        cfg = RunConfig.model_validate(self.config)
        return load_dcp_model(Path(self.checkpoint_dir), cfg, device), tokenizer


def load_dcp_model(step_dir: Path, cfg: RunConfig, device: str = "cpu") -> Llama:
    """The model tensors of a DCP checkpoint in an unsharded `Llama`."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader

    metadata = FileSystemReader(str(step_dir)).read_metadata()
    embedding = metadata.state_dict_metadata.get(MODEL_PREFIX + "tok_embeddings.weight")
    if embedding is None:
        raise CheckpointError(f"{step_dir}: no model tensors in this checkpoint")
    vocab_size = embedding.size[0]
    with torch.device("meta"):
        model = Llama(cfg.model.args(vocab_size), attention_backend="sdpa")
    model.to_empty(device=device)
    state = {MODEL_PREFIX + k: v for k, v in model.state_dict().items()}
    dcp.load(state, checkpoint_id=str(step_dir))  # reads only the keys asked for
    model.load_state_dict({k.removeprefix(MODEL_PREFIX): v for k, v in state.items()})
    return model.eval()


def run_target(cfg: RunConfig, step: int | None = None) -> EvalTarget:
    """The newest complete checkpoint of run `cfg.name` (or the one at `step`), fetched to
    local disk when the run's storage is S3, and the run's tokenizer."""
    from llamaray.storage import storage_location

    storage, fs = storage_location(cfg.storage_path)
    run_root = f"{storage.rstrip('/')}/{cfg.name}"
    candidates = _step_folders(run_root, fs)
    if not candidates:
        raise FileNotFoundError(f"run {cfg.name!r} has no checkpoints under {run_root}")
    if step is not None:
        candidates = [(s, p) for s, p in candidates if s == step]
        if not candidates:
            raise FileNotFoundError(f"run {cfg.name!r} has no checkpoint at step {step}")
    # Newest first; on S3 each candidate is downloaded only when the newer ones failed.
    local = (Path(path) if fs is None else _download(path, fs) for _, path in candidates)
    try:
        step_dir, state = newest_complete(local)
    except CheckpointError as err:
        raise CheckpointError(f"no complete checkpoint of {cfg.name!r}: {err}") from None
    return EvalTarget(str(step_dir), None, _tokenizer_of(cfg), state.step, cfg.model_dump())


def folder_target(model_dir: str | Path, tokenizer: str | Path | None = None) -> EvalTarget:
    """An exported Meta or Hugging Face folder (with its tokenizer.model unless given)."""
    tokenizer_path = Path(tokenizer or Path(model_dir) / "tokenizer.model")
    if not tokenizer_path.is_file():
        raise FileNotFoundError(f"no tokenizer at {tokenizer_path}; pass --tokenizer")
    return EvalTarget(None, str(model_dir), str(tokenizer_path), None)


def corpus_dir_of(cfg: RunConfig) -> str:
    """The run's prepared corpus: `data.corpus`, or where `data.prepare` put it."""
    if cfg.data.corpus:
        return cfg.data.corpus
    out = Path(cfg.output_dir).resolve() / cfg.data.prepare.name
    if not (out / "manifest.json").is_file():
        raise FileNotFoundError(f"the run's corpus {out} is not prepared (no manifest.json)")
    return str(out)


def _tokenizer_of(cfg: RunConfig) -> str:
    from llamaray.data.feed import CorpusRows

    path = CorpusRows.open(corpus_dir_of(cfg)).manifest["tokenizer"]["path"]
    if not Path(path).is_file():
        raise FileNotFoundError(f"the run's tokenizer {path} is missing")
    return path


def _step_folders(root: str, fs) -> list[tuple[int, str]]:
    """(step, path) of the run's step folders, newest first, local or on S3."""
    if fs is None:
        return [(_step_of(p.name), str(p)) for p in step_dirs(root)]
    import pyarrow.fs

    infos = fs.get_file_info(pyarrow.fs.FileSelector(root, allow_not_found=True))
    found = [
        (int(m.group(1)), i.path)
        for i in infos
        if i.type == pyarrow.fs.FileType.Directory and (m := STEP_DIR.match(i.base_name))
    ]
    return sorted(found, reverse=True)


def _step_of(name: str) -> int:
    return int(STEP_DIR.match(name).group(1))


def _download(path: str, fs) -> Path:
    import pyarrow.fs

    target = Path(tempfile.mkdtemp(prefix="llamaray-eval-"))
    try:
        pyarrow.fs.copy_files(path, str(target), source_filesystem=fs)
    except Exception:
        shutil.rmtree(target, ignore_errors=True)
        raise
    return target
