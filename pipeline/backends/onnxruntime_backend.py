"""The `onnxruntime` backend: runs anywhere on a CPU.

fp32: the ONNX with onnxruntime's extended graph optimizations applied;
fp16: float16 weights and activations with float32 I/O, written by the float16 converter of
      onnxconverter-common as onnxruntime maintains it (onnxruntime.transformers.float16:
      onnxconverter-common 1.16's own copy writes graphs onnxruntime rejects once nodes of a
      transformer are kept in float32, e.g. a Cast feeding a kept Add); the nodes
      pipeline.backends.fp16 names (reductions, and what leaves fp16's range on calibration
      data) stay in float32;
int8: the Q/DQ ONNX from calibrate, i.e. TensorRT's INT8 numerics simulated on a CPU, with
      exact dequantize -> float op -> quantize semantics on every CPU (calibration.ort_session:
      onnxruntime's integer kernels saturate on x86 CPUs without VNNI; TensorRT never does).
Reports always say `backend: onnxruntime`, so a CPU simulation is never mistaken for
an engine measurement."""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from ..errors import ArtifactError, BackendError
from ..fileio import QDQ_FILE
from ..runtime.runner import PLAIN, Runner
from .base import Backend, BuildRequest, BuildResult

ARTIFACT = "model.onnx"


def cpu_device() -> dict[str, Any]:
    """The CPU a number came from, with the features that decide onnxruntime's integer
    kernels, and the INT8 arithmetic every session here uses (exact Q/DQ semantics)."""
    from calibration.ort_session import EXACT, cpu_features, describe

    c = cpu_features()
    return {"device": "cpu", "cpu": c["model"], "machine": c["machine"], "cores": c["cores"],
            "cpu_flags": c["flags"], "int8_dot_product": c["int8_dot"], "int8_semantics": describe(EXACT)}


class OrtRunner(Runner):
    backend = "onnxruntime"

    def __init__(self, path: Path, threads: int | None = None):
        from ..onnx_utils import ort_session

        self.path = Path(path)
        self.session = ort_session(self.path, threads=threads)
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def infer(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(self.output_names, self.session.run(None, dict(feeds))))

    def time(self, feeds: Mapping[str, np.ndarray], warmup: int, iterations: int, mode: str = PLAIN) -> dict[str, Any]:
        if mode != PLAIN:
            raise BackendError(f"onnxruntime runs have no latency mode '{mode}'")
        run, feeds = self.session.run, dict(feeds)
        for _ in range(warmup):
            run(None, feeds)
        times = []
        for _ in range(iterations):
            t0 = time.perf_counter()
            run(None, feeds)
            times.append((time.perf_counter() - t0) * 1e3)
        return {"times_ms": times, "method": "host perf_counter around InferenceSession.run (CPU, end to end)"}

    def device(self) -> dict[str, Any]:
        return cpu_device()


def _save_optimized(onnx_path: Path, out: Path) -> None:
    """onnxruntime's optimized graph of `onnx_path` written to `out`. The model is loaded
    first on its own, so a failure to write is never blamed on the input."""
    from calibration.ort_session import make_session

    from ..onnx_utils import ort_session

    ort_session(onnx_path)  # the input loads: any error now names the input
    make_session(onnx_path, level="extended", optimized_path=out, what=str(out), error=ArtifactError,
                 failure="onnxruntime could not write the optimized model (check free disk space and permissions)")
    if not out.is_file() or out.stat().st_size == 0:
        raise ArtifactError(f"{out}: onnxruntime wrote no optimized model; check free disk space")


def _fp16(req: BuildRequest, out: Path) -> BuildResult:
    import os

    from .fp16 import describe
    from .trt_typed import plan_fp16

    plan = req.fp16 or plan_fp16(req.onnx_path, req.config, req.out_dir, ("typed", "onnxruntime runs the typed FP16 ONNX"),
                                 req.calib_dir, req.calib_data)
    if plan.route != "typed" or plan.onnx is None:
        raise BackendError(f"onnxruntime builds fp16 from the typed FP16 ONNX only (the plan says {plan.route!r})")
    os.replace(plan.onnx, out)  # the same typed FP16 ONNX a TensorRT build is given: the artifact itself
    info = {**(plan.typed_onnx or {}), "file": ARTIFACT}
    return BuildResult(ARTIFACT, flags=["float16 weights and activations (onnxruntime.transformers.float16)", "float32 I/O"],
                       kept_fp32=describe(plan.keep),
                       details={"typed_onnx": info, "fp16": plan.describe(),
                                "weights_clamped_to_fp16_range": info.get("weights_clamped_to_fp16_range", 0),
                                "examples": info.get("examples", [])})


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"

    def version(self) -> str:
        import onnxruntime

        return onnxruntime.__version__

    def build(self, req: BuildRequest) -> BuildResult:
        from ..onnx_utils import load_onnx

        out = req.out_dir / ARTIFACT
        if req.precision == "fp32":
            _save_optimized(req.onnx_path, out)
            result = BuildResult(ARTIFACT, flags=["graph_optimization_level=extended"])
        elif req.precision == "fp16":
            result = _fp16(req, out)
        elif req.precision == "int8":
            qdq = (req.calib_dir / QDQ_FILE) if req.calib_dir else None
            if qdq is None or not qdq.is_file():
                raise BackendError(
                    f"int8 needs the Q/DQ model from the calibrate stage ({req.calib_dir}/model.qdq.onnx); run calibrate first"
                )
            shutil.copyfile(qdq, out)
            load_onnx(out)
            result = BuildResult(ARTIFACT, flags=["int8 Q/DQ (activations per tensor, weights per channel, symmetric)",
                                                  "exact Q/DQ semantics (session.disable_quant_qdq=1)"],
                                 calibration={"source": "calibrate stage ranges (Q/DQ ONNX)", "route": "explicit"})
        else:
            raise BackendError(f"unknown precision '{req.precision}'; choose fp32, fp16 or int8")
        OrtRunner(out).close()  # a build is only good if it loads
        return result

    def load(self, artifact: Path, build_info: dict[str, Any]) -> Runner:
        return OrtRunner(artifact)

    def environment(self) -> dict[str, Any]:
        return {"backend": self.name, "version": self.version(), **cpu_device()}
