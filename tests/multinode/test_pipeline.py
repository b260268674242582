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
5. a finetune of that run that lowers its held-out response loss: instructions in S3, the
   tokenizer a file on the driver's node only (the driver puts it in the run's storage for
   the ranks), a child MLflow run;
6. a 2-trial sweep whose driver is killed in the middle of the first trial and submitted
   again: it resumes from Tune's state in S3, ASHA's rungs included, and stops the second
   trial at its first rung, as it would have without the kill; trials' runs and the
   summary in the MLflow server, best.yaml in S3; headless Chromium compares the trials in
   the server's MLflow UI.

No step reads a path that only the driver has: everything the ranks and actors read is in
S3 or comes from the MLflow server. A step that fails fails the test with the end of its
job's log; the steps after it skip as blocked.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from matplotlib import image

from llamaray.config import load_config
from llamaray.tracking import PARENT_TAG, RUN_NAME_TAG, dataset_inputs

REPO = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.multinode, pytest.mark.ray, pytest.mark.slow]

BUCKET = "pipeline"
STEPS = 10  # the node-loss run must still be training seconds after its first checkpoint
CHUNK_LINES = 60  # raw documents: 60-line pieces of a few standard-library modules
OUTPUT = f"s3://{BUCKET}/runs"
CORPUS = f"s3://{BUCKET}/corpora/corpus"
CHECKPOINTS = "runs/checkpoints"  # keys of the runs' storage (output_dir/checkpoints)
INSTRUCTIONS = f"s3://{BUCKET}/instructions/train.jsonl"
FINETUNE_STEPS = 30
SWEEP_STEPS, SWEEP_CHECKPOINT_EVERY = 16, 4  # ASHA's rungs at steps 2, 4 and 8
SWEEP_SLOW_STEP_S = 0.75  # the first trial spends >= 8 s between its first checkpoint and end
SWEEP_LRS = [3e-3, 1e-5]
"""Tried in this order. The driver is killed while the first (3e-3) trains. 1e-5 barely
moves the weights in 2 steps: at the first rung its loss is far above the first trial's,
so ASHA stops it there, by the first trial's score that ASHA recorded before the kill."""


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
    # The project's generated instruction set (jobs/data/make_instructions.py), 400 examples.
    with tempfile.TemporaryDirectory() as tmp:
        made = Path(tmp) / "instructions.jsonl"
        subprocess.run(
            [sys.executable, str(REPO / "jobs" / "data" / "make_instructions.py"),
             "--out", str(made), "--n", "400", "--seed", "0"],
            check=True, capture_output=True,
        )  # fmt: skip
        s3.put_object(Bucket=BUCKET, Key=INSTRUCTIONS.split("/", 3)[3], Body=made.read_bytes())
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
    assert {"config.yaml", "loss_curve.png", "tokenizer"} <= artifacts, artifacts
    # ... and its final model, registered as the run's name, its weights in S3 too.
    version = _mlflow(cluster).get_model_version("p", "1")
    assert version.run_id == run.info.run_id
    model_id = version.source.removeprefix("models:/")
    stored = _keys(cluster, "runs/", bucket="mlflow-artifacts")
    for owner, name in ((run.info.run_id, "loss_curve.png"), (model_id, "model.safetensors")):
        assert any(owner in k and k.endswith(f"/{name}") for k in stored), (name, stored)
    # The corpus and its mixture are the run's dataset inputs.
    inputs = {(n, c) for n, _, c in dataset_inputs(cluster.mlflow_uri, run.info.run_id)}
    assert inputs == {("corpus", "training"), ("corpus-mixture", "mixture")}, inputs
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


