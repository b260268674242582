"""SentencePiece BPE tokenizer with LLaMA's trainer spec, lossless on any UTF-8 text.

`train_tokenizer` trains a model the way LLaMA's was trained (BPE, digits split into single
tokens, byte fallback for unknown characters, no Unicode normalization) and `Tokenizer`
loads that model or any LLaMA-style ``tokenizer.model``:

    >>> tok = train_tokenizer(["corpus.txt"], "out", vocab_size=8000)  # doctest: +SKIP
    >>> tok = Tokenizer("out/tokenizer.model")  # doctest: +SKIP
    >>> tok.decode(tok.encode("x = 3.14\\n\\tπ ▁")) == "x = 3.14\\n\\tπ ▁"  # doctest: +SKIP
    True

Round trip. With the identity normalizer, ``remove_extra_whitespaces=False`` and byte
fallback, SentencePiece already decodes everything back exactly (tabs, newlines, leading
and repeated spaces, control characters including NUL, emoji, any script) except one
character: U+2581 LOWER ONE EIGHTH BLOCK ('▁'), which SentencePiece uses internally to
mark spaces. A literal '▁' in the input is read as a space marker, so it decodes to ' '.
`Tokenizer.encode` therefore splits the text on literal '▁' and writes each one as its
UTF-8 byte pieces ``<0xE2><0x96><0x81>``. SentencePiece's decoder turns byte pieces into
raw bytes without the marker-to-space substitution, so plain ``decode`` restores the '▁',
and the model can never emit those three byte pieces for a space (spaces always map to
the '▁' piece, which every model trained with a dummy prefix has). The segments after a
literal '▁' are encoded without the dummy prefix, because they continue the text rather
than start it. Text without '▁' takes the plain path: its ids are exactly
``SentencePieceProcessor.encode``'s, so models and data made with the original LLaMA
tokenizer stay compatible.

What cannot round-trip:

- Python strings that are not valid Unicode text (lone surrogates such as ``"\\ud800"``)
  have no UTF-8 encoding; `encode` raises `UnicodeEncodeError` for them.
- Models without byte pieces (``byte_fallback=False``, not LLaMA's) have no way to spell
  '▁' or any unknown character; for them `encode` is plain SentencePiece and lossy.
- Models whose normalizer rewrites text (NFKC, ``remove_extra_whitespaces=True``) lose
  what the normalizer removes; that is the model's choice and kept as is.

Determinism: sentencepiece's own sampling of ``input_sentence_size`` sentences ignores
``set_random_generator_seed`` (checked with sentencepiece 0.2.3: two processes with the
same seed trained different models), so `train_tokenizer` samples in Python with
``random.Random(seed)`` and hands sentencepiece at most ``input_sentence_size``
sentences, so that its own sampler keeps them all. The trained model is then identical
for the same inputs and seed, whatever ``num_threads``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import re
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import sentencepiece as spm

SPACE_MARKER = "\u2581"
"""'▁', the character SentencePiece writes for a space (and reads back as one)."""

_MARKER_BYTE_PIECES = tuple(f"<0x{b:02X}>" for b in SPACE_MARKER.encode("utf-8"))


def _default_threads() -> int:
    return os.cpu_count() or 1


@dataclass(frozen=True)
class TokenizerTrainSpec:
    """Trainer settings; the defaults are those recorded in LLaMA's ``tokenizer.model``.

    Example:

        >>> spec = TokenizerTrainSpec(vocab_size=8000, input_sentence_size=500_000)
        >>> spec.trainer_kwargs()["split_digits"]
        True
    """

    model_type: str = "bpe"
    """SentencePiece algorithm: LLaMA uses byte-pair encoding."""
    vocab_size: int = 32000
    """Total pieces, including <unk>/<s>/</s> and the 256 byte pieces."""
    split_digits: bool = True
    """Every digit is its own token, so numbers are read digit by digit."""
    byte_fallback: bool = True
    """Characters outside the vocabulary become UTF-8 byte pieces instead of <unk>."""
    character_coverage: float = 0.99995
    """Share of characters covered by character pieces; rarer ones use byte fallback."""
    normalization_rule_name: str = "identity"
    """No NFKC or other rewriting: decoding gives back the exact input."""
    add_dummy_prefix: bool = True
    """Prepend a space marker so a text's first word looks like any other word."""
    remove_extra_whitespaces: bool = False
    """Keep runs of spaces, leading and trailing spaces (code indentation)."""
    allow_whitespace_only_pieces: bool = True
    """Let BPE learn pieces made of spaces only, e.g. four-space indents."""
    split_by_unicode_script: bool = True
    """Never merge across a change of script (Latin/Han/...)."""
    split_by_number: bool = True
    """Never merge digits with non-digits."""
    split_by_whitespace: bool = True
    """Pieces do not span words: a space marker only starts a piece."""
    max_sentencepiece_length: int = 16
    """Longest piece, in characters."""
    max_sentence_length: int = 4192
    """Training lines longer than this many UTF-8 bytes are left out."""
    unk_id: int = 0
    """Id of <unk> (never produced with byte fallback, but reserved)."""
    bos_id: int = 1
    """Id of <s>, the beginning-of-sequence token."""
    eos_id: int = 2
    """Id of </s>, the end-of-sequence token."""
    pad_id: int = -1
    """-1: no padding piece, as in LLaMA (pad with eos or mask instead)."""
    input_sentence_size: int = 200_000_000
    """At most this many training lines are used (0: all); see `shuffle_input_sentence`.
    LLaMA's ``tokenizer.model`` records 200M (``trainer_spec.input_sentence_size``); the
    sample is also bounded by memory (`max_sample_bytes`)."""
    max_sample_bytes: int = 0
    """Memory the line sample may take: its Python strings plus the copy sentencepiece makes
    of them (``sample_bytes``). 0: half of the memory available when sampling starts. The
    sample stops growing there and stays a uniform sample of the lines that fit, with a
    message saying how many (200M lines of ~100 bytes need ~45 GB)."""
    shuffle_input_sentence: bool = True
    """True: a seeded uniform sample of the lines; False: the first lines."""
    num_threads: int = field(default_factory=_default_threads)
    """Trainer threads (the result does not depend on it)."""
    seed: int = 0
    """Seed of the line sample, applied by llamaray (see the module docstring)."""

    def __post_init__(self) -> None:
        if self.vocab_size <= 0:
            raise ValueError(f"vocab_size must be positive, got {self.vocab_size}")
        if self.max_sample_bytes < 0:
            raise ValueError(f"max_sample_bytes must be >= 0, got {self.max_sample_bytes}")
        if self.input_sentence_size < 0:
            raise ValueError(f"input_sentence_size must be >= 0, got {self.input_sentence_size}")
        if self.max_sentence_length <= 0:
            raise ValueError(
                f"max_sentence_length must be positive, got {self.max_sentence_length}"
            )

    def trainer_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``SentencePieceTrainer.train`` (everything but `seed` and
        `max_sample_bytes`, which llamaray applies)."""
        kwargs = dataclasses.asdict(self)
        del kwargs["seed"], kwargs["max_sample_bytes"]
        return kwargs


def _lines_of(path: Path) -> Iterator[str]:
    """Training lines of one input: a text file, or JSONL with a "text" field per line."""
    # Split on "\n" only (newline="\n"): "\r", form feeds and the like are part of the text
    # and stay in the lines the trainer sees.
    with path.open(encoding="utf-8", newline="\n") as f:
        if path.name.endswith(".jsonl"):
            for record in f:
                if record.strip():
                    yield from json.loads(record)["text"].split("\n")
        else:
            for line in f:
                yield line.removesuffix("\n")


@dataclass
class _Sample:
    sentences: list[str]
    files: int = 0
    bytes_read: int = 0
    lines_seen: int = 0
    too_long: int = 0
    memory_bytes: int = 0
    capped_at: int | None = None
    """Lines the sample stopped at because `max_sample_bytes` was reached, if it was."""


def sample_bytes(line: str) -> int:
    """Memory one sampled line takes: the Python string and its list slot, and
    sentencepiece's copy (a std::string of its UTF-8 bytes, ~32 bytes of overhead)."""
    return sys.getsizeof(line) + 8 + len(line) * (1 if line.isascii() else 4) + 32


