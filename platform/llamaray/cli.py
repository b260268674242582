"""`llamaray <command>`: the platform's entry points.

llamaray presets
llamaray tokenizer train --input corpus/*.jsonl --output tok/ --vocab-size 32000
llamaray train --config jobs/configs/demo.yaml train.steps=100
llamaray convert ckpt/llama-7b out/llama-7b-hf --to hf
llamaray generate --model runs/demo/model --prompt "def main("
llamaray eval --config jobs/configs/demo.yaml --task jobs/tasks/stdlib-modules
llamaray harness --model runs/checkpoints/demo/hf --tasks arc_easy   # lm-evaluation-harness
llamaray plan --experiment llamaray-scaling --compute 1e21 --inference-tokens 1e12
llamaray corpus versions runs/corpus-demo        # also: prune --keep 1, unlock
llamaray quality train lid --lang en=en.txt --lang fr=fr.txt --output models/lid.bin
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def cmd_presets(opts: argparse.Namespace) -> int:
    """A table of the size presets: architecture, parameter count, the paper's LR and batch."""

    from llamaray.model import PRESETS
    from llamaray.model.flops import flops_per_token, param_count

    header = (
        f"{'preset':7} {'dim':>5} {'heads':>5} {'layers':>6} {'ffn':>6} {'params':>8} "
        f"{'lr':>8} {'batch tok':>10} {'GFLOP/tok':>9}  notes"
    )
    print(header)
    print("-" * len(header))
    for p in PRESETS.values():
        n = param_count(p.args)
        a = p.args
        print(
            f"{p.name:7} {a.dim:5} {a.n_heads:5} {a.n_layers:6} {a.ffn_hidden_dim:6} "
            f"{_billions(n):>8} {p.lr:8.1e} {_tokens(p.batch_tokens):>10} "
            f"{flops_per_token(a, a.max_seq_len) / 1e9:9.2f}  {p.description}"
        )
    print("\nparams counted on the meta device with the 32000-piece vocabulary; GFLOP/tok is")
    print("training (forward + backward) at the preset's context length, PaLM's formula.")
    return 0


def _billions(n: int) -> str:
    # The paper's table truncates (65.29B is listed as 65.2B); do the same.
    return f"{int(n / 1e8) / 10:.1f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def _tokens(n: int) -> str:
    return f"{n // 2**20}M" if n >= 2**20 and n % 2**20 == 0 else f"{n // 1024}K"


def cmd_tokenizer_train(opts: argparse.Namespace) -> int:
    from llamaray.tokenizer import train_tokenizer

    missing = [p for p in opts.input if not Path(p).is_file()]
    if missing:
        raise SystemExit(f"error: --input: no such file(s): {', '.join(missing)}")
    tok = train_tokenizer(opts.input, opts.output, vocab_size=opts.vocab_size)
    print(f"wrote {tok.path} ({tok.vocab_size} pieces)")
    return 0


def cmd_train(opts: argparse.Namespace) -> int:
    from llamaray.config import load_config

    cfg = load_config(opts.config, opts.overrides)  # fails here, before any cluster work
    if opts.print_config:
        from llamaray.tracking import redact

        print(redact(cfg.to_yaml()))  # a tracking.uri's credentials are not printed
        return 0
    from llamaray.orchestrate.pretrain import TrainingStopped, pretrain

    try:
        out = pretrain(cfg)
    except TrainingStopped as err:
        print(f"training stopped: {err}", file=sys.stderr)
        return 1
    print(f"step {out.step} of run {out.name}; outputs in {out.run_uri}")
    return 0


def cmd_prepare(opts: argparse.Namespace) -> int:
    from llamaray.config import CorpusConfig, load_config

    cfg = load_config(opts.config, opts.overrides, schema=CorpusConfig)  # fail before Ray
    if opts.print_config:
        print(cfg.to_yaml())
        return 0
    from llamaray.data.corpus_lock import CorpusLocked, check_free
    from llamaray.data.prepare import check_models, corpus_location, prepare_corpus
    from llamaray.ray_session import start_ray

    check_models(cfg)  # CommonCrawl's quality models: named before Ray starts
    try:
        check_free(corpus_location(cfg))  # seconds before Ray would be up
        start_ray(opts.address)
        prepare_corpus(cfg)
    except CorpusLocked as err:  # another launch is building it: one line, no traceback
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


def cmd_corpus(opts: argparse.Namespace) -> int:
    """The versions of a prepared corpus (`data.corpus_layout`): list, prune, unlock."""
    from llamaray.data.corpus_layout import (
        KEEP_VERSIONS,
        list_versions,
        prune_versions,
        read_manifest,
    )
    from llamaray.data.corpus_lock import BuildLock, describe

    corpus = opts.corpus
    lock = BuildLock(corpus, f"(llamaray corpus {opts.corpus_command})")
    if opts.corpus_command == "versions":
        current = (read_manifest(corpus) or {}).get("version")
        for version, complete in list_versions(corpus).items():
            state = "current" if version == current else "complete" if complete else "incomplete"
            print(f"{version}  {state}")
        holder = lock.read()
        print(f"locked by {describe(holder)}" if holder else "not locked")
    elif opts.corpus_command == "prune":
        with lock:  # a running build's folder is incomplete: never prune beside one
            removed = prune_versions(corpus, keep=opts.keep or KEEP_VERSIONS)
        print(f"removed {', '.join(removed)}" if removed else "nothing to remove")
    else:
        holder = lock.read()
        if holder is None:
            print(f"{corpus} is not locked")
            return 0
        from llamaray import storage

        storage.delete_tree(lock.uri)
        print(f"removed the lock of {describe(holder)}")
    return 0


