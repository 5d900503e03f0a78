"""A project of the user's own: `trtpipe init` writes a config, params.yaml and a short, portable
dvc.yaml (trtpipe's code through .trtpipe-version, never by absolute path); a module outside the
project is refused by `trtpipe dvc --check` with the reason; compare writes a small metrics.json
of numbers; a rebuilt identical variant republishes as a no-op."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from pipeline import dvcgen
from tests._project import trtpipe


def test_init_writes_a_short_portable_project_and_never_overwrites(mine: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    assert trtpipe("init", "--name", "face") == 0
    for f in ("configs/face.yaml", "params.yaml", "dvc.yaml", dvcgen.VERSION_FILE):
        assert (mine / f).is_file(), f
    assert yaml.safe_load((mine / "params.yaml").read_text()) == {"config": "configs/face.yaml"}
    text = (mine / "dvc.yaml").read_text()
    doc = yaml.safe_load(text)
    deps = {d for st in doc["stages"].values() for d in st.get("do", st)["deps"]}
    assert not [d for d in deps if Path(d).is_absolute()], deps
    assert not [d for d in deps if d.endswith(".py")], deps
    assert dvcgen.VERSION_FILE in doc["stages"]["prepare"]["deps"] and "configs/face.yaml" not in deps
    assert "tune" not in doc["stages"]
    assert len(text.splitlines()) < 300
    assert trtpipe("dvc", "--check") == 0
    capsys.readouterr()
    before = (mine / "params.yaml").read_text()
    assert trtpipe("init", "--name", "face") == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "already exists" in err and "never overwrites" in err
    assert (mine / "params.yaml").read_text() == before


def test_check_fails_when_trtpipe_changed_since_dvc_yaml(mine: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert trtpipe("init") == 0
    (mine / dvcgen.VERSION_FILE).write_text("trtpipe 0.0.1\nsource sha256 0\n")
    capsys.readouterr()
    assert trtpipe("dvc", "--check") == 1
    assert ".trtpipe-version does not hold the installed trtpipe" in capsys.readouterr().err
    assert trtpipe("dvc") == 0 and trtpipe("dvc", "--check") == 0


def test_check_refuses_a_factory_module_outside_the_project(mine: Path, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    assert trtpipe("init", "--name", "m") == 0
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "far_models.py").write_text("from pipeline.models import build_model\n\ndef make():\n    pass\n")
    monkeypatch.syspath_prepend(str(outside))
    cfg = yaml.safe_load((mine / "configs" / "m.yaml").read_text())
    cfg["model"].update(source="factory", arch="far_models:make")
    (mine / "configs" / "m.yaml").write_text(yaml.safe_dump(cfg))
    capsys.readouterr()
    assert trtpipe("dvc", "--check") == 1
    err = capsys.readouterr().err
    assert "model.arch 'far_models:make'" in err and "outside the project" in err and "move it into the project" in err
    (mine / "far_models.py").write_text((outside / "far_models.py").read_text())  # inside the project: watched
    monkeypatch.syspath_prepend(str(mine))
    import sys

    sys.modules.pop("far_models", None)
    assert trtpipe("dvc") == 0
    assert "far_models.py" in yaml.safe_load((mine / "dvc.yaml").read_text())["stages"]["prepare"]["deps"]


def test_metrics_json_holds_a_few_numbers_per_variant(template: Path) -> None:
    metrics = json.loads((template / "artifacts" / "compare" / "metrics.json").read_text())
    assert set(metrics) == {"fp32", "fp16", "int8"}
    for variant, row in metrics.items():
        assert all(isinstance(v, float) for v in row.values()), row
        assert "top1" in row and "b1_ms" in row and "b32_ms" in row, row
        assert len(row) <= 5 and all(len(f"{variant}.{k}") <= 11 for k in row), row  # narrow dvc exp show columns
    assert "agree" in metrics["int8"] and "agree" not in metrics["fp32"]
    compare = json.loads((template / "artifacts" / "compare" / "compare.json").read_text())
    assert metrics["int8"]["top1"] == compare["variants"]["int8"]["top1"]
    assert metrics["int8"]["agree"] == compare["variants"]["int8"]["fp32_top1_agreement"]
    assert metrics["fp16"]["b32_ms"] == compare["variants"]["fp16"]["b32_p50_ms"]


def test_a_rebuilt_identical_variant_republishes_as_a_no_op(template: Path, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    work = tmp_path / "p"
    shutil.copytree(template, work, symlinks=True)
    monkeypatch.chdir(work)
    first = json.loads(Path("artifacts/publish/published.json").read_text())
    build = Path("artifacts/build/int8/build.json").read_bytes()
    assert trtpipe("build", "--precision", "int8", "--timings", "artifacts/timings/build-int8.json") == 0
    assert Path("artifacts/build/int8/build.json").read_bytes() == build  # no wall time in the report
    assert json.loads(Path("artifacts/timings/build-int8.json").read_text())["build_seconds"] >= 0
    assert trtpipe("evaluate", "--precision", "int8") == 0
    capsys.readouterr()
    assert trtpipe("publish") == 0
    out = capsys.readouterr().out
    assert "(unchanged)" in out and "int8" in out, out
    again = json.loads(Path("artifacts/publish/published.json").read_text())
    assert [v["version"] for v in again["published"]] == [v["version"] for v in first["published"]]
