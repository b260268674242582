"""Pretraining with `storage=s3://...`: checkpoints on moto's S3 server (a real HTTP S3 API
on 127.0.0.1, see tests/conftest.py), resumed from there, through S3 throttling (503
SlowDown) and past an upload that failed.

Throttling and failures come from `FaultyS3`, an HTTP proxy in front of moto running as a
thread of this process on 127.0.0.1. Runs are routed through it by pointing
AWS_ENDPOINT_URL at it before `pretrain()`: the driver resolves the endpoint, and the S3
filesystem it hands to Ray Train carries it into the controller and the workers (which
the shared Ray cluster started without any AWS_* variable).
"""

from __future__ import annotations

import pickle
import re
import tempfile
from pathlib import Path

import pyarrow.fs
import pytest
from mlflow import MlflowClient
from pretrain_helpers import STEPS, config, history

import llamaray.storage
from llamaray.orchestrate.failure_notes import FAILURES_TAG
from llamaray.orchestrate.pretrain import pretrain
from llamaray.storage import S3Storage, upload_directory
from llamaray.train.checkpoint import verify_checkpoint
from s3_faults import FaultyS3

pytestmark = pytest.mark.ray

BUCKET = "llamaray-checkpoints"
CHECKPOINT_FILES = {
    ".metadata",
    "train_state.json",
    *(f"{kind}-{r}.{ext}" for r in (0, 1) for kind, ext in (("rng", "pt"), ("integrity", "json"))),
    "__0_0.distcp",
    "__1_0.distcp",
}


# ------------------------------------------------------------------ S3 with faults


# ------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def s3(s3_endpoint, aws_test_env):
    """A bucket on moto, with this module's environment pointing S3 clients at it."""
    import boto3

    with pytest.MonkeyPatch.context() as mp:
        for name in ("AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
            mp.delenv(name, raising=False)
        for name, value in aws_test_env.items():
            mp.setenv(name, value)
        mp.setenv("AWS_ENDPOINT_URL", s3_endpoint)
        client = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
        client.create_bucket(Bucket=BUCKET)
        yield client


@pytest.fixture(scope="module")
def faulty(s3_endpoint):
    proxy = FaultyS3(s3_endpoint)
    yield proxy
    proxy.close()


def step_folders(client, prefix: str) -> dict[str, set[str]]:
    """{step folder: its object names} under s3://BUCKET/prefix/."""
    out: dict[str, set[str]] = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix):
        for obj in page.get("Contents", []):
            folder, _, name = obj["Key"][len(prefix) :].partition("/")
            if folder.startswith("step-") and name:
                out.setdefault(folder, set()).add(name)
    return out


def download(client, prefix: str, dest: Path) -> Path:
    dest.mkdir(parents=True)
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix):
        for obj in page.get("Contents", []):
            if not obj["Key"].endswith("/"):
                client.download_file(BUCKET, obj["Key"], str(dest / obj["Key"][len(prefix) :]))
    return dest


def counts(result) -> list[int]:
    losses = history(result)
    return [len(losses.get(step, [])) for step in range(1, STEPS + 1)]


# ------------------------------------------------------------------ tests


def test_filesystem_keeps_endpoint_retries_and_env_credentials_when_pickled(s3, monkeypatch):
    fs = S3Storage.from_env()
    attempts = llamaray.storage.S3_MAX_ATTEMPTS
    assert fs.endpoint.startswith("http://127.0.0.1:") and fs.max_attempts == attempts
    assert "testing" not in repr(fs)  # no credentials in what Ray Train shows of it
    # A process without AWS_* variables (a Ray Train worker) gets the driver's settings.
    blob = pickle.dumps(fs)
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(name)
    remote = pickle.loads(blob)
    assert (remote.endpoint, remote.max_attempts) == (fs.endpoint, attempts)
    remote.create_dir(f"{BUCKET}/pickled")
    with remote.open_output_stream(f"{BUCKET}/pickled/x.json") as f:
        f.write(b"{}")  # unsigned, the body would be stored aws-chunked: not b"{}"
    assert s3.get_object(Bucket=BUCKET, Key="pickled/x.json")["Body"].read() == b"{}"


