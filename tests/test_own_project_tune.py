"""Tune then publish in a project of the user's own (issue 19): trtpipe installed outside the
project (a copy of this repository's code on PYTHONPATH), `trtpipe init`, a three-output model
of the user's (tests/models/digit_detector.py, copied into the project, trained weights),
`dvc repro` publishes the untuned int8; then, with a `tune:` section and
`build.int8_from_tune`, `dvc exp run -S` of a tune budget re-runs tune and the int8 stages and
publishes the tuned int8 under a version of its own: exit 0, two versions in the registry."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import yaml

from tests._project import run_tool

ROOT = Path(__file__).resolve().parents[1]


def _sh(cwd: Path, site: Path, *cmd: str) -> str:
    return run_tool(cwd, *cmd, pythonpath=site)


def _edit(path: Path, fn) -> None:  # type: ignore[no-untyped-def]
    data = yaml.safe_load(path.read_text())
    fn(data)
    path.write_text(yaml.safe_dump(data, sort_keys=False))


def _versions(root: Path) -> list[str]:
    return sorted(p.name for p in (root / "artifacts" / "registry" / "det").iterdir() if p.is_dir())


@pytest.mark.slow
def test_tune_budget_experiment_then_publish_gives_a_second_version(tmp_path: Path) -> None:
    if shutil.which("git") is None or shutil.which("dvc", path=str(Path(sys.executable).parent)) is None:
        pytest.skip("needs git and dvc")
    site = tmp_path / "site"  # trtpipe "installed": outside the project, not watched file by file
    for item in ("pipeline", "calibration"):
        shutil.copytree(ROOT / item, site / item, ignore=shutil.ignore_patterns("__pycache__"))
    root = tmp_path / "det"
    root.mkdir()
    sh = lambda *cmd: _sh(root, site, *cmd)  # noqa: E731
    sh("git", "init", "-q")
    sh("dvc", "init", "-q")
    shutil.copy(ROOT / "tests" / "models" / "digit_detector.py", root / "det_model.py")
    sh(sys.executable, "-c", "import det_model; det_model.train('weights.pt', epochs=3)")
    sh("trtpipe", "init", "--name", "det")
    config = root / "configs" / "det.yaml"

    def own_model(c: dict) -> None:
        c["model"].update(source="factory", arch="det_model:make", checkpoint="weights.pt",
                          inputs=[{"name": "image", "shape": [1, 8, 8], "dtype": "float32"}])
        del c["model"]["outputs"], c["model"]["train"]
        c["calibration"]["num_samples"] = 64
        c["evaluate"]["latency"] = {"warmup": 1, "iterations": 3, "batch_sizes": [1]}
        c["publish"]["precisions"] = ["int8"]

    _edit(config, own_model)
    sh("trtpipe", "dvc")
    sh("git", "add", "-A")
    sh("git", "commit", "-qm", "det")
    out = sh("dvc", "repro")
    assert "evaluate.metrics is not set and the model has 3 outputs" in out  # the default fits the model
    [untuned] = _versions(root)
    sh("git", "add", "-A")
    sh("git", "commit", "-qm", "untuned int8 published")

    def tuned(c: dict) -> None:
        c["build"]["int8_from_tune"] = True
        c["tune"] = {"budget": {"metric": "top1_agreement@prob", "min": 0.9}, "max_candidates": 12,
                     "search_samples": 64}

    _edit(config, tuned)
    sh("trtpipe", "dvc")
    assert "tune" in yaml.safe_load((root / "dvc.yaml").read_text())["stages"]
    sh("trtpipe", "dvc", "--check")
    sh("git", "add", "-A")
    sh("git", "commit", "-qm", "int8 from tune")
    out = sh("dvc", "exp", "run", "-S", "configs/det.yaml:tune.budget.metric=snr_db@prob",
             "-S", "configs/det.yaml:tune.budget.min=45")
    for stage in ("tune", "build@int8", "evaluate@int8", "publish"):
        assert f"Running stage '{stage}'" in out, stage
    for stage in ("prepare", "export", "calibrate", "build@fp32", "evaluate@fp32"):
        assert f"Running stage '{stage}'" not in out, stage
    versions = _versions(root)
    assert len(versions) == 2 and untuned in versions, versions
    [tuned_version] = [v for v in versions if v != untuned]
    published = json.loads((root / "artifacts" / "publish" / "published.json").read_text())["published"]
    assert [p["version"] for p in published] == [tuned_version]
    manifests = {v: json.loads((root / "artifacts" / "registry" / "det" / v / "manifest.json").read_text())
                 for v in versions}
    # the version covers what the build applied (tune's result), not only the checkpoint, ONNX and config
    assert manifests[tuned_version]["inputs"]["build"] != manifests[untuned]["inputs"]["build"]
    assert manifests[tuned_version]["inputs"]["onnx"] == manifests[untuned]["inputs"]["onnx"]
    tune = json.loads((root / "artifacts" / "tune" / "tune.json").read_text())
    assert tune["budget"]["metric"] == "snr_db@prob" and tune["budget"]["value"] == 45
    assert tune["reference_points"]["chosen"]["meets_full"] is True
    ledger = (root / "artifacts" / "registry" / "det" / "ledger.jsonl").read_text().splitlines()
    assert len(ledger) == 2
    # DVC's own files survive the experiment (a stage never deletes them)
    assert (root / "artifacts" / "tune" / ".gitignore").is_file() and (root / "artifacts" / "compare" / ".gitignore").is_file()