def available_memory() -> int | None:
    """Bytes of memory available now (Linux's MemAvailable), None when unknown."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for row in f:
                if row.startswith("MemAvailable:"):
                    return int(row.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _memory_budget(spec: TokenizerTrainSpec) -> int | None:
    if spec.max_sample_bytes:
        return spec.max_sample_bytes
    free = available_memory()
    return free // 2 if free else None


def _usable_lines(paths: Sequence[Path], sample: _Sample, max_bytes: int) -> Iterator[str]:
    """Non-blank lines of all inputs that fit ``max_bytes``, counting what is read."""
    for path in paths:
        sample.files += 1
        sample.bytes_read += path.stat().st_size
        for raw in _lines_of(path):
            line = raw.rstrip("\r")
            if not line.strip():
                continue
            sample.lines_seen += 1
            # A char is at most 4 bytes: only long strings need the encode to be measured.
            if len(line) * 4 > max_bytes and len(line.encode("utf-8")) > max_bytes:
                sample.too_long += 1
                continue
            yield line


def _sample_sentences(paths: Sequence[Path], spec: TokenizerTrainSpec) -> _Sample:
    """At most ``input_sentence_size`` lines: a seeded uniform sample (reservoir sampling,
    algorithm R) when ``shuffle_input_sentence``, else the first ones."""
    cap = spec.input_sentence_size
    budget = _memory_budget(spec)
    rng = random.Random(spec.seed)
    sample = _Sample(sentences=[])
    kept = sample.sentences
    for n, line in enumerate(_usable_lines(paths, sample, spec.max_sentence_length), 1):
        if (cap == 0 or len(kept) < cap) and sample.capped_at is None:
            size = sample_bytes(line)
            if budget is None or sample.memory_bytes + size <= budget or not kept:
                kept.append(line)
                sample.memory_bytes += size
                continue
            # The memory bound: from here on a uniform sample of the lines that fit.
            cap = sample.capped_at = len(kept)
            print(
                f"tokenizer: the line sample reached its memory bound of {budget / 1e9:.2f} GB "
                f"(max_sample_bytes; default half the available memory) at {cap} lines, fewer "
                f"than input_sentence_size={spec.input_sentence_size}: training on a uniform "
                f"sample of {cap} lines. Give it more memory (max_sample_bytes) for more.",
                file=sys.stderr,
            )
        if spec.shuffle_input_sentence:
            j = rng.randrange(n)
            if j < cap:
                kept[j] = line
        else:
            break
    return sample


def _vocab_error(message: str, vocab_size: int) -> ValueError | None:
    """Turn sentencepiece's vocabulary-size failures into advice; None for other errors."""
    if "Vocabulary size too high" in message:
        limit = re.search(r"<= (\d+)", message)
        hint = f" to at most {limit.group(1)}" if limit else ""
        return ValueError(
            f"vocab_size={vocab_size} is more than BPE can reach on this text: lower "
            f"vocab_size{hint}, or train on more (and more varied) text. "
            f"sentencepiece said: {message}"
        )
    if "Vocabulary size is smaller than required_chars" in message:
        return ValueError(
            f"vocab_size={vocab_size} cannot hold the meta pieces, 256 byte pieces and the "
            f"characters of this text: raise vocab_size or lower character_coverage. "
            f"sentencepiece said: {message}"
        )
    return None


