"""`dvc repro` re-runs only what an edit affects: each stage tracks the config keys it reads
(not the whole config file), and a stage run twice on the same inputs writes the same bytes
(wall times go to an uncached timings file no stage depends on), so a forced re-run of the
upstream stages leaves everything after them up to date."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tests._project import dvc_project, edit_yaml, first_run, run_tool

ROOT = Path(__file__).resolve().parents[1]
INT8 = {"build@int8"}
BUILDS = {"build@fp32", "build@fp16", "build@int8"}
EVALS = {"evaluate@fp32", "evaluate@fp16", "evaluate@int8"}
# one key of each config section -> the stages `dvc status` must list, no more, no fewer
EDITS = [
    ("model.train.epochs", 19, {"prepare", "publish"}),
    ("data.seed", 1, {"prepare"}),
    ("export.opset", 18, {"export", "publish"}),
    ("validate.atol", 2.0e-4, {"validate"}),
    ("calibration.num_samples", 96, {"calibrate", "build@int8", "publish"}),
    ("build.workspace_mb", 512, {"tune", *BUILDS, "publish"}),
    ("build.int8_route", "explicit", {"build@int8", "publish"}),
    ("evaluate.batch_size", 64, {"tune", *EVALS}),
    ("tune.max_candidates", 11, {"tune"}),
    ("gate.latency.slack_ms", 0.2, set()),
    ("publish.precisions", ["fp32", "int8"], {"publish"}),
]


def _sh(cwd: Path, *cmd: str) -> str:
    return run_tool(cwd, *cmd, pythonpath=cwd)  # the project's own copy of the code runs (the shared tree may change)


def _status(r: Path) -> set[str]:
    return set(json.loads(_sh(r, "dvc", "status", "--json")))


def _set(data: dict, key: str, value: object) -> None:
    *path, last = key.split(".")
    for part in path:
        data = data[part]
    data[last] = value


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    r = dvc_project(tmp_path_factory.mktemp("reruns"))
    cfg = yaml.safe_load((ROOT / "configs" / "digits.yaml").read_text())
    cfg["calibration"]["num_samples"] = 64
    cfg["evaluate"]["latency"] = {"warmup": 1, "iterations": 3, "batch_sizes": [1]}
    cfg["tune"].update(max_candidates=12, search_samples=64)
    (r / "configs" / "t.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    (r / "params.yaml").write_text("config: configs/t.yaml\n")
    first_run(r, _sh)
    return r


@pytest.mark.slow
def test_a_stage_rerun_on_the_same_inputs_writes_the_same_reports(project: Path) -> None:
    """Forced re-runs of every stage before evaluate (the one that measures latency) change
    nothing a later stage depends on: dvc status stays empty and no report records a wall time."""
    assert _status(project) == set()
    _sh(project, "dvc", "repro", "--force", "--single-item", "prepare", "export", "validate", "calibrate", "tune",
        "build@fp32", "build@fp16", "build@int8")
    assert _status(project) == set()
    ran = _sh(project, "dvc", "repro")
    assert "Running stage" not in ran, ran
    for report in ("prepare/prepare.json", "export/export.json", "validate/validate.json", "calibrate/calibrate.json",
                   "build/int8/build.json", "tune/tune.json"):
        data = json.loads((project / "artifacts" / report).read_text())
        assert not {"seconds", "build_seconds", "built_at", "peak_rss_mb"} & set(data), report
    timings = json.loads((project / "artifacts" / "timings" / "build-int8.json").read_text())
    assert timings["stage"] == "build" and timings["build_seconds"] >= 0
    assert (project / "artifacts" / "compare" / ".gitignore").is_file()  # DVC's: a stage never deletes it
    assert (project / "artifacts" / "tune" / ".gitignore").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("key,value,stages", EDITS, ids=[e[0] for e in EDITS])
def test_an_edit_of_one_key_reruns_only_the_stages_that_read_it(project: Path, key: str, value: object,
                                                                stages: set[str]) -> None:
    config = project / "configs" / "t.yaml"
    original = config.read_bytes()
    try:
        edit_yaml(config, lambda d: _set(d, key, value))
        assert _status(project) == stages
    finally:
        config.write_bytes(original)
    assert _status(project) == set()
