"""`llamaray quality train`: the quality steps' models from a user's own text, on Ray.

Each model is made in two parts. The text preparation is a Ray Data pipeline: read the inputs
(JSONL / Parquet / text, local or s3://, `data.read`), split pages into lines, normalize
(`normalize`), label, tokenize, sample, shuffle; it runs across the cluster and ends
materialized in the object store. The training is one Ray task with the CPUs asked for
(`--cpus`): fastText and KenLM's lmplz are single-process programs, so the task gets the
prepared blocks one at a time by reference, writes them to its own disk, trains
(`trainers`), and hands the model over: to `s3://` outputs it uploads them itself; a local
output path is this machine's, so the files come back to the driver, which writes them (no
node shares a disk with another).

- `lid`: fastText language id from text of each language (`--lang fr=path ...`), one
  example a line, labeled `__label__<lang>`.
- `lm`: a SentencePiece model and a KenLM n-gram model of one language's text, and the
  perplexity cutoffs (33rd / 66th percentiles) of a sample of pages, written side by side as
  `<lang>.sp.model`, `<lang>.arpa.bin`, `<lang>.cutoffs.json` (the names `prepare` finds them
  by, `perplexity.companion`).
- `reference`: the fastText classifier of pages used as Wikipedia references (`--positive`)
  vs random pages (`--negative`), one example a page.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import pyarrow as pa

from llamaray.config import ConfigError
from llamaray.console import logger
from llamaray.data.quality import perplexity, reference, trainers
from llamaray.data.quality.normalize import normalize
from llamaray.storage import is_s3, write_bytes

log = logger("quality")


# --------------------------------------------------------------- text preparation (Ray Data)


def check_inputs(flags: dict[str, list[str] | None]) -> None:
    """Each input pattern names at least one file, and none is local on a cluster whose
    nodes share no disk: else `ConfigError` naming the flag, before any work. (Read as a
    corpus, a missing file would only be a rejected record, dropped with the rest, and the
    model trained on what is left: a language-id model missing a language, say.)"""
    from llamaray.data.files import expand_paths
    from llamaray.placement import require_shared_state
    from llamaray.storage import exists

    problems = [
        f"{flag} {pattern}: no such file"
        for flag, patterns in flags.items()
        for pattern in patterns or []
        if not any(exists(path) for path in expand_paths([pattern]))
    ]
    if problems:
        raise ConfigError("invalid input:\n" + "\n".join(f"  {p}" for p in problems))
    local = {
        flag: next((p for p in patterns if not is_s3(p)), None)
        for flag, patterns in flags.items()
        if patterns
    }
    require_shared_state(local, None)


def _documents(inputs: dict[str, list[str]]):
    """The documents of `inputs` (label -> paths) as (label, text) rows, from `read_corpus`
    (the label stands in its `source` column); unreadable records are dropped."""
    from ray.data.expressions import col

    from llamaray.data.read import read_corpus

    ds = read_corpus(inputs)
    return ds.filter(expr=col("kind") == "doc").select_columns(["source", "text"])


def lid_lines(batch: pa.Table) -> pa.Table:
    """fastText examples for language id: each non-blank line of a page, newline-free,
    labeled with its language (the page's `source`). Raw text: lid.176.bin too is applied
    to pages as they are."""
    out = []
    for lang, text in zip(batch["source"].to_pylist(), batch["text"].to_pylist(), strict=True):
        out += [f"__label__{lang} {line.strip()}" for line in text.splitlines() if line.strip()]
    return pa.table({"line": pa.array(out, pa.string())})


def reference_lines(batch: pa.Table) -> pa.Table:
    """fastText examples for the reference classifier: one a page, as the classifier reads
    pages in `prepare` (`reference.classifier_line`)."""
    out = []
    for label, text in zip(batch["source"].to_pylist(), batch["text"].to_pylist(), strict=True):
        if line := reference.classifier_line(text):
            out.append(f"__label__{label} {line}")
    return pa.table({"line": pa.array(out, pa.string())})


def normalized_lines(batch: pa.Table) -> pa.Table:
    """Each page's normalized non-blank lines (CCNet's), for the SentencePiece and KenLM
    training text."""
    out = [
        n
        for text in batch["text"].to_pylist()
        for line in text.splitlines()
        if (n := normalize(line))
    ]
    return pa.table({"line": pa.array(out, pa.string())})


class Tokenize:
    """Lines -> their SentencePiece pieces joined by spaces (KenLM's training text); with
    `pages=True`, each page -> its tokenized lines joined by newlines (a cutoffs sample)."""

    def __init__(self, sp_model: bytes, pages: bool = False):
        import sentencepiece as spm

        self.sp, self.pages = spm.SentencePieceProcessor(model_proto=sp_model), pages

    def __call__(self, batch: pa.Table) -> pa.Table:
        if self.pages:
            out = []
            for text in batch["text"].to_pylist():
                lines = [n for line in text.splitlines() if (n := normalize(line))]
                pieces = self.sp.encode(lines, out_type=str) if lines else []
                out.append("\n".join(" ".join(p) for p in pieces))
        else:
            lines = batch["line"].to_pylist()
            out = [" ".join(p) for p in self.sp.encode(lines, out_type=str)] if lines else []
        return pa.table({"line": pa.array(out, pa.string())})


def _limit(ds, most: int | None, seed: int):
    """At most about `most` rows of `ds`, a seeded random sample (all when None or fewer)."""
    if most is None:
        return ds
    total = ds.count()
    return ds if total <= most else ds.random_sample(most / total, seed=seed)


def _prepared(ds, seed: int, shuffle: bool = True) -> list:
    """`ds` (column `line`) shuffled with `seed` and materialized: the references of its
    blocks, which the training task reads one at a time."""
    if shuffle:  # fastText learns by SGD: examples grouped by label would skew it
        ds = ds.random_shuffle(seed=seed)
    return ds.materialize().to_arrow_refs()


# ----------------------------------------------------------------- the training task (Ray)


def _write_lines(refs: list, path: Path) -> int:
    """The prepared blocks into a local text file, one at a time; returns the lines."""
    import ray

    n = 0
    with path.open("w", encoding="utf-8") as f:
        for ref in refs:
            for line in ray.get(ref)["line"].to_pylist():
                f.write(line + "\n")
                n += 1
    return n


def _deliver(files: dict[str, Path], output_dir: str, s3) -> dict[str, bytes]:
    """Each file to `output_dir` when that is s3:// (returns {}), with `s3`, the driver's
    S3 filesystem (its endpoint, region, retries); else their bytes for the driver to write
    (a local output is the driver's disk)."""
    if is_s3(output_dir):
        from llamaray.storage import adopt_s3, join, upload

        adopt_s3(s3)
        for name, path in files.items():
            upload(path, join(output_dir, name))
        return {}
    return {name: path.read_bytes() for name, path in files.items()}


def fasttext_task(
    refs: list, output_name: str, output_dir: str, s3, params: dict, threads: int, seed: int
) -> dict:
    """The fastText training task: the prepared examples to a file, one model trained."""
    with tempfile.TemporaryDirectory(prefix="llamaray-fasttext-") as tmp:
        lines_file = Path(tmp) / "train.txt"
        n = _write_lines(refs, lines_file)
        if not n:
            raise ValueError("no training example: the inputs hold no text")
        model = Path(tmp) / output_name
        summary = trainers.train_fasttext(lines_file, model, threads=threads, seed=seed, **params)
        files = _deliver({output_name: model}, output_dir, s3)
    return {**summary, "examples": n, "files": files}


def kenlm_task(
    sp_model: bytes, refs: list, sample_refs: list, lang: str, output_dir: str, s3, order: int
) -> dict:
    """The KenLM training task: lmplz + build_binary on the tokenized lines, then the cutoffs
    of the sample pages, scored by the new model in this process."""
    import ray

    with tempfile.TemporaryDirectory(prefix="llamaray-kenlm-") as tmp:
        text = Path(tmp) / "tokenized.txt"
        n = _write_lines(refs, text)
        if not n:
            raise ValueError("no training text: the inputs hold no text")
        model = Path(tmp) / f"{lang}.arpa.bin"
        timings = trainers.train_kenlm(text, model, order=order)
        pages = (
            page.split("\n") if page else []
            for ref in sample_refs
            for page in ray.get(ref)["line"].to_pylist()
        )
        cutoffs, scored = trainers.sample_cutoffs(pages, model)
        sp = Path(tmp) / f"{lang}.sp.model"
        sp.write_bytes(sp_model)
        cut = Path(tmp) / f"{lang}.cutoffs.json"
        cut.write_text(
            cutoffs.to_json(
                language=lang, percentiles=list(perplexity.PERCENTILES), sample_pages=scored
            )
        )
        files = _deliver({p.name: p for p in (model, sp, cut)}, output_dir, s3)
    return {
        **timings,
        "lines": n,
        "sample_pages": scored,
        "cutoffs": cutoffs.__dict__,
        "files": files,
    }


def sentencepiece_task(refs: list, vocab_size: int, threads: int) -> bytes:
    import ray

    lines = (line for ref in refs for line in ray.get(ref)["line"].to_pylist())
    with tempfile.TemporaryDirectory(prefix="llamaray-sp-") as tmp:
        return trainers.train_sentencepiece(
            lines, Path(tmp) / "sp", vocab_size=vocab_size, threads=threads
        )


def _run_task(fn, cpus: int, *args):
    import ray

    return ray.get(ray.remote(num_cpus=cpus, max_retries=0)(fn).remote(*args))


def _write_output(output_dir: str, files: dict[str, bytes]) -> list[str]:
    from llamaray.storage import join

    for name, data in files.items():
        write_bytes(join(output_dir, name), data)
    return [join(output_dir, name) for name in files]


def _s3(output: str):
    """The driver's S3 filesystem when `output` is on S3 (for the task to adopt), else None."""
    from llamaray.storage import filesystem

    return filesystem(output)[0] if is_s3(output) else None


def _split_output(output: str) -> tuple[str, str]:
    """`models/lid.bin` -> ("models", "lid.bin")."""
    head, _, name = output.rstrip("/").rpartition("/")
    return head or ".", name


# ------------------------------------------------------------------------------- commands


def train_lid(
    langs: dict[str, list[str]],
    output: str,
    *,
    cpus: int = 1,
    seed: int = 0,
    max_lines: int | None = None,
    epoch: int | None = None,
) -> dict:
    """A fastText language-id model of the languages `langs` (language -> text files) at
    `output` (local or s3://). `max_lines`: a seeded sample of at most about this many
    lines."""
    start = time.perf_counter()
    check_inputs({f"--lang {lang}=": paths for lang, paths in langs.items()})
    log.info(f"language id: preparing lines of {', '.join(langs)}")
    ds = _limit(_documents(langs).map_batches(lid_lines, batch_format="pyarrow"), max_lines, seed)
    params = {**trainers.LID_PARAMS, **({"epoch": epoch} if epoch else {})}
    return _fasttext("lid", "language id", ds, output, params, cpus, seed, start)


def train_reference(
    positive: list[str],
    negative: list[str],
    output: str,
    *,
    cpus: int = 1,
    seed: int = 0,
    epoch: int | None = None,
) -> dict:
    """The reference classifier from `positive` (pages used as Wikipedia references) and
    `negative` (random pages) text files, at `output`."""
    start = time.perf_counter()
    check_inputs({"--positive": positive, "--negative": negative})
    inputs = {reference.POSITIVE: positive, reference.NEGATIVE: negative}
    log.info("reference classifier: preparing pages")
    ds = _documents(inputs).map_batches(reference_lines, batch_format="pyarrow")
    params = {**trainers.REFERENCE_PARAMS, **({"epoch": epoch} if epoch else {})}
    return _fasttext("reference", "reference classifier", ds, output, params, cpus, seed, start)


def _fasttext(
    model: str, what: str, ds, output: str, params: dict, cpus: int, seed: int, start: float
) -> dict:
    """Train a fastText model on the examples of `ds` (column `line`) in one Ray task and
    write it to `output`; the summary `llamaray quality train` prints."""
    refs = _prepared(ds, seed)
    folder, name = _split_output(output)
    log.info(f"{what}: training fastText in one task with {cpus} CPU(s)")
    out = _run_task(fasttext_task, cpus, refs, name, folder, _s3(folder), params, cpus, seed)
    written = _write_output(folder, out.pop("files")) or [output]
    return {
        "model": model,
        "outputs": written,
        **out,
        "seconds": round(time.perf_counter() - start, 2),
    }


def train_lm(
    inputs: list[str],
    output_dir: str,
    *,
    lang: str = "en",
    sample: list[str] | None = None,
    order: int = 5,
    vocab_size: int = 8000,
    cpus: int = 1,
    seed: int = 0,
    sp_lines: int = 1_000_000,
    sample_pages: int = 10_000,
) -> dict:
    """A KenLM model of `lang` from `inputs`, with its SentencePiece model and the cutoffs of
    `sample` (pages of the crawl to be filtered; None: of the training pages), written to
    `output_dir` as `<lang>.arpa.bin`, `<lang>.sp.model`, `<lang>.cutoffs.json`."""
    start = time.perf_counter()
    check_inputs({"--input": inputs, "--sample": sample})
    if not sample:
        log.warning(
            "lm: no --sample: the perplexity cutoffs come from the training text itself; "
            "CCNet sets them on pages of the crawl to be filtered, where the same cutoffs "
            "would put most pages in the tail"
        )
    docs = _documents({lang: inputs})
    lines = docs.map_batches(normalized_lines, batch_format="pyarrow").materialize()
    log.info(f"lm: training a SentencePiece model on up to {sp_lines} lines")
    sp_refs = _limit(lines, sp_lines, seed).materialize().to_arrow_refs()
    sp_model = _run_task(sentencepiece_task, cpus, sp_refs, vocab_size, cpus)
    refs = _prepared(
        lines.map_batches(
            Tokenize,
            fn_constructor_kwargs={"sp_model": sp_model},
            batch_format="pyarrow",
            compute=_pool(),
        ),
        seed,
        shuffle=False,
    )
    pages = _documents({lang: sample}) if sample else docs
    sample_refs = _prepared(
        _limit(pages, sample_pages, seed).map_batches(
            Tokenize,
            fn_constructor_kwargs={"sp_model": sp_model, "pages": True},
            batch_format="pyarrow",
            compute=_pool(),
        ),
        seed,
        shuffle=False,
    )
    log.info(f"lm: lmplz -o {order} and build_binary in one task with {cpus} CPU(s)")
    out = _run_task(
        kenlm_task, cpus, sp_model, refs, sample_refs, lang, output_dir, _s3(output_dir), order
    )
    written = _write_output(output_dir, out.pop("files"))
    if not written:
        from llamaray.storage import join

        written = [
            join(output_dir, f"{lang}{s}") for s in (".arpa.bin", ".sp.model", ".cutoffs.json")
        ]
    return {
        "model": "lm",
        "outputs": written,
        **out,
        "seconds": round(time.perf_counter() - start, 2),
    }


def _pool():
    """Tokenizing actors: one SentencePiece model loaded per actor, not per batch; up to the
    cluster's CPUs (an autoscaling cluster with none yet: as Ray Data grows it)."""
    import ray
    from ray.data import ActorPoolStrategy

    cpus = int(ray.cluster_resources().get("CPU", 0))
    return ActorPoolStrategy(min_size=1, max_size=cpus if cpus >= 1 else None)
