"""Issue 14's "Done when" on the no-shared-disk cluster, step by step, each one a job sent
with `ray job submit` and a runtime env (the checkout as working dir, S3 and the MLflow
server in the environment):

1. prepare: raw JSONL in S3 -> a corpus in S3 (tokenizer, shards, manifest);
2. pretrain: the debug model, corpus and checkpoints in S3, losses in the MLflow server; its
   two training workers ran on the two worker nodes (Ray's state API: the job's
   `RayTrainWorker` actors and their nodes; 1.5 CPUs a worker on 2-CPU nodes forces it);
3. node loss: the same run again with `train.max_failures=1`; once Ray Train has registered
   its first checkpoint (in S3) a whole worker node is killed (raylet, agents, workers, its
   disk) and replaced by a new node with an empty disk; the run completes on it, resumed
   from S3 (the steps up to that checkpoint logged once), and every loss it logged equals
   the uninterrupted run's, bit for bit;
4. eval of the pretrained run (checkpoint and corpus in S3) into the MLflow server (its
   artifacts land in S3);
5. a short finetune from that run: instructions in S3, the tokenizer a file on the driver's
   node only (the driver puts it in the run's storage for the ranks), a child MLflow run;
6. a 2-trial sweep: trials' runs and the summary in the MLflow server, best.yaml in S3;
   headless Chromium compares the two trials in the server's MLflow UI.

No step reads a path that only the driver has: everything the ranks and actors read is in
S3 or comes from the MLflow server. A step that fails fails the test with the end of its
job's log; the steps after it skip as blocked.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import sysconfig
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytestmark = [pytest.mark.multinode, pytest.mark.ray, pytest.mark.slow]

BUCKET = "pipeline"
STEPS = 10  # the node-loss run must still be training seconds after its first checkpoint
CHUNK_LINES = 60  # raw documents: 60-line pieces of a few standard-library modules
OUTPUT = f"s3://{BUCKET}/runs"
CORPUS = f"s3://{BUCKET}/corpora/corpus"
CHECKPOINTS = "runs/checkpoints"  # keys of the runs' storage (output_dir/checkpoints)
INSTRUCTIONS = f"s3://{BUCKET}/instructions/train.jsonl"
PARENT_TAG = "mlflow.parentRunId"


def _s3(cluster):
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=cluster.s3_endpoint,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )


def _keys(cluster, prefix: str, bucket: str = BUCKET) -> list[str]:
    pages = _s3(cluster).get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


def _submit(cluster, step: str, argv: list[str], **kwargs) -> str:
    """Run one step as a job; fail the test with the end of its log unless it succeeded."""
    rc, logs = cluster.submit(argv, **kwargs)
    if rc != 0:
        pytest.fail(f"{step} job failed (exit {rc}); its log ends:\n{logs[-4000:]}")
    return logs


def _blocked(state, *steps: str) -> None:
    for step in steps:
        if step not in state:
            pytest.skip(f"blocked: the {step} step did not succeed")


def _mlflow(cluster):
    from mlflow.tracking import MlflowClient

    return MlflowClient(cluster.mlflow_uri)


def _run(cluster, name: str):
    """The one MLflow run named `name` on the server."""
    client = _mlflow(cluster)
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(experiments, f"attributes.run_name = '{name}'")
    assert len(runs) == 1, f"{len(runs)} MLflow runs named {name!r}"
    return runs[0]


def _history(cluster, run_id: str, key: str = "loss") -> dict[int, list[float]]:
    """Step -> every value logged at that step (a resumed step is logged again)."""
    out: dict[int, list[float]] = {}
    for m in sorted(_mlflow(cluster).get_metric_history(run_id, key), key=lambda m: m.timestamp):
        out.setdefault(m.step, []).append(m.value)
    return out


def _train_worker_nodes(cluster, submission_id: str) -> list[str]:
    """The node of every Ray Train worker actor the job ever started (alive or dead), from
    Ray's state API."""
    from ray.job_submission import JobSubmissionClient
    from ray.util.state import list_actors

    job_id = JobSubmissionClient(cluster.dashboard_url).get_job_info(submission_id).job_id
    actors = list_actors(
        address=cluster.dashboard_url,
        filters=[("class_name", "=", "RayTrainWorker"), ("job_id", "=", job_id)],
        detail=True,
        limit=1000,
        timeout=60,
        raise_on_missing_output=False,
    )
    return [a.node_id for a in actors]


