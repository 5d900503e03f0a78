"""Shared pieces of the TensorRT GPU tests: tiny networks built with onnx.helper (no
torch on the GPU kit), onnxruntime references, configs, and engines built once per
session. Every test here is marked `gpu` and skipped, with the reason, where TensorRT or
a GPU is missing (CI, laptops)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pytest

# Channel counts and sizes big enough that TensorRT reliably finds INT8 kernels faster than
# FP32 ones (at 32/64 channels on 32x32 its choice varied between runs on an H100).
IN_SHAPE = (3, 64, 64)
PROFILE = {"min_batch": 1, "opt_batch": 8, "max_batch": 16}
CALIB_BATCH = 16
CALIB_SAMPLES = 64
NODES = ["/conv1/Conv", "/relu1/Relu", "/conv2/Conv", "/relu2/Relu", "/pool/GlobalAveragePool",
         "/flatten/Flatten", "/fc/Gemm"]


def _gpu_reason() -> Optional[str]:
    try:
        import tensorrt  # noqa: F401
    except Exception as e:
        return f"TensorRT is not installed here ({type(e).__name__}); these need TensorRT and an NVIDIA GPU (pip install -e .[tensorrt]; README, On a GPU)"
    try:
        from pipeline.runtime.cuda_device import gpu_count

        if gpu_count() < 1:
            return "no CUDA GPU visible"
    except Exception as e:
        return f"no usable CUDA driver ({e})"
    return None


@pytest.fixture(scope="session", autouse=True)
def _require_gpu() -> None:
    reason = _gpu_reason()
    if reason:
        pytest.skip(reason)


# -- tiny networks -------------------------------------------------------------------------------
def _weights(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)

    def he(*shape: int) -> np.ndarray:
        fan_in = int(np.prod(shape[1:]))
        return (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)

    return {"W1": he(64, 3, 3, 3), "B1": (rng.standard_normal(64) * 0.1).astype(np.float32),
            "W2": he(128, 64, 3, 3), "B2": (rng.standard_normal(128) * 0.1).astype(np.float32),
            "W3": he(10, 128), "B3": (rng.standard_normal(10) * 0.1).astype(np.float32)}


def _save(model: Any, path: Path) -> Path:
    import onnx

    model.ir_version = 8  # TensorRT 8.6's parser knows IR <= 8
    onnx.save(model, str(path))
    return path


def make_tiny_onnx(path: Path, extra_outputs: tuple[str, ...] = (), custom_op: bool = False) -> Path:
    """conv-relu-conv-relu-pool-flatten-gemm, dynamic batch, seeded weights."""
    from onnx import TensorProto, helper, numpy_helper

    w = _weights()
    inits = [numpy_helper.from_array(v, k) for k, v in w.items()]
    nodes = [
        helper.make_node("Conv", ["input", "W1", "B1"], ["c1"], name="/conv1/Conv", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="/relu1/Relu"),
        helper.make_node("Conv", ["r1", "W2", "B2"], ["c2"], name="/conv2/Conv", kernel_shape=[3, 3], pads=[1, 1, 1, 1],
                         strides=[2, 2]),
        helper.make_node("Relu", ["c2"], ["r2"], name="/relu2/Relu"),
        helper.make_node("GlobalAveragePool", ["r2"], ["p"], name="/pool/GlobalAveragePool"),
        helper.make_node("Flatten", ["p"], ["f"], name="/flatten/Flatten", axis=1),
        helper.make_node("Gemm", ["f", "W3", "B3"], ["logits"], name="/fc/Gemm", transB=1),
    ]
    opsets = [helper.make_opsetid("", 17)]
    if custom_op:
        nodes.insert(2, helper.make_node("FooBarUnknownOp", ["r1"], ["r1x"], name="/custom/FooBar", domain="trtpipe.test"))
        nodes[3].input[0] = "r1x"
        opsets.append(helper.make_opsetid("trtpipe.test", 1))
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])]
    outputs += [helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in extra_outputs]
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", *IN_SHAPE])],
                              outputs, inits)
    return _save(helper.make_model(graph, opset_imports=opsets), path)


def make_qdq_onnx(path: Path, calib: np.ndarray, tmp: Path) -> Path:
    """The tiny net with QuantizeLinear/DequantizeLinear on both conv inputs (per-tensor,
    amax from the calibration data) and weights (per output channel); biases and the
    Gemm stay float, as TensorRT's explicit route expects."""
    from calibration.ort_session import make_session
    from onnx import TensorProto, helper, numpy_helper

    probe = make_tiny_onnx(tmp / "probe.onnx", extra_outputs=("r1",))
    sess = make_session(probe)  # exact Q/DQ semantics
    _, r1 = sess.run(None, {"input": calib})
    amax = {"input": float(np.abs(calib).max()), "r1": float(np.abs(r1).max())}
    w = _weights()
    inits = [numpy_helper.from_array(w[k], k) for k in ("B1", "B2", "W3", "B3", "W1", "W2")]
    nodes = []

    def qdq(src: str, scale: np.ndarray, axis: Optional[int] = None) -> str:
        s, z = f"{src}_scale", f"{src}_zp"
        inits.append(numpy_helper.from_array(scale.astype(np.float32), s))
        inits.append(numpy_helper.from_array(np.zeros(scale.shape, np.int8), z))
        kw = {} if axis is None else {"axis": axis}
        nodes.append(helper.make_node("QuantizeLinear", [src, s, z], [f"{src}_q"], name=f"/q/{src}", **kw))
        nodes.append(helper.make_node("DequantizeLinear", [f"{src}_q", s, z], [f"{src}_dq"], name=f"/dq/{src}", **kw))
        return f"{src}_dq"

    def per_channel(name: str) -> np.ndarray:
        return np.abs(w[name]).reshape(w[name].shape[0], -1).max(axis=1) / 127.0

    x = qdq("input", np.array(amax["input"] / 127.0))
    w1 = qdq("W1", per_channel("W1"), axis=0)
    nodes.append(helper.make_node("Conv", [x, w1, "B1"], ["c1"], name="/conv1/Conv", kernel_shape=[3, 3], pads=[1, 1, 1, 1]))
    nodes.append(helper.make_node("Relu", ["c1"], ["r1"], name="/relu1/Relu"))
    r1 = qdq("r1", np.array(amax["r1"] / 127.0))
    w2 = qdq("W2", per_channel("W2"), axis=0)
    nodes += [
        helper.make_node("Conv", [r1, w2, "B2"], ["c2"], name="/conv2/Conv", kernel_shape=[3, 3], pads=[1, 1, 1, 1],
                         strides=[2, 2]),
        helper.make_node("Relu", ["c2"], ["r2"], name="/relu2/Relu"),
        helper.make_node("GlobalAveragePool", ["r2"], ["p"], name="/pool/GlobalAveragePool"),
        helper.make_node("Flatten", ["p"], ["f"], name="/flatten/Flatten", axis=1),
        helper.make_node("Gemm", ["f", "W3", "B3"], ["logits"], name="/fc/Gemm", transB=1),
    ]
    graph = helper.make_graph(nodes, "tiny_qdq", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", *IN_SHAPE])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])], inits)
    return _save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


def ort_run(onnx_path: Path, x: np.ndarray) -> np.ndarray:
    from calibration.ort_session import make_session

    sess = make_session(onnx_path)  # exact Q/DQ semantics
    return sess.run(["logits"], {"input": x})[0]


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-30))


