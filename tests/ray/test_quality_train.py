"""`llamaray quality train` on Ray: the three models trained from text made here
(tests/quality_text.py), each then making the decisions it is for; and the same into S3."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

import planted_corpus
import quality_text
from llamaray.cli import main
from llamaray.config import QualityConfig
from llamaray.data.quality import language_id, perplexity, reference, steps
from llamaray.data.quality.models import kenlm_tool
from llamaray.data.records import Document, Rejected

pytestmark = [pytest.mark.ray, pytest.mark.slow]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    if quality_text.have_dicts():
        pytest.skip(f"word lists missing: `make wordlists` installs {quality_text.DICT_PACKAGES}")
    if kenlm_tool("lmplz") is None:
        pytest.skip("KenLM's lmplz not built: `make kenlm-tools`")
    return quality_text.write_inputs(tmp_path_factory.mktemp("quality-text"))


def train(capsys, *args: str) -> dict:
    """Run `llamaray quality train ...`; its printed summary."""
    capsys.readouterr()
    assert main(["quality", "train", *args, "--cpus", "1"]) == 0
    return json.loads(capsys.readouterr().out)


def cc(text: str) -> Document:
    return Document(text, "commoncrawl", "cc.jsonl:1")


def test_quality_train_makes_the_three_models_and_they_decide_as_ccnet(inputs, tmp_path, capsys):
    models = tmp_path / "models"
    langs = [f"--lang={lang}={path}" for lang, path in inputs["lid"].items()]
    lid = train(capsys, "lid", *langs, "--output", str(models / "lid.bin"))
    assert lid["labels"] == sorted(quality_text.DICTS) and lid["examples"] == 5 * 300 * 10
    assert lid["outputs"] == [str(models / "lid.bin")]

    lm = train(
        capsys,
        "lm",
        "--input",
        inputs["lm"],
        "--sample",
        inputs["sample"],
        "--output",
        str(models),
        "--order",
        "3",
        "--vocab-size",
        "500",
    )
    assert sorted(Path(p).name for p in lm["outputs"]) == [
        "en.arpa.bin",
        "en.cutoffs.json",
        "en.sp.model",
    ]
    assert lm["sample_pages"] == 100 and lm["cutoffs"]["head"] < lm["cutoffs"]["middle"]
    written = json.loads((models / "en.cutoffs.json").read_text())
    assert (written["head"], written["middle"]) == (lm["cutoffs"]["head"], lm["cutoffs"]["middle"])

    ref = train(
        capsys,
        "reference",
        "--positive",
        inputs["positive"],
        "--negative",
        inputs["negative"],
        "--output",
        str(models / "reference.bin"),
    )
    assert ref["labels"] == ["random", "reference"] and ref["examples"] == 400

    q = QualityConfig(
        lid_model=str(models / "lid.bin"),
        perplexity_model=str(models / "en.arpa.bin"),
        reference_model=str(models / "reference.bin"),
    )
    steps.check_models(q)  # everything prepare needs is there, companions included
    rng = random.Random(11)
    english = cc("\n".join(planted_corpus.page(rng)))
    french = cc(planted_corpus.FRENCH)
    gibberish = cc(quality_text.dictionary_page(rng, "en", frequent=False))
    shop = cc(quality_text.page_of(rng, quality_text.shop_sentence))
    assert isinstance(language_id.language_filter(english, q.lid_model), Document)
    assert language_id.language_filter(french, q.lid_model).reason == "cc_wrong_language"
    assert isinstance(perplexity.perplexity_filter(english, q.perplexity_model), Document)
    tail = perplexity.perplexity_filter(gibberish, q.perplexity_model)
    assert isinstance(tail, Rejected) and tail.reason == "cc_perplexity_tail"
    assert isinstance(reference.reference_filter(english, q.reference_model), Document)
    assert reference.reference_filter(shop, q.reference_model).reason == "cc_not_reference"


def test_quality_train_reads_and_writes_s3(inputs, s3_client, capsys):
    from llamaray import storage

    bucket = "quality-train"
    s3_client.create_bucket(Bucket=bucket)
    for name in ("positive", "negative"):
        storage.upload(inputs[name], f"s3://{bucket}/text/{name}.jsonl")
    out = f"s3://{bucket}/models/reference.bin"
    ref = train(
        capsys,
        "reference",
        "--positive",
        f"s3://{bucket}/text/positive.jsonl",
        "--negative",
        f"s3://{bucket}/text/negative.jsonl",
        "--output",
        out,
    )
    assert ref["outputs"] == [out] and ref["examples"] == 400
    # prepare's check finds it, and the filter reads it from S3 (a local copy per process).
    steps.check_models(QualityConfig(reference_model=out, allow_missing_models=True))
    like = cc(quality_text.page_of(random.Random(5), quality_text.encyclopedic_sentence))
    assert reference.reference_score(like.text, out) >= 0.5
