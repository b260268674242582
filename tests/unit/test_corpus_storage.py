"""What `llamaray prepare` needs from storage, on a local folder and on S3 (moto's server):
bytes kept as they are (a `.gz` is not zipped again), writes on a filesystem handed to a
task, the built-in sample and a tokenizer read and written through it, and the corpus's
tokenizer found relative to the corpus."""

import gzip
import json
import pickle

import pytest

from llamaray import storage
from llamaray.data.packed_corpus import tokenizer_location
from llamaray.data.read import iter_file
from llamaray.data.sample_text import iter_texts, write_stdlib_sample
from llamaray.tokenizer import Tokenizer, train_tokenizer


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "store")
    client = request.getfixturevalue("s3_client")
    client.create_bucket(Bucket="corpus-storage")
    return "s3://corpus-storage/prefix"


def test_compressed_files_keep_their_bytes(root, tmp_path):
    local = tmp_path / "docs.jsonl.gz"
    with gzip.open(local, "wt", encoding="utf-8") as f:
        for i in range(50):
            f.write(json.dumps({"text": f"document {i}"}) + "\n")
    target = storage.join(root, "raw", "docs.jsonl.gz")
    storage.upload(local, target)
    assert storage.read_bytes(target) == local.read_bytes()
    docs = list(iter_file(target, "prose"))
    assert [d.text for d in docs] == [f"document {i}" for i in range(50)]
    copy = storage.download(target, tmp_path / "back.jsonl.gz")
    assert copy.read_bytes() == local.read_bytes()


def test_put_bytes_on_a_pickled_filesystem(root):
    fs, path = storage.filesystem(root)
    again = pickle.loads(pickle.dumps(fs))  # what a Ray task receives
    storage.put_bytes(again, f"{path}/a/b.bin", b"\x1f\x8b not really gzip")
    assert storage.read_bytes(storage.join(root, "a", "b.bin")) == b"\x1f\x8b not really gzip"
    assert storage.list_files(storage.join(root, "a")) == ["b.bin"]


def test_the_stdlib_sample_is_written_to_storage(root):
    paths = write_stdlib_sample(storage.join(root, "sample"), 50_000, seed=0)
    assert sorted(paths) == ["code", "prose"]
    assert storage.list_files(storage.join(root, "sample")) == ["code.jsonl", "prose.jsonl"]
    text = storage.read_text(str(paths["prose"]))
    assert text.count("\n") > 5 and json.loads(text.splitlines()[0])["text"]


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    sample = write_stdlib_sample(out / "sample", 100_000, seed=0)
    return train_tokenizer([sample["prose"]], out / "tok", vocab_size=400).path


def test_a_tokenizer_opens_from_storage_and_pickles_with_its_model(root, tokenizer_file):
    uri = storage.join(root, "tokenizer", "tokenizer.model")
    storage.upload(tokenizer_file, uri)
    tok = Tokenizer.open(uri)
    local = Tokenizer(tokenizer_file)
    text = next(iter_texts([tokenizer_file.parent.parent / "sample" / "prose.jsonl"]))
    assert tok.vocab_size == local.vocab_size == 400
    assert tok.encode(text) == local.encode(text)
    # A copy sent to another node carries the model, not a path that node may not have.
    storage.delete_tree(uri)
    assert pickle.loads(pickle.dumps(tok)).encode(text) == local.encode(text)


def test_tokenizer_location_is_relative_to_the_corpus():
    relative = {"tokenizer": {"path": "tokenizer/tokenizer.model"}}
    assert tokenizer_location("s3://b/c", relative) == "s3://b/c/tokenizer/tokenizer.model"
    assert tokenizer_location("/data/c", relative) == "/data/c/tokenizer/tokenizer.model"
    for old in ("/old/corpus/tokenizer/tokenizer.model", "s3://x/tokenizer.model"):
        assert tokenizer_location("/data/c", {"tokenizer": {"path": old}}) == old