def test_finetune_lowers_the_heldout_loss_of_the_pretrained_run_with_a_driver_local_tokenizer(
    no_shared_disk_cluster, state
):
    """Finetuning of the pretrained run on 400 generated instructions in S3 (360 to train,
    40 held out), by 2 workers on the 2 nodes: the held-out response loss falls well below
    the base model's, in a child of the base's MLflow run. The tokenizer is a file only the
    driver's node has; the driver puts it in the run's storage for the ranks."""
    _blocked(state, "pretrain")
    cluster = no_shared_disk_cluster
    # The tokenizer as a file only the driver's node (the head) has: /tmp is private there.
    local = "/tmp/finetune-tokenizer/tokenizer.model"
    fetch = "import sys; from llamaray import storage; storage.download(*sys.argv[1:])"
    finetune = [
        "python", "jobs/finetune.py", "name=ft", f"output_dir={OUTPUT}", "model.preset=debug",
        "finetune.base=p", f"finetune.train_file={INSTRUCTIONS}", f"finetune.tokenizer={local}",
        "finetune.validation_fraction=0.1", "optimizer.lr=3e-3", "optimizer.warmup_steps=3",
        f"train.steps={FINETUNE_STEPS}", "train.seq_len=96", f"train.batch_tokens={16 * 96}",
        "train.micro_batch_size=4", "train.num_workers=2", "train.cpus_per_worker=0.5",
        "train.checkpoint_every=0", "train.log_every=5", "tracking.system_metrics=false",
    ]  # fmt: skip
    command = (
        f"{shlex.join(['python', '-c', fetch, state['prepare'], local])} && {shlex.join(finetune)}"
    )
    _submit(cluster, "finetune", ["sh", "-c", command], timeout=600)
    client, run = _mlflow(cluster), _run(cluster, "ft")
    assert run.info.status == "FINISHED"
    base = state["pretrain"]["run_id"]
    assert run.data.tags.get(PARENT_TAG) == base
    assert run.data.tags["llamaray.kind"] == "finetune"
    assert run.data.params["data.train.examples"] == "360"
    assert run.data.params["data.validation.examples"] == "40"
    val = _history(cluster, run.info.run_id, "val_loss")
    assert sorted(val) == [0, FINETUNE_STEPS]  # the base model's, before any update; the end's
    before, after = val[0][0], val[FINETUNE_STEPS][0]
    assert after < 0.7 * before, (before, after)  # an untouched model stays at 1.0 x
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "data", "tokenizer", "loss_curve.png"} <= artifacts
    # A model of its own in the registry (not a version of the base's), from this run.
    assert client.get_model_version("ft", "1").run_id == run.info.run_id
    assert [v.version for v in client.search_model_versions("name = 'p'")] == ["1"]
    inputs = dataset_inputs(cluster.mlflow_uri, run.info.run_id)
    assert [(n, c) for n, _, c in inputs] == [("train.jsonl", "training")], inputs
    # The base run is left as it was: still one run of that name, finished, not reopened.
    assert _run(cluster, "p").info.run_id == base
    assert client.get_run(base).info.status == "FINISHED"
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
    # Its own final checkpoint, and rank 0's export of the finetuned model, in S3.
    assert any(f"/step-{FINETUNE_STEPS:08d}/" in k for k in keys), keys
    assert {f"{CHECKPOINTS}/ft/hf/{n}" for n in ("tokenizer.model", "model.safetensors")} <= set(
        keys
    )
    state["finetune"] = True


def _trial_runs(cluster) -> dict[str, tuple[str, str, int]]:
    """The sweep's trial runs in the MLflow server: run name -> (run id, status, last step
    with a logged loss)."""
    client = _mlflow(cluster)
    experiments = [e.experiment_id for e in client.search_experiments()]
    out = {}
    for run in client.search_runs(experiments, f"tags.`{RUN_NAME_TAG}` LIKE 'sw-%'"):
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "loss")]
        out[run.data.tags[RUN_NAME_TAG]] = (run.info.run_id, run.info.status, max(steps, default=0))
    return out


def _tune_trials(cluster) -> dict[str, tuple[str, int]]:
    """Trial id -> (status, last step reported), as Tune last saved them in S3."""
    import pyarrow.fs
    from ray.tune import ExperimentAnalysis

    fs = pyarrow.fs.S3FileSystem(
        access_key="testing", secret_key="testing", region="us-east-1",
        endpoint_override=cluster.s3_endpoint,
    )  # fmt: skip
    analysis = ExperimentAnalysis(f"{BUCKET}/{CHECKPOINTS}/sw", storage_filesystem=fs)
    return {t.trial_id: (t.status, int(t.last_result.get("step", 0))) for t in analysis.trials}


def _kill_sweep_driver_mid_trial(cluster, argv, runtime_env):
    """Submit the sweep and wait until its first trial is past its first registered
    checkpoint (as the MLflow server and Tune's state in S3 both say), then SIGKILL the
    job's driver on the head, as a lost driver. Returns Tune's trials as saved then and the
    running trial's (run name, run id)."""
    from ray.job_submission import JobSubmissionClient

    job = f"sweep-{uuid.uuid4().hex[:8]}"
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(
            cluster.submit, argv, runtime_env=runtime_env, timeout=600, submission_id=job
        )
        deadline = time.monotonic() + 540
        while True:
            if running.done():
                rc, logs = running.result()
                pytest.fail(
                    f"the sweep ended (exit {rc}) before its driver was killed:\n{logs[-4000:]}"
                )
            assert time.monotonic() < deadline, "no trial got past its first checkpoint in 540 s"
            time.sleep(1)  # each look costs the server and moto CPU the trial needs
            try:  # cheap first: the server says a trial is past its first checkpoint
                runs = _trial_runs(cluster)
            except Exception:  # the driver is creating the experiment
                continue
            if not any(
                s == "RUNNING" and SWEEP_CHECKPOINT_EVERY < step < SWEEP_STEPS
                for _, s, step in runs.values()
            ):
                continue
            try:
                trials = _tune_trials(cluster)
            except Exception:  # not saved yet
                continue
            # A trial still going reads as PENDING from a saved state (it would be resumed).
            going = [
                t
                for t, (s, step) in trials.items()
                if s not in ("TERMINATED", "ERROR") and step >= SWEEP_CHECKPOINT_EVERY
            ]
            if going and runs.get(f"sw-{going[0]}", ("", "", SWEEP_STEPS))[2] < SWEEP_STEPS:
                break
        # The driver runs on the head, in the head's mount namespace but this machine's
        # process table: kill its process group (the entrypoint's shell and Python).
        pid = JobSubmissionClient(cluster.dashboard_url).get_job_info(job).driver_info.pid
        os.killpg(os.getpgid(int(pid)), signal.SIGKILL)
        rc, _ = running.result()
    assert rc != 0, "the killed sweep job reported success"
    name = f"sw-{going[0]}"
    return trials, (name, runs[name][0])


