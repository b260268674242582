"""The driver of tests/cluster/test_autoscaling.py: joins the cluster at RAY_ADDRESS, runs a
training job that needs more CPUs than the head has, counts the cluster's alive nodes while
it runs and afterwards until the autoscaler has removed the idle workers, and prints one
JSON line (prefixed RESULT) with what it saw.

python tests/cluster/autoscale_job.py llamaray --output DIR [--settle-timeout S]
    jobs/configs/demo.yaml made tiny: corpus on Ray Data, 2 Ray Train FSDP workers, 4 steps
python tests/cluster/autoscale_job.py torch
    a bare ray.train.torch.TorchTrainer: 2 workers x 1 CPU, a few gloo DDP steps
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path

import ray

REPO = Path(__file__).resolve().parents[2]


class NodeCounter(threading.Thread):
    """Samples the number of alive nodes every `period` seconds."""

    def __init__(self, period: float = 0.5):
        super().__init__(daemon=True)
        self.period = period
        self.samples: list[tuple[float, int]] = []
        self._done = threading.Event()
        self._t0 = time.monotonic()

    def alive(self) -> int:
        return sum(1 for n in ray.nodes() if n["Alive"])

    def run(self) -> None:
        while not self._done.is_set():
            self.samples.append((round(time.monotonic() - self._t0, 1), self.alive()))
            self._done.wait(self.period)

    def stop(self) -> None:
        self._done.set()
        self.join()


def train_llamaray(output: str) -> dict:
    from llamaray.config import load_config
    from llamaray.orchestrate.pretrain import pretrain

    cfg = load_config(
        str(REPO / "jobs/configs/demo.yaml"),
        [
            "name=autoscale",
            f"output_dir={output}",
            "data.prepare.sample_mb=0.25",
            "data.prepare.tokenizer.vocab_size=512",
            "tokenizer.vocab_size=512",
            "model.preset=debug",
            "train.steps=4",
            "train.seq_len=64",
            "train.batch_tokens=512",
            "train.micro_batch_size=4",
            "train.num_workers=2",
            "train.cpus_per_worker=1",  # one worker node each: the head has no CPUs
            "train.log_every=1",
            "train.checkpoint_every=0",
            "train.eval_every=0",
            "tracking.enabled=false",
        ],
    )
    result = pretrain(cfg)
    return {"kind": "llamaray", "step": result.step, "loss": result.metrics.get("loss")}


def _torch_loop(config: dict) -> None:
    import torch

    from ray import train

    torch.manual_seed(0)
    model = train.torch.prepare_model(torch.nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(1, config["steps"] + 1):
        x = torch.randn(16, 8)
        loss = ((model(x) - x.sum(dim=1, keepdim=True)) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        train.report({"step": step, "loss": loss.item()})


def train_torch() -> dict:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    trainer = TorchTrainer(
        _torch_loop,
        train_loop_config={"steps": 3},
        scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
        run_config=RunConfig(name="autoscale-torch", storage_path=os.environ["STORAGE"]),
    )
    result = trainer.fit()
    return {"kind": "torch", "step": result.metrics["step"], "loss": result.metrics["loss"]}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("kind", choices=["llamaray", "torch"])
    parser.add_argument("--output", default=None)
    parser.add_argument("--settle-timeout", type=float, default=90.0)
    opts = parser.parse_args()

    ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=True)
    counter = NodeCounter()
    counter.start()
    began = time.monotonic()
    train = train_llamaray(opts.output) if opts.kind == "llamaray" else train_torch()
    trained = time.monotonic()
    peak_during = max(n for _, n in counter.samples)
    # Then wait for the idle worker nodes to be removed.
    deadline = trained + opts.settle_timeout
    while counter.alive() > 1 and time.monotonic() < deadline:
        time.sleep(0.5)
    settled = time.monotonic()
    counter.stop()
    print(
        "RESULT "
        + json.dumps(
            {
                "train": train,
                "peak_nodes_during_training": peak_during,
                "nodes_after": counter.alive(),
                "train_seconds": round(trained - began, 1),
                "scale_down_seconds": round(settled - trained, 1),
                "samples": counter.samples,
            }
        ),
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
