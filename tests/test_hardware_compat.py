"""build.hardware_compatibility after the build: the manifest records it in `settings` (so the
version and every digest cover it; absent means none), pipeline.compat lets an ampere_plus engine
run on any compute capability >= 8.0 with the same TensorRT and every other engine only on its own,
and publish refuses a build that differs from the config. Versions are published by the real
writers (tests/_small_registry.py: build.json details from trt_build.apply_builder_options on the
stand-in TensorRT)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline import registry
from pipeline.compat import cc_fits, check_runs_here, compat_findings, manifest_from_build_info
from pipeline.config import Config
from pipeline.errors import ArtifactError
from pipeline.manifest import hardware_compatibility, read_manifest
from pipeline.reports import BuildReport, read_report

from tests import _small_registry as small


@pytest.fixture
def reg(tmp_path: Path) -> Path:
    return tmp_path / "registry"


def test_manifest_records_ampere_plus_and_the_version_covers_it(tmp_path: Path, reg: Path) -> None:
    plain, _, m_plain = small.published_engine(tmp_path / "w", reg, "8.6", trt="10.16.0", plan=b"same bytes")
    compat, vdir, m = small.published_engine(tmp_path / "w", reg, "8.6", trt="10.16.0", plan=b"same bytes",
                                             hardware_compatibility="ampere_plus")
    build = read_report(vdir / "build.json", BuildReport, "build report", "build")
    assert build.details["hardware_compatibility"] == "ampere_plus"  # as apply_builder_options recorded it
    assert m["settings"]["hardware_compatibility"] == "ampere_plus" and hardware_compatibility(m) == "ampere_plus"
    assert "hardware_compatibility" not in m_plain["settings"] and hardware_compatibility(m_plain) == "none"
    assert compat != plain  # the same inputs otherwise: the level is part of the version
    assert registry.verify(compat, reg, integrity_only=True).ok(integrity_only=True)

    # an edit of the level is caught: the version no longer follows from the manifest, and the ledger disagrees
    path = vdir / "manifest.json"
    edited = json.loads(path.read_text())
    edited["settings"]["hardware_compatibility"] = "none"
    path.write_text(json.dumps(edited, indent=2))
    found = registry.verify(compat, reg, integrity_only=True)
    text = "; ".join(map(str, found.failures(integrity_only=True)))
    assert "inputs_digest" in text and "identity" in text


def test_older_manifest_without_the_field_means_none(tmp_path: Path, reg: Path) -> None:
    """A version published before the field (no details.hardware_compatibility in its build.json:
    what TensorRT < 8.6 and trtpipe before this change wrote) reads as none and runs on its own
    compute capability only."""
    _, vdir, m = small.published_engine(tmp_path / "w", reg, "9.0", trt="10.16.0")
    build = json.loads((vdir / "build.json").read_text())
    build["details"].pop("hardware_compatibility")
    assert manifest_from_build_info(build)["settings"] == {}
    assert hardware_compatibility(read_manifest(vdir)) == "none"
    assert compat_findings(m, {"tensorrt": "10.16.0", "compute_capability": "9.0"}) == []
    (msg,) = compat_findings(m, {"tensorrt": "10.16.0", "compute_capability": "8.9", "gpu": "NVIDIA L4"})
    assert "compute capability 9.0" in msg and "8.9 (NVIDIA L4)" in msg and "do not move between GPU architectures" in msg


@pytest.mark.parametrize("here_cc, runs", [("8.0", True), ("8.6", True), ("8.9", True), ("9.0", True), ("12.0", True),
                                           ("7.5", False), ("7.0", False)])
def test_ampere_plus_runs_on_compute_capability_8_and_later(tmp_path: Path, reg: Path, here_cc: str, runs: bool) -> None:
    _, _, m = small.published_engine(tmp_path / "w", reg, "8.6", trt="10.16.0", hardware_compatibility="ampere_plus")
    found = compat_findings(m, {"tensorrt": "10.16.0", "compute_capability": here_cc, "gpu": "GPU"})
    assert (found == []) is runs
    if not runs:
        (msg,) = found
        assert "ampere_plus" in msg and "8.0 and later" in msg and f"compute capability {here_cc}" in msg
    assert cc_fits("8.6", here_cc, "ampere_plus") is runs
    assert cc_fits("8.6", here_cc) is (here_cc == "8.6")


def test_ampere_plus_still_needs_its_tensorrt(tmp_path: Path, reg: Path) -> None:
    _, _, m = small.published_engine(tmp_path / "w", reg, "8.6", trt="10.16.0", hardware_compatibility="ampere_plus")
    with pytest.raises(ArtifactError) as e:
        check_runs_here(m, {"tensorrt": "10.3.0", "compute_capability": "9.0"}, where="m")
    assert "\n" not in str(e.value) and "TensorRT 10.16.0" in str(e.value) and "10.3.0" in str(e.value)
    (msg,) = compat_findings(m, {"tensorrt": "10.16.0", "compute_capability": None})
    assert "no CUDA GPU" in msg and "compute capability 8.0 or later (ampere_plus, built on 8.6)" in msg


def test_the_runner_check_keeps_the_level(tmp_path: Path, reg: Path) -> None:
    """What the TensorRT runner checks before deserializing (manifest_from_build_info, from the
    manifest load passes or from build.json alone) carries the level."""
    _, vdir, m = small.published_engine(tmp_path / "w", reg, "8.6", trt="10.16.0", hardware_compatibility="ampere_plus")
    here = {"tensorrt": "10.16.0", "compute_capability": "9.0"}
    for info in ({"manifest": m}, json.loads((vdir / "build.json").read_text())):
        assert compat_findings(manifest_from_build_info(info), here) == []
        assert compat_findings(manifest_from_build_info(info), {**here, "compute_capability": "7.5"})


def test_publish_refuses_a_build_unlike_the_config(tmp_path: Path, reg: Path) -> None:
    from pipeline.stages.publish import _check_hardware_compatibility

    _, vdir, _ = small.published_engine(tmp_path / "w", reg, "9.0", trt="10.16.0")
    build = read_report(vdir / "build.json", BuildReport, "build report", "build")
    model = {"name": "tiny", "arch": "tiny", "input": {"shape": [4]}}
    cfg = Config.model_validate({"model": model, "build": {"hardware_compatibility": "ampere_plus"}})
    with pytest.raises(ArtifactError) as e:
        _check_hardware_compatibility(cfg, "fp16", vdir, build)
    msg = str(e.value)
    assert "\n" not in msg and "built with hardware compatibility none" in msg and "is ampere_plus" in msg
    assert "re-run build@fp16" in msg
    _check_hardware_compatibility(Config.model_validate({"model": model}), "fp16", vdir, build)  # none and none
    ort = small.published(tmp_path / "w", reg, "fp32")  # onnxruntime: the setting is TensorRT's only
    _check_hardware_compatibility(cfg, "fp32", ort.path, ort.build)
