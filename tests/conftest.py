"""Shared fixtures: a scratch project folder holding this repo's configs and params."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _what_runs() -> list[str]:
    import onnxruntime

    from calibration.ort_session import cpu_summary

    return [f"cpu: {cpu_summary()}", f"onnxruntime {onnxruntime.__version__}: Q/DQ models run with exact "
            "dequantize -> float op -> quantize semantics (calibration.ort_session)"]


def pytest_report_header(config: pytest.Config) -> list[str]:
    """Say what ran: CPU numbers of the INT8 simulation are exact on every CPU, and a CI log
    names the CPU and the features that decide onnxruntime's integer kernels."""
    return _what_runs()


def pytest_sessionstart(session: pytest.Session) -> None:
    """`-q` (make test) drops the report header: print the same lines anyway."""
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None and session.config.option.verbose < 0:
        for line in _what_runs():
            reporter.write_line(line)


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A copy of configs/ and params.yaml in a temporary folder, made the working directory."""
    shutil.copytree(ROOT / "configs", tmp_path / "configs")
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def mine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty folder of the user's own (no copy of this repository), made the working directory."""
    root = tmp_path / "mine"
    root.mkdir()
    monkeypatch.chdir(root)
    return root


# Real digits runs (prepare .. compare on the CPU), built once per session by tests/_digits_run.py.
@pytest.fixture(scope="session")
def clean(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests._digits_run import digits_run

    return digits_run(tmp_path_factory, "clean")


@pytest.fixture(scope="session")
def broken(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same run calibrated at the 1st percentile of |x|: an int8 variant that is badly wrong."""
    from tests._digits_run import BROKEN, digits_run

    return digits_run(tmp_path_factory, "broken", **BROKEN)


# A finished CPU pipeline run through the command line (tests/_project.py).
@pytest.fixture(scope="session")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests._project import make_template

    return make_template(tmp_path_factory)


@pytest.fixture
def finished(template: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private copy of the finished project, made the working directory."""
    dst = tmp_path / "finished"
    shutil.copytree(template, dst, symlinks=True)
    monkeypatch.chdir(dst)
    return dst
