"""Issue 14's "Done when" on the no-shared-disk cluster, step by step, through `ray job
submit`: prepare (raw sources in S3, output to S3) -> pretrain (2 workers on 2 nodes,
corpus and checkpoints in S3, tracking on the MLflow server). One worker per node is
forced by 1.5 CPUs per worker on 2-CPU nodes; the placement itself is not asserted yet.

Work in progress: a step that fails is marked xfail with the error it hit (other changes
for issue 14 are landing); later steps then xfail as blocked. Still to add: kill a worker
node mid-run and compare losses bit for bit with the uninterrupted run, eval, finetune and
a 2-trial sweep.
"""

from __future__ import annotations

import json
import re
import sysconfig
from pathlib import Path

import pytest

pytestmark = [pytest.mark.multinode, pytest.mark.ray, pytest.mark.slow]

BUCKET = "pipeline"
STEPS = 6


def _s3(cluster):
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=cluster.s3_endpoint,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )


def _error(logs: str) -> str:
    """The last error-looking line of a job's logs: what the xfail names."""
    lines = [ln for ln in logs.splitlines() if re.search(r"Error|error:|Exception|failed", ln)]
    return (lines[-1] if lines else logs.strip().splitlines()[-1] if logs.strip() else "")[:400]


@pytest.fixture(scope="module")
def state(no_shared_disk_cluster):
    """Raw sources uploaded to S3 (JSONL from the standard library's modules), and the
    outcome of each step so far."""
    s3 = _s3(no_shared_disk_cluster)
    s3.create_bucket(Bucket=BUCKET)
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for part, names in enumerate((("argparse", "textwrap"), ("json/decoder", "string"))):
        lines = [
            json.dumps({"text": (stdlib / f"{n}.py").read_text(), "meta": {"file": n}})
            for n in names
        ]
        s3.put_object(
            Bucket=BUCKET, Key=f"raw/prose/part-{part}.jsonl", Body="\n".join(lines).encode()
        )
    return {}


def _blocked(state, step):
    if step not in state:
        pytest.xfail(f"blocked: the {step} step did not succeed")


def test_prepare_reads_raw_sources_from_s3_and_writes_the_corpus_to_s3(
    no_shared_disk_cluster, state
):
    rc, logs = no_shared_disk_cluster.submit(
        ["python", "jobs/prepare_corpus.py", "--config", "jobs/configs/corpus-demo.yaml",
         "name=corpus", f"output_dir=s3://{BUCKET}/corpora",
         f"sources.prose=[s3://{BUCKET}/raw/prose/]", "tokenizer.vocab_size=512",
         "seq_len=32", "validation_fraction=0.05", "tokenize_actors=1"],
        timeout=600,
    )  # fmt: skip
    if rc != 0:
        pytest.xfail(f"prepare fails: {_error(logs)}")
    keys = [
        o["Key"]
        for o in _s3(no_shared_disk_cluster)
        .list_objects_v2(Bucket=BUCKET, Prefix="corpora/corpus/")
        .get("Contents", [])
    ]
    assert any(k.endswith("manifest.json") for k in keys), keys
    assert any(k.endswith(".parquet") for k in keys), keys
    state["prepare"] = f"s3://{BUCKET}/corpora/corpus"


def test_pretrain_on_two_nodes_with_corpus_and_checkpoints_in_s3(no_shared_disk_cluster, state):
    from mlflow.tracking import MlflowClient

    _blocked(state, "prepare")
    rc, logs = no_shared_disk_cluster.submit(
        ["python", "jobs/pretrain.py", "name=p",  # the defaults: proportions from the corpus
         f"output_dir=s3://{BUCKET}/runs", f"data.corpus={state['prepare']}",
         "model.preset=debug", "tokenizer.vocab_size=512", "train.seq_len=32",
         "train.batch_tokens=512", "train.micro_batch_size=4", "train.num_workers=2",
         "train.cpus_per_worker=1.5", f"train.steps={STEPS}", "train.checkpoint_every=2",
         "train.log_every=1", "train.eval_every=0", "tracking.system_metrics=false"],
        timeout=600,
    )  # fmt: skip
    if rc != 0:
        pytest.xfail(f"pretrain fails: {_error(logs)}")
    client = MlflowClient(no_shared_disk_cluster.mlflow_uri)
    # 1.5 CPUs per worker and 2 per node: one worker per node.
    runs = client.search_runs(
        [e.experiment_id for e in client.search_experiments()], "attributes.run_name = 'p'"
    )
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    losses = client.get_metric_history(runs[0].info.run_id, "loss")
    assert [m.step for m in losses] == list(range(1, STEPS + 1))
    listing = _s3(no_shared_disk_cluster).list_objects_v2(Bucket=BUCKET, Prefix="runs/")
    keys = [o["Key"] for o in listing.get("Contents", [])]
    assert any(f"step-{STEPS:08d}/" in k for k in keys), keys[:50]  # checkpoints in S3
    state["pretrain"] = [m.value for m in losses]
