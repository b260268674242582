"""Text made here for CommonCrawl's quality models, and small models trained on it.

- Language id: pages of words drawn from Debian's word lists (`wamerican`, `wfrench`,
  `wngerman`, `wspanish`, `witalian`: /usr/share/dict), real vocabularies of each language.
- The language model: English "encyclopedic" sentences (the planted corpus's WORDS, with
  function words) and shop-page sentences, the kind of text a crawl holds. Its cutoffs come
  from a sample of crawl pages: 40 such clean pages, 30 noisy ones (half the words replaced
  by rare dictionary words) and 30 of gibberish (dictionary words in no order): the 66th
  percentile falls among the noisy pages, so every clean page is head or middle and every
  gibberish page tail.
- The reference classifier: encyclopedic pages (like the text Wikipedia cites) against shop
  pages (random crawl pages).

`DICTS` and `have_dicts()` tell which word lists are installed (`make` installs them with
apt where it runs as root); tests skip, saying why, where they are not. KenLM's `lmplz` comes
from `make kenlm-tools`.
"""

from __future__ import annotations

import functools
import itertools
import json
import random
from pathlib import Path

from planted_corpus import SHOP_WORDS, WORDS, sentence

DICTS = {
    "en": "/usr/share/dict/american-english",
    "fr": "/usr/share/dict/french",
    "de": "/usr/share/dict/ngerman",
    "es": "/usr/share/dict/spanish",
    "it": "/usr/share/dict/italian",
}
DICT_PACKAGES = "wamerican wfrench wngerman wspanish witalian"
FUNCTION_WORDS = ["the", "of", "and", "in", "to", "a", "was", "is", "by", "with", "for", "on"]


def have_dicts() -> list[str]:
    """The word lists that are missing (empty when all are there)."""
    return [path for path in DICTS.values() if not Path(path).is_file()]


@functools.lru_cache(maxsize=8)
def words_of(lang: str) -> list[str]:
    """The dictionary's plain words: lowercase letters only, two or more."""
    lines = Path(DICTS[lang]).read_text(encoding="utf-8").split()
    return [w for w in lines if w.isalpha() and w.islower() and len(w) > 1]


@functools.lru_cache(maxsize=8)
def _short_first(lang: str) -> list[float]:
    # Cumulative weights len ** -4: a word list holds every inflection once (French's is
    # mostly verb forms), while text is mostly short words; drawn uniformly, French prose
    # looked like no language the model knew. Measured: French prose 0.91 fr (0.23 uniform).
    return list(itertools.accumulate(len(w) ** -4.0 for w in words_of(lang)))


def dictionary_page(
    rng: random.Random, lang: str, lines: int = 6, n: int = 12, frequent: bool = True
) -> str:
    """A page of `lines` lines of `n` words of the language's word list, short ones drawn more
    often (`frequent`), or all alike (rare words: gibberish)."""
    words, weights = words_of(lang), _short_first(lang) if frequent else None
    return "\n".join(
        " ".join(rng.choices(words, cum_weights=weights, k=n)).capitalize() + "."
        for _ in range(lines)
    )


def encyclopedic_sentence(rng: random.Random, n: int = 12) -> str:
    words = [rng.choice(WORDS) if i % 2 else rng.choice(FUNCTION_WORDS) for i in range(n)]
    return " ".join(words).capitalize() + "."


def shop_sentence(rng: random.Random, n: int = 12) -> str:
    return " ".join(rng.choice(SHOP_WORDS) for _ in range(n)).capitalize() + "!"


def page_of(rng: random.Random, sentence, lines: int = 6) -> str:
    return "\n".join(sentence(rng) for _ in range(lines))


def noisy_page(rng: random.Random, rare: list[str], lines: int = 6) -> str:
    """Encyclopedic lines with every other word a rare dictionary word."""
    out = []
    for _ in range(lines):
        words = encyclopedic_sentence(rng).split()
        out.append(" ".join(rng.choice(rare) if i % 2 else w for i, w in enumerate(words)))
    return "\n".join(out)


