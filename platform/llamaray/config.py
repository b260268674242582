"""Typed, validated run configuration: YAML files plus `key.path=value` overrides.

Every problem is reported with its dotted field path and the reason, before any work
starts:

    >>> cfg = load_config("jobs/configs/demo.yaml", ["train.steps=50"])
    >>> load_config(None, ["model.n_heads=7"])
    Traceback (most recent call last):
    ...
    llamaray.config.ConfigError: invalid config:
      model.n_heads: 7 must divide dim=256
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from llamaray.model.args import PRESETS, ModelArgs, get_preset
from llamaray.prompts import DEFAULT_TEMPLATE, DEFAULT_TEMPLATE_WITH_INPUT, check_template


class ConfigError(ValueError):
    """A configuration that cannot run; the message lists each bad field and why."""


NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
"""A run's or a corpus's name: it becomes one folder under `output_dir` and `storage` (a
key prefix in S3) and a word in MLflow's search filters. So no separator, nothing that
starts with a dot ("..", ".hidden"), no quote, no space, not empty."""


def check_name(value: str) -> str:
    """`value` if it is a name (NAME), else ValueError saying what a name may hold."""
    if not NAME.fullmatch(value):
        raise ValueError(
            f"{value!r} is not a name: 1-128 letters, digits, '.', '_' or '-', starting with "
            "a letter or digit (it names a folder under output_dir and storage, and the "
            "MLflow run)"
        )
    return value


MAX_DOCUMENT_CHARS = 8_000_000
"""Default `corpus.max_document_chars`: longer documents are rejected as "too_long". 8M
characters is a long book several times over (most of the paper's documents are under
100k); it also bounds what reading holds of one record, about 12 bytes a character
(`llamaray.data.read.max_line_bytes`): ~97 MiB."""


class _Section(BaseModel):
    # Unknown keys are errors: a typo must not silently fall back to a default.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(), sort_keys=False)


class ModelConfig(_Section):
    preset: str = Field("tiny", description="Size preset: " + ", ".join(PRESETS))
    dim: int | None = Field(None, gt=0, description="Override the preset's width.")
    n_layers: int | None = Field(None, gt=0, description="Override the preset's depth.")
    n_heads: int | None = Field(None, gt=0, description="Override the preset's query heads.")
    n_kv_heads: int | None = Field(None, gt=0, description="Key/value heads (GQA); None = n_heads.")
    vocab_size: int | None = Field(None, gt=0, description="None: the tokenizer's size.")
    max_seq_len: int | None = Field(None, gt=0, description="Override the rotary table length.")
    attention: Literal["auto", "sdpa", "xformers", "reference"] = Field(
        "auto", description="auto = xformers on CUDA when installed, torch SDPA otherwise."
    )
    activation_checkpointing: Literal["none", "full", "selective"] = Field(
        "none", description="selective keeps matmul/attention outputs (the paper's choice)."
    )
    compile: bool = Field(
        False,
        description="torch.compile each transformer block (after activation checkpointing, "
        "before FSDP). The first steps are slower while the block compiles (tens of seconds "
        "on a GPU, longer on a CPU); then fused elementwise kernels save time and memory.",
    )

    @field_validator("preset")
    @classmethod
    def _known_preset(cls, name: str) -> str:
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
        return name

    def args(self, vocab_size: int | None = None) -> ModelArgs:
        """The preset's architecture with this section's overrides applied."""
        base = get_preset(self.preset).args
        changes = {
            k: getattr(self, k)
            for k in ("dim", "n_layers", "n_heads", "n_kv_heads", "max_seq_len")
            if getattr(self, k) is not None
        }
        vocab = self.vocab_size or vocab_size
        if vocab:
            changes["vocab_size"] = vocab
        return base.with_(**changes)


class TokenizerConfig(_Section):
    path: str | None = Field(None, description="An existing tokenizer.model; None: train one.")
    vocab_size: int = Field(32000, gt=259, description="Pieces when training (the paper: 32000).")


WIKIPEDIA_LANGUAGES: tuple[str, ...] = (
    "bg", "ca", "cs", "da", "de", "en", "es", "fr", "hr", "hu",
    "it", "nl", "pl", "pt", "ro", "ru", "sl", "sr", "sv", "uk",
)  # fmt: skip
"""The paper's 20 Wikipedia languages (Touvron et al. 2023, section 2.1: "covering 20
languages, which use either the Latin or Cyrillic scripts")."""