def train_tokenizer(
    inputs: Iterable[str | Path],
    output_dir: str | Path,
    spec: TokenizerTrainSpec | None = None,
    *,
    vocab_size: int | None = None,
    verbose: bool = False,
    **overrides: Any,
) -> Tokenizer:
    """Train a SentencePiece model on text files; write ``output_dir/tokenizer.model``.

    ``inputs`` are UTF-8 text files, one sentence or line per line, or JSONL files
    (``*.jsonl``) whose records carry a ``"text"`` field. Documents are split into lines:
    sentencepiece drops sentences over ``max_sentence_length`` bytes, and LLaMA's
    vocabulary leaves newlines to byte fallback too. ``vocab_size`` and any other
    `TokenizerTrainSpec` field given as a keyword override ``spec``; None values are
    ignored. A ``tokenizer.vocab`` listing pieces and scores is written beside the model.
    Progress goes to stderr; ``verbose=True`` also shows sentencepiece's own log.

    Raises ValueError when the vocabulary size does not fit the text (with the size to
    use), when there is no text, or for an unknown override.

    Example:

        >>> tok = train_tokenizer(["sample/prose.jsonl"], "tok", vocab_size=4000,
        ...                       input_sentence_size=100_000)  # doctest: +SKIP
        >>> tok.vocab_size  # doctest: +SKIP
        4000
    """
    spec = spec or TokenizerTrainSpec()
    # None means "not given", so a CLI can pass all of its optional flags straight through.
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if vocab_size is not None:
        overrides["vocab_size"] = vocab_size
    names = {f.name for f in dataclasses.fields(TokenizerTrainSpec)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise ValueError(f"unknown tokenizer spec field(s) {unknown}; valid: {sorted(names)}")
    spec = dataclasses.replace(spec, **overrides)

    paths = [Path(p) for p in inputs]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"tokenizer inputs not found: {missing}")
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    sample = _sample_sentences(paths, spec)
    if not sample.sentences:
        raise ValueError(f"no non-blank lines to train a tokenizer on in {[str(p) for p in paths]}")
    fed = sum(len(s.encode("utf-8")) for s in sample.sentences)
    print(
        f"tokenizer: read {sample.files} file(s), {sample.bytes_read / 1e6:.1f} MB, "
        f"{sample.lines_seen} lines ({sample.too_long} over {spec.max_sentence_length} bytes "
        f"left out); training {spec.model_type} vocab {spec.vocab_size} on "
        f"{len(sample.sentences)} lines, {fed / 1e6:.1f} MB "
        f"[{time.perf_counter() - t0:.1f}s]",
        file=sys.stderr,
    )

    t1 = time.perf_counter()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sample.sentences),
            model_prefix=str(out / "tokenizer"),
            # Process-wide setting (sentencepiece has no per-call one): 0 = info, 2 = errors.
            minloglevel=0 if verbose else 2,
            **spec.trainer_kwargs(),
        )
    except RuntimeError as e:
        advice = _vocab_error(str(e), spec.vocab_size)
        if advice is not None:
            raise advice from e
        raise
    tok = Tokenizer(out / "tokenizer.model")
    print(
        f"tokenizer: wrote {tok.path} ({tok.vocab_size} pieces) in {time.perf_counter() - t1:.1f}s",
        file=sys.stderr,
    )
    return tok


