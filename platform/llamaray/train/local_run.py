"""One machine, one process, end to end: sample text -> tokenizer -> rows -> model -> text.

What `make demo` runs. Each stage writes into `<output_dir>/<name>/` and reuses what a
previous run left there when it is still valid (a tokenizer already trained, say).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from llamaray.config import RunConfig
from llamaray.data.local import prepare_rows
from llamaray.data.sample_text import iter_texts, write_stdlib_sample
from llamaray.model.formats import save_hf
from llamaray.model.generation import SamplingConfig, generate_text
from llamaray.tokenizer import Tokenizer, train_tokenizer
from llamaray.train.loop import TrainResult, train_local

DEMO_PROMPTS = ("def main(", "import os\n", "The following")


@dataclass
class LocalRunOutputs:
    run_dir: Path
    tokenizer: Tokenizer
    result: TrainResult
    model_dir: Path
    samples: dict[str, str]


def _say(msg: str) -> None:
    print(f"[llamaray] {msg}", file=sys.stderr, flush=True)


def corpus_paths(cfg: RunConfig, run_dir: Path) -> list[Path]:
    if cfg.data.paths:
        missing = [p for p in cfg.data.paths if not Path(p).is_file()]
        if missing:
            raise FileNotFoundError(f"data.paths: no such file(s): {', '.join(missing)}")
        return [Path(p) for p in cfg.data.paths]
    _say("data.paths is empty: building the standard-library text sample")
    sample = write_stdlib_sample(run_dir / "corpus", int(cfg.data.sample_mb * 1e6), cfg.train.seed)
    return list(sample.values())


def load_or_train_tokenizer(cfg: RunConfig, inputs: list[Path], run_dir: Path) -> Tokenizer:
    if cfg.tokenizer.path:
        return Tokenizer(cfg.tokenizer.path)
    out = run_dir / "tokenizer"
    model_file = out / "tokenizer.model"
    if model_file.is_file():
        tok = Tokenizer(model_file)
        if tok.vocab_size == cfg.tokenizer.vocab_size:
            _say(f"reusing {model_file}")
            return tok
    _say(f"training a {cfg.tokenizer.vocab_size}-piece BPE tokenizer")
    return train_tokenizer(inputs, out, vocab_size=cfg.tokenizer.vocab_size)


def run_local(cfg: RunConfig, prompts: tuple[str, ...] = DEMO_PROMPTS) -> LocalRunOutputs:
    """Run the whole pipeline in this process; return where everything was written."""
    run_dir = Path(cfg.output_dir) / cfg.name
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(cfg.to_yaml())
    inputs = corpus_paths(cfg, run_dir)
    tokenizer = load_or_train_tokenizer(cfg, inputs, run_dir)
    train_rows, val_rows = prepare_rows(
        iter_texts(inputs), tokenizer, cfg.train.seq_len, cfg.data.validation_fraction,
        cfg.train.seed,
    )  # fmt: skip
    result = train_local(cfg, train_rows, val_rows, vocab_size=tokenizer.vocab_size)
    model_dir = save_hf(result.model, run_dir / "model")
    tokenizer_copy = model_dir / "tokenizer.model"
    tokenizer_copy.write_bytes(Path(tokenizer.path).read_bytes())
    _say(f"model saved in Hugging Face format to {model_dir}")
    sampling = SamplingConfig(max_new_tokens=48, temperature=0.7, top_p=0.9, seed=cfg.train.seed)
    texts = generate_text(result.model, tokenizer, list(prompts), sampling)
    samples = dict(zip(prompts, texts, strict=True))
    for prompt, text in samples.items():
        print(f"--- {prompt!r}\n{prompt}{text}\n", flush=True)
    return LocalRunOutputs(run_dir, tokenizer, result, model_dir, samples)
