"""The no-download text sample: RedPajama-shaped JSONL from the running Python's stdlib."""

from __future__ import annotations

import ast
import json
import sys
from pathlib import Path

import pytest

from llamaray.data import sample_text
from llamaray.data.sample_text import SOURCES, iter_texts, stdlib_dir, write_stdlib_sample

CAP = 300_000


@pytest.fixture(scope="module")
def sample(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_stdlib_sample(tmp_path_factory.mktemp("a"), max_bytes_per_source=CAP, seed=0)


def records(path: Path) -> list[dict]:
    lines = path.read_text(encoding="utf-8").split("\n")
    assert lines[-1] == ""  # every record ends with a newline
    return [json.loads(line) for line in lines[:-1]]


def test_writes_both_sources(sample: dict[str, Path]) -> None:
    assert set(sample) == set(SOURCES) == {"code", "prose"}
    for source, path in sample.items():
        assert path.name == f"{source}.jsonl" and path.is_file()


def test_records_have_redpajama_shape(sample: dict[str, Path]) -> None:
    for source, path in sample.items():
        recs = records(path)
        assert len(recs) > 10
        for rec in recs:
            assert set(rec) == {"text", "meta"}
            expected = {"source", "path"} | ({"license"} if source == "code" else set())
            assert set(rec["meta"]) == expected
            if source == "code":
                assert rec["meta"]["license"] == "PSF-2.0"
            assert rec["meta"]["source"] == source
            assert isinstance(rec["text"], str) and rec["text"].strip()


def test_byte_cap_is_respected_and_filled(sample: dict[str, Path]) -> None:
    for path in sample.values():
        size = sum(len(t.encode("utf-8")) for t in iter_texts([path]))
        assert 0.9 * CAP <= size <= CAP


def test_code_is_the_stdlib_sources(sample: dict[str, Path]) -> None:
    recs = records(sample["code"])
    paths = [r["meta"]["path"] for r in recs]
    assert len(set(paths)) == len(paths)
    root = stdlib_dir()
    for rec in recs:
        rel = Path(rec["meta"]["path"])
        assert rel.suffix == ".py"
        assert not {"test", "tests", "idle_test", "site-packages"} & set(rel.parts)
        assert rec["text"] == (root / rel).read_bytes().decode("utf-8")


def test_prose_is_pydoc_topics_and_module_docstrings(sample: dict[str, Path]) -> None:
    from pydoc_data.topics import topics

    recs = records(sample["prose"])
    kinds = {"topic": 0, "docstring": 0}
    root = stdlib_dir()
    for rec in recs:
        where, _, key = rec["meta"]["path"].partition(":")
        if where == "pydoc_data/topics.py":
            kinds["topic"] += 1
            assert rec["text"] == topics[key]
        else:
            kinds["docstring"] += 1
            assert key == "__doc__"
            tree = ast.parse((root / where).read_text(encoding="utf-8"))
            assert rec["text"] == ast.get_docstring(tree)
    assert kinds["topic"] > 0 and kinds["docstring"] > 0


def test_builds_without_importing_modules(sample: dict[str, Path]) -> None:
    # `this` prints the Zen of Python and `antigravity` opens a browser when imported; the
    # sample holds their docstrings or sources only if they were read, not run.
    assert "antigravity" not in sys.modules and "this" not in sys.modules


def test_deterministic_and_seeded(sample: dict[str, Path], tmp_path: Path) -> None:
    again = write_stdlib_sample(tmp_path / "same", max_bytes_per_source=CAP, seed=0)
    other = write_stdlib_sample(tmp_path / "other", max_bytes_per_source=CAP, seed=1)
    for source in SOURCES:
        assert again[source].read_bytes() == sample[source].read_bytes()
        assert other[source].read_bytes() != sample[source].read_bytes()


def test_iter_texts_yields_every_text_in_order(sample: dict[str, Path]) -> None:
    paths = [sample["prose"], sample["code"]]
    expected = [r["text"] for p in paths for r in records(p)]
    assert list(iter_texts(paths)) == expected


def test_skips_tests_site_packages_and_non_utf8(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    fake = tmp_path / "lib"
    (fake / "pkg").mkdir(parents=True)
    (fake / "pkg" / "good.py").write_text('"""Good module."""\nx = "é"\n', encoding="utf-8")
    (fake / "latin1.py").write_bytes(b'"""caf\xe9"""\n')
    for skipped in ("test", "pkg/tests", "idle_test", "site-packages"):
        (fake / skipped).mkdir(parents=True)
        (fake / skipped / "skip_me.py").write_text('"""Never."""\n', encoding="utf-8")
    monkeypatch.setattr(sample_text, "stdlib_dir", lambda: fake)

    paths = write_stdlib_sample(tmp_path / "out", max_bytes_per_source=10**7)
    code = records(paths["code"])
    assert [r["meta"]["path"] for r in code] == ["pkg/good.py"]
    docstrings = [r for r in records(paths["prose"]) if r["meta"]["path"].endswith("__doc__")]
    assert [(r["meta"]["path"], r["text"]) for r in docstrings] == [
        ("pkg/good.py:__doc__", "Good module.")
    ]
    err = capsys.readouterr().err
    assert "1 .py files read, 1 skipped as not UTF-8" in err
    assert "code" in err and "prose" in err


def test_rejects_non_positive_cap(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="max_bytes_per_source"):
        write_stdlib_sample(tmp_path, max_bytes_per_source=0)
