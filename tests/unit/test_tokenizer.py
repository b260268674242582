"""SentencePiece tokenizer: LLaMA's trainer spec, lossless round trip, digits, byte fallback.

One small tokenizer (vocab 1000 on ~1.5 MB of the stdlib sample) is trained per module.
The only text that sentencepiece alone does not round-trip is a literal U+2581 ('▁');
`test_plain_sentencepiece_loses_literal_marker` pins that trap and the round-trip tests
check that `Tokenizer` closes it. Strings with lone surrogates have no UTF-8 form and are
rejected (`test_lone_surrogate_is_rejected`); nothing else is excluded.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import sentencepiece as spm
from hypothesis import given, settings
from hypothesis import strategies as st
from sentencepiece import sentencepiece_model_pb2

from llamaray.data.sample_text import iter_texts, write_stdlib_sample
from llamaray.tokenizer import (
    SPACE_MARKER,
    Tokenizer,
    TokenizerTrainSpec,
    _sample_sentences,
    train_tokenizer,
)

VOCAB = 1000
MARKER_BYTES = ["<0xE2>", "<0x96>", "<0x81>"]


@pytest.fixture(scope="module")
def sample(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_stdlib_sample(
        tmp_path_factory.mktemp("sample"), max_bytes_per_source=750_000, seed=0
    )


@pytest.fixture(scope="module")
def tok(sample: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    return train_tokenizer(
        [sample["code"], sample["prose"]], tmp_path_factory.mktemp("tok"), vocab_size=VOCAB
    )


@pytest.fixture(scope="module")
def raw(tok: Tokenizer) -> spm.SentencePieceProcessor:
    """The same model through plain sentencepiece, to compare with."""
    return spm.SentencePieceProcessor(model_file=str(tok.path))


@pytest.fixture(scope="module")
def small_corpus(sample: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A plain-text file (one line per line) for the quick training checks."""
    lines = [line for text in iter_texts([sample["prose"]]) for line in text.split("\n") if line]
    path = tmp_path_factory.mktemp("small") / "prose.txt"
    path.write_text("\n".join(lines[:6000]) + "\n", encoding="utf-8")
    return path


def pieces(tok: Tokenizer, ids: list[int]) -> list[str]:
    return [tok.id_to_piece(i) for i in ids]


# ------------------------------------------------------------------------ trainer spec


def test_spec_defaults_are_llamas() -> None:
    spec = TokenizerTrainSpec()
    expected = {
        "model_type": "bpe",
        "vocab_size": 32000,
        "split_digits": True,
        "byte_fallback": True,
        "character_coverage": 0.99995,
        "normalization_rule_name": "identity",
        "add_dummy_prefix": True,
        "remove_extra_whitespaces": False,
        "allow_whitespace_only_pieces": True,
        "split_by_unicode_script": True,
        "split_by_number": True,
        "split_by_whitespace": True,
        "max_sentencepiece_length": 16,
        "max_sentence_length": 4192,
        "unk_id": 0,
        "bos_id": 1,
        "eos_id": 2,
        "pad_id": -1,
        "shuffle_input_sentence": True,
    }
    kwargs = spec.trainer_kwargs()
    assert {k: kwargs[k] for k in expected} == expected
    assert "seed" not in kwargs  # applied by llamaray, not a sentencepiece field
    assert kwargs["num_threads"] >= 1


def test_trainer_spec_is_in_the_model(tok: Tokenizer) -> None:
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(tok.path.read_bytes())
    ts, ns = proto.trainer_spec, proto.normalizer_spec
    assert ts.model_type == sentencepiece_model_pb2.TrainerSpec.BPE
    assert ts.vocab_size == VOCAB
    assert ts.split_digits and ts.byte_fallback and ts.allow_whitespace_only_pieces
    assert ts.split_by_unicode_script and ts.split_by_number and ts.split_by_whitespace
    assert ts.character_coverage == pytest.approx(0.99995)
    assert (ts.max_sentencepiece_length, ts.max_sentence_length) == (16, 4192)
    assert (ts.unk_id, ts.bos_id, ts.eos_id, ts.pad_id) == (0, 1, 2, -1)
    assert ns.name == "identity" and ns.precompiled_charsmap == b""
    assert ns.add_dummy_prefix and not ns.remove_extra_whitespaces
    assert (tok.path.parent / "tokenizer.vocab").is_file()


def test_tokenizer_properties(tok: Tokenizer) -> None:
    assert tok.vocab_size == len(tok) == VOCAB
    assert (tok.unk_id, tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2, -1)
    assert pieces(tok, [0, 1, 2]) == ["<unk>", "<s>", "</s>"]
    byte_pieces = [p for p in map(tok.id_to_piece, range(VOCAB)) if p.startswith("<0x")]
    assert len(byte_pieces) == 256
    assert tok.piece_to_id(SPACE_MARKER) != tok.unk_id  # spaces never need byte fallback