def cmd_quality_train(opts: argparse.Namespace) -> int:
    """Train one of CommonCrawl's quality models on Ray (`data.quality.train`); print what
    was written and what it took."""
    import json

    from llamaray.data.quality import train
    from llamaray.ray_session import start_ray

    if opts.model == "lid":
        langs: dict[str, list[str]] = {}
        for item in opts.lang:
            lang, sep, path = item.partition("=")
            if not sep or not lang or not path:
                raise ValueError(f"--lang {item!r}: give <language>=<text file>, e.g. fr=fr.txt")
            langs.setdefault(lang, []).append(path)
        if len(langs) < 2:
            raise ValueError("--lang: give text of at least two languages")
    start_ray(opts.address)
    common = {"cpus": opts.cpus, "seed": opts.seed}
    if opts.model == "lid":
        summary = train.train_lid(langs, opts.output, max_lines=opts.max_lines, **common)
    elif opts.model == "lm":
        summary = train.train_lm(
            opts.input, opts.output, lang=opts.language, sample=opts.sample, order=opts.order,
            vocab_size=opts.vocab_size, sample_pages=opts.sample_pages, **common,
        )  # fmt: skip
    else:
        summary = train.train_reference(opts.positive, opts.negative, opts.output, **common)
    print(json.dumps(summary, indent=1))
    return 0


