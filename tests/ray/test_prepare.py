"""`prepare_corpus` end to end on the shared local Ray cluster, with bad input planted;
the same input prepared from S3 into S3 (moto's server) must give the same corpus; a
rebuild into the same name is a new version, switched to when complete."""

from __future__ import annotations

import gzip
import hashlib
import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from llamaray import storage
from llamaray.config import CorpusConfig, load_config
from llamaray.data.corpus_layout import list_versions, pinned_corpus
from llamaray.data.packed_corpus import CorpusRows, tokenizer_location
from llamaray.data.prepare import heldout, prepare_corpus
from llamaray.data.sample_text import write_stdlib_sample
from llamaray.tokenizer import Tokenizer

pytestmark = pytest.mark.ray

SENTENCE = "The quick brown fox jumps over the lazy dog near the river bank today."


def load_rows(corpus_dir, source: str, split: str = "train") -> np.ndarray:
    """Every packed row of one source and split, read as the trainers read them."""
    rows = CorpusRows.open(str(corpus_dir))
    return rows.rows(source, np.arange(rows.rows_per_source(split)[source]), split)


def c4_doc(i: int) -> str:
    return "\n".join(f"{SENTENCE} Line {w} of page {i} has enough words here." for w in range(6))


def write_jsonl(path, records, *, raw_lines=()):
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
        for line in raw_lines:
            f.write(line + "\n")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("prepare")
    sample = write_stdlib_sample(root / "sample", 400_000)
    code = [json.loads(line) for line in sample["code"].read_text().splitlines()][:20]
    github = [dict(r, meta={"license": "MIT"}) for r in code]
    github.append(dict(code[0], meta={"license": "GPL-3.0"}))  # -> github_license
    github.append(dict(code[1], meta={"license": "MIT"}))  # exact duplicate of a kept file
    write_jsonl(root / "github.jsonl", github)
    c4 = [{"text": c4_doc(i)} for i in range(12)]
    c4.append({"text": c4_doc(99) + "\nlorem ipsum dolor sit amet."})  # -> c4_lorem_ipsum
    write_jsonl(root / "c4.jsonl", c4, raw_lines=['{"text": "unterminated', '{"meta": {}}'])
    prose_lines = sample["prose"].read_text().splitlines()
    with gzip.open(root / "prose.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write("\n".join(prose_lines) + "\n")
        f.write(json.dumps({"text": "   "}) + "\n")  # -> empty
    expected_in = {
        "github": len(github),
        "c4": len(c4) + 2,
        "prose": len(prose_lines) + 1 + 1,  # + the missing file
    }
    manifest = prepare_corpus(config(str(root), str(root / "out")))
    return manifest, expected_in, root / "out" / "t", root


INPUTS = ("github.jsonl", "c4.jsonl", "prose.jsonl.gz")


def config(inputs: str, output_dir: str) -> CorpusConfig:
    """The test corpus's config, its raw files under `inputs` (a folder or s3:// prefix)."""
    at = lambda name: storage.join(inputs, name)  # noqa: E731
    return load_config(
        None,
        [
            f"output_dir={output_dir}",
            "name=t",
            f"sources.github=[{at('github.jsonl')}]",
            f"sources.c4=[{at('c4.jsonl')}]",
            f"sources.prose=[{at('prose.jsonl.gz')}, {at('missing.jsonl')}]",
            "tokenizer.vocab_size=600",
            # Less than the cleaned text (~0.5 MB): the tokenizer trains on a sample.
            "tokenizer_sample_bytes=300000",
            "seq_len=32",
            "validation_fraction=0.1",
            "tokenize_actors=1",
        ],
        schema=CorpusConfig,
    )


def quarantine_lines(corpus: str, manifest: dict) -> list[str]:
    return [
        line
        for entry in manifest["quarantine"]["files"]
        for line in storage.read_text(storage.join(corpus, entry["path"])).splitlines()
    ]


def test_every_record_is_accounted_for(corpus):
    manifest, expected_in, _, _ = corpus
    for name, n_in in expected_in.items():
        s = manifest["sources"][name]
        assert s["documents_in"] == n_in, name
        assert s["kept"] + sum(s["dropped"].values()) == n_in, name
        kept_tokenized = s["splits"]["train"]["documents"] + s["splits"]["validation"]["documents"]
        assert kept_tokenized == s["kept"], name


def test_drop_reasons_per_source(corpus):
    manifest, _, out, _ = corpus
    src = manifest["sources"]
    assert src["github"]["dropped"].get("github_license") == 1
    # The paper's exact file dedup, per source; nothing across sources by default.
    assert src["github"]["dropped"].get("github_exact_duplicate") == 1
    assert not any(
        r in s["dropped"] for s in src.values() for r in ("exact_duplicate", "near_duplicate")
    )
    assert [d["step"] for d in src["github"]["dedup"]["steps"]] == ["exact"]
    assert src["prose"]["dedup"]["steps"] == src["c4"]["dedup"]["steps"] == []
    assert src["c4"]["dropped"].get("c4_lorem_ipsum") == 1
    assert src["c4"]["dropped"].get("malformed_json") == 1
    assert src["c4"]["dropped"].get("missing_text") == 1
    assert src["prose"]["dropped"].get("empty") == 1
    assert src["prose"]["dropped"].get("missing_file") == 1
    quarantined = quarantine_lines(str(out), manifest)
    total_dropped = sum(sum(s["dropped"].values()) for s in src.values())
    assert len(quarantined) == total_dropped == manifest["quarantine"]["records"]
    assert sum(f["records"] for f in manifest["quarantine"]["files"]) == total_dropped
    # Written by the tasks, into the corpus's version: nothing else is in its quarantine.
    version = manifest["version_path"]
    listed = {f"{version}/quarantine/{p}" for p in storage.list_files(out / version / "quarantine")}
    assert listed == {f["path"] for f in manifest["quarantine"]["files"]}
    first = json.loads(quarantined[0])
    assert {"origin", "reason", "source", "excerpt"} <= set(first)
    assert any(json.loads(q)["origin"].endswith("missing.jsonl:0") for q in quarantined)


def test_shards_hold_packed_rows_of_the_vocabulary(corpus):
    manifest, _, out, _ = corpus
    vocab = manifest["tokenizer"]["vocab_size"]
    for name, s in manifest["sources"].items():
        rows = load_rows(out, name, "train")
        assert rows.shape == (s["splits"]["train"]["rows"], 33)
        # Stored as int32 (half of int64's bytes); the reader widens to int64 for torch.
        for f in s["splits"]["train"]["files"]:
            stored = pq.read_schema(out / f).field("tokens").type
            assert stored.value_type == pa.int32(), stored
        assert rows.min() >= 0 and rows.max() < vocab
        # Packing keeps every token except each block's unfinished row.
        split = s["splits"]["train"]
        assert split["packed_tokens"] <= split["tokens"] + 2 * split["documents"]
        assert split["packed_tokens"] > 0.8 * (split["tokens"] + 2 * split["documents"])
    prose_rows = load_rows(out, "prose", "train")
    assert (prose_rows == 1).any() and (prose_rows == 2).any()  # bos and eos between documents
    assert manifest["sources"]["prose"]["splits"]["validation"]["rows"] > 0


def test_heldout_split_is_deterministic_and_near_the_fraction():
    origins = [f"file.jsonl:{i}" for i in range(20_000)]
    picked = [heldout(o, 0.1, 0) for o in origins]
    assert picked == [heldout(o, 0.1, 0) for o in origins]
    assert 0.09 < np.mean(picked) < 0.11
    assert picked != [heldout(o, 0.1, 1) for o in origins]


def test_manifest_paths_are_relative_and_shards_are_what_the_tasks_wrote(corpus):
    manifest, _, out, _ = corpus
    without_config = {k: v for k, v in manifest.items() if k != "config"}
    assert str(out) not in json.dumps(without_config)
    # The corpus's manifest points into its current version, paths relative to the corpus.
    version = manifest["version_path"]
    assert version == f"versions/{manifest['version']}"
    assert manifest["tokenizer"]["path"] == f"{version}/tokenizer/tokenizer.model"
    files = [
        f for s in manifest["sources"].values() for split in s["splits"].values()
        for f in split["files"]
    ]  # fmt: skip
    assert files and all(not f.startswith("/") and "://" not in f for f in files)
    assert {f"{version}/shards/{p}" for p in storage.list_files(out / version / "shards")} == set(
        files
    )
    # The version's own manifest: the same, relative to the version, so it opens alone.
    own = json.loads((out / version / "manifest.json").read_text())
    assert own["tokenizer"]["path"] == "tokenizer/tokenizer.model"
    assert own["digest"] == manifest["digest"] and "version_path" not in own
    # The same input gives the same file names (content digests) on every run.
    for name, s in manifest["sources"].items():
        for split, entry in s["splits"].items():
            prefix = f"{version}/shards/source={name}/split={split}/"
            assert all(f.startswith(prefix) and f.endswith(".parquet") for f in entry["files"])
            assert entry["files"] == sorted(entry["files"])


def test_the_tokenizer_trained_on_a_bounded_sample(corpus):
    manifest, _, _, _ = corpus
    trained = manifest["tokenizer"]["trained_on"]
    assert trained["sampled"] is True
    assert trained["limit_bytes"] == 300_000 < trained["corpus_bytes"]
    assert 0 < trained["bytes"] < trained["corpus_bytes"]
    assert trained["fraction"] == pytest.approx(300_000 / trained["corpus_bytes"])
    kept = sum(s["kept"] for s in manifest["sources"].values())
    assert 0 < trained["documents"] < kept


def test_a_copied_corpus_opens_with_its_tokenizer(corpus, tmp_path):
    manifest, _, out, _ = corpus
    copy = tmp_path / "moved" / "t"
    shutil.copytree(out, copy)
    rows = CorpusRows.open(copy)
    location = tokenizer_location(copy, rows.manifest)
    version = manifest["version_path"]
    assert location == str(copy / version / "tokenizer" / "tokenizer.model") == rows.tokenizer_uri
    tok = Tokenizer.open(location)
    assert tok.vocab_size == manifest["tokenizer"]["vocab_size"]
    n = manifest["sources"]["c4"]["splits"]["train"]["rows"]
    assert np.array_equal(rows.rows("c4", np.arange(n)), load_rows(out, "c4", "train"))
    # An absolute path (a manifest written before paths were relative) is kept as it is.
    old = dict(rows.manifest, tokenizer={"path": str(out / version / "tokenizer.model")})
    assert tokenizer_location(copy, old) == str(out / version / "tokenizer.model")


def test_prepare_from_s3_into_s3_gives_the_same_corpus(corpus, s3_client):
    local, _, _, root = corpus
    bucket = "prepare-s3"
    s3_client.create_bucket(Bucket=bucket)
    for name in INPUTS:
        storage.upload(root / name, f"s3://{bucket}/raw/{name}")
    manifest = prepare_corpus(config(f"s3://{bucket}/raw", f"s3://{bucket}/corpora"))
    out = f"s3://{bucket}/corpora/t"

    for name, s in local["sources"].items():
        got = manifest["sources"][name]
        for key in ("documents_in", "kept", "dropped"):
            assert got[key] == s[key], (name, key)
        for split in ("train", "validation"):
            mine, theirs = dict(got["splits"][split]), dict(s["splits"][split])
            # The same files, each in its own build's version folder.
            assert [f.split("/", 2)[2] for f in mine.pop("files")] == [
                f.split("/", 2)[2] for f in theirs.pop("files")
            ], (name, split)
            assert mine == theirs, (name, split)
            assert np.array_equal(
                load_rows(out, name, split), load_rows(root / "out" / "t", name, split)
            ), (name, split)
    assert manifest["tokenizer"]["trained_on"] == local["tokenizer"]["trained_on"]
    # The digest names the data, not where it is stored.
    assert manifest["digest"] == local["digest"] and manifest["version"] != local["version"]
    # Everything is in the bucket, found through the manifest's relative paths.
    assert "s3://" not in json.dumps({k: v for k, v in manifest.items() if k != "config"}).replace(
        f"s3://{bucket}/raw/", ""
    )
    lines = quarantine_lines(out, manifest)
    assert len(lines) == manifest["quarantine"]["records"] == local["quarantine"]["records"]
    assert any(json.loads(q)["origin"] == f"s3://{bucket}/raw/missing.jsonl:0" for q in lines)
    rows = CorpusRows.open(out)
    assert rows.tokenizer_uri == f"{out}/{manifest['version_path']}/tokenizer/tokenizer.model"
    tok = Tokenizer.open(rows.tokenizer_uri)
    assert tok.vocab_size == 600
    # The same sample gives the same model, byte for byte, with no path of the driver's in it.
    model = storage.read_bytes(rows.tokenizer_uri)
    assert model == storage.read_bytes(tokenizer_location(root / "out" / "t", local))
    assert b"llamaray-tokenizer-" not in model


def test_the_tokenize_pool_sizes_itself_from_the_cluster_unless_set():
    import ray

    from llamaray.data.prepare import _actor_pool

    cpus = int(ray.cluster_resources()["CPU"])
    pool = _actor_pool(None)
    assert (pool.min_size, pool.max_size) == (1, cpus)
    pool = _actor_pool(3)
    assert (pool.min_size, pool.max_size) == (3, 3)
    assert CorpusConfig().tokenize_actors is None


def snapshot(folder) -> dict[str, str]:
    """Every file under `folder` with a digest of its bytes."""
    return {
        f: hashlib.sha256(storage.read_bytes(storage.join(folder, f))).hexdigest()
        for f in storage.list_files(folder)
    }


def test_a_rebuild_into_the_same_name_is_a_new_version_the_first_left_as_it_was(corpus, tmp_path):
    """Prepared again into the same name with other inputs: the new build lands in a
    version of its own and the corpus switches to it once complete; the manifest lists
    only the new build's files; the first build's files, tokenizer included, are byte for
    byte as they were, and a run pinned to the first version still reads it."""
    first, _, built, root = corpus
    out = tmp_path / "out"
    shutil.copytree(built, out / "t")  # the module's corpus, rebuilt here as a copy
    corpus_dir = out / "t"
    v1 = corpus_dir / first["version_path"]
    before = snapshot(corpus_dir)
    first_rows = load_rows(corpus_dir, "c4")
    assert pinned_corpus(str(corpus_dir)) == str(v1)

    inputs = tmp_path / "second"
    inputs.mkdir()
    write_jsonl(inputs / "c4.jsonl", [{"text": c4_doc(i)} for i in range(100, 130)],
                raw_lines=["{broken"])  # fmt: skip
    prose = (root / "sample" / "prose.jsonl").read_text().splitlines()[:150]
    (inputs / "prose.jsonl").write_text("\n".join(prose) + "\n")
    second = prepare_corpus(
        load_config(
            None,
            [
                f"output_dir={out}",
                "name=t",
                f"sources.c4=[{inputs / 'c4.jsonl'}]",
                f"sources.prose=[{inputs / 'prose.jsonl'}]",
                "tokenizer.vocab_size=600",
                "seq_len=32",
                "validation_fraction=0.1",
                "tokenize_actors=1",
            ],
            schema=CorpusConfig,
        )
    )

    # Nothing of the first build changed: not its shards, not its tokenizer.
    after = snapshot(corpus_dir)
    assert {f: d for f, d in after.items() if f in before and f != "manifest.json"} == {
        f: d for f, d in before.items() if f != "manifest.json"
    }
    tokenizer = first["tokenizer"]["path"]
    assert after[tokenizer] == before[tokenizer] != after[second["tokenizer"]["path"]]

    assert second["version"] != first["version"] and second["digest"] != first["digest"]
    v2 = second["version_path"]
    assert json.loads((corpus_dir / "manifest.json").read_text()) == second
    assert set(second["sources"]) == {"c4", "prose"}
    listed = (
        [
            f
            for s in second["sources"].values()
            for split in s["splits"].values()
            for f in split["files"]
        ]
        + [f["path"] for f in second["quarantine"]["files"]]
        + [second["tokenizer"]["path"]]
    )
    assert listed and all(f.startswith(v2 + "/") for f in listed), listed
    assert {f for f in storage.list_files(corpus_dir) if f.startswith(v2 + "/")} >= set(listed)
    assert list(list_versions(str(corpus_dir))) == [first["version"], second["version"]]
    # The corpus reads the new build; the first version, pinned, still reads as before.
    assert pinned_corpus(str(corpus_dir)) == str(corpus_dir / v2)
    assert len(load_rows(corpus_dir, "c4")) == second["sources"]["c4"]["splits"]["train"]["rows"]
    assert np.array_equal(load_rows(v1, "c4"), first_rows)
