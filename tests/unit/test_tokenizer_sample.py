"""The tokenizer trainer's line sample: LLaMA's size, bounded by memory with a message."""

from llamaray.tokenizer import TokenizerTrainSpec, _sample_sentences, sample_bytes


def lines_file(tmp_path, n: int = 1000):
    path = tmp_path / "lines.txt"
    lines = [f"line {i} of the sample text" for i in range(n)]
    path.write_text("\n".join(lines) + "\n")
    return path, lines


def test_the_default_sample_size_is_llamas():
    spec = TokenizerTrainSpec()
    # LLaMA's tokenizer.model: trainer_spec.input_sentence_size = 200000000.
    assert spec.input_sentence_size == 200_000_000
    assert "max_sample_bytes" not in spec.trainer_kwargs()


def test_the_sample_stops_at_its_memory_bound_and_says_so(tmp_path, capsys):
    path, lines = lines_file(tmp_path)
    per_line = sample_bytes(lines[0])
    spec = TokenizerTrainSpec(max_sample_bytes=per_line * 100, seed=1)
    sample = _sample_sentences([path], spec)
    assert sample.capped_at == len(sample.sentences)
    assert 95 <= len(sample.sentences) <= 100  # later lines are a few bytes longer
    assert sample.memory_bytes <= per_line * 100 + 200
    # Still a uniform sample of all the lines, not the first ones.
    assert max(lines.index(s) for s in sample.sentences) > 500
    assert sample.sentences == _sample_sentences([path], spec).sentences
    err = capsys.readouterr().err
    assert "memory bound" in err and "max_sample_bytes" in err
    assert f"at {sample.capped_at} lines" in err


def test_no_bound_reached_keeps_every_line(tmp_path, capsys):
    path, lines = lines_file(tmp_path, 50)
    sample = _sample_sentences([path], TokenizerTrainSpec(max_sample_bytes=10**9))
    assert sample.sentences == lines and sample.capped_at is None
    assert "memory bound" not in capsys.readouterr().err