def write_inputs(root: Path, seed: int = 0) -> dict:
    """The training text of every model, as JSONL files under `root` (what `llamaray quality
    train` reads); returns their paths by role."""
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)

    def jsonl(name: str, pages: list[str]) -> str:
        path = root / name
        path.write_text("".join(json.dumps({"text": p}) + "\n" for p in pages))
        return str(path)

    english = words_of("en")
    lid = {
        lang: jsonl(f"lid-{lang}.jsonl", [dictionary_page(rng, lang, 10) for _ in range(300)])
        for lang in DICTS
    }
    # The language model's text: encyclopedic and shop pages (general English of the crawl).
    lm_text = [page_of(rng, encyclopedic_sentence, 10) for _ in range(200)]
    lm_text += [page_of(rng, sentence, 10) for _ in range(100)]
    lm_text += [page_of(rng, shop_sentence, 10) for _ in range(150)]
    sample = [page_of(rng, encyclopedic_sentence) for _ in range(30)]
    sample += [page_of(rng, shop_sentence) for _ in range(10)]
    sample += [noisy_page(rng, english) for _ in range(30)]
    sample += [dictionary_page(rng, "en", frequent=False) for _ in range(30)]
    return {
        "lid": lid,
        "lm": jsonl("lm.jsonl", lm_text),
        "sample": jsonl("sample.jsonl", sample),
        "positive": jsonl(
            "reference.jsonl",
            [page_of(rng, s) for s in (encyclopedic_sentence, sentence) for _ in range(100)],
        ),
        "negative": jsonl("random.jsonl", [page_of(rng, shop_sentence) for _ in range(200)]),
    }


def pages_of(path: str) -> list[str]:
    return [json.loads(line)["text"] for line in Path(path).read_text().splitlines()]


def train_models(root: Path, seed: int = 0) -> dict:
    """The three models, trained in this process (`data.quality.trainers`, what the Ray task
    runs) on `write_inputs`' text; returns the `quality.*` settings that use them."""
    from llamaray.data.quality import reference, trainers
    from llamaray.data.quality.normalize import normalized_lines
    from llamaray.data.quality.perplexity import tokenized_lines

    inputs = write_inputs(root / "text", seed)
    models = root / "models"
    models.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)

    lid_lines = [
        f"__label__{lang} {line}"
        for lang, path in inputs["lid"].items()
        for page in pages_of(path)
        for line in page.splitlines()
    ]
    rng.shuffle(lid_lines)
    (root / "lid.txt").write_text("\n".join(lid_lines) + "\n")
    trainers.train_fasttext(root / "lid.txt", models / "lid.bin", seed=seed, **trainers.LID_PARAMS)

    ref_lines = [
        f"__label__{label} {reference.classifier_line(page)}"
        for label, key in ((reference.POSITIVE, "positive"), (reference.NEGATIVE, "negative"))
        for page in pages_of(inputs[key])
    ]
    rng.shuffle(ref_lines)
    (root / "reference.txt").write_text("\n".join(ref_lines) + "\n")
    trainers.train_fasttext(
        root / "reference.txt", models / "reference.bin", seed=seed, **trainers.REFERENCE_PARAMS
    )

    lines = [n for page in pages_of(inputs["lm"]) for n in normalized_lines(page)]
    sp = trainers.train_sentencepiece(lines, models / "en.sp", vocab_size=500)
    (models / "en.sp.vocab").unlink()
    tokenizer = str(models / "en.sp.model")
    tokenized = [
        line for page in pages_of(inputs["lm"]) for line in tokenized_lines(page, tokenizer)
    ]
    (root / "lm.txt").write_text("\n".join(tokenized) + "\n")
    trainers.train_kenlm(root / "lm.txt", models / "en.arpa.bin", order=3)
    pages = [tokenized_lines(page, tokenizer) for page in pages_of(inputs["sample"])]
    cutoffs, _ = trainers.sample_cutoffs(pages, models / "en.arpa.bin")
    (models / "en.cutoffs.json").write_text(cutoffs.to_json())
    assert sp  # the model's bytes were returned too
    return {
        "lid_model": str(models / "lid.bin"),
        "perplexity_model": str(models / "en.arpa.bin"),
        "reference_model": str(models / "reference.bin"),
    }


def overrides(models: dict) -> list[str]:
    """`CorpusConfig` overrides pointing `quality` at `train_models`' models."""
    return [f"quality.{field}={path}" for field, path in models.items()]