STACKEXCHANGE_SITES: tuple[str, ...] = (
    "stackoverflow.com", "math.stackexchange.com", "superuser.com", "serverfault.com",
    "askubuntu.com", "unix.stackexchange.com", "physics.stackexchange.com",
    "electronics.stackexchange.com", "tex.stackexchange.com", "stats.stackexchange.com",
    "english.stackexchange.com", "mathoverflow.net", "apple.stackexchange.com",
    "gis.stackexchange.com", "ell.stackexchange.com", "gaming.stackexchange.com",
    "salesforce.stackexchange.com", "softwareengineering.stackexchange.com",
    "codereview.stackexchange.com", "wordpress.stackexchange.com",
    "magento.stackexchange.com", "dba.stackexchange.com", "sharepoint.stackexchange.com",
    "scifi.stackexchange.com", "diy.stackexchange.com", "android.stackexchange.com",
    "mathematica.stackexchange.com", "security.stackexchange.com",
)  # fmt: skip
"""The 28 largest Stack Exchange sites (the paper, section 2.1: "We kept the data from the 28
largest websites"; it does not name them). RedPajama-Data v1 takes the first 28 of the dump's
sites ordered by posts (questions + answers, `data_prep/stack_exchange/count.py`); this list is
that ranking for the 2023 archive.org dump as far as we could establish it without the dump:
recount with your own dump and set `stackexchange_sites` when it differs."""

_SITE = re.compile(r"[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)+")
_LANGUAGE = re.compile(r"[a-z]{2,3}(-[a-z]+)*")


def _all_match(values: list[str], pattern: re.Pattern, what: str) -> list[str]:
    """`values` when each matches `pattern` whole; else a ValueError naming every one that
    does not, as "'x', 'y': not <what>"."""
    bad = [v for v in values if not pattern.fullmatch(v)]
    if bad:
        raise ValueError(f"{', '.join(map(repr, bad))}: not {what}")
    return values


class SourceDedupConfig(_Section):
    """Which deduplication runs on one source (`CorpusConfig.dedup.sources[name]`). Sources
    are deduplicated independently, as the paper does (section 2.1)."""

    lines: bool = Field(
        False,
        description="CCNet line dedup (Wenzek et al. 2020, section 3.2): every copy of a line "
        "(normalized) that occurs more than once within a group of line_group_shards input "
        "files is removed; a document left empty is dropped. The paper's: commoncrawl.",
    )
    line_group_shards: int = Field(
        50,
        ge=0,
        description="Input files (CCNet's shards) whose lines are deduplicated together, in "
        "the order the source lists them; 0: all of the source's files form one group. "
        "CCNet's default (mine.py hash_in_mem) is 50.",
    )
    exact: bool = Field(
        False,
        description="Exact file-level dedup: of the documents with the same text (after the "
        "cleaning, license header stripped) one is kept. The paper's: github.",
    )
    overlap: float | None = Field(
        None,
        ge=0.5,
        le=1.0,
        description="Near-duplicate removal: a document sharing more than this fraction of "
        "its content (Jaccard similarity of word 5-gram sets, checked exactly) with a kept "
        "one is dropped. The paper's: books at 0.9. None: off. At least 0.5, where MinHash "
        "banding still finds candidate pairs reliably.",
    )


PAPER_DEDUP: dict[str, dict[str, Any]] = {
    "commoncrawl": {"lines": True},
    "github": {"exact": True},
    "books": {"overlap": 0.9},
}
"""The paper's per-source deduplication (section 2.1); other sources get none by default."""


class DedupConfig(_Section):
    enabled: bool = Field(True, description="False: no deduplication at all.")
    sources: dict[str, SourceDedupConfig] = Field(
        default_factory=lambda: {k: SourceDedupConfig(**v) for k, v in PAPER_DEDUP.items()},
        description="Per-source dedup. The paper's (PAPER_DEDUP) apply unless a key is set: "
        "`dedup.sources.books.overlap=0.95` changes the books threshold only, "
        "`dedup.sources.wikipedia.overlap=0.8` adds near-dedup to wikipedia.",
    )
    cross_source: bool = Field(
        False,
        description="Also remove exact and near duplicates across all sources (content hash, "
        "then MinHash Jaccard >= near_threshold, `data.dedup`); the paper does not, so off.",
    )
    near_threshold: float = Field(
        0.8, gt=0, le=1, description="Estimated Jaccard of the cross-source pass."
    )

    @field_validator("sources", mode="before")
    @classmethod
    def _over_the_papers(cls, given: Any) -> Any:
        # A source's given keys change the paper's defaults for it; they never drop them.
        if not isinstance(given, dict):
            return given
        merged: dict[str, Any] = {k: dict(v) for k, v in PAPER_DEDUP.items()}
        for name, value in given.items():
            if isinstance(value, SourceDedupConfig):
                value = value.model_dump(exclude_unset=True)
            merged[name] = {**merged.get(name, {}), **value} if isinstance(value, dict) else value
        return merged


