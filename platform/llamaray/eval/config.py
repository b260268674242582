"""`llamaray eval` options, validated before any Ray work."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator


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
    benchmarks: list[str] = Field(
        default_factory=list,
        description="The paper's benchmarks as name=path of their published files "
        "(llamaray.eval.benchmarks.BENCHMARKS), e.g. arc=ARC-Easy/ARC-Easy-Test.jsonl.",
    )
    samples: int = Field(
        0,
        ge=0,
        description="Samples per problem for code and free-form tasks (pass@k, maj1@k); "
        "0: one greedy answer each. The paper: 200 for HumanEval/MBPP, 100 for GSM8k, "
        "256 for MATH.",
    )
    temperature: float = Field(
        0.8, gt=0, description="Sampling temperature (the paper: 0.1 for pass@1, 0.8 else)."
    )
    top_p: float = Field(0.95, gt=0, le=1, description="Nucleus sampling mass; 1: off.")
    pass_k: list[int] = Field(
        default_factory=lambda: [1, 10, 100],
        description="The k of pass@k and maj1@k reported (those at most `samples`).",
    )

    @field_validator("benchmarks")
    @classmethod
    def _known_benchmarks(cls, value: list[str]) -> list[str]:
        from llamaray.eval.benchmarks import BENCHMARKS

        for entry in value:
            name, sep, path = entry.partition("=")
            if not sep or not path:
                raise ValueError(f"{entry!r}: give name=path, e.g. arc=ARC-Easy-Test.jsonl")
            if name not in BENCHMARKS:
                raise ValueError(f"{entry!r}: unknown benchmark; one of {', '.join(BENCHMARKS)}")
        return value

    @field_validator("pass_k")
    @classmethod
    def _positive_ks(cls, value: list[int]) -> list[int]:
        if not value or min(value) < 1:
            raise ValueError(f"each k must be >= 1, got {value}")
        return value
