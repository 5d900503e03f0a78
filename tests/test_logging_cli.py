"""One logger, -v/-q on every command (pipeline/log.py): -q leaves no note and no progress bar on
stderr even on a terminal, -v adds debug lines, the result on stdout is the same either way, and
a PipelineError is still the one line it was."""

from __future__ import annotations

import io
import shutil
import sys
from pathlib import Path

import pytest
import yaml

from tests._project import trtpipe

ROOT = Path(__file__).resolve().parents[1]


class _Terminal(io.StringIO):
    """stderr as a person watching it would have it: a TTY, so progress bars are drawn."""

    def isatty(self) -> bool:
        return True


@pytest.fixture
def run_dir(clean: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The finished digits run laid out as artifacts/, with the params it was made with."""
    shutil.copytree(ROOT / "configs", tmp_path / "configs")
    for sub in ("prepare", "export", "validate", "calibrate"):
        shutil.copytree(clean / sub, tmp_path / "artifacts" / sub)
    params = {"config": "configs/digits.yaml", "override": True, "build": {"backend": "onnxruntime"},
              "calibration": {"num_samples": 64}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _run(monkeypatch: pytest.MonkeyPatch, *args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), _Terminal()
    with monkeypatch.context() as mp:
        mp.setattr(sys, "stdout", out)
        mp.setattr(sys, "stderr", err)
        code = trtpipe(*args)
    return code, out.getvalue(), err.getvalue()


def test_quiet_verbose_and_default_on_a_real_stage(run_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    code, out, err = _run(monkeypatch, "calibrate")
    assert code == 0, err
    assert "trtpipe: note: params.yaml overrides configs/digits.yaml" in err  # info by default
    assert "calibrate:" in err and "batch" in err  # the bar, drawn on a terminal ...
    assert "trtpipe: debug:" not in err
    assert out.startswith("calibrate: ") and len(out.splitlines()) == 1  # ... never on stdout

    for args in (("-q", "calibrate"), ("calibrate", "-q"), ("calibrate", "--quiet")):
        code, out_q, err_q = _run(monkeypatch, *args)
        assert code == 0 and out_q == out, (args, err_q)
        assert err_q == "", (args, err_q)  # no note, no bar

    for args in (("-v", "calibrate"), ("calibrate", "--verbose")):
        code, out_v, err_v = _run(monkeypatch, *args)
        assert code == 0 and out_v == out, args
        debug = [ln for ln in err_v.splitlines() if ln.startswith("trtpipe: debug: ")]
        assert any("config: configs/digits.yaml" in ln for ln in debug), err_v
        assert "trtpipe: note: params.yaml overrides" in err_v


def test_a_progress_bar_is_off_on_a_pipe(run_dir: Path, monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()
    assert trtpipe("calibrate") == 0
    captured = capsys.readouterr()
    assert [ln for ln in captured.err.splitlines() if not ln.startswith("trtpipe: note:")] == []
    assert "\r" not in captured.err


def test_every_command_takes_v_and_q(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from pipeline import cli

    cli._extra_commands.clear()
    cli._load_extras()
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    names = list(sub.choices)
    assert {"prepare", "calibrate", "build", "evaluate", "publish", "dvc", "init", "gate", "artifacts"} <= set(names)
    for name in names:
        helptext = sub.choices[name].format_help()
        assert "--verbose" in helptext and "--quiet" in helptext, name


def test_the_error_line_is_unchanged_by_q_and_v(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for flags in ((), ("-q",), ("-v",)):
        capsys.readouterr()
        assert trtpipe(*flags, "evaluate", "--precision", "int8", "--build-dir", "nowhere") == 1
        err = capsys.readouterr().err
        errors = [ln for ln in err.splitlines() if ln.startswith("trtpipe evaluate: error:")]
        assert len(errors) == 1 and err.splitlines()[-1] == errors[0], (flags, err)
        if "-q" in flags:
            assert err.splitlines() == errors