QUALITY_STEPS: tuple[str, ...] = ("lid_model", "perplexity_model", "reference_model")
"""CommonCrawl's model steps, by the `quality` field naming each one's model."""


class QualityConfig(_Section):
    """CommonCrawl's model-based quality steps (`CorpusConfig.quality`), in CCNet's order:
    language id, n-gram perplexity, then LLaMA's Wikipedia-reference classifier (Wenzek et
    al. 2020, section 3.3; Touvron et al. 2023, section 2.1). Each model is a file, local or
    s3://, made by `llamaray quality train` or published (fastText's lid.176.bin, CCNet's
    lm_sp models); nothing is downloaded. With a commoncrawl source, `prepare` stops before
    any cluster work while a model is not set, unless `allow_missing_models` says to go on."""

    language: str = Field(
        "en", description="The language kept (fastText's label, e.g. en, fr): LLaMA's is en."
    )
    lid_model: str | None = Field(
        None,
        description="fastText language-id model (lid.176.bin, or `llamaray quality train "
        "lid`): a page whose top language is not `language` with at least lid_threshold "
        "is dropped as cc_wrong_language.",
    )
    lid_threshold: float = Field(
        0.5, ge=0, le=1, description="Least language probability kept (CCNet's: 0.5)."
    )
    perplexity_model: str | None = Field(
        None,
        description="KenLM model of `language` (`<lang>.arpa.bin`, CCNet's lm_sp or "
        "`llamaray quality train lm`); its SentencePiece model and cutoffs sit beside it "
        "(`<lang>.sp.model`, `<lang>.cutoffs.json`) unless set below.",
    )
    perplexity_tokenizer: str | None = Field(
        None, description="SentencePiece model the KenLM text was tokenized with; None: beside."
    )
    perplexity_cutoffs: str | None = Field(
        None,
        description='JSON {"head": p33, "middle": p66}: perplexity percentiles of a sample '
        "(CCNet's 33rd and 66th); None: beside the model.",
    )
    keep_buckets: list[Literal["head", "middle", "tail"]] = Field(
        default_factory=lambda: ["head", "middle"],
        min_length=1,
        description="Perplexity buckets kept; others dropped as cc_perplexity_<bucket>. "
        "CCNet's and LLaMA's: head and middle.",
    )
    reference_model: str | None = Field(
        None,
        description="fastText classifier of pages used as Wikipedia references vs random "
        "pages (`llamaray quality train reference`); a page below reference_threshold is "
        "dropped as cc_not_reference.",
    )
    reference_threshold: float = Field(
        0.5, ge=0, le=1, description="Least probability of being a reference kept."
    )
    heuristics: bool = Field(
        False,
        description="Also apply Gopher's heuristics (Rae et al. 2021, A.1.1; RedPajama-V2's "
        "thresholds: word count, mean word length, symbol ratio, bullet and ellipsis lines, "
        "alphabetic words) to CommonCrawl pages after the model steps. Not in LLaMA's recipe, "
        "hence off; a model-free floor where the model steps are skipped.",
    )
    allow_missing_models: bool = Field(
        False,
        description="true: run commoncrawl with the model steps that have no model skipped "
        "(the manifest records which and that this was allowed); false: prepare stops, "
        "naming them.",
    )

    @field_validator("language")
    @classmethod
    def _language_code(cls, code: str) -> str:
        return _all_match([code], _LANGUAGE, "a language code (lowercase, e.g. en, fr)")[0]

    def missing(self) -> list[str]:
        """The model fields not set, in CCNet's order."""
        return [f for f in QUALITY_STEPS if getattr(self, f) is None]