def add_quality_parser(sub) -> None:
    quality = sub.add_parser("quality", help="CommonCrawl's quality models (CCNet)")
    train = quality.add_subparsers(dest="quality_command", required=True).add_parser(
        "train", help="train a quality model on Ray from your own text (local or s3://)"
    )
    models = train.add_subparsers(dest="model", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--cpus", type=int, default=1, help="CPUs of the training task")
    common.add_argument("--seed", type=int, default=0)
    common.add_argument("--address", default=None, help="Ray cluster (default: RAY_ADDRESS/local)")
    p = models.add_parser("lid", parents=[common], help="fastText language id (quality.lid_model)")
    p.add_argument("--lang", action="append", required=True, metavar="LANG=PATH",
                   help="text of one language (repeat; JSONL, Parquet or text files)")  # fmt: skip
    p.add_argument("--output", required=True, help="the model file, e.g. models/lid.bin")
    p.add_argument("--max-lines", type=int, default=None, help="sample at most this many lines")
    p.set_defaults(func=cmd_quality_train)
    p = models.add_parser(
        "lm", parents=[common], help="KenLM + SentencePiece + cutoffs (quality.perplexity_model)"
    )
    p.add_argument("--input", nargs="+", required=True, help="training text (e.g. Wikipedia)")
    p.add_argument("--output", required=True, help="folder for <lang>.arpa.bin and companions")
    p.add_argument("--language", default="en", help="names the files: <language>.arpa.bin")
    p.add_argument("--sample", nargs="+", default=None,
                   help="pages whose perplexity percentiles set the cutoffs (CCNet: a sample "
                   "of the crawl); default: the training pages")  # fmt: skip
    p.add_argument("--sample-pages", type=int, default=10_000, help="most sample pages scored")
    p.add_argument("--order", type=int, default=5, help="n-gram order (CCNet: 5)")
    p.add_argument("--vocab-size", type=int, default=8000, help="SentencePiece pieces (at most)")
    p.set_defaults(func=cmd_quality_train)
    p = models.add_parser(
        "reference", parents=[common], help="reference classifier (quality.reference_model)"
    )
    p.add_argument("--positive", nargs="+", required=True, help="pages cited by Wikipedia")
    p.add_argument("--negative", nargs="+", required=True, help="randomly sampled pages")
    p.add_argument("--output", required=True, help="the model file, e.g. models/reference.bin")
    p.set_defaults(func=cmd_quality_train)


def cmd_convert(opts: argparse.Namespace) -> int:
    from llamaray.model.formats import convert

    dst = convert(opts.src, opts.dst, to=opts.to, num_shards=opts.shards, dtype=opts.dtype)
    print(f"wrote {opts.to} checkpoint to {dst}")
    return 0


def cmd_generate(opts: argparse.Namespace) -> int:

    from llamaray.model import Llama
    from llamaray.model.device import pick_device
    from llamaray.model.generation import SamplingConfig, generate_text
    from llamaray.tokenizer import Tokenizer

    tokenizer_path = Path(opts.tokenizer or Path(opts.model) / "tokenizer.model")
    if not tokenizer_path.is_file():
        raise SystemExit(f"error: no tokenizer at {tokenizer_path}; pass --tokenizer")
    device = pick_device(opts.device, setting="--device")
    model = Llama.from_pretrained(opts.model, device=device)
    tokenizer = Tokenizer(tokenizer_path)
    config = SamplingConfig(
        max_new_tokens=opts.max_new_tokens,
        temperature=opts.temperature,
        top_p=opts.top_p,
        seed=opts.seed,
    )
    for prompt, text in zip(
        opts.prompt, generate_text(model, tokenizer, opts.prompt, config), strict=True
    ):
        print(prompt + text)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llamaray", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("presets", help="model size presets with parameter counts")
    p.set_defaults(func=cmd_presets)

    tok = sub.add_parser("tokenizer", help="SentencePiece tokenizer").add_subparsers(
        dest="tokenizer_command", required=True
    )
    p = tok.add_parser("train", help="train a BPE tokenizer with LLaMA's settings")
    p.add_argument("--input", nargs="+", required=True, help="text or JSONL files")
    p.add_argument("--output", required=True, help="directory for tokenizer.model")
    p.add_argument("--vocab-size", type=int, default=32000)
    p.set_defaults(func=cmd_tokenizer_train)

    p = sub.add_parser(
        "train",
        help="pretrain on Ray Train (config + key.path=value overrides); "
        "relaunching a run name resumes it",
    )
    p.add_argument("--config", default=None, help="YAML file (defaults if omitted)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config, exit")
    p.add_argument("overrides", nargs="*", help="key.path=value, e.g. train.steps=100")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("prepare", help="build a corpus on Ray: clean, dedup, tokenize, pack")
    p.add_argument("--config", default=None, help="YAML file (defaults if omitted)")
    p.add_argument("--address", default=None, help="Ray cluster (default: RAY_ADDRESS/local)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config, exit")
    p.add_argument("overrides", nargs="*", help="key.path=value, e.g. seq_len=2048")
    p.set_defaults(func=cmd_prepare)

    corpus = sub.add_parser("corpus", help="a prepared corpus's versions").add_subparsers(
        dest="corpus_command", required=True
    )
    p = corpus.add_parser("versions", help="list the versions (current, complete) and the lock")
    p.add_argument("corpus", help="<output_dir>/<name>, a local path or s3://")
    p.set_defaults(func=cmd_corpus)
    p = corpus.add_parser("prune", help="delete all but the newest complete versions")
    p.add_argument("corpus", help="<output_dir>/<name>, a local path or s3://")
    p.add_argument(
        "--keep",
        type=int,
        default=None,
        help="complete versions kept, the current one included (default: what prepare keeps, 2)",
    )
    p.set_defaults(func=cmd_corpus)
    p = corpus.add_parser("unlock", help="remove the build lock of a launch that is dead")
    p.add_argument("corpus", help="<output_dir>/<name>, a local path or s3://")
    p.set_defaults(func=cmd_corpus)
    add_quality_parser(sub)

    p = sub.add_parser("convert", help="convert between Meta and Hugging Face checkpoints")
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--to", required=True, choices=["meta", "hf"])
    p.add_argument("--shards", type=int, default=1, help="model-parallel shards (meta only)")
    p.add_argument("--dtype", default=None, help="cast weights, e.g. bf16")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("generate", help="sample text from a checkpoint")
    p.add_argument("--model", required=True, help="Meta or Hugging Face checkpoint folder")
    p.add_argument("--tokenizer", default=None, help="default: <model>/tokenizer.model")
    p.add_argument("--prompt", action="append", required=True, help="repeat for a batch")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.7, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--device", default=None)
    p.set_defaults(func=cmd_generate)
    from llamaray.sweep.driver import add_sweep_parser  # imports no Ray

    add_sweep_parser(sub)
    from llamaray.plan.cli import add_plan_parser  # imports no torch, scipy or matplotlib

    add_plan_parser(sub)
    from llamaray.eval.cli import add_eval_parser  # imports no Ray or torch

    add_eval_parser(sub)
    from llamaray.eval.harness_cli import add_harness_parser  # imports no torch or lm-eval

    add_harness_parser(sub)
    from llamaray.finetune.driver import add_finetune_parser  # imports no Ray or torch

    add_finetune_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from llamaray.config import ConfigError

    opts = build_parser().parse_args(argv)
    try:
        return opts.func(opts)
    except Exception as err:
        if not isinstance(err, (ConfigError, FileNotFoundError, ValueError, *_loaded_errors())):
            raise
        # User errors get one clear line (the config error lists every field), no traceback.
        print(f"error: {err}", file=sys.stderr)
        return 2


def _loaded_errors() -> tuple[type[Exception], ...]:
    """User-facing error classes of modules the command imported (a damaged or refused
    checkpoint); modules it never imported cannot have raised theirs, and importing them
    here would import torch into every command."""
    module = sys.modules.get("llamaray.train.checkpoint")
    return (module.CheckpointError,) if module else ()


if __name__ == "__main__":
    sys.exit(main())