def test_upload_directory_raises_where_copy_files_does_not(s3, faulty, tmp_path):
    """An object whose multipart upload cannot be completed: pyarrow.fs.copy_files, Ray
    Train's default checkpoint upload, drops the error; llamaray.storage's upload raises."""
    local = tmp_path / "checkpoint"
    local.mkdir()
    (local / "a.json").write_text("{}")
    (local / "b.distcp").write_bytes(b"b" * 3000)
    faulty.reset(lambda method, key, query, n: (
        (500, "InternalError", False)
        if method == "POST" and key.endswith("/b.distcp") and "uploadId=" in query
        else None
    ))  # fmt: skip
    fs = S3Storage(faulty.url, "us-east-1", max_attempts=2)
    pyarrow.fs.copy_files(
        str(local), f"{BUCKET}/upload/copy_files", destination_filesystem=fs, use_threads=False
    )  # no error: that is the bug worked around
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET, Prefix="upload/")["Contents"]}
    assert "upload/copy_files/b.distcp" not in keys and "upload/copy_files/a.json" in keys

    with pytest.raises(OSError, match="CompleteMultipartUpload"):
        upload_directory(local, fs, f"{BUCKET}/upload/ours")
    faulty.reset()
    upload_directory(local, fs, f"{BUCKET}/upload/ours")
    body = s3.get_object(Bucket=BUCKET, Key="upload/ours/b.distcp")["Body"].read()
    assert body == b"b" * 3000