class CorpusConfig(_Section):
    """`llamaray prepare`: raw sources -> cleaned, deduplicated, packed token shards."""

    name: str = "corpus"
    output_dir: str = "runs"
    sources: dict[str, list[str]] = Field(
        default_factory=dict,
        description="Source name -> files, globs, directories or s3:// prefixes. Paper names "
        "(commoncrawl, c4, github, wikipedia, books, arxiv, stackexchange) get their cleaning "
        "rules; other names only the common checks. Empty: the standard-library sample.",
    )
    sample_mb: float = Field(3.0, gt=0, description="Size per source of the built-in sample.")
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig)
    seq_len: int = Field(2048, gt=0, description="Rows are seq_len + 1 tokens.")
    validation_fraction: float = Field(
        0.01, ge=0, lt=0.5, description="Documents held out per source (by hash of the text)."
    )
    strict: bool = Field(False, description="Fail at the first bad record, naming file:line.")
    max_document_chars: int = Field(
        MAX_DOCUMENT_CHARS,
        gt=0,
        description="Longest document kept, in characters; a longer one (or a JSONL line of "
        "more than 12 bytes a character + 1 MiB) is rejected as too_long, read but never "
        "held whole. It bounds a reading task's memory: ~12 bytes a character.",
    )
    dedup: DedupConfig = Field(default_factory=DedupConfig)
    quality: QualityConfig = Field(
        default_factory=QualityConfig,
        description="CommonCrawl's model steps (language id, perplexity, reference "
        "classifier): their model files and thresholds.",
    )
    wikipedia_languages: list[str] = Field(
        default_factory=lambda: list(WIKIPEDIA_LANGUAGES),
        description="Wikipedia languages kept (the record's meta language, or its url's "
        "<lang>.wikipedia.org); others are dropped as wikipedia_language. Default: the "
        "paper's 20. Empty: every language.",
    )
    stackexchange_sites: list[str] = Field(
        default_factory=lambda: list(STACKEXCHANGE_SITES),
        description="Stack Exchange sites kept (the record's meta site, or its url's host); "
        "others are dropped as stackexchange_site. Default: the paper's 28 largest. Empty: "
        "every site.",
    )
    github_extra_licenses: list[str] = Field(
        default_factory=list,
        description="Licenses accepted besides the paper's MIT/BSD/Apache (e.g. PSF-2.0).",
    )
    tokenize_actors: int | None = Field(
        None,
        gt=0,
        description="Tokenizer actor pool size; None: up to the cluster's CPUs. Each batch "
        "packs on its own, so any size gives the same shards on every run (the batch size, "
        "so the shards, depends on the size).",
    )
    tokenizer_sample_bytes: int = Field(
        1_000_000_000,
        gt=0,
        description="Most text the tokenizer trains on (a seeded random sample of the cleaned "
        "documents, gathered on the driver); the manifest says when a sample was taken.",
    )
    seed: int = 0

    @field_validator("name")
    @classmethod
    def _a_name(cls, value: str) -> str:
        return check_name(value)

    @field_validator("wikipedia_languages")
    @classmethod
    def _language_codes(cls, codes: list[str]) -> list[str]:
        return _all_match(
            codes,
            _LANGUAGE,
            "a Wikipedia language code (lowercase, as in <code>.wikipedia.org, e.g. en, fr, "
            "zh-yue)",
        )

    @field_validator("stackexchange_sites")
    @classmethod
    def _site_names(cls, sites: list[str]) -> list[str]:
        return _all_match(
            sites,
            _SITE,
            "a site host name (lowercase, e.g. math.stackexchange.com, stackoverflow.com)",
        )

    @field_validator("sources")
    @classmethod
    def _sources_have_paths(cls, sources: dict[str, list[str]]) -> dict[str, list[str]]:
        empty = [name for name, paths in sources.items() if not paths]
        if empty:
            raise ValueError(f"source(s) {', '.join(empty)} list no paths")
        return sources


class DataConfig(_Section):
    corpus: str | None = Field(
        None,
        description="A corpus made by `llamaray prepare` (local path or s3://). None: prepare "
        "`data.prepare` first (reused while its config is unchanged).",
    )
    prepare: CorpusConfig = Field(
        default_factory=lambda: CorpusConfig(name="corpus-demo"),
        description="The corpus to prepare when `data.corpus` is None; its seq_len is "
        "train.seq_len. Default: the standard-library sample.",
    )
    proportions: dict[str, float] | None = Field(
        None, description="Sampling weight per source; None: the paper's table 1."
    )
    eval_rows: int = Field(64, ge=0, description="Held-out rows per source for validation loss.")

    @field_validator("proportions")
    @classmethod
    def _weights_valid(cls, weights: dict[str, float] | None) -> dict[str, float] | None:
        if weights is not None:
            bad = [f"{k}={v}" for k, v in weights.items() if not (v >= 0 and v < float("inf"))]
            if bad:
                raise ValueError(f"weights must be finite and >= 0: {', '.join(bad)}")
            if sum(weights.values()) <= 0:
                raise ValueError("weights must sum to more than 0")
        return weights


