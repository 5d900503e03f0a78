"""What every backend provides: build an artifact for one precision, and load it as a runner.

A backend never decides where files live: the build stage hands it a staging folder
and publishes that folder atomically once the build succeeded."""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from ..config import Config
from ..runtime.runner import Runner

__all__ = ["Backend", "BuildRequest", "BuildResult", "Runner"]


@dataclass(frozen=True)
class BuildRequest:
    precision: str  # "fp32" | "fp16" | "int8"
    onnx_path: Path  # the FP32 ONNX written by export
    out_dir: Path  # staging folder: write the artifact (and side files) here
    config: Config
    calib_dir: Optional[Path] = None  # calibrate's outputs: ranges.json, calibration.cache, model.qdq.onnx
    calib_data: Optional[Path] = None  # prepared calibration samples (calib.npz): TensorRT's calibrator
    fp16: Optional[Any] = None  # trt_typed.Fp16Plan: the fp16 variant as the build stage planned it (None: plan here)
    qdq_onnx: Optional[Path] = None  # explicit INT8: build this Q/DQ ONNX instead of calib_dir/model.qdq.onnx
    typed_onnx: Optional[dict[str, Any]] = None  # what build.json records of a typed INT8 ONNX given as qdq_onnx


@dataclass
class BuildResult:
    artifact: str  # file name inside out_dir (model.engine, model.onnx)
    flags: list[str] = field(default_factory=list)
    profiles: Optional[list[dict[str, dict[str, list[int]]]]] = None
    workspace_mb: Optional[int] = None
    calibration: Optional[dict[str, Any]] = None
    kept_fp32: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)


class Backend(abc.ABC):
    name: str = ""

    @abc.abstractmethod
    def version(self) -> str: ...

    @abc.abstractmethod
    def build(self, req: BuildRequest) -> BuildResult: ...

    @abc.abstractmethod
    def load(self, artifact: Path, build_info: dict[str, Any]) -> Runner: ...

    def fp16_route(self, cfg: Config) -> tuple[str, str]:
        """("typed" | "flag", why): whether fp16 builds the typed FP16 ONNX (trt_typed.plan_fp16)."""
        return "typed", f"{self.name} runs the typed FP16 ONNX"

    def int8_typed(self, cfg: Config) -> Optional[str]:
        """Why int8 builds the typed INT8 ONNX (trt_typed.plan_int8_typed: the Q/DQ ONNX with its float parts in
        FP16), or None where this backend builds the Q/DQ ONNX as it is."""
        return None

    def environment(self) -> dict[str, Any]:
        """Software and hardware this backend runs on (goes into build.json and manifests)."""
        return {"backend": self.name, "version": self.version()}
