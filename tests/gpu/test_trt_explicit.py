"""Explicit INT8: a Q/DQ ONNX (QuantizeLinear/DequantizeLinear on conv inputs and
weights) built through build.int8_route: explicit."""

from __future__ import annotations

import pytest

pytest.importorskip("tensorrt", reason="TensorRT is not installed: run on the GPU device with the kit (shared/gpu/README.md)")
pytestmark = pytest.mark.gpu


def test_explicit_qdq_route_builds(env):
    from pipeline.runtime.trt_runner import TrtRunner

    calib_dir = env.root / "calib_qdq"
    calib_dir.mkdir(exist_ok=True)
    qdq = env.make_qdq_onnx(calib_dir / "model.qdq.onnx", env.calib, env.root)
    engine, info = env.build("int8", "int8_explicit", calib_dir=calib_dir, int8_route="explicit")
    assert info["int8_route"] == "explicit" and "calibration" not in info
    assert info["onnx"].endswith("model.qdq.onnx")
    with TrtRunner(engine) as r:
        out = r.infer({"input": env.x7})["logits"]
    ort_qdq = env.ort_run(qdq, env.x7)
    assert env.cosine(out, ort_qdq) > 0.99, "TensorRT vs onnxruntime on the same Q/DQ model"
    assert env.cosine(out, env.ref7) > 0.99, "explicit INT8 vs FP32 reference"
    types = info.get("by_output_type", {})
    assert any(k.startswith("INT8") for k in types), types