class Tokenizer:
    """A SentencePiece model (e.g. LLaMA's ``tokenizer.model``) with lossless round trip.

    Example:

        >>> tok = Tokenizer("tokenizer.model")  # doctest: +SKIP
        >>> ids = tok.encode("Hello world", bos=True)  # doctest: +SKIP
        >>> tok.decode(ids)  # doctest: +SKIP
        'Hello world'
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._load(spm.SentencePieceProcessor(model_file=str(self.path)))

    @classmethod
    def from_bytes(cls, model: bytes, path: str | Path = "<bytes>") -> Tokenizer:
        """A tokenizer from the bytes of a ``tokenizer.model`` (a serialized model proto);
        ``path`` names where they came from, for messages."""
        tok = cls.__new__(cls)
        tok.path = Path(path)
        tok._load(spm.SentencePieceProcessor(model_proto=model))
        return tok

    @classmethod
    def open(cls, uri: str | Path) -> Tokenizer:
        """A ``tokenizer.model`` at a local path or ``s3://`` URI (read through
        `llamaray.storage`; SentencePiece itself opens only local files)."""
        if not str(uri).startswith("s3://"):
            return cls(uri)
        from llamaray.storage import read_bytes

        return cls.from_bytes(read_bytes(uri), uri)

    def _load(self, sp: spm.SentencePieceProcessor) -> None:
        self._sp = sp
        self._sp_continued: spm.SentencePieceProcessor | None = None
        ids = [sp.piece_to_id(p) for p in _MARKER_BYTE_PIECES]
        # piece_to_id answers unk for a missing piece, so check that these really are bytes.
        self._marker_ids: list[int] | None = ids if all(sp.is_byte(i) for i in ids) else None

    # Ray ships tokenizers to workers by pickling: carry the model bytes, not a file path
    # that may not exist on the other node.
    def __getstate__(self) -> dict[str, Any]:
        return {"path": str(self.path), "proto": self._sp.serialized_model_proto()}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.path = Path(state["path"])
        self._load(spm.SentencePieceProcessor(model_proto=state["proto"]))

    def __repr__(self) -> str:
        return f"Tokenizer({str(self.path)!r}, vocab_size={self.vocab_size})"

    def __len__(self) -> int:
        return self.vocab_size

    @property
    def vocab_size(self) -> int:
        """Number of pieces (ids run from 0 to vocab_size - 1)."""
        return self._sp.vocab_size()

    @property
    def bos_id(self) -> int:
        """Id of <s>; -1 if the model has none."""
        return self._sp.bos_id()

    @property
    def eos_id(self) -> int:
        """Id of </s>; -1 if the model has none."""
        return self._sp.eos_id()

    @property
    def unk_id(self) -> int:
        """Id of <unk>."""
        return self._sp.unk_id()

    @property
    def pad_id(self) -> int:
        """Id of <pad>; -1 (LLaMA) if the model has none."""
        return self._sp.pad_id()

    def id_to_piece(self, token_id: int) -> str:
        """The piece of an id, e.g. ``'▁the'`` or ``'<0x0A>'``."""
        return self._sp.id_to_piece(token_id)

    def piece_to_id(self, piece: str) -> int:
        """The id of a piece; `unk_id` if there is no such piece."""
        return self._sp.piece_to_id(piece)

    def _continued(self) -> spm.SentencePieceProcessor:
        """The same model without the dummy prefix, for text that follows a literal '▁'."""
        if self._sp_continued is None:
            # Imported here: protobuf is only needed for text containing a literal '▁'.
            from sentencepiece import sentencepiece_model_pb2

            proto = sentencepiece_model_pb2.ModelProto()
            proto.ParseFromString(self._sp.serialized_model_proto())
            if proto.normalizer_spec.add_dummy_prefix:
                proto.normalizer_spec.add_dummy_prefix = False
                self._sp_continued = spm.SentencePieceProcessor(
                    model_proto=proto.SerializeToString()
                )
            else:
                self._sp_continued = self._sp
        return self._sp_continued

    def _raw_encode(self, sp: spm.SentencePieceProcessor, text: Any, **kwargs: Any) -> Any:
        try:
            return sp.encode(text, out_type=int, **kwargs)
        except (RuntimeError, TypeError):
            # sentencepiece reports a lone surrogate as an opaque cast error; name the real
            # problem (this raises UnicodeEncodeError) when that is what it was.
            for t in text if isinstance(text, list) else [text]:
                if isinstance(t, str):
                    t.encode("utf-8")
            raise

    def _encode_one(self, text: str) -> list[int]:
        if SPACE_MARKER not in text or self._marker_ids is None:
            return self._raw_encode(self._sp, text)
        first, *rest = text.split(SPACE_MARKER)
        ids = self._raw_encode(self._sp, first)
        # One thread: the segments are usually few and short, thread start-up would dominate.
        for segment_ids in self._raw_encode(self._continued(), rest, num_threads=1):
            ids.extend(self._marker_ids)
            ids.extend(segment_ids)
        return ids

    def _with_specials(self, ids: list[int], bos: bool, eos: bool) -> list[int]:
        if bos:
            if self.bos_id < 0:
                raise ValueError(f"{self.path} has no bos piece")
            ids.insert(0, self.bos_id)
        if eos:
            if self.eos_id < 0:
                raise ValueError(f"{self.path} has no eos piece")
            ids.append(self.eos_id)
        return ids

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        """Token ids of ``text``, optionally with <s> first and </s> last.

        ``decode(encode(text)) == text`` for every string with a UTF-8 encoding.

        Example:

            >>> [tok.id_to_piece(i) for i in tok.encode("x=10")]  # doctest: +SKIP
            ['▁x', '=', '1', '0']
        """
        return self._with_specials(self._encode_one(text), bos, eos)

    def encode_batch(
        self,
        texts: Iterable[str],
        bos: bool = False,
        eos: bool = False,
        num_threads: int | None = None,
    ) -> list[list[int]]:
        """`encode` of each text, computed by sentencepiece on ``num_threads`` threads.

        ``num_threads`` None uses every core.

        Example:

            >>> tok.encode_batch(["a b", "c"], bos=True) == [
            ...     tok.encode("a b", bos=True), tok.encode("c", bos=True)]  # doctest: +SKIP
            True
        """
        texts = list(texts)
        if not texts:
            return []
        threads = num_threads or _default_threads()
        plain = [i for i, t in enumerate(texts) if SPACE_MARKER not in t]
        if len(plain) == len(texts) or self._marker_ids is None:
            batch = self._raw_encode(self._sp, texts, num_threads=threads)
        else:
            # Texts with a literal '▁' are rare; only they take the segment-by-segment path.
            batch = [[] for _ in texts]
            encoded = self._raw_encode(self._sp, [texts[i] for i in plain], num_threads=threads)
            for i, ids in zip(plain, encoded, strict=True):
                batch[i] = ids
            for i, t in enumerate(texts):
                if SPACE_MARKER in t:
                    batch[i] = self._encode_one(t)
        return [self._with_specials(ids, bos, eos) for ids in batch]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of token ids; <s>, </s> and other control pieces decode to nothing.

        Example:

            >>> tok.decode(tok.encode("naïve ▁ café", bos=True))  # doctest: +SKIP
            'naïve ▁ café'
        """
        ids = ids if isinstance(ids, list) else [int(i) for i in ids]
        # Byte pieces come back as raw bytes, so the <0xE2><0x96><0x81> that `encode` writes
        # for a literal '▁' is restored without help.
        return self._sp.decode(ids)

    def decode_batch(
        self, batch: Iterable[Iterable[int]], num_threads: int | None = None
    ) -> list[str]:
        """`decode` of each id list, on ``num_threads`` threads (None: every core).

        Example:

            >>> tok.decode_batch(tok.encode_batch(["a", "b c"]))  # doctest: +SKIP
            ['a', 'b c']
        """
        lists = [ids if isinstance(ids, list) else [int(i) for i in ids] for ids in batch]
        if not lists:
            # sentencepiece would read an empty batch as one empty id list and answer "".
            return []
        return self._sp.decode(lists, num_threads=num_threads or _default_threads())