class OptimizerConfig(_Section):
    lr: float | None = Field(None, gt=0, description="Peak LR; None: the preset's.")
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.95, ge=0, lt=1)
    eps: float = Field(1e-8, gt=0)
    weight_decay: float = Field(0.1, ge=0)
    grad_clip: float = Field(1.0, gt=0, description="Max global gradient norm.")
    warmup_steps: int = Field(2000, ge=0)
    final_lr_ratio: float = Field(0.1, ge=0, le=1, description="Cosine floor as a share of peak.")


class TrainConfig(_Section):
    steps: int = Field(100_000, gt=0, description="Optimizer steps.")
    seq_len: int | None = Field(
        None,  # RunConfig fills it in: after validation it is always set
        gt=0,
        description="Tokens per training row; None: the model's max_seq_len (2048 for the "
        "paper's presets).",
    )
    batch_tokens: int | None = Field(None, gt=0, description="Tokens per step; None: preset's.")
    micro_batch_size: int = Field(1, gt=0, description="Rows per worker per forward pass.")
    num_workers: int = Field(1, gt=0, description="Training processes (Ray Train workers).")
    cpus_per_worker: float = Field(
        1.0, gt=0, description="CPUs Ray reserves per worker; below 1 leaves room for Ray Data."
    )
    dtype: Literal["fp32", "bf16", "auto"] = Field(
        "fp32",
        description="bf16: FSDP mixed precision on GPUs with more than one worker, autocast "
        "otherwise (on CPU, and for a single worker). auto: bf16 on a GPU "
        "that supports it; on CPU bf16 only where a short matmul probe at the model's width "
        "finds it faster than fp32 (CPUs with AMX), else fp32 (llamaray.train.precision).",
    )
    device: Literal["auto", "cpu", "cuda"] = "auto"
    accelerator_type: str | None = Field(
        None,
        description="GPU type every worker must run on, as Ray names it (A100, H100; "
        "Ray Train's ScalingConfig.accelerator_type): one run never mixes node types. "
        "None: any GPU.",
    )
    seed: int = 0
    log_every: int = Field(10, gt=0, description="Steps between progress lines and metrics.")
    eval_every: int = Field(0, ge=0, description="Steps between validation passes; 0: at end.")
    checkpoint_every: int = Field(500, ge=0, description="Steps between checkpoints; 0: at end.")
    keep_checkpoints: int = Field(3, gt=0, description="Newest complete checkpoints kept.")
    async_checkpoint: bool = Field(
        True,
        description="Write checkpoints in the background: a step waits only while the state "
        "is copied to host memory (train/checkpoint_writer.py); false writes, hashes and "
        "uploads before the next step, using no second copy of the state.",
    )
    max_failures: int = Field(0, ge=0, description="Worker failures survived by restarting.")
    allow_changes: list[str] = Field(
        default_factory=list,
        description="Course fields (e.g. train.steps, data.corpus) a relaunch may change on "
        "purpose; any other change from the checkpoint's course is refused (train/course.py).",
    )
    hang_timeout_s: float = Field(
        600,
        gt=0,
        description="A worker that stops answering (a hung process, a frozen node) for this "
        "long fails the run, naming it; train.max_failures then restarts from a checkpoint.",
    )
    start_over_if_damaged: bool = Field(
        False,
        description="When every checkpoint of the run fails verification, train from step 0 "
        "instead of refusing (the damaged ones are named either way).",
    )
    nan_policy: Literal["skip", "stop"] = Field(
        "skip", description="Non-finite loss or gradients: skip the step, or stop the run."
    )
    max_skipped_steps: int = Field(
        20, ge=0, description="With nan_policy=skip, stop once more steps than this are skipped."
    )
    stop_at_step: int | None = Field(
        None,
        gt=0,
        description="End this launch after this step (checkpointed); relaunch "
        "the same name to go on. The schedule still spans train.steps.",
    )
    peak_tflops: float | None = Field(
        None, gt=0, description="Per-device peak for MFU; None: known GPUs only."
    )


