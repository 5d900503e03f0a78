"""Explicit INT8: a Q/DQ ONNX (QuantizeLinear/DequantizeLinear on conv inputs and
weights) built through build.int8_route: explicit."""

from __future__ import annotations

import pytest

pytest.importorskip("tensorrt", reason="TensorRT is not installed: these need TensorRT and an NVIDIA GPU (pip install -e .[tensorrt]; README, On a GPU)")
pytestmark = pytest.mark.gpu


def test_explicit_qdq_route_builds(env):
    from pipeline.runtime.trt_runner import TrtRunner

    calib_dir = env.root / "calib_qdq"
    calib_dir.mkdir(exist_ok=True)
    qdq = env.make_qdq_onnx(calib_dir / "model.qdq.onnx", env.calib, env.root)
    engine, info = env.build("int8", "int8_explicit", calib_dir=calib_dir, int8_route="explicit")
    assert info.details["int8_route"] == "explicit" and info.calibration["route"] == "explicit"
    assert info.details["onnx"].endswith("model.qdq.onnx")
    with TrtRunner(engine) as r:
        out = r.infer({"input": env.x7})["logits"]
    ort_qdq = env.ort_run(qdq, env.x7)
    assert env.cosine(out, ort_qdq) > 0.99, "TensorRT vs onnxruntime on the same Q/DQ model"
    assert env.cosine(out, env.ref7) > 0.99, "explicit INT8 vs FP32 reference"
    types = info.details.get("by_output_type", {})
    assert any(k.startswith("INT8") for k in types), types


def test_tensorrt_placement_runs_int8_where_it_says(env):
    """The calibrate stage's Q/DQ model (TensorRT's placement rules): the Conv nodes the
    placement expects in int8 run INT8 kernels in the engine (layers.json)."""
    import json

    from pipeline.backends.trt_build import layer_precision
    from pipeline.runtime.trt_runner import TrtRunner

    calib_dir = env.stage_calibration(env.onnx, {"input": env.calib}, "calib_placement")
    expected = env.placement["expected_precision"]
    engine, info = env.build("int8", "int8_placement", calib_dir=calib_dir, int8_route="explicit")
    layers = json.loads((engine.parent / "layers.json").read_text())["Layers"]
    for node in ("/conv1/Conv", "/conv2/Conv"):
        assert expected[node] == "int8"
        found = [ly for ly in layers if node in ly.get("Name", "")]
        assert found and layer_precision(found[0]) == "INT8", (node, found[:1])
    with TrtRunner(engine) as r:
        assert env.cosine(r.infer({"input": env.x7})["logits"], env.ref7) > 0.99