# --------------------------------------------------------------------------- round trip

CASES = [
    "",
    "hello world",
    " leading space",
    "   three leading spaces",
    "trailing spaces   ",
    "double  space",
    " ",
    "\n",
    "\n\nblank lines\n\n",
    "def f(x):\n\tif x:\n\t\treturn  x  # tab\tinside\n    pass\r\n",
    "日本語のテキスト、中文文本，한국어 텍스트",
    "Ελληνικά, русский, עברית, العربية, हिन्दी, ไทย",
    "emoji 🦙🔥👩‍👩‍👧 and flags 🇫🇷",
    "control \x00 nul \x01\x02\x1b[0m \x7f \x85 \u200b zero width \ufeff bom",
    "\x00",
    "\u2028 line sep \u2029 para sep \u3000 ideographic space",
    "combining e\u0301 vs \u00e9, NFKC would fold ﬁ and ①",
    "▁",
    "▁▁▁",
    "▁leading marker",
    "trailing marker▁",
    "a▁b ▁ c  ▁▁  d",
    " ▁ ",
    "\n▁\n",
    "\t▁x▁\x00▁",
    "▁12▁3.5",
]


@pytest.mark.parametrize("text", CASES)
def test_round_trip_cases(tok: Tokenizer, text: str) -> None:
    assert tok.decode(tok.encode(text)) == text
    assert tok.decode(tok.encode(text, bos=True, eos=True)) == text


def test_plain_sentencepiece_loses_literal_marker(tok: Tokenizer, raw) -> None:
    # The trap `Tokenizer` works around: sentencepiece reads '▁' as its space marker.
    assert raw.decode(raw.encode("a▁b")) == "a b"
    ids = tok.encode("a▁b")
    assert pieces(tok, ids) == ["▁a", *MARKER_BYTES, "b"]
    assert tok.decode(ids) == "a▁b"


# Built from a list of pieces rather than with st.text(alphabet=...): text() flattens the
# alphabet and would almost never draw the special strings, the point of this test.
_PIECE = st.one_of(
    st.sampled_from(
        [SPACE_MARKER, " ", "  ", "\u3000", "\t", "\n", "\r\n", "\x00", "\x1f", "a", "7"]
    ),
    st.characters(codec="utf-8"),  # any code point with a UTF-8 form: no lone surrogates
)
_TEXT = st.lists(_PIECE, max_size=40).map("".join)


@settings(max_examples=1000, derandomize=True, deadline=None)
@given(text=_TEXT, bos=st.booleans(), eos=st.booleans())
def test_round_trip_property(tok: Tokenizer, raw, text: str, bos: bool, eos: bool) -> None:
    ids = tok.encode(text, bos=bos, eos=eos)
    assert tok.decode(ids) == text
    assert tok.unk_id not in ids
    if SPACE_MARKER not in text:
        assert ids == raw.encode(text, add_bos=bos, add_eos=eos)
    digits = sum(c in "0123456789" for c in text)
    assert sum(p in "0123456789" and len(p) == 1 for p in pieces(tok, ids)) == digits


@settings(max_examples=50, derandomize=True, deadline=None)
@given(texts=st.lists(_TEXT, max_size=8))
def test_batch_property(tok: Tokenizer, texts: list[str]) -> None:
    batch = tok.encode_batch(texts, bos=True, num_threads=2)
    assert batch == [tok.encode(t, bos=True) for t in texts]
    assert tok.decode_batch(batch) == texts


def test_ordinary_text_ids_match_sentencepiece(tok: Tokenizer, raw, sample) -> None:
    texts = list(iter_texts([sample["prose"]]))[:50]
    assert all(SPACE_MARKER not in t for t in texts)
    assert tok.encode_batch(texts) == raw.encode(texts)
    assert [tok.encode(t) for t in texts[:10]] == raw.encode(texts[:10])


def test_lone_surrogate_is_rejected(tok: Tokenizer) -> None:
    with pytest.raises(UnicodeEncodeError):
        tok.encode("ok \ud800")
    with pytest.raises(UnicodeEncodeError):
        tok.encode_batch(["fine", "\udfff"])


# ------------------------------------------------------------------- digits and bytes


@pytest.mark.parametrize(
    ("text", "digits"),
    [
        ("12345", "12345"),
        (" 2023", "2023"),
        ("3.14159", "314159"),
        ("x=10", "10"),
        ("v1.2.3-rc10 0x7f 1e-9", "1231007 19"),
        ("0000000000", "0000000000"),
    ],
)
def test_digits_are_single_tokens(tok: Tokenizer, text: str, digits: str) -> None:
    ps = pieces(tok, tok.encode(text))
    # Byte pieces are spelled with hex digits ("<0x31>"); they must not count as digits here.
    words = [p for p in ps if not (p.startswith("<0x") and p.endswith(">"))]
    assert [p for p in words if any(c.isdigit() for c in p)] == [d for d in digits if d != " "]


