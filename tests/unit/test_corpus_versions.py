"""Rebuilding a corpus is atomic: each build in a version folder of its own, a pointer
written last, one build at a time (a lease created only if absent, stale ones taken over),
old versions pruned. Local paths and moto's S3 server, no Ray."""

from __future__ import annotations

import hashlib
import json
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pyarrow as pa
import pytest

from llamaray import storage
from llamaray.cli import main
from llamaray.data.corpus_layout import (
    LOCK,
    MANIFEST,
    corpus_digest,
    list_versions,
    new_version,
    pinned_corpus,
    prune_versions,
    read_manifest,
    switch_to,
    version_location,
)
from llamaray.data.corpus_lock import BuildLock, CorpusLocked, LockLost, check_free
from llamaray.data.packed_corpus import CorpusRows
from llamaray.data.prepare import TOKENIZER, _pointer, write_shards

SEQ_LEN = 8


@pytest.fixture(params=["local", "s3"])
def corpus(request, tmp_path) -> str:
    """Where a corpus named `c` goes: a local folder, or a fresh bucket on moto's server."""
    if request.param == "local":
        return str(tmp_path / "c")
    client = request.getfixturevalue("s3_client")
    bucket = f"versions-{hashlib.sha1(request.node.name.encode()).hexdigest()[:12]}"
    client.create_bucket(Bucket=bucket)
    return f"s3://{bucket}/corpora/c"


def build(corpus: str, fill: int, rows: int = 4) -> dict:
    """One version's files, written as prepare writes them (its `write_shards`, the
    tokenizer), and the version's manifest; not yet switched to."""
    version = new_version()
    out = version_location(corpus, version)
    width = SEQ_LEN + 1
    tokens = np.full((rows, width), fill, dtype=np.int32)
    packed = pa.table(
        {
            "kind": ["row"] * rows,
            "source": ["web"] * rows,
            "split": ["train"] * (rows - 1) + ["validation"],
            "tokens": pa.FixedSizeListArray.from_arrays(pa.array(tokens.ravel()), width),
        }
    )
    fs, root = storage.filesystem(out)
    records = write_shards(packed, fs, root).to_pylist()
    model = f"tokenizer of build {fill}".encode()
    storage.write_bytes(storage.join(out, TOKENIZER), model)
    splits = {
        split: {
            "rows": sum(r["rows"] for r in records if r["split"] == split),
            "files": sorted(r["path"] for r in records if r["split"] == split),
        }
        for split in ("train", "validation")
    }
    manifest = {
        "name": "c",
        "tokenizer": {
            "path": TOKENIZER,
            "vocab_size": 16,
            "sha256": hashlib.sha256(model).hexdigest(),
        },
        "seq_len": SEQ_LEN,
        "row_tokens": width,
        "sources": {"web": {"paths": ["/raw/web.jsonl"], "splits": splits}},
        "quarantine": {"records": 0, "files": []},
        "version": version,
    }
    manifest["digest"] = corpus_digest(manifest)
    return manifest


def switch(corpus: str, manifest: dict) -> None:
    version = manifest["version"]
    switch_to(corpus, version, manifest, _pointer(manifest, f"versions/{version}", sample=False))


def snapshot(uri: str) -> dict[str, str]:
    """Every file under `uri` with a digest of its bytes."""
    return {
        f: hashlib.sha256(storage.read_bytes(storage.join(uri, f))).hexdigest()
        for f in storage.list_files(uri)
    }


def train_rows(corpus: str) -> np.ndarray:
    rows = CorpusRows.open(corpus)
    return rows.rows("web", np.arange(rows.rows_per_source()["web"]))


