"""What every backend provides: build an artifact for one precision, and load it as a runner.

A backend never decides where files live: the build stage hands it a staging folder
and publishes that folder atomically once the build succeeded."""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

from ..config import Config


@dataclass(frozen=True)
class BuildRequest:
    precision: str  # "fp32" | "fp16" | "int8"
    onnx_path: Path  # the FP32 ONNX written by export
    out_dir: Path  # staging folder: write the artifact (and side files) here
    config: Config
    calib_dir: Optional[Path] = None  # calibrate's outputs: ranges.json, calibration.cache, model.qdq.onnx
    calib_data: Optional[Path] = None  # prepared calibration samples (calib.npy), for TensorRT's own calibrator


@dataclass
class BuildResult:
    artifact: str  # file name inside out_dir (model.engine, model.onnx)
    info: dict[str, Any] = field(default_factory=dict)  # merged into build.json


class Runner(abc.ABC):
    """A loaded model/engine. Use as a context manager; `infer` takes and returns numpy."""

    backend: str = ""
    input_names: list[str]
    output_names: list[str]

    @abc.abstractmethod
    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one batch (any batch size inside the profile) and return host arrays."""

    @abc.abstractmethod
    def time(self, feeds: dict[str, np.ndarray], warmup: int, iterations: int) -> dict[str, Any]:
        """Latency of `feeds`: per-iteration milliseconds under the key `times_ms`
        (and optionally `gpu_times_ms`), plus `method` naming how they were taken."""

    def device(self) -> dict[str, Any]:
        return {}

    def close(self) -> None:
        pass

    def __enter__(self) -> "Runner":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Backend(abc.ABC):
    name: str = ""

    @abc.abstractmethod
    def version(self) -> str: ...

    @abc.abstractmethod
    def build(self, req: BuildRequest) -> BuildResult: ...

    @abc.abstractmethod
    def load(self, artifact: Path, build_info: dict[str, Any]) -> Runner: ...

    def environment(self) -> dict[str, Any]:
        """Software and hardware this backend runs on (goes into build.json and manifests)."""
        return {"backend": self.name, "version": self.version()}