def _registered_step(s3, name: str) -> int:
    """The step of the run's newest checkpoint that Ray Train has registered (its
    checkpoint manager's snapshot in the run's storage folder), 0 if none: a relaunched
    worker group resumes from it. A step folder already in S3 may not be registered yet."""
    key = f"{CHECKPOINTS}/{name}/checkpoint_manager_snapshot.json"
    try:
        body = s3.get_object(Bucket=BUCKET, Key=key)["Body"].read()
    except s3.exceptions.NoSuchKey:
        return 0
    latest = json.loads(body).get("latest_checkpoint_result") or {}
    return int(latest.get("metrics", {}).get("step", 0))


def _pretrain_argv(name: str, *extra: str) -> list[str]:
    return [
        "python", "jobs/pretrain.py", f"name={name}", f"output_dir={OUTPUT}",
        f"data.corpus={CORPUS}", *_model_overrides(), "train.batch_tokens=512",
        "train.micro_batch_size=4", "train.num_workers=2", "train.cpus_per_worker=1.5",
        f"train.steps={STEPS}", "train.checkpoint_every=2", "train.log_every=1",
        "train.eval_every=0", "tracking.system_metrics=false", *extra,
    ]  # fmt: skip


def _model_overrides() -> list[str]:
    return ["model.preset=debug", "tokenizer.vocab_size=512", "train.seq_len=32"]


@pytest.fixture(scope="module")
def state(no_shared_disk_cluster):
    """Raw sources (JSONL: about 60 pieces of a few standard-library modules, enough
    documents for a validation split) and instructions uploaded to S3, and what each step
    left for the next ones."""
    s3 = _s3(no_shared_disk_cluster)
    s3.create_bucket(Bucket=BUCKET)
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for part, names in enumerate((("argparse", "textwrap"), ("json/decoder", "string"))):
        lines = []
        for n in names:
            text = (stdlib / f"{n}.py").read_text().splitlines()
            for i in range(0, len(text), CHUNK_LINES):
                piece = "\n".join(text[i : i + CHUNK_LINES])
                lines.append(json.dumps({"text": piece, "meta": {"file": n, "line": i + 1}}))
        s3.put_object(
            Bucket=BUCKET, Key=f"raw/prose/part-{part}.jsonl", Body="\n".join(lines).encode()
        )
    demo = Path(__file__).resolve().parents[2] / "jobs" / "data" / "instructions-demo.jsonl"
    head = demo.read_text().splitlines()[:40]
    s3.put_object(Bucket=BUCKET, Key=INSTRUCTIONS.split("/", 3)[3], Body="\n".join(head).encode())
    return {}


def test_prepare_reads_raw_sources_from_s3_and_writes_the_corpus_to_s3(
    no_shared_disk_cluster, state
):
    _submit(
        no_shared_disk_cluster,
        "prepare",
        ["python", "jobs/prepare_corpus.py", "--config", "jobs/configs/corpus-demo.yaml",
         "name=corpus", f"output_dir=s3://{BUCKET}/corpora",
         f"sources.prose=[s3://{BUCKET}/raw/prose/]", "tokenizer.vocab_size=512",
         "seq_len=32", "validation_fraction=0.1", "tokenize_actors=1"],
        timeout=600,
    )  # fmt: skip
    keys = _keys(no_shared_disk_cluster, "corpora/corpus/")
    assert "corpora/corpus/manifest.json" in keys, keys
    manifest = json.loads(
        _s3(no_shared_disk_cluster)
        .get_object(Bucket=BUCKET, Key="corpora/corpus/manifest.json")["Body"]
        .read()
    )
    splits = manifest["sources"]["prose"]["splits"]
    assert splits["train"]["rows"] > 0 and splits["validation"]["rows"] > 0, splits
    assert any(k.endswith(".parquet") for k in keys), keys
    tokenizers = [k for k in keys if k.endswith("tokenizer.model")]
    assert len(tokenizers) == 1, keys
    state["prepare"] = f"s3://{BUCKET}/{tokenizers[0]}"


