"""One source of settings: the config is the truth; a key params.yaml sets to another value is
an error naming both files and the key, unless params.yaml says `override: true` (then its
values win, each change noted); and params.yaml never adds a tune stage to a project."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from pipeline import dvcgen
from pipeline.config import load_config
from pipeline.errors import ConfigError
from tests._project import trtpipe

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def mine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A user's project: their config (calibration over 100 samples, no tune section)."""
    (tmp_path / "configs").mkdir()
    cfg = yaml.safe_load((ROOT / "configs" / "digits.yaml").read_text())
    cfg["calibration"]["num_samples"] = 100
    del cfg["tune"]
    (tmp_path / "configs" / "mine.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_a_key_both_files_set_differently_is_an_error_naming_both(mine: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    shutil.copy(ROOT / "params.yaml", "params.yaml")
    params = yaml.safe_load(Path("params.yaml").read_text())
    params.update(config="configs/mine.yaml")
    params.pop("override")
    Path("params.yaml").write_text(yaml.safe_dump(params))
    with pytest.raises(ConfigError) as e:
        load_config()
    msg = str(e.value)
    assert "params.yaml sets calibration.num_samples to 320 but configs/mine.yaml sets it to 100" in msg
    assert "override: true" in msg
    assert trtpipe("prepare") == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "calibration.num_samples" in err and "Traceback" not in err


def test_override_true_is_the_stated_choice_and_each_change_is_noted(mine: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    Path("params.yaml").write_text(yaml.safe_dump({"config": "configs/mine.yaml", "override": True,
                                                   "calibration": {"num_samples": 320}}))
    assert load_config().calibration.num_samples == 320
    assert "calibration.num_samples 100 -> 320" in capsys.readouterr().err
    Path("params.yaml").write_text(yaml.safe_dump({"config": "configs/mine.yaml", "override": "yes"}))
    with pytest.raises(ConfigError, match="'override' must be true or false"):
        load_config()


def test_the_same_value_in_both_and_a_key_only_params_sets_are_fine(mine: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    Path("params.yaml").write_text(yaml.safe_dump({"config": "configs/mine.yaml",
                                                   "calibration": {"num_samples": 100, "seed": 0},
                                                   "evaluate": {"batch_size": 128}}))
    cfg = load_config()
    assert cfg.calibration.num_samples == 100
    assert capsys.readouterr().err == ""


def test_the_shipped_params_yaml_adds_no_tune_stage(mine: Path) -> None:
    assert "tune" not in (yaml.safe_load((ROOT / "params.yaml").read_text()) or {})
    shutil.copy(ROOT / "params.yaml", "params.yaml")
    edit = yaml.safe_load(Path("params.yaml").read_text())
    edit.update(config="configs/mine.yaml")
    Path("params.yaml").write_text(yaml.safe_dump(edit))
    cfg = load_config(quiet=True)
    assert cfg.tune is None
    assert "tune" not in dvcgen.generate(cfg, "configs/mine.yaml", root=mine)["stages"]
