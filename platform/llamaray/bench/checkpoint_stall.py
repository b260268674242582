"""Checkpoint stall: how long a checkpoint blocks training, written in the background
(`train.async_checkpoint`, the default) against written before the next step.

A checkpoint is what a Ray Train worker does with one (`orchestrate.ray_worker`): write
the rank's DCP shards and integrity record to local disk (`train.checkpoint`), then upload
the folder to the run's storage (`storage.upload_directory`). With `--s3` the storage is
S3 -- moto's server on 127.0.0.1, started here -- else a local folder.

- **sync**: write, hash, upload; the step after it waits for all of it.
- **async**: the state copied to host memory (`stage_checkpoint`: the only blocking
  part), then the write and upload in the background (`CheckpointWriter`) while training
  steps run; the steps taken meanwhile are timed, so the cost the background work puts on
  them (both share the machine's cores) is measured, not hidden.

Per mode, the median over `--rounds` of: the **stall** (time the training loop is
blocked), the time until the checkpoint is **complete** (uploaded), and for async the
median step time while the write runs against the step time with no checkpoint. Imports
torch (and boto3 for --s3), never Ray, so it also runs on a bare GPU box:

    python -m llamaray.bench.checkpoint_stall [--preset small] [--rounds 2] [--s3] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from llamaray.config import load_config
from llamaray.console import logger
from llamaray.model.flops import param_count
from llamaray.storage import filesystem, upload_directory
from llamaray.train.checkpoint import (
    TrainState,
    stage_checkpoint,
    step_dir_name,
    write_checkpoint,
)
from llamaray.train.checkpoint_writer import CheckpointWriter
from llamaray.train.launcher import ensure_process_group
from llamaray.train.optim import build_optimizer
from llamaray.train.step import train_step

log = logger("bench")


def build(preset: str, seq_len: int, vocab: int):
    from llamaray.train.worker import build_parallel_model

    overrides = [f"model.preset={preset}", f"train.seq_len={seq_len}"]
    cfg = load_config(None, [*overrides, "model.activation_checkpointing=none"])
    args = cfg.model.args(vocab)
    model, _ = build_parallel_model(cfg, args, torch.device("cpu"))
    return model, build_optimizer(model, 1e-4), args


def make_stepper(model, optimizer, vocab: int, seq_len: int, rows: int):
    generator = torch.Generator().manual_seed(0)

    def step() -> float:
        batch = torch.randint(0, vocab, (rows, seq_len + 1), generator=generator)
        start = time.perf_counter()
        assert train_step(model, optimizer, [batch], 1e-4).finite
        return time.perf_counter() - start

    return step


def checkpoint_round(mode, model, optimizer, step, destination, writer, index) -> dict:
    """One checkpoint in `mode`: the stall, the time to complete, the steps run meanwhile."""
    fs, root = filesystem(destination)
    state = TrainState(step=index, world_size=1)
    local = tempfile.mkdtemp(prefix="llamaray-bench-ckpt-")
    target = f"{root.rstrip('/')}/{step_dir_name(index)}"

    def write_and_upload(staged, group=None) -> None:
        write_checkpoint(local, staged, group)
        upload_directory(local, fs, target)

    start = time.perf_counter()
    steps_meanwhile: list[float] = []
    if mode == "sync":
        write_and_upload(stage_checkpoint(model, optimizer, state, copy=False))
        stall = complete = time.perf_counter() - start
    else:
        pending = writer.submit(write_and_upload, stage_checkpoint(model, optimizer, state))
        stall = time.perf_counter() - start
        while not pending.done():
            steps_meanwhile.append(step())
        writer.wait()
        complete = time.perf_counter() - start
    size = sum(p.stat().st_size for p in Path(local).iterdir())
    shutil.rmtree(local)
    fs.delete_dir(target)
    return {"mode": mode, "stall_s": stall, "complete_s": complete, "bytes": size,
            "steps_meanwhile_s": steps_meanwhile}  # fmt: skip


@contextmanager
def moto_s3(bucket: str):
    """moto's S3 server on a free loopback port, with the environment pointed at it."""
    import boto3

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    exe = Path(sys.executable).with_name("moto_server")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "moto.server"]
    proc = subprocess.Popen([*cmd, "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    endpoint = f"http://127.0.0.1:{port}"
    env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}  # fmt: skip
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
        for _ in range(100):
            try:
                client.create_bucket(Bucket=bucket)
                break
            except Exception:
                time.sleep(0.1)
        yield f"s3://{bucket}/checkpoints"
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--vocab-size", type=int, default=32000)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--rows", type=int, default=2, help="rows per training step")
    parser.add_argument("--rounds", type=int, default=2, help="checkpoints per mode")
    parser.add_argument("--s3", action="store_true", help="upload to moto's S3 server")
    parser.add_argument("--json", action="store_true", help="JSON on stdout, the table on stderr")
    opts = parser.parse_args(argv)

    ensure_process_group()
    torch.manual_seed(0)
    model, optimizer, args = build(opts.preset, opts.seq_len, opts.vocab_size)
    step = make_stepper(model, optimizer, opts.vocab_size, opts.seq_len, opts.rows)
    step()  # the optimizer's state exists from the first step on: checkpoint a full one
    baseline = [step() for _ in range(3)]
    writer = CheckpointWriter()
    results = []
    with tempfile.TemporaryDirectory(prefix="llamaray-bench-store-") as local_store:
        store = moto_s3("bench") if opts.s3 else _local(local_store)
        with store as destination:
            for index in range(1, opts.rounds + 1):
                for mode in ("sync", "async"):  # alternating: drift hits both alike
                    r = checkpoint_round(mode, model, optimizer, step, destination, writer, index)
                    log.info(f"{mode} checkpoint {index}: stall {r['stall_s']:.2f} s, complete "
                             f"after {r['complete_s']:.2f} s")  # fmt: skip
                    results.append(r)
                    baseline.append(step())

    def med(mode: str, key: str) -> float:
        return statistics.median(r[key] for r in results if r["mode"] == mode)

    during = [t for r in results for t in r["steps_meanwhile_s"]]
    summary = {
        "preset": opts.preset,
        "params": param_count(args),
        "checkpoint_bytes": results[0]["bytes"],
        "storage": "s3 (moto)" if opts.s3 else "local folder",
        "step_s": statistics.median(baseline),
        "step_during_write_s": statistics.median(during) if during else None,
        "steps_during_write": len(during),
        "sync": {"stall_s": med("sync", "stall_s"), "complete_s": med("sync", "complete_s")},
        "async": {"stall_s": med("async", "stall_s"), "complete_s": med("async", "complete_s")},
    }
    summary["stall_ratio"] = summary["async"]["stall_s"] / summary["sync"]["stall_s"]
    out = sys.stderr if opts.json else sys.stdout
    gb = summary["checkpoint_bytes"] / 2**30
    print(f"\n# checkpoint stall: {opts.preset} ({summary['params'] / 1e6:.0f}M params, "
          f"{gb:.2f} GiB per checkpoint), to {summary['storage']}, {opts.rounds} rounds, "
          f"{os.cpu_count()} cores", file=out)  # fmt: skip
    print(f"{'mode':6} {'stall s':>8} {'complete s':>11}", file=out)
    for mode in ("sync", "async"):
        print(f"{mode:6} {summary[mode]['stall_s']:8.2f} {summary[mode]['complete_s']:11.2f}",
              file=out)  # fmt: skip
    print(f"stall async / sync: {summary['stall_ratio']:.3f}x; step {summary['step_s']:.2f} s "
          f"alone, {summary['step_during_write_s'] or float('nan'):.2f} s while a write runs "
          f"({summary['steps_during_write']} steps)", file=out)  # fmt: skip
    if opts.json:
        print(json.dumps(summary | {"rounds": results}, indent=2))
    return summary


@contextmanager
def _local(folder: str):
    yield str(Path(folder) / "checkpoints")


if __name__ == "__main__":
    main(sys.argv[1:])
