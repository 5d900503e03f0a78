"""The `onnxruntime` backend: runs anywhere on a CPU.

fp32: the ONNX with onnxruntime's basic (portable) graph optimizations applied;
fp16: weights and activations in float16 with float32 I/O;
int8: the Q/DQ ONNX from calibrate, i.e. TensorRT's INT8 numerics simulated on a CPU.
Reports always say `backend: onnxruntime`, so a CPU simulation is never mistaken for
an engine measurement."""

from __future__ import annotations

import platform
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import BackendError
from ..fileio import sha256_file
from .base import Backend, BuildRequest, BuildResult, Runner

ARTIFACT = "model.onnx"


class OrtRunner(Runner):
    backend = "onnxruntime"

    def __init__(self, path: Path, threads: int | None = None):
        from ..onnx_utils import ort_session

        self.path = Path(path)
        self.session = ort_session(self.path, threads=threads)
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(self.output_names, self.session.run(None, feeds)))

    def time(self, feeds: dict[str, np.ndarray], warmup: int, iterations: int) -> dict[str, Any]:
        run = self.session.run
        for _ in range(warmup):
            run(None, feeds)
        times = []
        for _ in range(iterations):
            t0 = time.perf_counter()
            run(None, feeds)
            times.append((time.perf_counter() - t0) * 1e3)
        return {"times_ms": times, "method": "host perf_counter around InferenceSession.run (CPU, end to end)"}

    def device(self) -> dict[str, Any]:
        import os

        return {"device": "cpu", "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()}


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"

    def version(self) -> str:
        import onnxruntime

        return onnxruntime.__version__

    def build(self, req: BuildRequest) -> BuildResult:
        import onnx

        from ..onnx_utils import load_onnx, ort_session

        start = time.perf_counter()
        out = req.out_dir / ARTIFACT
        info: dict[str, Any] = {"flags": [], "calibration": None}
        if req.precision == "fp32":
            ort_session(req.onnx_path, optimized_path=out)
            info["flags"] = ["graph_optimization_level=extended"]
        elif req.precision == "fp16":
            from onnxruntime.transformers.float16 import convert_float_to_float16

            model = load_onnx(req.onnx_path)
            half = convert_float_to_float16(model, keep_io_types=True, disable_shape_infer=False)
            onnx.save(half, str(out))
            info["flags"] = ["float16 weights and activations", "float32 I/O"]
        elif req.precision == "int8":
            if req.calib_dir is None or not (req.calib_dir / "model.qdq.onnx").is_file():
                raise BackendError(
                    f"int8 needs the Q/DQ model from the calibrate stage ({req.calib_dir}/model.qdq.onnx); run calibrate first"
                )
            shutil.copyfile(req.calib_dir / "model.qdq.onnx", out)
            load_onnx(out)
            ranges = req.calib_dir / "ranges.json"
            info["flags"] = ["int8 Q/DQ (activations per tensor, weights per channel, symmetric)"]
            info["calibration"] = {
                "source": "calibrate stage ranges",
                "ranges_sha256": sha256_file(ranges) if ranges.is_file() else None,
                "qdq_sha256": sha256_file(req.calib_dir / "model.qdq.onnx"),
            }
        else:
            raise BackendError(f"unknown precision '{req.precision}'; choose fp32, fp16 or int8")
        # A build is only good if it loads.
        OrtRunner(out).close()
        info.update(
            {
                "build_seconds": round(time.perf_counter() - start, 3),
                "engine_bytes": out.stat().st_size,
                "sha256": sha256_file(out),
                "profile": None,
                "workspace_mb": None,
            }
        )
        return BuildResult(artifact=ARTIFACT, info=info)

    def load(self, artifact: Path, build_info: dict[str, Any]) -> Runner:
        return OrtRunner(artifact)

    def environment(self) -> dict[str, Any]:
        import os

        return {
            "backend": self.name,
            "version": self.version(),
            "device": "cpu",
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
        }
