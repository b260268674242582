"""The command line at toy scale: convert, generate, presets, config errors, tokenizer.

Training itself (`llamaray train`) runs on Ray and is tested in tests/ray/test_pretrain.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from llamaray.cli import main
from llamaray.data.sample_text import write_stdlib_sample
from llamaray.model import Llama
from llamaray.model.args import get_preset
from llamaray.model.formats import save_hf
from llamaray.tokenizer import Tokenizer, train_tokenizer


@dataclass
class Exported:
    model: Llama
    model_dir: Path
    tokenizer: Tokenizer
    corpus: Path


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """A small model exported in Hugging Face format with its tokenizer beside it, as a
    finished pretraining run leaves it."""
    out = tmp_path_factory.mktemp("runs")
    sample = write_stdlib_sample(out / "corpus", 300_000)
    tokenizer = train_tokenizer([sample["prose"]], out / "tokenizer", vocab_size=512)
    torch.manual_seed(0)
    model = Llama(get_preset("debug").args.with_(vocab_size=tokenizer.vocab_size)).eval()
    model_dir = save_hf(model, out / "hf")
    (model_dir / "tokenizer.model").write_bytes(Path(tokenizer.path).read_bytes())
    return Exported(model, model_dir, tokenizer, sample["prose"])


def test_saved_model_reloads_with_identical_logits(demo_run):
    reloaded = Llama.from_pretrained(demo_run.model_dir)
    tokens = torch.randint(0, demo_run.tokenizer.vocab_size, (2, 17))
    torch.testing.assert_close(reloaded(tokens), demo_run.model(tokens), atol=0, rtol=0)


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
    corpus = demo_run.corpus
    assert main(["tokenizer", "train", "--input", str(corpus), "--output", str(tmp_path),
                 "--vocab-size", "600"]) == 0  # fmt: skip
    assert "600 pieces" in capsys.readouterr().out
    assert (tmp_path / "tokenizer.model").is_file()
    with pytest.raises(SystemExit, match="no such file"):
        main(["tokenizer", "train", "--input", str(tmp_path / "nope.txt"), "--output", "x"])
