"""Sharing published versions through a DVC remote: a project runs `dvc repro` (onnxruntime, small
settings) and `dvc push`es to a local folder remote; a fresh `git clone` of it `dvc pull`s, `trtpipe
artifacts verify` passes there, and `trtpipe artifacts pull --to out` picks the published version of
every precision, whose copied model gives the original's outputs bit for bit."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests._project import dvc_project, first_run, run_tool

ROOT = Path(__file__).resolve().parents[1]


def _sh(cwd: Path, *cmd: str) -> str:
    return run_tool(cwd, *cmd, pythonpath=cwd)  # the project's own copy of the code runs (the clone's in the clone)


@pytest.mark.slow
def test_push_clone_pull_verify_and_pull_an_artifact(tmp_path: Path) -> None:
    from pipeline import registry

    r = dvc_project(tmp_path)
    cfg = yaml.safe_load((ROOT / "configs" / "digits.yaml").read_text())
    cfg.pop("tune", None)  # no tune stage: what is shared is the same without it
    cfg["build"]["backend"] = "onnxruntime"
    cfg["calibration"]["num_samples"] = 64
    cfg["evaluate"]["latency"] = {"warmup": 1, "iterations": 3, "batch_sizes": [1]}
    (r / "configs" / "t.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    (r / "params.yaml").write_text("config: configs/t.yaml\n")
    first_run(r, _sh)

    remote = tmp_path / "remote"
    _sh(r, "dvc", "remote", "add", "-d", "local", str(remote))
    _sh(r, "git", "commit", "-qam", "dvc remote")
    _sh(r, "dvc", "push")
    assert any(remote.rglob("*")), "dvc push wrote nothing to the remote"

    clone = tmp_path / "clone"
    _sh(tmp_path, "git", "clone", "-q", str(r), str(clone))
    assert not (clone / "artifacts" / "registry").exists()  # the artifacts are DVC's, not git's
    _sh(clone, "dvc", "pull")
    published = json.loads((clone / "artifacts" / "publish" / "published.json").read_text())["published"]
    assert [p["precision"] for p in published] == ["fp32", "fp16", "int8"]

    out = _sh(clone, sys.executable, "-m", "pipeline", "artifacts", "verify")
    assert out.count("OK  ") >= len(published) and "FAIL" not in out, out

    report = json.loads(_sh(clone, sys.executable, "-m", "pipeline", "artifacts", "pull", "--to", "out", "--json"))
    picks = {p["precision"]: p for p in report["picks"]}
    assert {p: picks[p]["version"] for p in picks} == {p["precision"]: p["version"] for p in published}
    assert all(p["rule"] == "onnxruntime" and p["backend"] == "onnxruntime" for p in picks.values())
    assert not report["machine"]["named"]

    with np.load(r / "artifacts" / "prepare" / "eval.npz") as z:
        batch = {"input": z["input"][:32]}
    for p in published:
        original = registry.load(p["version"], r / "artifacts" / "registry")
        copied = registry.load(clone / "out" / p["precision"], clone / "artifacts" / "registry")
        with original, copied:
            want, got = original.infer(batch), copied.infer(batch)
        assert want.keys() == got.keys()
        for name in want:
            np.testing.assert_array_equal(got[name], want[name], err_msg=f"{p['precision']} {name}")
