"""CommonCrawl's model steps (data/quality) with real models trained here on text made here
(tests/quality_text.py): fastText language id, KenLM perplexity buckets, the reference
classifier; their settings' check before any cluster work; the planted corpus's decisions."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest

import planted_corpus
import quality_text
from llamaray.config import ConfigError, CorpusConfig, QualityConfig, load_config
from llamaray.data.clean import REASONS, clean_document
from llamaray.data.quality import language_id, perplexity, reference, steps
from llamaray.data.quality.models import kenlm_model, kenlm_tool
from llamaray.data.quality.normalize import normalize, normalized_lines
from llamaray.data.quality.perplexity import Cutoffs, companion, percentile_cutoffs
from llamaray.data.records import Document, Rejected

pytestmark = pytest.mark.timeout(120)


def cc(text: str) -> Document:
    return Document(text, "commoncrawl", "cc.jsonl:1")


def reason(out: Document | Rejected) -> str | None:
    return out.reason if isinstance(out, Rejected) else None


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """The three models, trained in this process on quality_text's text (about 6 s)."""
    missing = quality_text.have_dicts()
    if missing:
        pytest.skip(
            f"word lists missing ({', '.join(missing)}): `make wordlists` installs "
            f"{quality_text.DICT_PACKAGES} with apt"
        )
    if kenlm_tool("lmplz") is None:
        pytest.skip("KenLM's lmplz not built: `make kenlm-tools`")
    return quality_text.train_models(tmp_path_factory.mktemp("quality"))


# --- normalization, cutoffs, files (no model) ------------------------------------------------


def test_normalize_is_ccnets():
    assert normalize("  Le 14 Juillet, à Paris… ") == "le 00 juillet, a paris..."
    # cc_net maps an em dash to " - " and keeps the spaces around it (no collapsing).
    assert normalize("«Ｑｕｏｔｅ»\x07 — “x”") == '"ｑｕｏｔｅ"  -  "x"'
    assert normalize(" \t ") == ""
    assert normalized_lines("One\n\n  \nTwo 2\n") == ["one", "two 0"]


def test_buckets_split_at_the_cutoffs():
    cut = Cutoffs(head=10.0, middle=100.0)
    assert [cut.bucket(p) for p in (1, 10, 10.5, 100, 100.5, math.inf)] == [
        "head",
        "head",
        "middle",
        "middle",
        "tail",
        "tail",
    ]
    assert Cutoffs.from_json(cut.to_json(language="en")) == cut
    with pytest.raises(ValueError, match="not a cutoffs file"):
        Cutoffs.from_json('{"head": 1}', "x.json")


def test_cutoffs_are_the_33rd_and_66th_percentiles_of_the_sample():
    got = percentile_cutoffs(range(1, 101))  # numpy's linear interpolation
    assert (got.head, got.middle) == (pytest.approx(33.67), pytest.approx(66.34))
    assert percentile_cutoffs([5.0, math.inf, 5.0]) == Cutoffs(5.0, 5.0)
    with pytest.raises(ValueError, match="no finite perplexity"):
        percentile_cutoffs([math.inf])


def test_companion_files_sit_beside_the_model_as_ccnets():
    assert companion("/m/en.arpa.bin", ".sp.model") == "/m/en.sp.model"
    assert companion("s3://b/lm/de.arpa", ".cutoffs.json") == "s3://b/lm/de.cutoffs.json"


def test_every_model_step_reason_is_a_cleaning_reason():
    assert set(steps.REASONS) <= set(REASONS)
    assert set(steps.REASONS) == {
        "cc_wrong_language",
        "cc_perplexity_head",
        "cc_perplexity_middle",
        "cc_perplexity_tail",
        "cc_not_reference",
    }


# --- the settings' check, before any cluster work -----------------------------------------------


def test_no_model_stops_prepare_naming_each_setting_and_how_to_train_it():
    with pytest.raises(ConfigError) as err:
        steps.check_models(QualityConfig())
    msg = str(err.value)
    for field in ("lid_model", "perplexity_model", "reference_model"):
        assert f"quality.{field}: not set" in msg
    assert "llamaray quality train lid" in msg and "llamaray quality train lm" in msg
    assert "llamaray quality train reference" in msg
    assert "quality.allow_missing_models=true" in msg
    steps.check_models(QualityConfig(allow_missing_models=True))  # the opt-out: no error