def test_pretrain_places_one_worker_on_each_node_with_corpus_and_checkpoints_in_s3(
    no_shared_disk_cluster, state
):
    _blocked(state, "prepare")
    cluster = no_shared_disk_cluster
    job = f"pretrain-{uuid.uuid4().hex[:8]}"
    _submit(cluster, "pretrain", _pretrain_argv("p"), timeout=600, submission_id=job)
    run = _run(cluster, "p")
    assert run.info.status == "FINISHED"
    losses = _history(cluster, run.info.run_id)
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert all(len(v) == 1 for v in losses.values()), losses
    keys = _keys(cluster, f"{CHECKPOINTS}/p/")
    assert any(f"/step-{STEPS:08d}/" in k for k in keys), keys[:50]  # checkpoints in S3
    assert any(k.startswith(f"{CHECKPOINTS}/p/hf/") for k in keys), keys[:50]  # the export
    # Rank 0 on a worker node logged the run's artifacts through the server into S3.
    artifacts = {a.path for a in _mlflow(cluster).list_artifacts(run.info.run_id)}
    assert {"config.yaml", "loss_curve.png", "model", "tokenizer"} <= artifacts, artifacts
    stored = [k for k in _keys(cluster, "runs/", bucket="mlflow-artifacts") if run.info.run_id in k]
    for name in ("loss_curve.png", "model.safetensors"):
        assert any(k.endswith(f"/{name}") for k in stored), (name, stored)
    # Where the two training workers ran: one on each worker node (none on the head).
    placed = _train_worker_nodes(cluster, job)
    assert sorted(placed) == sorted(n.node_id for n in cluster.nodes), placed
    state["pretrain"] = {"run_id": run.info.run_id, "losses": losses}