@pytest.mark.parametrize("char", ["🦙", "鿰", "ꙮ", "𝔘", "\u0f3a"])
def test_unknown_chars_fall_back_to_bytes(tok: Tokenizer, char: str) -> None:
    assert tok.piece_to_id(char) == tok.unk_id  # not in the vocabulary
    ids = tok.encode(f"a{char}b")
    ps = pieces(tok, ids)
    assert tok.unk_id not in ids
    expected = [f"<0x{b:02X}>" for b in char.encode("utf-8")]
    assert ps == ["▁a", *expected, "b"]
    assert tok.decode(ids) == f"a{char}b"


def test_bos_eos_flags(tok: Tokenizer) -> None:
    plain = tok.encode("hello")
    assert tok.bos_id not in plain and tok.eos_id not in plain
    assert tok.encode("hello", bos=True) == [tok.bos_id, *plain]
    assert tok.encode("hello", eos=True) == [*plain, tok.eos_id]
    assert tok.encode("hello", bos=True, eos=True) == [tok.bos_id, *plain, tok.eos_id]
    assert tok.encode("", bos=True, eos=True) == [tok.bos_id, tok.eos_id]


def test_encode_batch_matches_encode(tok: Tokenizer) -> None:
    texts = ["a b", "", "x=10\n", "a▁b", "🦙 ▁", "  indent"] * 5
    for threads in (None, 1, 2):
        got = tok.encode_batch(texts, eos=True, num_threads=threads)
        assert got == [tok.encode(t, eos=True) for t in texts]
    assert tok.decode_batch(got) == texts


def test_pickle_round_trip(tok: Tokenizer) -> None:
    clone = pickle.loads(pickle.dumps(tok))
    assert clone.vocab_size == tok.vocab_size
    text = "pickled ▁ tokenizer 42"
    assert clone.encode(text) == tok.encode(text)
    assert clone.decode(clone.encode(text)) == text


# ----------------------------------------------------------------------------- training


def _vocab(tok: Tokenizer) -> list[str]:
    return [tok.id_to_piece(i) for i in range(tok.vocab_size)]


def test_training_is_deterministic(small_corpus: Path, tmp_path: Path) -> None:
    # A sample smaller than the file, so the seeded line sampling really decides.
    kw = {"vocab_size": 500, "input_sentence_size": 2000}
    a = train_tokenizer([small_corpus], tmp_path / "a", seed=0, num_threads=1, **kw)
    # None overrides mean "not given" (how the CLI passes unset flags).
    b = train_tokenizer(
        [small_corpus], tmp_path / "b", seed=0, num_threads=2, character_coverage=None, **kw
    )
    c = train_tokenizer([small_corpus], tmp_path / "c", seed=1, num_threads=2, **kw)
    assert _vocab(a) == _vocab(b)
    assert _vocab(a) != _vocab(c)


def test_line_sampling(tmp_path: Path) -> None:
    lines = [f"line {i}" for i in range(100)]
    path = tmp_path / "in.txt"
    path.write_text("\n".join([*lines[:50], "", "   ", "x" * 5000, *lines[50:]]) + "\n")

    def sample(**kw):
        return _sample_sentences([path], TokenizerTrainSpec(**kw))

    whole = sample(input_sentence_size=0)
    assert whole.sentences == lines
    assert (whole.lines_seen, whole.too_long, whole.files) == (101, 1, 1)
    assert sample(input_sentence_size=10, shuffle_input_sentence=False).sentences == lines[:10]
    seeded = sample(input_sentence_size=10, seed=3).sentences
    assert len(set(seeded)) == 10 and set(seeded) <= set(lines)
    assert seeded == sample(input_sentence_size=10, seed=3).sentences
    assert seeded != sample(input_sentence_size=10, seed=4).sentences
    assert seeded != lines[:10]


def test_too_large_vocab_is_a_clear_error(small_corpus: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"lower vocab_size to at most \d+"):
        train_tokenizer([small_corpus], tmp_path, vocab_size=200_000)
    assert not (tmp_path / "tokenizer.model").exists()


def test_too_small_vocab_is_a_clear_error(small_corpus: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="raise vocab_size"):
        train_tokenizer([small_corpus], tmp_path, vocab_size=260)


def test_bad_arguments(small_corpus: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown tokenizer spec field"):
        train_tokenizer([small_corpus], tmp_path, vocab_sise=500)
    with pytest.raises(FileNotFoundError):
        train_tokenizer([tmp_path / "missing.txt"], tmp_path, vocab_size=500)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n", encoding="utf-8")
    with pytest.raises(ValueError, match="no non-blank lines"):
        train_tokenizer([empty], tmp_path, vocab_size=500)
