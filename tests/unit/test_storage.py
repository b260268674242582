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


# ------------------------------------------------------------------ the retry policy


def test_transient_and_permanent_s3_errors_as_pyarrow_words_them():
    transient = [
        "AWS Error SLOW_DOWN during ListObjectsV2 operation: Please reduce your request rate.",
        "AWS Error UNKNOWN (HTTP status 503) during HeadObject operation: No response body.",
        "AWS Error UNKNOWN (HTTP status 429) during GetObject operation: TooManyRequests",
        "AWS Error NETWORK_CONNECTION during GetObject operation: curlCode: 52, Empty reply",
        "AWS Error INTERNAL_FAILURE during GetObject operation: Failed to flush response stream",
    ]
    permanent = [
        "AWS Error ACCESS_DENIED during HeadObject operation: No response body.",
        "AWS Error RESOURCE_NOT_FOUND during GetObject operation: ",
        "AWS Error UNKNOWN (HTTP status 400) during GetObject operation: Bad Request",
        "Couldn't deserialize thrift: TProtocolException: Invalid data",
    ]
    assert [storage.is_transient(OSError(m)) for m in transient] == [True] * len(transient)
    assert [storage.is_transient(OSError(m)) for m in permanent] == [False] * len(permanent)
    assert not storage.is_transient(FileNotFoundError("AWS Error SLOW_DOWN"))
    assert not storage.is_transient(ValueError("AWS Error SLOW_DOWN"))


def test_retry_gives_up_with_storage_unavailable_and_lets_permanent_errors_through():
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise OSError("AWS Error SLOW_DOWN during GetObject operation")
        return "ok"

    assert storage.retry(flaky, "x", attempts=3) == "ok" and len(calls) == 3
    calls.clear()
    with pytest.raises(storage.StorageUnavailable, match="x: S3 failed 2 times") as err:
        storage.retry(flaky, "x", attempts=2)
    assert not isinstance(err.value, OSError)  # never read as a bad record
    calls.clear()

    def denied():
        calls.append(1)
        raise OSError("AWS Error ACCESS_DENIED during GetObject operation")

    with pytest.raises(OSError, match="ACCESS_DENIED"):
        storage.retry(denied, "x", attempts=5)
    assert len(calls) == 1


@pytest.mark.slow  # make test only: retries until they give up
def test_storage_reads_and_listings_ride_out_transient_errors(
    s3_client, s3_endpoint, monkeypatch, tmp_path
):
    """read_bytes, exists, list_files and download through FaultyS3: each request kind fails
    first with a 503, a reset and a 503 (more than the 3 attempts of one SDK round
    absorb when pyarrow cannot read the error answer to a small GET)."""
    from s3_faults import FaultyS3

    s3_client.create_bucket(Bucket="storage-faults")
    s3_client.put_object(Bucket="storage-faults", Key="run/state.json", Body=b'{"step": 7}')
    proxy = FaultyS3(s3_endpoint)
    try:
        monkeypatch.setattr(storage, "_ADOPTED_S3", None)
        storage.adopt_s3(storage.S3Storage(proxy.url, "us-east-1", max_attempts=3))
        answers = [(503, "SlowDown", False), (0, "reset", False), (503, "SlowDown", False)]
        proxy.reset(lambda method, key, query, n: answers[n - 1] if n <= 3 else None)
        uri = "s3://storage-faults/run/state.json"
        assert storage.read_bytes(uri) == b'{"step": 7}'
        assert storage.exists(uri)
        assert storage.list_files("s3://storage-faults/run") == ["state.json"]
        assert storage.download(uri, tmp_path / "state.json").read_bytes() == b'{"step": 7}'
        assert len(proxy.faults(503)) >= 2  # HEAD, GET and listing were each refused
        with pytest.raises(FileNotFoundError):
            storage.read_bytes("s3://storage-faults/run/none.json")
    finally:
        proxy.close()