def test_a_rebuild_switches_only_when_complete_and_leaves_the_old_version_as_it_was(corpus):
    first = build(corpus, fill=1)
    switch(corpus, first)
    v1 = version_location(corpus, first["version"])
    before = snapshot(v1)
    assert pinned_corpus(corpus) == v1
    assert (train_rows(corpus) == 1).all()

    second = build(corpus, fill=2, rows=6)  # written, not switched: readers see the first
    assert read_manifest(corpus)["version"] == first["version"]
    assert (train_rows(corpus) == 1).all() and pinned_corpus(corpus) == v1

    switch(corpus, second)
    pointer = read_manifest(corpus)
    v2 = f"versions/{second['version']}/"
    assert pointer["version"] == second["version"] and pointer["version_path"] == v2[:-1]
    files = [f for s in pointer["sources"]["web"]["splits"].values() for f in s["files"]]
    assert files and all(f.startswith(v2) for f in files)  # only its own shards
    assert pointer["tokenizer"]["path"] == v2 + TOKENIZER
    assert (train_rows(corpus) == 2).all() and len(train_rows(corpus)) == 5
    # The first version is byte for byte what it was (its tokenizer too), and still opens
    # on its own for a run pinned to it.
    assert snapshot(v1) == before
    assert storage.read_bytes(storage.join(v1, TOKENIZER)) == b"tokenizer of build 1"
    assert (train_rows(v1) == 1).all() and pinned_corpus(v1) == v1
    assert pinned_corpus(corpus) == version_location(corpus, second["version"])
    assert corpus_digest(pointer) == second["digest"] != first["digest"]


def test_the_digest_names_the_data_not_where_it_is_stored():
    manifest = {
        "seq_len": 8,
        "tokenizer": {"path": TOKENIZER, "vocab_size": 16, "sha256": "ab"},
        "sources": {"web": {"splits": {"train": {"files": ["shards/a.parquet"], "rows": 3}}}},
    }
    digest = corpus_digest(manifest)
    moved = _pointer(
        dict(manifest, sources={"web": dict(manifest["sources"]["web"], paths=[])},
             quarantine={"files": []}),
        "versions/20250101T000000.000Z-abcdef",
        sample=False,
    )  # fmt: skip
    assert corpus_digest(moved) == digest
    for change in (
        {"seq_len": 16},
        {"tokenizer": dict(manifest["tokenizer"], sha256="cd")},
        {"sources": {"web": {"splits": {"train": {"files": ["shards/b.parquet"], "rows": 3}}}}},
    ):
        assert corpus_digest(dict(manifest, **change)) != digest, change
    assert corpus_digest(dict(manifest, digest="recorded")) == "recorded"


def test_prune_keeps_the_current_and_previous_versions_and_drops_incomplete_ones(tmp_path):
    corpus = str(tmp_path / "c")
    builds = []
    for fill in range(3):
        builds.append(build(corpus, fill))
        switch(corpus, builds[-1])
    dead = build(corpus, fill=9)  # a build that died before its switch: no manifest
    storage.delete_tree(storage.join(version_location(corpus, dead["version"]), MANIFEST))
    assert list_versions(corpus)[dead["version"]] is False

    removed = prune_versions(corpus)
    assert sorted(removed) == sorted([builds[0]["version"], dead["version"]])
    assert list(list_versions(corpus)) == [builds[1]["version"], builds[2]["version"]]
    assert prune_versions(corpus, keep=1) == [builds[1]["version"]]
    assert (train_rows(corpus) == 2).all()
    with pytest.raises(ValueError, match="keep"):
        prune_versions(corpus, keep=0)
    with pytest.raises(ValueError, match="version id"):
        version_location(corpus, "../../etc")


def test_a_second_launch_fails_at_once_naming_the_holder(corpus):
    holder = BuildLock(corpus, "20250101T000000.000Z-aaaaaa").acquire()
    try:
        record = json.loads(storage.read_text(storage.join(corpus, LOCK)))
        assert record["token"] == holder.token and record["pid"] > 0
        start = time.monotonic()
        with pytest.raises(CorpusLocked) as err:
            BuildLock(corpus, "20250101T000001.000Z-bbbbbb").acquire()
        assert time.monotonic() - start < 5
        message = str(err.value)
        for part in (
            f"pid {record['pid']}", socket.gethostname(), "20250101T000000.000Z-aaaaaa",
            f"rm {storage.join(corpus, LOCK)}",
        ):  # fmt: skip
            assert part in message, (part, message)
        with pytest.raises(CorpusLocked):
            check_free(corpus)
    finally:
        holder.release()
    assert not storage.exists(storage.join(corpus, LOCK))
    check_free(corpus)
    with BuildLock(corpus, "20250101T000002.000Z-cccccc"):
        pass