class ParallelConfig(_Section):
    tensor: int = Field(1, gt=0, description="Tensor+sequence parallel degree (within a node).")
    replicate: int = Field(
        1,
        gt=0,
        description="HSDP: data-parallel replicas of the sharded model. The data-parallel "
        "workers (num_workers / tensor) form `replicate` groups of equal size; FSDP shards "
        "within a group and all-reduces gradients across groups. Set it to the number of "
        "nodes so the all-gathers stay on each node's fast links. 1: plain FSDP over all.",
    )
    reshard_after_forward: bool = Field(
        True, description="Free gathered weights after forward (ZeRO-3); False: ZeRO-2."
    )
    prefetch: bool = Field(True, description="Gather the next block's weights during compute.")
    defer_gradient_sync: bool = Field(
        True,
        description="Under gradient accumulation, reduce-scatter gradients once per step (in "
        "the last micro-batch) instead of per micro-batch; holds one unsharded gradient per "
        "parameter meanwhile. False: less memory, more communication.",
    )


class TrackingConfig(_Section):
    enabled: bool = True
    uri: str | None = Field(
        None,
        description="MLflow tracking URI; None: $MLFLOW_TRACKING_URI, else "
        "sqlite:///<output_dir>/mlflow.db.",
    )
    experiment: str = "llamaray"
    parent_run_id: str | None = Field(
        None,
        description="MLflow run this run is a child of (a sweep's parent run, the base "
        "model's run of a finetune); shown nested under it in the MLflow UI.",
    )
    system_metrics: bool = Field(True, description="CPU/GPU/memory sampled by MLflow.")
    export_hf: bool = Field(
        True,
        description="Export the final model (Hugging Face format, with its tokenizer) to "
        "the run's storage and log it to MLflow as a model that generates text.",
    )
    register_model: bool = Field(
        True,
        description="Register the logged model in MLflow's Model Registry as a new version "
        "of model_name (needs export_hf).",
    )
    model_name: str | None = Field(
        None,
        description="The registered model; None: the run's name. A finetune gives its "
        "base's registered model here to add a version to it instead of a model of its own.",
    )

    @field_validator("model_name")
    @classmethod
    def _registrable(cls, value: str | None) -> str | None:
        # MLflow's own rule for registered model names, said before any cluster work.
        if value is not None and (not value.strip() or any(c in value for c in "/:")):
            raise ValueError(f"{value!r} must be non-empty, without '/' or ':'")
        return value


class FaultConfig(_Section):
    """Fault injection, to test recovery; all off by default."""

    nan_at_steps: list[int] = Field(default_factory=list, description="Steps whose loss is NaN.")
    kill_rank: int | None = Field(None, ge=0, description="Worker to kill (once per run name).")
    kill_at_step: int | list[int] | None = Field(
        None, description="Step(s) at which kill_rank dies, once each."
    )
    stop_rank: int | None = Field(
        None, ge=0, description="Worker to freeze with SIGSTOP, as a hung process (once)."
    )
    stop_at_step: int | None = Field(None, gt=0, description="Step at which stop_rank freezes.")
    slow_step_s: float = Field(
        0.0,
        ge=0,
        description="Seconds every rank waits after each step, as on a slow cluster: gives a "
        "drill or test time to act while a run is in the middle of its steps.",
    )

    @field_validator("kill_at_step")
    @classmethod
    def _steps_positive(cls, steps: int | list[int] | None) -> int | list[int] | None:
        if any(s <= 0 for s in ([steps] if isinstance(steps, int) else steps or [])):
            raise ValueError(f"steps are counted from 1, got {steps}")
        return steps


