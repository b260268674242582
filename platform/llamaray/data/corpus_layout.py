"""Where a prepared corpus's files are: immutable versions behind a pointer, in one place.

A corpus is `<output_dir>/<name>` (`corpus_location`), a local path or `s3://bucket/prefix`:

    <corpus>/manifest.json             the pointer: the current version's manifest, its paths
                                       relative to <corpus>; written last, in one object write
    <corpus>/versions/<version>/       one build, never written again once complete:
        manifest.json                  its own manifest (paths relative to the version)
        tokenizer/ shards/ quarantine/ sample/
    <corpus>/prepare.lock              while a build runs (`data.corpus_lock`)

Every build of `llamaray prepare` writes a fresh `versions/<version>/` and switches only when
it is complete: its own manifest first, then the pointer. On a local disk the pointer is
written beside and renamed over (`storage.put_bytes`); S3 has no rename, but one PutObject
replaces an object whole, so a reader sees the old pointer or the new one, never a mix. A
build that dies leaves an incomplete version folder and the old pointer: readers go on
with the old corpus, and the next build removes the folder (`prune_versions`).

Why versions rather than refusing to rebuild: a corpus that a run has trained on must stay
as it was (a resume reads the same rows), yet a corrected corpus under the same name is
what a user wants. So a version is never modified; a run reads the version it was launched
with (`pinned_corpus`, the version folder, which opens as a corpus on its own), and the
manifest's `digest` (`corpus_digest`) says whether two manifests describe the same data.
A build never deletes a complete version: a run may still be reading it (a run reads the
version it was launched with, and so does a worker restarted after a failure). It removes
only incomplete version folders. `llamaray corpus prune <corpus> --keep N` (default
`KEEP_VERSIONS`) deletes older complete ones, when no run needs them: a run whose version
was pruned cannot go on.

Readers that know nothing of versions still work: the pointer is a whole manifest whose
paths resolve under `<corpus>` (`CorpusRows.open(<corpus>)`, `tokenizer_location`). A corpus
prepared before versions (shards beside its manifest, no `version`) opens as before.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import re
import secrets
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pyarrow.fs

from llamaray import storage

MANIFEST = "manifest.json"
VERSIONS = "versions"
LOCK = "prepare.lock"
KEEP_VERSIONS = 2
"""Complete versions `llamaray corpus prune` keeps by default: the current and the one before."""

_VERSION = re.compile(r"\d{8}T\d{6}\.\d{3}Z-[0-9a-f]{6}")


def corpus_location(output_dir: str, name: str) -> str:
    """`<output_dir>/<name>`: a local path made absolute, or an `s3://` URI. The one rule
    for where a corpus named `name` is; prepare, pretrain and eval all ask here.

    >>> corpus_location("s3://b/corpora/", "c4")
    's3://b/corpora/c4'
    """
    if storage.is_s3(output_dir):
        return storage.join(output_dir, name)
    return str(Path(output_dir).resolve() / name)


def new_version(now: float | None = None) -> str:
    """A fresh version id: the UTC time of the build's start to the millisecond (so ids
    sort by age) and 24 random bits (so two launches never share one), e.g.
    20250614T101112.345Z-3fa9c1."""
    now = time.time() if now is None else now
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(now))
    return f"{stamp}.{int(now * 1000) % 1000:03d}Z-{secrets.token_hex(3)}"


def version_location(corpus: str, version: str) -> str:
    """The folder of `version` of `corpus`; it opens as a corpus on its own."""
    if not _VERSION.fullmatch(version):
        raise ValueError(
            f"{version!r} is not a corpus version id (like 20250614T101112.345Z-3fa9c1)"
        )
    return storage.join(corpus, VERSIONS, version)


def read_manifest(corpus: str) -> dict | None:
    """`<corpus>/manifest.json` parsed, or None when the corpus is not prepared."""
    uri = storage.join(corpus, MANIFEST)
    try:
        return json.loads(storage.read_text(uri))
    except FileNotFoundError:
        return None


def pinned_corpus(corpus: str) -> str:
    """The location a run should read: for a versioned corpus, the folder of its current
    version, which no later build modifies; a version folder, or a corpus prepared before
    versions, as it is. FileNotFoundError when `corpus` has no manifest."""
    manifest = read_manifest(corpus)
    if manifest is None:
        raise FileNotFoundError(f"no {MANIFEST} in {corpus} (not a prepared corpus?)")
    relative = manifest.get("version_path")
    if not relative:
        return corpus
    return storage.join(corpus, *str(relative).split("/"))


def corpus_digest(manifest: Mapping[str, Any]) -> str:
    """What the trainers read, as one id: a digest of the sources in order, each split's
    files (named by a digest of their rows) and row counts, `seq_len` and the tokenizer's
    bytes (`tokenizer.sha256`). The same data gives the same digest wherever it is stored
    and whichever version folder holds it. A manifest records it as `digest`; one written
    before digests gets it computed from the same fields (no tokenizer bytes)."""
    if manifest.get("digest"):
        return str(manifest["digest"])
    prefix = f"{manifest['version_path']}/" if manifest.get("version_path") else ""
    content = {
        "seq_len": manifest["seq_len"],
        "tokenizer": {
            "vocab_size": manifest["tokenizer"].get("vocab_size"),
            "sha256": manifest["tokenizer"].get("sha256"),
        },
        "sources": [
            [
                name,
                {
                    split: [[f.removeprefix(prefix) for f in part["files"]], part["rows"]]
                    for split, part in sorted(entry["splits"].items())
                },
            ]
            for name, entry in manifest["sources"].items()
        ],
    }
    text = json.dumps(content, sort_keys=True, separators=(",", ":"))
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


def corpus_profile(manifest: Mapping[str, Any]) -> dict:
    """The corpus in numbers (MLflow's dataset profile): its version, `seq_len`, vocabulary,
    and per source the documents kept and dropped and each split's tokens and rows, with
    the totals."""
    sources = {}
    for name, entry in manifest["sources"].items():
        splits = entry["splits"]
        sources[name] = {
            "documents_kept": entry.get("kept"),
            "documents_dropped": sum((entry.get("dropped") or {}).values()),
            **{f"{split}_tokens": part["tokens"] for split, part in splits.items()},
            **{f"{split}_rows": part["rows"] for split, part in splits.items()},
        }
    return {
        "version": manifest.get("version"),
        "seq_len": manifest["seq_len"],
        "vocab_size": manifest["tokenizer"].get("vocab_size"),
        "train_tokens": sum(s.get("train_tokens", 0) for s in sources.values()),
        "train_rows": sum(s.get("train_rows", 0) for s in sources.values()),
        "sources": sources,
    }


def switch_to(corpus: str, version: str, own: Mapping, pointer: Mapping) -> None:
    """Make `version` the corpus's current one: its own manifest `own`, then the pointer
    `pointer` (its paths relative to `corpus`), each one object written whole. Call only
    when everything the manifest names is written."""
    storage.write_text(storage.join(version_location(corpus, version), MANIFEST), _dump(own))
    storage.write_text(storage.join(corpus, MANIFEST), _dump(pointer))


def _dump(manifest: Mapping) -> str:
    return json.dumps(manifest, indent=2)


def list_versions(corpus: str) -> dict[str, bool]:
    """The version folders of `corpus`, oldest first, each with True when complete (its
    own manifest is written; an incomplete one is a build still running or one that died)."""
    fs, root = storage.filesystem(storage.join(corpus, VERSIONS))
    selector = pyarrow.fs.FileSelector(root, recursive=False, allow_not_found=True)
    names = sorted(
        posixpath.basename(i.path.rstrip("/"))
        for i in fs.get_file_info(selector)
        if i.type == pyarrow.fs.FileType.Directory
        and _VERSION.fullmatch(posixpath.basename(i.path.rstrip("/")))
    )
    manifests = [posixpath.join(root, n, MANIFEST) for n in names]
    infos = fs.get_file_info(manifests) if manifests else []
    return {n: info.type == pyarrow.fs.FileType.File for n, info in zip(names, infos, strict=True)}


def prune_versions(corpus: str, keep: int | None = KEEP_VERSIONS) -> list[str]:
    """Delete all but the newest `keep` complete versions (never the current one; None:
    keep them all), and every incomplete version folder; return the deleted versions. Run
    it only while holding the corpus's build lock (a running build's folder is
    incomplete): `llamaray corpus prune` takes it, a build calls it with keep=None."""
    if keep is not None and keep < 1:
        raise ValueError(f"keep must be at least 1 (the current version), got {keep}")
    pointer = read_manifest(corpus) or {}
    current = pointer.get("version")
    versions = list_versions(corpus)
    complete = [v for v, done in versions.items() if done and v != current]
    if keep is None:
        kept = set(complete)
    else:
        kept = set(complete[max(0, len(complete) - (keep - 1 if current else keep)) :])
    doomed = [v for v in versions if v != current and v not in kept]
    for version in doomed:
        storage.delete_tree(version_location(corpus, version))
    return doomed