# Ray Train uploads with pyarrow.fs.copy_files unless told otherwise, and that drops the
# error (see test_upload_directory_raises_where_copy_files_does_not); RayLauncher passes
# checkpoint_upload_fn=llamaray.orchestrate.ray_worker.upload_checkpoint, which raises.
def test_s3_faults_lose_nothing(s3, faulty, root, reference, monkeypatch):
    """Two launches through S3 faults, each a fault a long run meets:

    1. At step 2 every part upload of a DCP shard is first answered 503 SlowDown 3 times
       (beyond pyarrow's default of 3 attempts: the workers retry with llamaray.storage's
       strategy), train_state.json once. At step 6 the request completing rank 1's last
       object (its integrity record) reaches S3, but every answer to it is a 500: the
       folder in S3 is complete and would verify, yet the launch fails and Ray Train never
       registers it.
    2. Step 4, the newest registered checkpoint, then loses an object (as an upload whose
       error was dropped leaves it). The relaunch (a new `pretrain()` of the same name,
       which finds the checkpoints through Ray Train's registry in S3), its downloads
       slowed down too, passes over step 4 and does not take step 6: it resumes from step
       2. At step 5 its rank 1 dies (`faults.kill_rank`, `train.max_failures=1`): Ray
       Train replaces the worker group, which resumes from the step 4 the relaunch saved
       again. Every loss logged equals the uninterrupted run's, bit for bit, and the
       exported model is in S3, not on rank 0's disk."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", faulty.url)
    # 4 attempts: 3 slowdowns are survived, 4 answers of 500 fail the upload in seconds.
    monkeypatch.setattr(llamaray.storage, "S3_MAX_ATTEMPTS", 4)
    prefix = f"/{BUCKET}/faults/faults/step-"
    record = f"{prefix}00000006/integrity-1.json"

    def slow_down(method, key, query, n):
        # pyarrow does not retry a throttled read of an object smaller than the error's
        # body (train_state.json); ray_worker._local_dir downloads it again.
        shard, state = key.endswith(".distcp"), key.endswith("/train_state.json")
        limit = 3 if shard else 1 if state else 0
        # Uploads only at the first checkpoint (3 slowdowns cost ~3.5 s of backoff, and
        # the step waits on them); downloads at every step the relaunch reads.
        throttled = method == "GET" or (method == "PUT" and key.startswith(f"{prefix}00000002/"))
        if throttled and key.startswith(prefix) and n <= limit:
            return 503, "SlowDown", False
        return None

    def first_launch(method, key, query, n):
        if method == "POST" and key == record and "uploadId=" in query:
            return 500, "InternalError", True
        return slow_down(method, key, query, n)

    faulty.reset(first_launch)
    storage = f"storage=s3://{BUCKET}/faults"
    with pytest.raises(Exception, match="CompleteMultipartUpload"):
        pretrain(config(root, "faults", storage))
    slowed = faulty.faults(503, "PUT")
    for step in (2, 4, 6):
        for name in ("__0_0.distcp", "__1_0.distcp", "train_state.json"):
            key = f"{prefix}{step:08d}/{name}"
            expected = (3 if name.endswith(".distcp") else 1) if step == 2 else 0
            assert slowed[key] == expected, key
    assert faulty.faults(500)[record] >= 4  # retried, then given up
    folders = step_folders(s3, "faults/faults/")
    assert folders == {f"step-{s:08d}": CHECKPOINT_FILES for s in (2, 4, 6)}
    for step in (2, 4, 6):  # all complete; step 6 would load, if anything picked it
        local = download(s3, f"faults/faults/step-{step:08d}/", root / f"faults-{step}")
        assert verify_checkpoint(local).step == step

    s3.delete_object(Bucket=BUCKET, Key="faults/faults/step-00000004/__1_0.distcp")
    faulty.reset(lambda method, key, query, n: method == "GET" and slow_down(method, key, query, n))
    kill_then_hang = [
        "train.max_failures=2", "train.hang_timeout_s=4",
        "faults.kill_rank=1", "faults.kill_at_step=5",
        "faults.stop_rank=1", "faults.stop_at_step=5",
    ]  # fmt: skip
    restores_before = set(Path(tempfile.gettempdir()).glob("llamaray-restore-*"))
    again = pretrain(config(root, "faults", storage, *kill_then_hang))
    assert again.step == STEPS
    # 1..6 by the first launch; 3..5 by the relaunch, from step 2, whose rank 1 died
    # before checkpointing step 6; 5 again by the replacement group, from step 4, whose
    # rank 1 then froze; 5 again and 6 by the third group, from step 4.
    assert counts(again) == [1, 1, 2, 2, 4, 2]
    # Each failure named, with its rank and step, in the run's MLflow run: the first
    # launch's failed upload, then this launch's kill and hang (a peer of the killed rank
    # may fail too, its collective cut off: a note of its own).
    tags = MlflowClient(again.tracking_uri).get_run(again.mlflow_run_id).data.tags
    notes = [n for n in tags[FAILURES_TAG].splitlines() if n.startswith("worker rank 1 ")]
    assert len(notes) == 3, tags[FAILURES_TAG]
    assert "CompleteMultipartUpload" in notes[0]
    # The step named is the last report the controller took: the relaunch's start (2) or
    # its checkpoint of step 4 (a report the killed worker queued may not have been taken
    # yet when the controller learns of the failure); never one before the relaunch. The
    # replacement group resumed from step 4, and rank 1 froze at step 5: if it froze
    # before the controller took the group's start report, the note says so, naming the
    # newest resume point the controller saw (the relaunch's start, 2, or its step 4).
    killed = r"worker rank 1 failed after step [24] .*: A worker health check failed"
    assert re.match(killed, notes[1]), notes
    hung = (r"worker rank 1 failed (after step 4 \(.*\)|before its group's first report "
            r"\(the newest resume point seen: step [24]\)): it stopped answering for over "
            r"train\.hang_timeout_s=4s$")  # fmt: skip
    assert re.match(hung, notes[2]), notes
    # Every resume read the checkpoint in place: no download folder on the node, and each
    # shard's tensors fetched once per resume by the two ranks together (step 2 was loaded
    # once; a download per rank fetched every shard twice). Entries both ranks load (the
    # optimizer's non-tensor state, kept once in one rank's file) are fetched by each:
    # 5% of rank 1's file here.
    assert set(Path(tempfile.gettempdir()).glob("llamaray-restore-*")) == restores_before
    for name in ("__0_0.distcp", "__1_0.distcp"):
        key = f"{prefix}00000002/{name}"
        size = (root / "faults-2" / name).stat().st_size  # pruned from S3 since
        assert size <= faulty.bytes_read[key] <= 1.1 * size, (key, faulty.bytes_read[key], size)
    for key in ("loss", "rows_crc"):  # every value the same as the reference's, same rows
        expected = {s: set(v) for s, v in history(reference, key).items()}
        assert sorted(expected) == list(range(1, STEPS + 1)), key
        assert {s: set(v) for s, v in history(again, key).items()} == expected, key
    # The fault fired once; its marker is in the run's storage, where the new group saw it.
    markers = s3.list_objects_v2(Bucket=BUCKET, Prefix="faults/faults/.faults/")["Contents"]
    assert sorted(o["Key"] for o in markers if not o["Key"].endswith("/")) == [
        "faults/faults/.faults/killed-rank1-step5",
        "faults/faults/.faults/stopped-rank1-step5",
    ]
    # The exported model is in the run's storage, and nothing of the run on local disk.
    assert again.model_uri == f"s3://{BUCKET}/faults/faults/hf"
    listed = s3.list_objects_v2(Bucket=BUCKET, Prefix="faults/faults/hf/")["Contents"]
    assert {"config.json", "model.safetensors", "tokenizer.model"} <= {
        o["Key"].rsplit("/", 1)[-1] for o in listed
    }
    assert not (root / "faults").exists() and not (root / "checkpoints" / "faults").exists()
    slowed = faulty.faults(503, "GET")
    for step in (4, 2):  # step 4 was fetched and rejected, step 2 fetched and loaded
        assert slowed[f"{prefix}{step:08d}/__0_0.distcp"] == 3, step
        assert slowed[f"{prefix}{step:08d}/train_state.json"] == 1, step