class FinetuneConfig(_Section):
    """Instruction finetuning (`llamaray finetune`): start from `base`, learn the responses
    of `train_file`. The `data` and `tokenizer` sections are not used; `model` must describe
    the base's architecture (checked against the base before any worker starts)."""

    base: str = Field(
        description="A training run name (its newest complete checkpoint under the storage "
        "path), a checkpoint folder `<storage>/<run>/step-NNNNNNNN`, or a Meta / Hugging "
        "Face model folder."
    )
    train_file: str = Field(description="Instruction/response JSONL for training.")
    validation_file: str | None = Field(
        None, description="Held-out JSONL; None: hold out validation_fraction of train_file."
    )
    validation_fraction: float = Field(
        0.1, ge=0, lt=1, description="Share of train_file held out (seeded by train.seed)."
    )
    tokenizer: str | None = Field(
        None,
        description="tokenizer.model; None: the base's (a model folder's own, or the "
        "tokenizer logged to the base run's MLflow run).",
    )
    template: str = Field(
        DEFAULT_TEMPLATE, description="Prompt of an example without input: {instruction}."
    )
    template_with_input: str = Field(
        DEFAULT_TEMPLATE_WITH_INPUT,
        description="Prompt of an example with input: {instruction} and {input}.",
    )

    @field_validator("template")
    @classmethod
    def _template_fields(cls, text: str) -> str:
        check_template(text, ["instruction"])
        return text

    @field_validator("template_with_input")
    @classmethod
    def _template_with_input_fields(cls, text: str) -> str:
        check_template(text, ["instruction", "input"])
        return text

    @field_validator("base", "train_file")
    @classmethod
    def _not_empty(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty")
        return value


class RunConfig(_Section):
    """A whole run. Sections: model, tokenizer, data, optimizer, train, parallel, tracking,
    faults, and finetune (instruction finetuning of a base model; None: pretraining)."""

    name: str = Field("llamaray", description="Run name: relaunching a name resumes it.")
    output_dir: str = Field(
        "runs",
        description="Where data.prepare writes the corpus (path or s3://), and the default "
        "home of storage and the SQLite tracking store.",
    )
    storage: str | None = Field(
        None,
        description="The run's storage (path or s3://): checkpoints, Ray Train state and the "
        "exported model under <storage>/<name>/; None: <output_dir>/checkpoints.",
    )
    shared_filesystem: bool = Field(
        False,
        description="Every node of the Ray cluster mounts the same file system at the same "
        "path (NFS, EFS, Lustre): local output_dir, storage, data.corpus and a SQLite "
        "tracking store are then allowed on a multi-node cluster. Env: "
        "LLAMARAY_SHARED_FILESYSTEM=1.",
    )
    model: ModelConfig = Field(default_factory=ModelConfig)
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    parallel: ParallelConfig = Field(default_factory=ParallelConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    faults: FaultConfig = Field(default_factory=FaultConfig)
    finetune: FinetuneConfig | None = None

    @field_validator("name")
    @classmethod
    def _a_name(cls, value: str) -> str:
        return check_name(value)

    @model_validator(mode="after")
    def _check_consistency(self) -> RunConfig:
        problems: list[str] = []
        m, t = self.model, self.train
        if (
            m.vocab_size
            and self.tokenizer.path is None
            and m.vocab_size != self.tokenizer.vocab_size
        ):
            problems.append(
                f"model.vocab_size: {m.vocab_size} differs from tokenizer.vocab_size="
                f"{self.tokenizer.vocab_size}; set one of them"
            )
        try:
            args = m.args(self.tokenizer.vocab_size)
        except ValueError as err:
            # Map ModelArgs' messages (which name their own fields) onto config paths.
            problems += [f"model.{p}" for p in str(err).splitlines()[1:]]
            args = None
        if t.seq_len is None:  # the default: as long as the model's rotary table
            t.seq_len = args.max_seq_len if args is not None else 2048
        if args is not None and t.seq_len > args.max_seq_len:
            problems.append(
                f"train.seq_len: {t.seq_len} exceeds the model's max_seq_len={args.max_seq_len}"
            )
        tp = self.parallel.tensor
        if t.num_workers % tp:
            problems.append(f"parallel.tensor: {tp} must divide train.num_workers={t.num_workers}")
            tp = 1
        if args is not None and (args.n_heads % tp or args.kv_heads % tp):
            problems.append(
                f"parallel.tensor: {tp} must divide model.n_heads={args.n_heads} and "
                f"n_kv_heads={args.kv_heads}"
            )
        dp = t.num_workers // tp
        if dp % self.parallel.replicate:
            problems.append(
                f"parallel.replicate: {self.parallel.replicate} must divide the data-parallel "
                f"workers, train.num_workers / parallel.tensor = {t.num_workers} / {tp} = {dp}"
            )
        row_tokens = t.seq_len * t.micro_batch_size * dp
        if self.batch_tokens % row_tokens:
            problems.append(
                f"train.batch_tokens: {self.batch_tokens} is not divisible by seq_len x "
                f"micro_batch_size x data-parallel workers = {t.seq_len} x "
                f"{t.micro_batch_size} x {dp} = {row_tokens}"
            )
        if t.stop_at_step is not None and t.stop_at_step > t.steps:
            problems.append(f"train.stop_at_step: {t.stop_at_step} is past train.steps={t.steps}")
        f = self.faults
        if f.kill_rank is not None and f.kill_rank >= t.num_workers:
            problems.append(
                f"faults.kill_rank: {f.kill_rank} is not a rank of {t.num_workers} workers"
            )
        if (f.kill_rank is None) != (f.kill_at_step is None):
            problems.append("faults.kill_at_step: set together with faults.kill_rank")
        if f.stop_rank is not None and f.stop_rank >= t.num_workers:
            problems.append(
                f"faults.stop_rank: {f.stop_rank} is not a rank of {t.num_workers} workers"
            )
        if (f.stop_rank is None) != (f.stop_at_step is None):
            problems.append("faults.stop_at_step: set together with faults.stop_rank")
        if self.finetune is not None:
            # The presets' LRs are pretraining peaks: far too high to adapt a trained model.
            if self.optimizer.lr is None:
                problems.append("optimizer.lr: set a finetuning learning rate (no preset default)")
            if self.optimizer.warmup_steps >= t.steps:
                problems.append(
                    f"optimizer.warmup_steps: {self.optimizer.warmup_steps} is not below "
                    f"train.steps={t.steps} (a finetune needs its own short warmup)"
                )
        if problems:
            raise ValueError("\n".join(problems))
        return self

    @property
    def batch_tokens(self) -> int:
        return self.train.batch_tokens or get_preset(self.model.preset).batch_tokens

    @property
    def data_parallel(self) -> int:
        """Data-parallel replicas: workers / tensor-parallel degree."""
        return self.train.num_workers // self.parallel.tensor

    @property
    def rows_per_step(self) -> int:
        """Packed rows in one global batch: batch_tokens / seq_len."""
        return self.batch_tokens // self.train.seq_len

    @property
    def grad_accum_steps(self) -> int:
        """Micro-batches each worker accumulates so a step sees `batch_tokens` tokens."""
        t = self.train
        return self.batch_tokens // (t.seq_len * t.micro_batch_size * self.data_parallel)

    @property
    def storage_path(self) -> str:
        """Where Ray Train keeps runs' checkpoints (under `<storage_path>/<name>/`): `storage`,
        or `<output_dir>/checkpoints` made absolute."""
        if self.storage:
            return self.storage
        if self.output_dir.startswith("s3://"):
            return self.output_dir.rstrip("/") + "/checkpoints"
        return str(Path(self.output_dir).resolve() / "checkpoints")

    @property
    def run_uri(self) -> str:
        """The run's folder in its storage, `<storage_path>/<name>` (Ray Train's run folder):
        its checkpoints, the exported model (`hf/`), whatever the driver puts there for the
        ranks. The one rule; every part asks the config for it."""
        from llamaray.storage import join

        return join(self.storage_path, self.name)

    @property
    def peak_lr(self) -> float:
        return self.optimizer.lr or get_preset(self.model.preset).lr

    def model_args(self, vocab_size: int | None = None) -> ModelArgs:
        return self.model.args(vocab_size or self.tokenizer.vocab_size)


def _format_error(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling; see the section's fields)"
        # Cross-field problems come from the root validator and carry their own paths.
        lines += [f"  {path}: {line}" if path else f"  {line}" for line in msg.split("\n")]
    return "invalid config:\n" + "\n".join(lines)


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """["train.steps=10", "model.preset=debug"] -> {"train": {"steps": 10}, ...}.

    Values are parsed as YAML, so numbers, booleans, lists and null work as typed.
    """
    tree: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} is not of the form key.path=value")
        node = tree
        *parents, leaf = key.strip().split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r} conflicts with an earlier override")
        node[leaf] = yaml.safe_load(raw) if raw.strip() else None
    return tree


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    schema: type[_Section] = RunConfig,
):
    """Read a YAML config (or start from defaults) and apply overrides; raise ConfigError
    listing every invalid field. `schema` is RunConfig (training) or CorpusConfig.

    >>> load_config(None, ["model.preset=debug", "train.seq_len=64", "train.steps=10"]).train.steps
    10
    """
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {path} is not valid YAML: {err}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(
                f"config file {path} must hold a mapping of sections, not {type(loaded).__name__}"
            )
        data = loaded or {}
    data = _merge(data, parse_overrides(overrides or []))
    try:
        return schema.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_error(err)) from None
