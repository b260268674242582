"""The demo pipeline and the command line, end to end at toy scale."""

from __future__ import annotations

import pytest
import torch

from llamaray.cli import main
from llamaray.config import load_config
from llamaray.model import Llama
from llamaray.train.local_run import run_local


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    cfg = load_config("jobs/configs/demo.yaml", [
        f"output_dir={out}", "name=t", "data.sample_mb=0.3", "tokenizer.vocab_size=512",
        "train.steps=4", "train.log_every=2",
    ])  # fmt: skip
    return run_local(cfg, prompts=("def ", "The "))


def test_demo_pipeline_writes_everything(demo_run):
    run_dir = demo_run.run_dir
    assert (run_dir / "config.yaml").is_file()
    assert (run_dir / "tokenizer" / "tokenizer.model").is_file()
    assert {p.name for p in (run_dir / "corpus").glob("*.jsonl")} == {"code.jsonl", "prose.jsonl"}
    assert len(demo_run.result.history) == 4 and demo_run.result.val_loss is not None
    assert set(demo_run.samples) == {"def ", "The "}
    assert all(isinstance(s, str) and s for s in demo_run.samples.values())


def test_saved_model_reloads_with_identical_logits(demo_run):
    reloaded = Llama.from_pretrained(demo_run.model_dir)
    tokens = torch.randint(0, demo_run.tokenizer.vocab_size, (2, 17))
    demo_run.result.model.eval()
    torch.testing.assert_close(reloaded(tokens), demo_run.result.model(tokens), atol=0, rtol=0)


def test_cli_generate_and_convert(demo_run, tmp_path, capsys):
    assert main(["convert", str(demo_run.model_dir), str(tmp_path / "meta"), "--to", "meta"]) == 0
    assert (tmp_path / "meta" / "params.json").is_file()
    assert (tmp_path / "meta" / "tokenizer.model").is_file()
    capsys.readouterr()
    assert main(["generate", "--model", str(tmp_path / "meta"), "--prompt", "def ",
                 "--temperature", "0", "--max-new-tokens", "5"]) == 0  # fmt: skip
    assert capsys.readouterr().out.startswith("def ")


def test_cli_presets_table(capsys):
    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    for name, params in [("7B", "6.7B"), ("13B", "13.0B"), ("33B", "32.5B"), ("65B", "65.2B")]:
        line = next(row for row in out.splitlines() if row.startswith(name + " "))
        assert params in line.split()
    assert "debug" in out and "tiny" in out and "1b" in out


def test_cli_config_error_exits_2_naming_field_before_work(tmp_path, capsys):
    code = main(["train", f"output_dir={tmp_path}", "model.n_heads=7"])
    assert code == 2
    assert "model.n_heads: 7 must divide dim=256" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # nothing was started


def test_cli_print_config(capsys):
    assert main(["train", "--print-config", "model.preset=debug", "train.seq_len=64"]) == 0
    assert "preset: debug" in capsys.readouterr().out


def test_cli_tokenizer_train(demo_run, tmp_path, capsys):
    corpus = demo_run.run_dir / "corpus" / "prose.jsonl"
    assert main(["tokenizer", "train", "--input", str(corpus), "--output", str(tmp_path),
                 "--vocab-size", "600"]) == 0  # fmt: skip
    assert "600 pieces" in capsys.readouterr().out
    assert (tmp_path / "tokenizer.model").is_file()
    with pytest.raises(SystemExit, match="no such file"):
        main(["tokenizer", "train", "--input", str(tmp_path / "nope.txt"), "--output", "x"])