def inputs(batch: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, *IN_SHAPE)).astype(np.float32)


def make_config(model: Optional[dict[str, Any]] = None, **build: Any) -> Any:
    from pipeline.config import Config

    b = {"backend": "tensorrt", "workspace_mb": 256}
    if "profiles" not in build:
        b["profile"] = dict(PROFILE)
    b.update(build)
    return Config.model_validate({
        "model": model or {"name": "tiny", "arch": "tiny", "input": {"name": "input", "shape": list(IN_SHAPE)}},
        "calibration": {"batch_size": CALIB_BATCH, "num_samples": CALIB_SAMPLES},
        "build": b,
    })


class Env:
    """Paths and helpers of one test session (test modules reach the helpers through
    this fixture object rather than importing conftest)."""

    inputs = staticmethod(inputs)
    cosine = staticmethod(cosine)
    ort_run = staticmethod(ort_run)
    make_config = staticmethod(make_config)
    make_tiny_onnx = staticmethod(make_tiny_onnx)
    make_qdq_onnx = staticmethod(make_qdq_onnx)
    NODES = NODES
    PROFILE = PROFILE
    IN_SHAPE = IN_SHAPE

    def __init__(self, root: Path) -> None:
        self.root = root
        self.onnx = make_tiny_onnx(root / "tiny.onnx")
        self.calib = inputs(CALIB_SAMPLES, seed=7)
        self.calib_npz = root / "calib.npz"  # as prepare writes it: one array per input
        np.savez(self.calib_npz, input=self.calib)
        self.timing_cache = root / "timing.cache"
        self.x7 = inputs(7)
        self.ref7 = ort_run(self.onnx, self.x7)

    def build(self, precision: str, name: str, calib_dir: Optional[Path] = None, onnx: Optional[Path] = None,
              memory: str = "auto", model: Optional[dict[str, Any]] = None, calib_data: Optional[Path] = None,
              **build: Any) -> tuple[Path, Any]:
        """(engine path, BuildResult) of a TensorRT build of `onnx` (default: the tiny net)."""
        from pipeline.backends.base import BuildRequest
        from pipeline.backends.tensorrt_backend import TensorRTBackend

        build.setdefault("timing_cache", str(self.timing_cache))
        out = self.root / name
        shutil.rmtree(out, ignore_errors=True)
        req = BuildRequest(precision=precision, onnx_path=onnx or self.onnx, out_dir=out,
                           config=make_config(model, **build), calib_dir=calib_dir,
                           calib_data=calib_data or self.calib_npz)
        res = TensorRTBackend(memory=memory, heartbeat_s=5.0).build(req)
        return out / res.artifact, res

    def stage_calibration(self, onnx: Path, samples: dict[str, np.ndarray], name: str, batch: int = CALIB_BATCH) -> Path:
        """What the calibrate stage writes for `onnx` (ranges under the tensorrt rules, the cache
        for this TensorRT, the Q/DQ model with TensorRT's placement), without the report."""
        import tensorrt as trt

        from calibration.algorithms import amax_to_scale
        from calibration.cache import write_cache
        from calibration.collect import collect_histograms
        from calibration.qdq import quantize_qdq
        from calibration.rules import get_rules, ranges_under

        rules = get_rules("tensorrt")
        n = len(next(iter(samples.values())))
        batches = [{k: v[i:i + batch] for k, v in samples.items()} for i in range(0, n - batch + 1, batch)]
        col = collect_histograms(onnx, batches, progress=False, growth=rules.growth)
        amax, _, _ = ranges_under(rules, col.histograms, "entropy", col.node_ops, 99.99)
        out = self.root / name
        out.mkdir(exist_ok=True)
        write_cache(out / "calibration.cache", {k: amax_to_scale(v) for k, v in amax.items()}, trt.__version__,
                    "EntropyCalibration2")
        self.placement = quantize_qdq(onnx, out / "model.qdq.onnx", amax)
        return out


@pytest.fixture(scope="session")
def env(tmp_path_factory: pytest.TempPathFactory) -> Env:
    return Env(tmp_path_factory.mktemp("trt"))


@pytest.fixture(scope="session")
def engines(env: Env) -> dict[str, tuple[Path, Any]]:
    """FP32 (cold timing cache), FP16 and INT8 (TensorRT's calibrator fed the data) engines, built once,
    with a timing cache of their own (other tests' builds would make the first one warm)."""
    cache = str(env.root / "engines.timing.cache")
    return {p: env.build(p, f"build_{p}", calibration_source="tensorrt", timing_cache=cache) for p in ("fp32", "fp16", "int8")}
