"""manifest.json: the version string is derived from the variant's identity only, and an
edited manifest no longer derives its own version."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import pytest

from pipeline.errors import ArtifactError
from pipeline.manifest import (
    SCHEMA_VERSION,
    consistency_findings,
    build_environment,
    device_tag,
    make_manifest,
    normalize_cc,
    read_manifest,
)

TRT_BUILD = {
    "backend": "tensorrt",
    "backend_version": "8.6.1",
    "artifact": "model.engine",
    "environment": {"tensorrt": "8.6.1", "gpu": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0", "driver": "550.54", "cuda_runtime": "12.4"},
    "flags": ["FP16"],
    "profile": {"min_batch": 1, "opt_batch": 32, "max_batch": 128},
    "workspace_mb": 1024,
    "build_seconds": 18.2,
    "built_at": "2026-01-01T00:00:00+00:00",
}
INPUTS = {"checkpoint": "a" * 64, "onnx": "b" * 64, "config": "c" * 64}
SETTINGS = {"precision": "fp16", "flags": ["FP16"], "profile": TRT_BUILD["profile"], "workspace_mb": 1024}
FILES = {"model.engine": {"sha256": "d" * 64, "bytes": 10, "role": "artifact"}}


def manifest(**over: Any) -> dict[str, Any]:
    build = copy.deepcopy(TRT_BUILD)
    build.update(over.pop("build", {}))
    args = dict(inputs=INPUTS, settings=SETTINGS, metrics={"task": {"top1": 99.0}}, files=FILES, software={"tensorrt": "8.6.1"})
    args.update(over)
    return make_manifest("digits-cnn", "fp16", build, **args)


def test_version_string_form() -> None:
    m = manifest()
    assert re.fullmatch(r"digits-cnn-fp16-tensorrt8\.6\.1-sm90-[0-9a-f]{8}", m["version"]), m["version"]
    assert m["version"].endswith(m["inputs_digest"][:8])
    assert m["schema_version"] == SCHEMA_VERSION
    assert m["hardware"] == {k: TRT_BUILD["environment"][k] for k in ("gpu", "compute_capability", "driver", "cuda_runtime")}
    assert consistency_findings(m) == []


def test_same_inputs_same_version_whatever_the_records() -> None:
    a = manifest()
    b = manifest(build={"build_seconds": 99.0, "built_at": "2027-01-01T00:00:00+00:00"}, metrics={"task": {"top1": 1.0}}, published_at="x")
    assert a["version"] == b["version"]


@pytest.mark.parametrize(
    "change",
    [
        {"inputs": {**INPUTS, "checkpoint": "e" * 64}},
        {"inputs": {**INPUTS, "onnx": "e" * 64}},
        {"inputs": {**INPUTS, "config": "e" * 64}},
        {"inputs": {**INPUTS, "calibration_cache": "e" * 64}},
        {"settings": {**SETTINGS, "workspace_mb": 2048}},
        {"build": {"backend_version": "10.3.0"}},
        {"build": {"environment": {**TRT_BUILD["environment"], "compute_capability": "8.0"}}},
    ],
)
def test_every_input_moves_the_version(change: dict[str, Any]) -> None:
    assert manifest(**change)["version"] != manifest()["version"]


def test_device_tags() -> None:
    assert device_tag("tensorrt", {"compute_capability": "8.6"}) == "sm86"
    assert device_tag("tensorrt", {"compute_capability": (8, 9)}) == "sm89"
    assert device_tag("tensorrt", {}) == "gpu"
    assert device_tag("onnxruntime", {"device": "cpu"}) == "cpu"
    for cc in ("9.0", "sm_90", "sm90", "90", 9.0, (9, 0)):
        assert normalize_cc(cc) == "9.0"
    assert normalize_cc("10.0") == "10.0" and normalize_cc("100") == "10.0"
    assert normalize_cc(None) is None


@pytest.mark.parametrize(
    "edit, finding",
    [
        (lambda m: m["inputs"].update(onnx="f" * 64), "inputs_digest"),
        (lambda m: m["hardware"].update(compute_capability="8.0"), "compute_capability 8.0 does not match device sm90"),
        (lambda m: m["software"].update(tensorrt="10.3.0"), "software.tensorrt 10.3.0 does not match"),
        (lambda m: m.update(version="digits-cnn-fp16-tensorrt8.6.1-sm90-00000000"), "does not follow from the manifest"),
        (lambda m: m.update(artifact="other.engine"), "not listed in files"),
    ],
)
def test_edited_manifest_is_inconsistent(edit: Any, finding: str) -> None:
    m = manifest()
    edit(m)
    assert any(finding in f for f in consistency_findings(m)), consistency_findings(m)


def test_read_manifest_errors(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="no manifest"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="not valid JSON"):
        read_manifest(tmp_path)
    m = manifest()
    (tmp_path / "manifest.json").write_text(json.dumps({**m, "schema_version": SCHEMA_VERSION + 1}))
    with pytest.raises(ArtifactError, match=f"schema_version {SCHEMA_VERSION + 1}, this trtpipe reads {SCHEMA_VERSION}"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"kind": "something else"}))
    with pytest.raises(ArtifactError, match="not a trtpipe manifest"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps(m))
    assert read_manifest(tmp_path) == m


def test_build_environment_reads_both_forms() -> None:
    flat = build_environment(TRT_BUILD)
    assert flat == {**TRT_BUILD["environment"]}
    dev = {"gpu": "NVIDIA A100-SXM4-80GB", "compute_capability": "8.0", "driver": "535.1", "cuda_runtime": "12.2", "memory_bytes": 1}
    nested = {  # pipeline.backends.tensorrt_backend: device facts nested under environment.device
        "backend": "tensorrt", "backend_version": "10.3.0",
        "environment": {"backend": "tensorrt", "version": "10.3.0", "tensorrt": "10.3.0", "device": dev},
        "hardware": {"gpu": dev["gpu"], "compute_capability": "sm_80"},
    }
    assert build_environment(nested) == {"tensorrt": "10.3.0", "gpu": dev["gpu"], "compute_capability": "8.0", "driver": "535.1", "cuda_runtime": "12.2"}
    assert device_tag("tensorrt", build_environment(nested)) == "sm80"
    ort = {"backend": "onnxruntime", "environment": {"backend": "onnxruntime", "version": "1.17", "device": "cpu", "cpu": "x86_64", "cores": 2}}
    assert build_environment(ort) == {"device": "cpu", "cpu": "x86_64", "cores": 2}
