"""Shared fixtures: a scratch project folder holding this repo's configs and params."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A copy of configs/ and params.yaml in a temporary folder, made the working directory."""
    shutil.copytree(ROOT / "configs", tmp_path / "configs")
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    monkeypatch.chdir(tmp_path)
    return tmp_path


# Real digits runs (prepare .. compare on the CPU), built once per session by tests/_digits_run.py.
@pytest.fixture(scope="session")
def clean(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests._digits_run import digits_run

    return digits_run(tmp_path_factory, "clean")


@pytest.fixture(scope="session")
def broken(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same run with the int8 model's activation scales multiplied by 100."""
    from tests._digits_run import digits_run

    return digits_run(tmp_path_factory, "broken", int8_scale=100.0)