def test_of_launches_racing_for_the_lock_exactly_one_wins(corpus):
    barrier = threading.Barrier(6)
    won, refused = [], []

    def launch(i: int) -> None:
        lock = BuildLock(corpus, f"20250101T00000{i}.000Z-aaaaaa")
        barrier.wait()
        try:
            won.append(lock.acquire())
        except CorpusLocked as err:
            refused.append(err)

    threads = [threading.Thread(target=launch, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1 and len(refused) == 5
    assert all(won[0].version in str(err) for err in refused)
    won[0].release()


def stale_lock(corpus: str, **fields) -> None:
    record = {
        "owner": "someone", "host": "another-host", "pid": 4242, "version": "old",
        "token": "0" * 32, "started_at": time.time() - 7200, "renewed_at": time.time(),
    } | fields  # fmt: skip
    storage.write_text(storage.join(corpus, LOCK), json.dumps(record))


def test_a_stale_lock_is_taken_over_by_the_clear_rule(corpus, tmp_path):
    # Not renewed for longer than the lease (a launch killed on another machine).
    stale_lock(corpus, renewed_at=time.time() - 3600)
    with BuildLock(corpus, "20250101T000000.000Z-aaaaaa", lease_s=600) as lock:
        assert json.loads(storage.read_text(storage.join(corpus, LOCK)))["token"] == lock.token
    # Its process has exited on this host: taken over at once, however fresh.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale_lock(corpus, host=socket.gethostname(), pid=dead.pid)
    with BuildLock(corpus, "20250101T000001.000Z-aaaaaa"):
        pass
    # A live holder elsewhere, renewed within its lease, is never taken over.
    stale_lock(corpus)
    with pytest.raises(CorpusLocked, match="another-host"):
        BuildLock(corpus, "20250101T000002.000Z-aaaaaa").acquire()
    # The documented command removes it.
    assert main(["corpus", "unlock", corpus]) == 0
    assert not storage.exists(storage.join(corpus, LOCK))


def test_a_holder_renews_its_lease_and_one_taken_over_does_not_switch(tmp_path):
    corpus = str(tmp_path / "c")
    holder = BuildLock(corpus, "20250101T000000.000Z-aaaaaa", lease_s=1.0).acquire()
    try:
        time.sleep(1.5)  # past the lease: only the renewals keep it
        with pytest.raises(CorpusLocked):
            BuildLock(corpus, "20250101T000001.000Z-bbbbbb", lease_s=1.0).acquire()
        holder.check()
    finally:
        holder._stop.set()  # the holder stops renewing (paused, partitioned)
        holder._renewer.join()
    time.sleep(1.2)
    taker = BuildLock(corpus, "20250101T000002.000Z-cccccc", lease_s=1.0).acquire()
    with pytest.raises(LockLost, match=r"20250101T000002\.000Z-cccccc"):
        holder.check()
    holder.release()  # leaves the taker's lock alone
    assert json.loads(storage.read_text(storage.join(corpus, LOCK)))["token"] == taker.token
    taker.release()


def test_create_exclusive_creates_once(corpus):
    uri = storage.join(corpus, "once")
    assert storage.create_exclusive(uri, b"first") is True
    assert storage.create_exclusive(uri, b"second") is False
    assert storage.read_bytes(uri) == b"first"


def test_the_corpus_command_lists_and_prunes_and_prepare_refuses_a_locked_corpus(tmp_path, capsys):
    corpus = str(tmp_path / "runs" / "c")
    builds = [build(corpus, fill) for fill in range(3)]
    for b in builds:
        switch(corpus, b)
    assert main(["corpus", "versions", corpus]) == 0
    out = capsys.readouterr().out
    assert f"{builds[2]['version']}  current" in out and "not locked" in out
    assert main(["corpus", "prune", corpus, "--keep", "1"]) == 0
    assert list(list_versions(corpus)) == [builds[2]["version"]]
    capsys.readouterr()
    with BuildLock(corpus, "20250101T000000.000Z-aaaaaa"):
        # Refused before Ray starts, naming the holder.
        code = main(["prepare", f"output_dir={tmp_path / 'runs'}", "name=c"])
        assert code == 2
        assert "20250101T000000.000Z-aaaaaa" in capsys.readouterr().err
