"""Configs fail before any work, naming the field and the reason."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llamaray.config import ConfigError, CorpusConfig, RunConfig, load_config, parse_overrides

REPO = Path(__file__).resolve().parents[2]


def error_of(overrides: list[str], path=None) -> str:
    with pytest.raises(ConfigError) as err:
        load_config(path, overrides)
    return str(err.value)


def test_defaults_follow_the_paper():
    cfg = load_config(None, ["model.preset=7B"])
    assert cfg.train.seq_len == 2048  # the paper's context, the 7B preset's rotary table
    assert cfg.peak_lr == 3e-4 and cfg.batch_tokens == 4 * 1024 * 1024
    assert (cfg.optimizer.beta1, cfg.optimizer.beta2, cfg.optimizer.weight_decay) == (
        0.9,
        0.95,
        0.1,
    )
    assert (cfg.optimizer.warmup_steps, cfg.optimizer.final_lr_ratio, cfg.optimizer.grad_clip) == (
        2000, 0.1, 1.0)  # fmt: skip
    assert cfg.grad_accum_steps == 2048  # one 2048-token row per micro-batch, one worker


def test_the_default_row_length_is_the_models_context():
    # The default preset (tiny) has a 512-token rotary table: a bare config must be valid.
    cfg = load_config(None, ["name=x"])
    assert (cfg.model.preset, cfg.train.seq_len) == ("tiny", 512)
    assert load_config(None, ["model.max_seq_len=256"]).train.seq_len == 256
    assert load_config(None, ["train.seq_len=128"]).train.seq_len == 128  # set: kept
    assert "train.seq_len: 1024 exceeds" in error_of(["train.seq_len=1024"])


def test_overrides_are_typed_and_nested():
    assert parse_overrides(["a.b=3", "a.c=[1, 2]", "d=true", "e=x"]) == {
        "a": {"b": 3, "c": [1, 2]}, "d": True, "e": "x"}  # fmt: skip
    cfg = load_config(None, ["model.preset=debug", "train.seq_len=64", "train.batch_tokens=512"])
    assert cfg.grad_accum_steps == 8 and cfg.model_args().dim == 64


def test_unknown_key_is_named():
    assert "train.stepz: unknown key" in error_of(["train.stepz=3"])
    assert "optimiser: unknown key" in error_of(["optimiser.lr=1"])


def test_wrong_type_is_named():
    assert "train.steps: Input should be a valid integer" in error_of(["train.steps=many"])


def test_inconsistent_values_are_named_with_the_reason():
    msg = error_of(["model.n_heads=7"])
    assert "model.n_heads: 7 must divide dim=256" in msg
    msg = error_of(["train.num_workers=3", "train.seq_len=256", "train.batch_tokens=1024"])
    assert "train.batch_tokens: 1024 is not divisible by" in msg and "256 x 1 x 3" in msg
    assert "train.seq_len: 4096 exceeds the model's max_seq_len=512" in error_of(
        ["train.seq_len=4096"]
    )
    assert "model.preset: unknown preset 'huge'" in error_of(["model.preset=huge"])


def test_all_problems_reported_at_once():
    msg = error_of(["model.preset=huge", "train.steps=-1"])
    assert "model.preset" in msg and "train.steps" in msg


def test_bad_files_and_bad_override_syntax(tmp_path):
    assert "does not exist" in error_of([], tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    assert "must hold a mapping" in error_of([], tmp_path / "list.yaml")
    (tmp_path / "bad.yaml").write_text("train: [unclosed\n")
    assert "not valid YAML" in error_of([], tmp_path / "bad.yaml")
    assert "key.path=value" in error_of(["trainsteps"])


@pytest.mark.parametrize("path", sorted((REPO / "jobs" / "configs").glob("*.yaml")), ids=str)
def test_shipped_configs_are_valid(path):
    if path.name.startswith("sweep"):  # a run config plus a `sweep:` section
        from llamaray.sweep.config import load_sweep_config

        run, _ = load_sweep_config(path)
        assert isinstance(run, RunConfig)
        return
    schema = CorpusConfig if path.name.startswith("corpus") else RunConfig
    assert isinstance(load_config(path, schema=schema), schema)


def test_corpus_config_errors_name_the_field():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["sources.c4=[]", "seq_len=0", "dedup.near_threshold=2"], CorpusConfig)
    msg = str(err.value)
    assert "sources: source(s) c4 list no paths" in msg
    assert "seq_len: Input should be greater than 0" in msg
    assert "dedup.near_threshold" in msg


def test_yaml_round_trip(tmp_path):
    cfg = load_config(None, ["model.preset=debug", "train.seq_len=64", "train.batch_tokens=256"])
    (tmp_path / "c.yaml").write_text(cfg.to_yaml())
    assert load_config(tmp_path / "c.yaml") == cfg


@pytest.mark.parametrize(
    "bad", ["..", ".", "", "/etc", "../elsewhere", "a/b", "it's", "a b", ".hidden"]
)
def test_names_that_would_leave_their_folder_or_break_a_lookup_are_refused(bad):
    """A run's and a corpus's name become a folder under output_dir and storage and an MLflow
    run name: '..' or an absolute path would write outside them, a quote would break the
    run's lookup (a filter string)."""
    quoted = json.dumps(bad)  # a YAML string, "" included (a bare `name=` is null)
    assert f"name: {bad!r} is not a name" in error_of([f"name={quoted}"])
    assert f"data.prepare.name: {bad!r} is not a name" in error_of([f"data.prepare.name={quoted}"])
    with pytest.raises(ConfigError, match=r"(?m)^  name: .* is not a name"):
        load_config(None, [f"name={quoted}"], CorpusConfig)


def test_names_of_letters_digits_dots_dashes_and_underscores_are_kept():
    for name in ("demo", "llama-7b", "sw-4f2a1_00003", "run.2", "A1"):
        assert load_config(None, [f"name={name}"]).name == name


def test_the_cli_refuses_a_bad_name_before_any_work(capsys):
    from llamaray.cli import main

    assert main(["train", "name=.."]) == 2
    err = capsys.readouterr().err
    assert "name: '..' is not a name" in err and "Traceback" not in err