def test_a_missing_model_file_is_named_with_its_setting(tmp_path):
    (tmp_path / "en.arpa.bin").write_bytes(b"x")
    q = QualityConfig(
        lid_model=str(tmp_path / "lid.bin"),
        perplexity_model=str(tmp_path / "en.arpa.bin"),
        reference_model=str(tmp_path / "ref.bin"),
    )
    with pytest.raises(ConfigError) as err:
        steps.check_models(q)
    msg = str(err.value)
    assert f"quality.lid_model: {tmp_path / 'lid.bin'} does not exist" in msg
    assert f"quality.reference_model: {tmp_path / 'ref.bin'} does not exist" in msg
    assert (
        f"quality.perplexity_tokenizer: {tmp_path / 'en.sp.model'} does not exist "
        "(beside quality.perplexity_model)"
    ) in msg
    assert "quality.perplexity_model:" not in msg  # it is there
    (tmp_path / "en.sp.model").write_bytes(b"x")
    (tmp_path / "en.cutoffs.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match=r"quality.perplexity_cutoffs: .*not a cutoffs file"):
        steps.check_models(q)


def test_the_quality_settings_are_validated_at_load():
    with pytest.raises(ConfigError) as err:
        load_config(
            None,
            [
                "quality.language=English",
                "quality.keep_buckets=[top]",
                "quality.lid_threshold=2",
                "quality.lid_modle=x",
            ],
            CorpusConfig,
        )
    msg = str(err.value)
    assert "quality.language: 'English': not a language code" in msg
    assert "quality.keep_buckets.0: Input should be 'head', 'middle' or 'tail'" in msg
    assert "quality.lid_threshold: Input should be less than or equal to 1" in msg
    assert "quality.lid_modle: unknown key" in msg


def test_prepare_without_models_stops_before_ray_naming_the_settings(tmp_path, capsys):
    from llamaray.cli import main

    page = tmp_path / "cc.jsonl"
    page.write_text(json.dumps({"text": "hello"}) + "\n")
    code = main(["prepare", f"sources.commoncrawl=[{page}]", f"output_dir={tmp_path}"])
    err = capsys.readouterr().err
    assert code == 2
    assert "quality.lid_model: not set" in err and "quality.reference_model: not set" in err
    assert not (tmp_path / "corpus").exists()  # nothing was built, not even the lock
    # A corpus without commoncrawl needs no model (the demo's).
    from llamaray.data.prepare import check_models

    check_models(load_config(None, [f"sources.c4=[{page}]"], CorpusConfig))


# --- the models' decisions --------------------------------------------------------------------


def test_language_id_drops_a_french_page_from_an_english_corpus(models):
    french = cc(planted_corpus.FRENCH)
    english = cc("\n".join(planted_corpus.page(random.Random(1))))
    lid = models["lid_model"]
    assert reason(language_id.language_filter(french, lid)) == "cc_wrong_language"
    kept = language_id.language_filter(english, lid)
    assert isinstance(kept, Document) and kept.meta["ccnet"]["language"] == "en"
    assert kept.meta["ccnet"]["language_score"] >= 0.5
    # The same model keeps the French page for a French corpus, and its score is real.
    assert isinstance(language_id.language_filter(french, lid, language="fr"), Document)
    assert language_id.identify(planted_corpus.FRENCH, lid)[1] > 0.5
    # CCNet's threshold: a page below it is dropped even in its own language.
    assert reason(language_id.language_filter(english, lid, min_score=1.0)) == "cc_wrong_language"


@pytest.mark.parametrize("lang", ["de", "es", "it"])
def test_language_id_tells_the_other_languages_apart(models, lang):
    page = quality_text.dictionary_page(random.Random(7), lang)
    assert language_id.identify(page, models["lid_model"])[0] == lang


def test_perplexity_is_ccnets_formula_over_kenlm_scores(models):
    lm, sp = models["perplexity_model"], companion(models["perplexity_model"], ".sp.model")
    text = "The river and the garden.\nA winter market in the village."
    lines = perplexity.tokenized_lines(text, sp)
    assert len(lines) == 2 and all("▁" in line for line in lines)  # SentencePiece pieces
    # Summed log10 probabilities over tokens, each line's pieces + </s>.
    scores = [sum(s[0] for s in kenlm_model(lm).full_scores(line)) for line in lines]
    tokens = sum(len(line.split()) + 1 for line in lines)
    expected = 10 ** (-sum(scores) / tokens)
    assert perplexity.document_perplexity(text, lm, sp) == pytest.approx(
        expected, rel=1e-6
    )  # float32 sums


def test_gibberish_falls_in_the_tail_and_is_dropped(models):
    lm = models["perplexity_model"]
    gibberish = cc(quality_text.dictionary_page(random.Random(2), "en", frequent=False))
    english = cc("\n".join(planted_corpus.page(random.Random(2))))
    assert reason(perplexity.perplexity_filter(gibberish, lm)) == "cc_perplexity_tail"
    kept = perplexity.perplexity_filter(english, lm)
    assert isinstance(kept, Document) and kept.meta["ccnet"]["bucket"] in ("head", "middle")
    # Which buckets stay is a setting: keeping the tail keeps it, and records its bucket.
    tail = perplexity.perplexity_filter(gibberish, lm, keep=("head", "middle", "tail"))
    assert tail.meta["ccnet"]["bucket"] == "tail"
    cutoffs = perplexity.load_cutoffs(companion(lm, ".cutoffs.json"))
    assert tail.meta["ccnet"]["perplexity"] > cutoffs.middle
    assert reason(perplexity.perplexity_filter(english, lm, keep=("tail",))) in (
        "cc_perplexity_head",
        "cc_perplexity_middle",
    )


def test_the_reference_classifier_keeps_reference_like_pages_only(models):
    rng = random.Random(3)
    like = cc(quality_text.page_of(rng, quality_text.encyclopedic_sentence))
    shop = cc(quality_text.page_of(rng, quality_text.shop_sentence))
    ref = models["reference_model"]
    kept = reference.reference_filter(like, ref)
    assert isinstance(kept, Document) and kept.meta["ccnet"]["reference_score"] >= 0.5
    assert reason(reference.reference_filter(shop, ref)) == "cc_not_reference"
    assert reference.reference_score(shop.text, ref) < 0.5
    # The threshold is a setting: at 0 every page is kept.
    assert isinstance(reference.reference_filter(shop, ref, min_score=0.0), Document)


def test_clean_document_runs_the_model_steps_in_ccnets_order(models):
    q = QualityConfig(**models)
    options = {"commoncrawl": {"quality": q}}
    # A French page of gibberish-level perplexity is named by language id, the first step.
    assert reason(clean_document(cc(planted_corpus.FRENCH), options)) == "cc_wrong_language"
    english = clean_document(cc("\n".join(planted_corpus.page(random.Random(4)))), options)
    assert isinstance(english, Document)
    assert set(english.meta["ccnet"]) == {
        "language",
        "language_score",
        "perplexity",
        "bucket",
        "reference_score",
    }
    # A step whose model is not set does not run (the opt-out): the French page passes.
    skipping = QualityConfig(allow_missing_models=True)
    out = clean_document(cc(planted_corpus.FRENCH), {"commoncrawl": {"quality": skipping}})
    assert isinstance(out, Document) and "ccnet" not in out.meta


# --- the planted corpus ------------------------------------------------------------------------


def test_the_planted_corpus_gets_ccnets_decisions_with_the_models(models, tmp_path):
    from llamaray.data.prepare import decide_rows, outcomes

    planted = planted_corpus.write(tmp_path / "raw")
    cfg = load_config(None, planted_corpus.overrides(planted["sources"], models), CorpusConfig)
    rows, _ = decide_rows(cfg, planted["sources"])
    got = outcomes(rows)
    assert got == planted["expected"]
    cc_out = got["commoncrawl"]
    assert cc_out["documents_in"] == cc_out["kept"] + sum(cc_out["dropped"].values())
    excerpts = {r["reason"]: r["excerpt"] for r in rows if r["kind"] == "rejected"}
    assert excerpts["cc_wrong_language"].startswith("Le conseil municipal")
    assert excerpts["cc_perplexity_tail"].split()[0].lower() in planted_corpus.RARE_WORDS
    assert excerpts["cc_not_reference"].split()[0].lower() in planted_corpus.SHOP_WORDS
    kept = [
        json.loads(r["meta_json"])["ccnet"]
        for r in rows
        if r["kind"] == "doc" and r["source"] == "commoncrawl"
    ]
    assert len(kept) == 5 and all(k["bucket"] in ("head", "middle") for k in kept)


def test_the_manifest_entry_counts_each_step_and_bucket(models):
    q = QualityConfig(**models)
    dropped = {
        "cc_all_lines_duplicate": 1,
        "cc_wrong_language": 2,
        "cc_perplexity_tail": 3,
        "cc_not_reference": 4,
    }
    entry = steps.manifest_entry(q, dropped, {"head": 5, "middle": 6})
    by_step = {s["step"]: s for s in entry["steps"]}
    assert list(by_step) == ["language_id", "perplexity", "reference_classifier"]
    assert all(s["ran"] for s in entry["steps"]) and entry["skipped"] == {}
    assert by_step["language_id"]["documents_removed"] == 2
    assert by_step["perplexity"]["buckets"] == {"head": 5, "middle": 6, "tail": 3}
    assert by_step["perplexity"]["documents_removed"] == 3
    assert by_step["perplexity"]["cutoffs"]["middle"] > by_step["perplexity"]["cutoffs"]["head"]
    assert by_step["reference_classifier"]["documents_removed"] == 4
    assert not entry["allow_missing_models"]


def test_the_manifest_entry_records_the_opt_out_and_what_was_skipped():
    q = QualityConfig(allow_missing_models=True, reference_model="ref.bin")
    entry = steps.manifest_entry(q, {}, {})
    assert entry["allow_missing_models"] is True
    assert [s["ran"] for s in entry["steps"]] == [False, False, True]
    assert set(entry["skipped"]) == {"language_id", "perplexity"}
    assert "quality.lid_model not set" in entry["skipped"]["language_id"]


def test_quality_train_names_an_input_that_matches_no_file(tmp_path):
    """Read as a corpus, a missing file is only a rejected record: the model would be
    trained on the rest (a language-id model without French). The flag is named first."""
    from llamaray.config import ConfigError
    from llamaray.data.quality.train import check_inputs

    there = tmp_path / "fr.txt"
    there.write_text("bonjour\n")
    with pytest.raises(ConfigError) as err:
        check_inputs({"--lang fr=": [str(there)], "--lang en=": [str(tmp_path / "en.tx")]})
    assert f"--lang en= {tmp_path / 'en.tx'}: no such file" in str(err.value)
    assert "fr.txt" not in str(err.value)


def test_an_s3_model_is_copied_once_per_node_and_again_when_replaced(
    s3_client, tmp_path, monkeypatch
):
    """Every cleaning worker on a node opens the same copy of an S3 model (a KenLM model is
    GBs); the copy is named by the object's version, so a replaced model is fetched anew."""
    import multiprocessing

    from llamaray.data.quality import models

    monkeypatch.setenv(models.MODEL_CACHE_ENV, str(tmp_path / "cache"))
    s3_client.create_bucket(Bucket="quality-cache")
    uri = "s3://quality-cache/models/en.arpa.bin"
    s3_client.put_object(Bucket="quality-cache", Key="models/en.arpa.bin", Body=b"first" * 1000)
    models.local_path.cache_clear()
    # Two processes at once, as two workers starting together: one copy, whole, for both.
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        paths = pool.map(models.local_path, [uri, uri])
    assert paths[0] == paths[1] and Path(paths[0]).read_bytes() == b"first" * 1000
    assert Path(paths[0]).is_relative_to(tmp_path / "cache")
    assert [p.name for p in Path(paths[0]).parent.iterdir() if p.name != ".lock"] == [
        "en.arpa.bin"
    ]  # no partial file left
    first = Path(paths[0])
    stamp = first.stat().st_mtime_ns
    assert models.local_path(uri) == paths[0] and first.stat().st_mtime_ns == stamp  # reused
    s3_client.put_object(Bucket="quality-cache", Key="models/en.arpa.bin", Body=b"second")
    models.local_path.cache_clear()
    replaced = models.local_path(uri)
    assert replaced != paths[0] and Path(replaced).read_bytes() == b"second"
    models.local_path.cache_clear()
