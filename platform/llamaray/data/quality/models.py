"""Opening the quality steps' model files, once per process, local or on S3.

fastText, KenLM and SentencePiece open local files only. A model configured as `s3://...`
is copied once per node into a cache folder (`MODEL_CACHE_ENV`, default
`<tmp>/llamaray-models`): every cleaning worker on that node opens the same copy, so a
KenLM model of several GB is on each node's disk once and shares its page cache. The copy
is named by the object's URI, size and modification time (a replaced model is fetched
again), streamed to a temporary and renamed when whole, under a file lock so that workers
starting together download it once. A local path is opened where it is. Each model stays
loaded for the life of the process (`functools.lru_cache`), so a cleaning worker loads it
once, not per block. Nothing is ever fetched from the internet.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import os
import tempfile
from pathlib import Path

import pyarrow.fs

from llamaray.storage import download, file_info, filesystem, is_s3

LMPLZ_HINT = (
    "build KenLM's lmplz and build_binary with `make kenlm-tools` (they land in .venv/bin), "
    "or put them on PATH"
)


MODEL_CACHE_ENV = "LLAMARAY_MODEL_CACHE"
"""The node's folder of S3 models copied for the quality steps (default
`<tmp>/llamaray-models`); safe to delete between runs."""


def cache_dir() -> Path:
    return Path(os.environ.get(MODEL_CACHE_ENV) or Path(tempfile.gettempdir(), "llamaray-models"))


@functools.lru_cache(maxsize=16)
def local_path(uri: str) -> str:
    """A local file holding `uri`: the path itself, or the node's cached copy of an S3
    object (downloaded by the first worker that needs it)."""
    if not is_s3(uri):
        if not Path(uri).is_file():
            raise FileNotFoundError(f"{uri} does not exist")
        return uri
    fs, path = filesystem(uri)
    info = file_info(fs, path)
    if info.type != pyarrow.fs.FileType.File:
        raise FileNotFoundError(f"{uri} does not exist")
    version = f"{uri}\0{info.size}\0{info.mtime_ns}"
    folder = cache_dir() / hashlib.sha256(version.encode()).hexdigest()[:20]
    target = folder / uri.rstrip("/").rsplit("/", 1)[-1]
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released on close; the others then find the copy
        if not (target.is_file() and target.stat().st_size == info.size):
            download(uri, target)
    return str(target)


@functools.lru_cache(maxsize=8)
def fasttext_model(uri: str):
    """A fastText model (`.bin`). The `fasttext` module's own `predict` breaks on numpy 2
    (`np.array(copy=False)`), so callers use the binding underneath, `model.f.predict`."""
    import fasttext  # the `quality` extra

    # fastText prints a warning to stderr on every load_model; it says nothing useful here.
    fasttext.FastText.eprint = lambda *args, **kwargs: None
    return fasttext.load_model(local_path(uri))


@functools.lru_cache(maxsize=8)
def kenlm_model(uri: str):
    """A KenLM model, ARPA or binary (`build_binary`'s)."""
    import kenlm  # the `quality` extra

    return kenlm.Model(local_path(uri))


@functools.lru_cache(maxsize=8)
def sentencepiece_model(uri: str):
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_file=local_path(uri))


def predict(model, line: str, k: int = 1) -> list[tuple[str, float]]:
    """fastText's top-k (label without `__label__`, probability) for one line of text."""
    # The binding wants one line ending in a newline, like fastText's own predict builds.
    found = model.f.predict(line.replace("\n", " ") + "\n", k, 0.0, "strict")
    return [(label.removeprefix("__label__"), float(p)) for p, label in found]


def kenlm_tool(name: str) -> str | None:
    """KenLM's `lmplz` or `build_binary`: beside this Python (the venv's bin, where `make
    kenlm-tools` puts them), else on PATH; None when neither has it."""
    import shutil
    import sys

    beside = Path(sys.executable).parent / name
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which(name)
