"""The runtime sits below the registry: importing the TensorRT runner pulls in neither the
compat check nor the manifest module; the compat layer hands the runner its check."""

from __future__ import annotations

import subprocess
import sys

import pytest

from pipeline.errors import ArtifactError


def test_trt_runner_imports_no_compat_or_manifest() -> None:
    code = ("import sys, pipeline.runtime.trt_runner; "
            "print(sorted(m for m in ('pipeline.compat', 'pipeline.manifest', 'pipeline.registry') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"


def test_compat_trt_runner_refuses_a_missing_engine_before_any_check(tmp_path) -> None:
    from pipeline.compat import trt_runner

    with pytest.raises(ArtifactError, match="engine file not found"):
        trt_runner(tmp_path / "model.engine", manifest=tmp_path / "nowhere.json")