def test_killed_node_is_replaced_and_the_run_resumes_from_s3_with_equal_losses(
    no_shared_disk_cluster, state
):
    _blocked(state, "pretrain")
    cluster, name = no_shared_disk_cluster, "p-node-loss"
    job = f"node-loss-{uuid.uuid4().hex[:8]}"
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(
            cluster.submit,
            _pretrain_argv(name, "train.max_failures=1"),
            # Ray Train waits this long for a new worker group's placement before it tries
            # again (60 s by default): the replacement node is used seconds after it joins.
            runtime_env=cluster.runtime_env({"RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "10"}),
            timeout=900,
            submission_id=job,
        )
        s3, deadline = _s3(cluster), time.monotonic() + 600
        while not running.done() and not (registered := _registered_step(s3, name)):
            assert time.monotonic() < deadline, f"no checkpoint of {name} registered in 600 s"
            time.sleep(0.2)
        if running.done():
            rc, logs = running.result()
            pytest.fail(
                f"the run ended (exit {rc}) before a registered checkpoint was seen, so no "
                f"node was killed mid-run; its log ends:\n{logs[-3000:]}"
            )
        killed = cluster.nodes[1].node_id
        cluster.kill_node(1)  # the whole node: raylet, agents, the training worker, its disk
        replacement = cluster.restart_node(1)  # an empty disk: only S3 has the checkpoint
        rc, logs = running.result()
    if rc != 0:
        pytest.fail(f"the node-loss run failed (exit {rc}); its log ends:\n{logs[-4000:]}")
    run = _run(cluster, name)
    assert run.info.status == "FINISHED"
    losses = _history(cluster, run.info.run_id)
    expected = state["pretrain"]["losses"]
    assert sorted(losses) == list(range(1, STEPS + 1)), losses
    # Resumed from the checkpoint registered before the kill (or a later one), not from
    # scratch: the steps up to it ran once.
    assert all(len(losses[s]) == 1 for s in range(1, registered + 1)), (registered, losses)
    assert registered < STEPS, "the kill came after the last checkpoint: nothing was resumed"
    for step, values in losses.items():
        assert all(v == expected[step][0] for v in values), (step, values, expected[step])
    # A second worker group was started, on the replacement node (and the surviving one).
    placed = _train_worker_nodes(cluster, job)
    assert killed in placed and replacement.node_id in placed, (placed, killed)
    assert len(placed) >= 4, placed
    state["node loss"] = True


def test_eval_of_the_pretrained_run_goes_to_the_mlflow_server(no_shared_disk_cluster, state):
    _blocked(state, "pretrain")
    cluster = no_shared_disk_cluster
    _submit(
        cluster,
        "eval",
        ["python", "jobs/evaluate.py", "--task", "jobs/tasks/stdlib-modules", "--limit", "4",
         "--perplexity-rows", "4", "--workers", "2", "--cpus-per-worker", "0.5",
         "name=p", f"output_dir={OUTPUT}", f"data.corpus={CORPUS}", *_model_overrides()],
        timeout=600,
    )  # fmt: skip
    parent = state["pretrain"]["run_id"]
    run = _run(cluster, f"p-eval-step-{STEPS}")
    assert run.data.tags.get(PARENT_TAG) == parent
    metrics = run.data.metrics
    assert any(k.startswith("eval/stdlib-modules/") for k in metrics), metrics
    assert any(k.startswith("ppl/") for k in metrics), metrics
    # Its artifacts went through the server into S3 (the server's artifact bucket).
    artifacts = [a.path for a in _mlflow(cluster).list_artifacts(run.info.run_id)]
    assert "results.json" in artifacts, artifacts
    stored = _keys(cluster, "runs/", bucket="mlflow-artifacts")
    assert any(k.endswith(f"{run.info.run_id}/artifacts/results.json") for k in stored), stored
    state["eval"] = True


def test_finetune_from_the_pretrained_run_with_a_driver_local_tokenizer(
    no_shared_disk_cluster, state
):
    _blocked(state, "pretrain")
    cluster = no_shared_disk_cluster
    # The tokenizer as a file only the driver's node (the head) has: /tmp is private there.
    local = "/tmp/finetune-tokenizer/tokenizer.model"
    fetch = "import sys; from llamaray import storage; storage.download(*sys.argv[1:])"
    finetune = [
        "python", "jobs/finetune.py", "name=ft", f"output_dir={OUTPUT}", "model.preset=debug",
        "finetune.base=p", f"finetune.train_file={INSTRUCTIONS}", f"finetune.tokenizer={local}",
        "finetune.validation_fraction=0.25", "optimizer.lr=3e-4", "optimizer.warmup_steps=1",
        "train.seq_len=128", "train.batch_tokens=512", "train.micro_batch_size=2",
        "train.num_workers=2", "train.cpus_per_worker=0.5", "train.steps=2",
        "train.checkpoint_every=2", "train.log_every=1", "train.eval_every=2",
        "tracking.system_metrics=false",
    ]  # fmt: skip
    command = (
        f"{shlex.join(['python', '-c', fetch, state['prepare'], local])} && {shlex.join(finetune)}"
    )
    _submit(cluster, "finetune", ["sh", "-c", command], timeout=600)
    run = _run(cluster, "ft")
    assert run.info.status == "FINISHED"
    assert run.data.tags.get(PARENT_TAG) == state["pretrain"]["run_id"]
    assert sorted(_history(cluster, run.info.run_id)) == [1, 2]
    assert "val_loss" in run.data.metrics
    keys = _keys(cluster, f"{CHECKPOINTS}/ft/")
    # The ranks read the driver's tokenizer from the run's storage, where the driver put it.
    copied = f"{CHECKPOINTS}/ft/base-tokenizer/tokenizer.model"
    assert copied in keys, keys
    s3 = _s3(cluster)
    corpus_tokenizer = state["prepare"].split("/", 3)[3]
    assert (
        s3.get_object(Bucket=BUCKET, Key=copied)["Body"].read()
        == s3.get_object(Bucket=BUCKET, Key=corpus_tokenizer)["Body"].read()
    )
    assert any("/step-00000002/" in k for k in keys), keys
    assert f"{CHECKPOINTS}/ft/hf/tokenizer.model" in keys, keys  # rank 0's export, in S3
    state["finetune"] = True


def test_two_trial_sweep_reports_to_the_mlflow_server_and_s3(no_shared_disk_cluster, state):
    _blocked(state, "pretrain")
    cluster = no_shared_disk_cluster
    _submit(
        cluster,
        "sweep",
        ["python", "jobs/sweep.py", "name=sw", f"output_dir={OUTPUT}", f"data.corpus={CORPUS}",
         *_model_overrides(), "train.batch_tokens=512", "train.micro_batch_size=4",
         "train.num_workers=2", "train.cpus_per_worker=0.5", "train.steps=2",
         "train.eval_every=2", "train.checkpoint_every=2", "train.log_every=1",
         "data.eval_rows=4", "tracking.system_metrics=false", "sweep.num_samples=1",
         "sweep.batch_tokens=[512]", "sweep.lr.values=[0.001, 0.003]"],
        timeout=600,
    )  # fmt: skip
    parent = _run(cluster, "sw")
    client = _mlflow(cluster)
    trials = client.search_runs(
        [parent.info.experiment_id], f"tags.`{PARENT_TAG}` = '{parent.info.run_id}'"
    )
    assert len(trials) == 2, [t.info.run_name for t in trials]
    assert sorted(float(t.data.params["optimizer.lr"]) for t in trials) == [0.001, 0.003]
    for trial in trials:
        assert sorted(_history(cluster, trial.info.run_id)) == [1, 2], trial.info.run_name
        assert "val_loss" in trial.data.metrics, trial.info.run_name
    assert "best.yaml" in [a.path for a in client.list_artifacts(parent.info.run_id)]
    assert "runs/sweeps/sw/best.yaml" in _keys(cluster, "runs/sweeps/sw/")
    assert _keys(cluster, f"{CHECKPOINTS}/sw/"), "no Tune experiment state in S3"
    state["sweep"] = {"experiment": parent.info.experiment_id, "trials": trials}


def test_mlflow_ui_compares_the_sweep_trials_in_chromium(no_shared_disk_cluster, state, tmp_path):
    """Headless Chromium opens the MLflow UI's comparison of the sweep's two trials, as a
    user of the cluster's tracking server would."""
    _blocked(state, "sweep")
    sync_api = pytest.importorskip("playwright.sync_api")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("no chromium on PATH (make test installs Debian's chromium where it can)")
    sweep = state["sweep"]
    ids = json.dumps([t.info.run_id for t in sweep["trials"]])
    url = (
        f"{no_shared_disk_cluster.mlflow_uri}/#/compare-runs?runs={ids}"
        f"&experiments={json.dumps([sweep['experiment']])}"
    )
    shot = Path(os.environ.get("LLAMARAY_SCREENSHOT_DIR", tmp_path)) / "mlflow-compare.png"
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(url)
            for trial in sweep["trials"]:  # the comparison names both runs
                page.get_by_text(trial.info.run_name).first.wait_for(timeout=60_000)
            page.get_by_text("optimizer.lr").first.wait_for(timeout=60_000)
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    assert shot.stat().st_size > 10_000
