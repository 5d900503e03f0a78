"""The `onnxruntime` backend: runs anywhere on a CPU.

fp32: the ONNX with onnxruntime's extended graph optimizations applied;
fp16: float16 weights and activations with float32 I/O, written by the float16 converter of
      onnxconverter-common as onnxruntime maintains it (onnxruntime.transformers.float16:
      onnxconverter-common 1.16's own copy writes graphs onnxruntime rejects once nodes of a
      transformer are kept in float32, e.g. a Cast feeding a kept Add); the nodes
      pipeline.backends.fp16 names (reductions, and what leaves fp16's range on calibration
      data) stay in float32;
int8: the Q/DQ ONNX from calibrate, i.e. TensorRT's INT8 numerics simulated on a CPU.
Reports always say `backend: onnxruntime`, so a CPU simulation is never mistaken for
an engine measurement."""

from __future__ import annotations

import os
import platform
import shutil
import time
import warnings
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from ..errors import ArtifactError, BackendError, ModelError
from ..runtime.runner import PLAIN, Runner
from .base import Backend, BuildRequest, BuildResult

ARTIFACT = "model.onnx"


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
        return {"device": "cpu", "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()}


def _save_optimized(onnx_path: Path, out: Path) -> None:
    """onnxruntime's optimized graph of `onnx_path` written to `out`. The model is loaded
    first on its own, so a failure to write is never blamed on the input."""
    import onnxruntime as ort

    from ..onnx_utils import ort_session

    ort_session(onnx_path)  # the input loads: any error now names the input
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    so.optimized_model_filepath = str(out)
    try:
        ort.InferenceSession(str(onnx_path), sess_options=so, providers=["CPUExecutionProvider"])
    except Exception as e:
        raise ArtifactError(f"{out}: onnxruntime could not write the optimized model ({str(e).splitlines()[0][:200]}); "
                            "check free disk space and permissions") from None
    if not out.is_file() or out.stat().st_size == 0:
        raise ArtifactError(f"{out}: onnxruntime wrote no optimized model; check free disk space")


def _fp16(req: BuildRequest, out: Path) -> BuildResult:
    import onnx
    from onnxruntime.transformers import float16

    from ..data import load_samples
    from ..onnx_utils import load_onnx
    from .fp16 import describe, fold_identities, keep_fp32_nodes, range_check_batches

    cfg = req.config
    batches = None
    if cfg.build.fp16.range_check:
        if req.calib_data is None:
            raise BackendError("build.fp16.range_check needs the calibration samples (--calib-data); pass them or set "
                               "build.fp16.range_check: false")
        samples = load_samples(req.calib_data, cfg.model.inputs, cfg.data.labels_key, "calibration data")
        batches = range_check_batches(samples.x)
    keep = keep_fp32_nodes(req.onnx_path, cfg.build.fp16, batches)
    model = fold_identities(load_onnx(req.onnx_path))
    try:
        with warnings.catch_warnings(record=True) as caught:  # weights beyond fp16's range, clamped
            warnings.simplefilter("always")
            half = float16.convert_float_to_float16(
                model, keep_io_types=True, op_block_list=list(float16.DEFAULT_OP_BLOCK_LIST), node_block_list=list(keep))
    except Exception as e:
        raise ModelError(f"{req.onnx_path}: the float16 converter cannot convert the model "
                         f"({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    onnx.save(half, str(out))
    clamped = [str(w.message) for w in caught if "truncated" in str(w.message)]
    return BuildResult(ARTIFACT, flags=["float16 weights and activations (onnxruntime.transformers.float16)", "float32 I/O"],
                       kept_fp32=describe(keep),
                       details={"weights_clamped_to_fp16_range": len(clamped), "examples": clamped[:3]})


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
            qdq = (req.calib_dir / "model.qdq.onnx") if req.calib_dir else None
            if qdq is None or not qdq.is_file():
                raise BackendError(
                    f"int8 needs the Q/DQ model from the calibrate stage ({req.calib_dir}/model.qdq.onnx); run calibrate first"
                )
            shutil.copyfile(qdq, out)
            load_onnx(out)
            result = BuildResult(ARTIFACT, flags=["int8 Q/DQ (activations per tensor, weights per channel, symmetric)"],
                                 calibration={"source": "calibrate stage ranges (Q/DQ ONNX)", "route": "explicit"})
        else:
            raise BackendError(f"unknown precision '{req.precision}'; choose fp32, fp16 or int8")
        OrtRunner(out).close()  # a build is only good if it loads
        return result

    def load(self, artifact: Path, build_info: dict[str, Any]) -> Runner:
        return OrtRunner(artifact)

    def environment(self) -> dict[str, Any]:
        return {
            "backend": self.name,
            "version": self.version(),
            "device": "cpu",
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
        }
