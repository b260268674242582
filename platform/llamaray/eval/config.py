"""`llamaray eval` options, validated before any Ray work."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class EvalConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tasks: list[str] = Field(default_factory=list, description="Task folders (task.yaml + JSONL).")
    step: int | None = Field(None, gt=0, description="Checkpoint step; None: the newest complete.")
    num_fewshot: int | None = Field(None, ge=0, description="Shots; None: each task's own.")
    seed: int = Field(0, description="Seeds the choice of shots.")
    limit: int | None = Field(None, gt=0, description="Items per task at most (smoke runs).")
    perplexity_rows: int = Field(
        32, ge=0, description="Held-out rows per corpus source for perplexity; 0: none."
    )
    num_workers: int = Field(2, gt=0, description="Ray actors sharing the requests.")
    cpus_per_worker: float = Field(0.5, gt=0, description="CPUs each actor reserves.")
    batch_size: int = Field(8, gt=0, description="Sequences per forward pass.")
