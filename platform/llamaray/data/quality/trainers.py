"""Training each quality model in one process: the body of `llamaray quality train`'s Ray
task (`data.quality.train`), and what tests call directly on small text.

- `train_fasttext`: a supervised fastText model (Joulin et al. 2016) from `__label__<x> text`
  lines: the language-id model and the reference classifier.
- `train_sentencepiece`: the SentencePiece model (Kudo 2018) the KenLM text is tokenized with
  (CCNet trains one per language on Wikipedia).
- `train_kenlm`: KenLM's `lmplz -o N` (modified Kneser-Ney, Heafield et al. 2013) on the
  tokenized text, then `build_binary` (CCNet's `lm_sp/<lang>.arpa.bin` are such binaries).
- `sample_cutoffs`: the perplexity bucket edges from a sample of pages (CCNet's cutoff.csv).
"""

from __future__ import annotations

import subprocess
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

from llamaray.data.quality.models import LMPLZ_HINT, kenlm_tool
from llamaray.data.quality.perplexity import Cutoffs, percentile_cutoffs, perplexity_of_lines

LID_PARAMS: dict = {
    "epoch": 5,
    "lr": 0.5,
    "dim": 16,
    "minn": 2,
    "maxn": 4,
    "wordNgrams": 1,
    "minCount": 1,
    "loss": "softmax",
}
"""Language id: character 2- to 4-grams carry most of a language's signal in short text
(fastText's language identification models use subword n-grams; its lid.176 has dim 16)."""

REFERENCE_PARAMS: dict = {
    "epoch": 5,
    "lr": 0.2,
    "dim": 64,
    "wordNgrams": 2,
    "minCount": 1,
    "loss": "softmax",
}
"""The reference classifier: word uni- and bigrams, a plain linear model over them."""


def train_fasttext(
    lines_file: str | Path, output: str | Path, *, threads: int = 1, seed: int = 0, **params
) -> dict:
    """Train a fastText classifier on `lines_file` (`__label__<x> <text>` a line); save it to
    `output`; return its labels and the seconds it took."""
    import fasttext

    start = time.perf_counter()
    # fastText seeds its own generator (`seed`); one thread makes the result repeatable.
    model = fasttext.train_supervised(
        input=str(lines_file), thread=threads, seed=seed, verbose=0, **params
    )
    model.save_model(str(output))
    labels = sorted(label.removeprefix("__label__") for label in model.get_labels())
    return {"labels": labels, "seconds": round(time.perf_counter() - start, 2)}


def train_sentencepiece(
    lines: Iterable[str], output_prefix: str | Path, *, vocab_size: int = 8000, threads: int = 1
) -> bytes:
    """A unigram SentencePiece model of the (normalized) `lines`, written to
    `<output_prefix>.model`; returns its bytes. The vocabulary is a bound, not a demand
    (`hard_vocab_limit=false`): small text gives a smaller model instead of an error."""
    import sentencepiece as spm

    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_prefix=str(output_prefix),
        model_type="unigram",
        vocab_size=vocab_size,
        hard_vocab_limit=False,
        character_coverage=0.9999,
        num_threads=threads,
        minloglevel=2,
    )
    return Path(f"{output_prefix}.model").read_bytes()


def train_kenlm(
    tokenized_file: str | Path, output: str | Path, *, order: int = 5, memory: str = "50%"
) -> dict:
    """`lmplz -o order` on `tokenized_file` (pieces separated by spaces, a sentence a line),
    then `build_binary` into `output`; returns the seconds each took.

    `--discount_fallback`: on small text some n-gram orders have too few counts for
    Kneser-Ney's discounts; KenLM then uses its fallback discounts instead of failing.
    """
    lmplz, build_binary = kenlm_tool("lmplz"), kenlm_tool("build_binary")
    if lmplz is None or build_binary is None:
        raise FileNotFoundError(f"KenLM's lmplz / build_binary not found: {LMPLZ_HINT}")
    with tempfile.TemporaryDirectory(prefix="llamaray-lmplz-") as tmp:
        arpa = Path(tmp) / "model.arpa"
        start = time.perf_counter()
        _run(
            [
                lmplz,
                "-o",
                str(order),
                "-S",
                memory,
                "-T",
                tmp,
                "--discount_fallback",
                "--text",
                str(tokenized_file),
                "--arpa",
                str(arpa),
            ]
        )
        lmplz_s = time.perf_counter() - start
        _run([build_binary, str(arpa), str(output)])
    return {
        "lmplz_s": round(lmplz_s, 2),
        "build_binary_s": round(time.perf_counter() - start - lmplz_s, 2),
    }


def _run(command: list[str]) -> None:
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        tail = "\n".join(done.stderr.strip().splitlines()[-15:])
        raise RuntimeError(f"{Path(command[0]).name} failed ({done.returncode}):\n{tail}")


def sample_cutoffs(pages: Iterable[list[str]], model_uri: str | Path) -> tuple[Cutoffs, int]:
    """The bucket edges from a sample of pages, each given as its tokenized lines: the 33rd
    and 66th percentiles of their perplexities. Returns them and the pages scored."""
    import kenlm  # the `quality` extra

    # Loaded here, not through the process's model cache: the file is a task's temporary,
    # and a cached model would pin its memory and its deleted file in a reused worker.
    lm = kenlm.Model(str(model_uri))
    scores = [perplexity_of_lines(lines, lm)[0] for lines in pages if lines]
    return percentile_cutoffs(scores), len(scores)