def test_sweep_stops_early_survives_its_drivers_death_and_reports_to_the_server_and_s3(
    no_shared_disk_cluster, state, tmp_path
):
    """A 2-trial sweep, one trial at a time in the grid's order (so ASHA's decisions do
    not depend on timing). The driver is killed with SIGKILL while the first trial trains,
    and the same `ray job submit` again resumes the sweep from Tune's state in S3: the
    first trial from its checkpoint, in the same MLflow run; the second (1e-5, which barely
    moves the weights) is stopped at ASHA's first rung by the score the first trial had
    there before the kill. Every trial is a child of the sweep's MLflow run, which holds
    the summary, the plot and best.yaml."""
    _blocked(state, "pretrain")
    cluster = no_shared_disk_cluster
    argv = [
        "python", "jobs/sweep.py", "name=sw", f"output_dir={OUTPUT}", f"data.corpus={CORPUS}",
        *_model_overrides(), "train.batch_tokens=512", "train.micro_batch_size=4",
        "train.num_workers=1", "train.cpus_per_worker=1", f"train.steps={SWEEP_STEPS}",
        "train.eval_every=2", f"train.checkpoint_every={SWEEP_CHECKPOINT_EVERY}",
        "train.log_every=1", "optimizer.warmup_steps=2", "data.eval_rows=4",
        "tracking.system_metrics=false", "sweep.num_samples=1", "sweep.batch_tokens=[512]",
        f"sweep.lr.values=[{', '.join(map(str, SWEEP_LRS))}]", "sweep.asha.grace_period=2",
        "sweep.asha.reduction_factor=2", "sweep.max_concurrent_trials=1",
        # A step of this model takes ~0.05 s: without a pause the first trial can go from its
        # first checkpoint to its end between two looks of the kill loop (seen under load).
        f"faults.slow_step_s={SWEEP_SLOW_STEP_S}",
    ]  # fmt: skip
    # Tune saves its experiment state at most every 10 s by default; every second here,
    # so the state in S3 is current whenever the driver is killed.
    runtime_env = cluster.runtime_env({"TUNE_GLOBAL_CHECKPOINT_S": "1"})

    # 1. The driver dies in the middle of a trial.
    before, (interrupted, interrupted_id) = _kill_sweep_driver_mid_trial(cluster, argv, runtime_env)

    # 2. Submitted again, it resumes the sweep from S3 and completes it.
    logs = _submit(cluster, "sweep (resumed)", argv, runtime_env=runtime_env, timeout=600)
    assert "sweep sw: resuming" in logs, logs[-4000:]
    after = _tune_trials(cluster)
    assert set(before) <= set(after) and len(after) == len(SWEEP_LRS)  # no new trials
    assert all(status == "TERMINATED" for status, _ in after.values()), after

    # 3. ASHA stopped the hopeless LR at the first rung, as without the kill: its rungs came
    # back from S3 with Tune's state (empty rungs would have let it past step 2). The
    # summary (in S3) says so.
    s3 = _s3(cluster)
    summary = s3.get_object(Bucket=BUCKET, Key="runs/sweeps/sw/summary.csv")["Body"].read()
    rows = {float(r["lr"]): r for r in csv.DictReader(io.StringIO(summary.decode()))}
    assert sorted(rows) == sorted(SWEEP_LRS)
    assert rows[1e-5]["status"] == "stopped early" and rows[1e-5]["steps"] == f"2/{SWEEP_STEPS}"
    full = f"{SWEEP_STEPS}/{SWEEP_STEPS}"
    assert rows[3e-3]["status"].startswith("finished") and rows[3e-3]["steps"] == full
    finished = [r for r in rows.values() if r["status"].startswith("finished")]
    best_row = min(finished, key=lambda r: float(r["val_loss"]))
    assert best_row["status"] == "finished (best)"
    assert [r["status"] for r in finished].count("finished (best)") == 1
    stopped = [r for r in rows.values() if r["status"] == "stopped early"]
    assert all(int(r["steps"].split("/")[0]) < SWEEP_STEPS for r in stopped)

    # 4. Every trial is one child run of the sweep's run, marked with how it ended.
    client, parent = _mlflow(cluster), _run(cluster, "sw")
    children = client.search_runs(
        [parent.info.experiment_id], f"tags.`{PARENT_TAG}` = '{parent.info.run_id}'"
    )
    by_name = {r.data.tags[RUN_NAME_TAG]: r for r in children}
    assert (
        sorted(by_name)
        == sorted(f"sw-{t}" for t in after)
        == sorted(r["trial"] for r in rows.values())
    )
    for row in rows.values():
        run = by_name[row["trial"]]
        assert float(run.data.params["optimizer.lr"]) == float(row["lr"])
        assert run.data.metrics["final_val_loss"] == pytest.approx(float(row["val_loss"]), abs=1e-4)
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "loss")]
        assert steps.count(1) == 1, row  # no trial started over from scratch
        if row["status"] == "stopped early":
            assert run.info.status == "KILLED", row
            assert run.data.tags["llamaray.sweep.stopped_early"] == "true"
            assert int(run.data.tags["llamaray.sweep.step_reached"]) < SWEEP_STEPS
        else:
            assert run.info.status == "FINISHED", row
            assert sorted(set(steps)) == list(range(1, SWEEP_STEPS + 1))
            val = [m.step for m in client.get_metric_history(run.info.run_id, "val_loss")]
            assert sorted(set(val)) == list(range(2, SWEEP_STEPS + 1, 2))
    # The interrupted trial went on in the same MLflow run from a checkpoint in S3: the
    # steps up to its first checkpoint were trained once.
    assert by_name[interrupted].info.run_id == interrupted_id
    assert float(by_name[interrupted].data.params["optimizer.lr"]) == SWEEP_LRS[0]
    assert by_name[interrupted].info.status == "FINISHED"
    resumed = [m.step for m in client.get_metric_history(interrupted_id, "loss")]
    assert all(resumed.count(s) == 1 for s in range(1, SWEEP_CHECKPOINT_EVERY + 1)), resumed

    # 5. The sweep's run holds the search space, the summary, the plot and best.yaml.
    parent = client.get_run(parent.info.run_id)
    assert parent.info.status == "FINISHED" and PARENT_TAG not in parent.data.tags
    assert parent.data.params["sweep.lr.values"] == ",".join(map(str, SWEEP_LRS))
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"summary.csv", "summary.md", "loss_vs_lr.png", "best.yaml", "sweep.yaml"} <= artifacts
    assert parent.data.metrics["best_val_loss"] == pytest.approx(
        float(best_row["val_loss"]), abs=1e-4
    )
    assert parent.data.metrics["trials_stopped_early"] == len(stopped)
    assert parent.data.tags["llamaray.sweep.best_run_id"] == by_name[best_row["trial"]].info.run_id
    png = client.download_artifacts(parent.info.run_id, "loss_vs_lr.png", str(tmp_path))
    assert image.imread(png).shape[:2] == (450, 700)
    assert _keys(cluster, f"{CHECKPOINTS}/sw/"), "no Tune experiment state in S3"

    # 6. best.yaml (in S3 and in MLflow) is the best trial's run as a config of its own:
    # it loads, with the trial's LR, the full schedule and no parent.
    stored = s3.get_object(Bucket=BUCKET, Key="runs/sweeps/sw/best.yaml")["Body"].read().decode()
    logged = client.download_artifacts(parent.info.run_id, "best.yaml", str(tmp_path))
    assert Path(logged).read_text() == stored
    cfg = load_config(Path(logged))
    best_run = by_name[best_row["trial"]]
    best_lr = float(best_run.data.params["optimizer.lr"])
    assert cfg.name == "sw-best" and (cfg.optimizer.lr, cfg.train.batch_tokens) == (best_lr, 512)
    assert cfg.train.steps == SWEEP_STEPS and cfg.train.stop_at_step is None
    assert cfg.tracking.parent_run_id is None and cfg.tracking.export_hf
    # The corpus version the trials read, pinned: a rebuild since does not move it.
    assert cfg.data.corpus.startswith(f"{CORPUS}/versions/"), cfg.data.corpus
    dumped = cfg.model_dump()
    for key in (
        "model.preset",
        "train.seq_len",
        "train.micro_batch_size",
        "optimizer.warmup_steps",
    ):
        value = dumped
        for part in key.split("."):
            value = value[part]
        assert str(value) == best_run.data.params[key], key
    state["sweep"] = {"experiment": parent.info.experiment_id, "trials": children}


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
