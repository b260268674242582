"""The doctests of platform/llamaray (collected with `--doctest-modules`, see pyproject.toml)
run in a temporary folder holding a link to the repository's jobs/: an example names files
as a user in the checkout would (`jobs/configs/demo.yaml`) and writes nothing into it."""

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent


@pytest.fixture(autouse=True)
def _doctests_in_a_scratch_folder(request, monkeypatch):
    if type(request.node).__name__ != "DoctestItem":
        return
    scratch = request.getfixturevalue("tmp_path")
    (scratch / "jobs").symlink_to(REPO / "jobs", target_is_directory=True)
    monkeypatch.chdir(scratch)
