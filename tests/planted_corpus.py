"""A small corpus with the paper's dedup and selection cases planted, source by source, and
the decisions the paper's recipe makes on it (issue 17):

- commoncrawl: three shard files, `line_group_shards=2` (files 0 and 1 form a group, file 2
  another). Two boilerplate lines repeat on the pages of the first group: every copy goes
  (CCNet), and a page made only of them is dropped; the same boilerplate line once in the
  second group stays. One page is a Wikipedia article's text plus boilerplate. The second
  group also holds a French page, a gibberish page (rare English words in no order) and a
  shop page: CCNet's language id drops the first, its perplexity filter (tail bucket) the
  second, LLaMA's reference classifier the third, with the models `tests/quality_text.py`
  trains; without models (`quality.allow_missing_models`) the three are kept.
- books: two books at 92% content overlap (one dropped), two at 85% (both kept).
- github: two identical files (one dropped), two near-identical ones (both kept).
- wikipedia: the article also on a crawled page (both kept: no cross-source dedup), and
  one in Japanese (not among the paper's 20 languages: dropped).
- stackexchange: a post from math.stackexchange.com (kept), one from a small site (dropped).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

WORDS = [
    "river", "garden", "market", "winter", "history", "silver", "engine", "harbor", "letter",
    "forest", "mountain", "village", "science", "journey", "council", "theatre", "station",
    "teacher", "painter", "library", "morning", "evening", "bridge", "window", "chapter",
    "finance", "travel", "kitchen", "weather", "student", "museum", "orchard", "meadow",
    "lantern", "voyage", "castle", "planet", "signal", "marble", "pepper", "cotton",
]  # fmt: skip

SHOP_WORDS = [
    "buy", "cheap", "discount", "offer", "click", "free", "shipping", "price", "deal", "order",
    "sale", "best", "coupon", "cart", "checkout", "save", "now", "online", "store", "today",
]  # fmt: skip
FRENCH = """Le conseil municipal s'est réuni hier soir pour discuter du budget de la ville.
Les habitants du quartier demandent depuis longtemps une nouvelle bibliothèque publique.
Selon le maire, les travaux commenceront au printemps prochain si le financement est accordé.
Plusieurs associations ont exprimé leur inquiétude au sujet de la circulation.
La séance s'est terminée tard, après un long débat sur les transports en commun.
Un nouveau vote aura lieu le mois prochain, avec la participation des citoyens."""
RARE_WORDS = [
    "quagmire", "obelisk", "zephyr", "fjord", "kumquat", "xylophone", "wombat", "gazebo",
    "sphinx", "jackal", "mollusk", "pumice", "quartz", "vortex", "zodiac", "glyph", "kayak",
    "nymph", "tundra", "yacht", "walrus", "bazooka", "cobweb", "dervish", "eggnog", "flapjack",
    "gherkin", "hubbub", "igloo", "juxtapose", "knapsack", "lummox", "mukluk", "nincompoop",
]  # fmt: skip
BOILERPLATE = [
    "Sign in to read more stories from Example News today",
    "Copyright Example Media Group and partners all rights reserved",
]
LINE_GROUP_SHARDS = 2


def sentence(rng: random.Random, n: int = 12) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + "."


def page(rng: random.Random, lines: int = 6) -> list[str]:
    return [sentence(rng) for _ in range(lines)]


def shifted(n: int, k: int, seed: int) -> tuple[str, str]:
    """Two texts of n distinct-ish words, the second the first shifted by k words: their word
    5-gram sets have Jaccard (n - 4 - k) / (n - 4 + k)."""
    rng = random.Random(seed)
    vocab = [f"{w}{i}" for i, w in enumerate(WORDS * 80)]
    tokens = [rng.choice(vocab) for _ in range(n + k)]
    return " ".join(tokens[:n]), " ".join(tokens[k : k + n])


CODE = '''import os


def {name}(path, size=4096):
    """Read {name} data from a file in chunks of the given size."""
    total = 0
    with open(path, "rb") as handle:
        while True:
            chunk = handle.read(size)
            if not chunk:
                break
            total += len(chunk)
    return total + {extra}
'''


def write(root: Path) -> dict:
    """Write the corpus under `root`; return {"sources": name -> files, "expected": name ->
    {documents_in, kept, dropped}, "lines_removed": {...}}."""
    root.mkdir(parents=True, exist_ok=True)
    rng = random.Random(17)
    article = page(rng, 8)

    def jsonl(name: str, records: list[dict]) -> str:
        path = root / name
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
        return str(path)

    b1, b2 = BOILERPLATE
    cc0 = [
        {"text": "\n".join([b1, *page(rng), b2])},
        {"text": "\n".join([*page(rng), b1, b2])},
        {"text": "\n".join([b2, b1])},  # only boilerplate: dropped
    ]
    cc1 = [
        {"text": "\n".join([b1, *article, b2])},  # the Wikipedia article, crawled
        {"text": "\n".join(page(rng))},  # nothing repeated: unchanged
    ]
    cc2 = [
        {"text": "\n".join([b1, *page(rng)])},  # another group: its b1 is not repeated
        {"text": FRENCH},  # not English: cc_wrong_language
        {"text": "\n".join(" ".join(rng.choice(RARE_WORDS) for _ in range(12)) + "."
                           for _ in range(6))},  # gibberish: cc_perplexity_tail
        {"text": "\n".join(" ".join(rng.choice(SHOP_WORDS) for _ in range(12)) + "!"
                           for _ in range(6))},  # not like a reference: cc_not_reference
    ]  # fmt: skip
    a92, b92 = shifted(2000, 83, seed=1)  # Jaccard 1913 / 2079 = 0.920
    a85, b85 = shifted(2000, 162, seed=2)  # Jaccard 1834 / 2158 = 0.850
    mit = {"license": "MIT"}
    github = [
        {"text": CODE.format(name="load", extra=0), "meta": mit},
        {"text": CODE.format(name="load", extra=0), "meta": mit},  # identical: dropped
        {"text": CODE.format(name="scan", extra=1), "meta": mit},
        {"text": CODE.format(name="scan", extra=2), "meta": mit},  # one character apart: kept
    ]
    wiki = [
        {"text": "\n".join(article), "meta": {"language": "en", "title": "Rivers"}},
        {"text": "\n".join(page(rng)), "meta": {"url": "https://ja.wikipedia.org/wiki/X"}},
    ]
    qa = "Q: " + sentence(rng) + "\n\nA: " + sentence(rng)
    stackexchange = [
        {"text": qa, "meta": {"url": "https://math.stackexchange.com/questions/1"}},
        {"text": qa + " Again.", "meta": {"url": "https://cooking.stackexchange.com/q/2"}},
    ]
    sources = {
        "commoncrawl": [
            jsonl("cc-0.jsonl", cc0),
            jsonl("cc-1.jsonl", cc1),
            jsonl("cc-2.jsonl", cc2),
        ],
        "books": [jsonl("books.jsonl", [{"text": t} for t in (a92, b92, a85, b85)])],
        "github": [jsonl("github.jsonl", github)],
        "wikipedia": [jsonl("wikipedia.jsonl", wiki)],
        "stackexchange": [jsonl("stackexchange.jsonl", stackexchange)],
    }
    expected = {
        "commoncrawl": {
            "documents_in": 9,
            "kept": 5,
            "dropped": {
                "cc_all_lines_duplicate": 1,
                "cc_wrong_language": 1,
                "cc_perplexity_tail": 1,
                "cc_not_reference": 1,
            },
        },
        "books": {"documents_in": 4, "kept": 3, "dropped": {"books_near_duplicate": 1}},
        "github": {"documents_in": 4, "kept": 3, "dropped": {"github_exact_duplicate": 1}},
        "wikipedia": {"documents_in": 2, "kept": 1, "dropped": {"wikipedia_language": 1}},
        "stackexchange": {"documents_in": 2, "kept": 1, "dropped": {"stackexchange_site": 1}},
    }
    # Without the quality models, the French, gibberish and shop pages are kept.
    without_models = {**expected, "commoncrawl": {
        "documents_in": 9, "kept": 8, "dropped": {"cc_all_lines_duplicate": 1}}}  # fmt: skip
    # b1 and b2 four times each in the first group; the second group's b1 stays.
    return {"sources": sources, "expected": expected, "expected_without_models": without_models,
            "lines_removed": {"commoncrawl": 8}, "article": "\n".join(article),
            "boilerplate": BOILERPLATE}  # fmt: skip


def overrides(sources: dict[str, list[str]], models: dict[str, str] | None = None) -> list[str]:
    """`CorpusConfig` overrides for the planted corpus: its files, the smaller shard group,
    and CommonCrawl's quality models (`quality_text.train_models`), or None: none, with
    `quality.allow_missing_models`."""
    out = [f"sources.{name}=[{', '.join(paths)}]" for name, paths in sources.items()]
    out.append(f"dedup.sources.commoncrawl.line_group_shards={LINE_GROUP_SHARDS}")
    if models is None:
        return [*out, "quality.allow_missing_models=true"]
    return [*out, *(f"quality.{field}={path}" for field, path in models.items())]
