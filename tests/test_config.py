from pathlib import Path

import pytest
import yaml

from pipeline.config import load_config
from pipeline.errors import ConfigError


def _write(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def test_default_config_loads_with_params_overrides(project: Path) -> None:
    params = yaml.safe_load(Path("params.yaml").read_text())
    params["calibration"]["method"] = "percentile"
    params["calibration"]["percentile"] = 99.9
    _write(Path("params.yaml"), params)
    cfg = load_config()
    assert cfg.model.name == "digits-cnn"
    assert cfg.calibration.method == "percentile" and cfg.calibration.percentile == 99.9
    # keys not overridden keep the config file's values
    assert cfg.calibration.num_bins == 2048
    assert cfg.validate_.num_samples >= 256


def test_misspelt_key_names_dotted_path(project: Path) -> None:
    data = yaml.safe_load(Path("configs/digits.yaml").read_text())
    data["calibration"]["num_sampels"] = 10
    _write(Path("configs/digits.yaml"), data)
    with pytest.raises(ConfigError, match=r"unknown key 'calibration\.num_sampels'"):
        load_config()


def test_wrong_type_names_path_and_expectation(project: Path) -> None:
    data = yaml.safe_load(Path("configs/digits.yaml").read_text())
    data["build"]["profile"]["max_batch"] = "lots"
    _write(Path("configs/digits.yaml"), data)
    with pytest.raises(ConfigError, match=r"'build\.profile\.max_batch': Input should be a valid integer.*'lots'"):
        load_config()


def test_override_with_wrong_value_is_reported_against_params(project: Path) -> None:
    params = yaml.safe_load(Path("params.yaml").read_text())
    params["calibration"]["method"] = "kl"
    _write(Path("params.yaml"), params)
    with pytest.raises(ConfigError, match=r"params\.yaml.*'calibration\.method'"):
        load_config()


def test_profile_order_is_checked(project: Path) -> None:
    data = yaml.safe_load(Path("configs/digits.yaml").read_text())
    data["build"]["profile"] = {"min_batch": 8, "opt_batch": 4, "max_batch": 2}
    _write(Path("configs/digits.yaml"), data)
    with pytest.raises(ConfigError, match=r"build\.profile.*min_batch <= opt_batch <= max_batch"):
        load_config()


def test_missing_config_file(project: Path) -> None:
    _write(Path("params.yaml"), {"config": "configs/nope.yaml"})
    with pytest.raises(ConfigError, match=r"configs/nope\.yaml: config file not found"):
        load_config()
