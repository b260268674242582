"""The one filesystem layer (`llamaray.storage`): the same calls on a local folder and on
S3 (moto's server on loopback), so a path means the same thing to every process."""

import pyarrow.fs
import pytest

from llamaray import storage


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "store")
    client = request.getfixturevalue("s3_client")
    client.create_bucket(Bucket="storage-unit")
    return "s3://storage-unit/prefix"


def test_write_read_list_and_delete(root):
    target = storage.join(root, "a", "b.txt")
    assert not storage.exists(target)
    storage.write_text(target, "hello\n")
    storage.write_bytes(storage.join(root, "c.bin"), b"\x00\x01")
    assert storage.exists(target)
    assert storage.read_text(target) == "hello\n"
    assert storage.list_files(root) == ["a/b.txt", "c.bin"]
    storage.delete_tree(storage.join(root, "a"))
    assert storage.list_files(root) == ["c.bin"]
    assert storage.list_files(storage.join(root, "missing")) == []


def test_a_missing_file_is_named(root):
    with pytest.raises(FileNotFoundError, match=r"nope\.txt"):
        storage.read_bytes(storage.join(root, "nope.txt"))
    with pytest.raises(FileNotFoundError, match="nope"):
        storage.download(storage.join(root, "nope"), "/tmp/never-written")


def test_folders_round_trip_through_upload_and_download(root, tmp_path):
    src = tmp_path / "src"
    (src / "deep").mkdir(parents=True)
    (src / "deep" / "x.bin").write_bytes(b"x" * 70_000)
    (src / "y.txt").write_text("y")
    storage.upload(src, storage.join(root, "folder"))
    assert storage.list_files(storage.join(root, "folder")) == ["deep/x.bin", "y.txt"]
    back = storage.download(storage.join(root, "folder"), tmp_path / "back")
    assert (back / "deep" / "x.bin").read_bytes() == b"x" * 70_000
    assert (back / "y.txt").read_text() == "y"


def test_local_copy_is_a_readable_file_that_s3_cleans_up(root):
    uri = storage.join(root, "tok", "tokenizer.model")
    storage.write_bytes(uri, b"model bytes")
    with storage.local_copy(uri) as path:
        assert path.read_bytes() == b"model bytes"
        seen = path
    assert seen.exists() == (not storage.is_s3(root))


def test_s3_uses_the_retrying_filesystem_of_this_environment(s3_client):
    fs, path = storage.filesystem("s3://bucket/key/")
    assert isinstance(fs, storage.S3Storage)
    assert fs.max_attempts == storage.S3_MAX_ATTEMPTS
    assert path == "bucket/key"
    assert storage.filesystem("s3://other/x")[0] is fs  # one client per environment
    local, _ = storage.filesystem("relative/dir")
    assert isinstance(local, pyarrow.fs.LocalFileSystem)
    with pytest.raises(ValueError, match="gs://"):
        storage.filesystem("gs://bucket/x")
