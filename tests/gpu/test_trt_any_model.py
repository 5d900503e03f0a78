"""TensorRT engines of models that are not one float image: two int64 inputs with a dynamic
sequence axis and two optimization profiles (the runtime picks the one that fits), INT8
from TensorRT's calibrator fed integer inputs and from the calibrate stage's cache, and
FP16 keeping the nodes that overflow in FP32."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tensorrt", reason="TensorRT is not installed: these need TensorRT and an NVIDIA GPU (pip install -e .[tensorrt]; README, On a GPU)")
pytestmark = pytest.mark.gpu

from pipeline.errors import DataError  # noqa: E402

VOCAB, DIM = 1000, 64
PROFILES = [{"batch": [1, 2, 4], "seq": [4, 8, 16]}, {"batch": [4, 16, 32], "seq": [16, 32, 64]}]
MODEL = {"name": "encoder", "arch": "x", "inputs": [{"name": "input_ids", "shape": ["seq"], "dtype": "int64"},
                                                     {"name": "attention_mask", "shape": ["seq"], "dtype": "int64"}]}


def _encoder_onnx(path: Path) -> Path:
    """Token embedding (Gather), masked mean pooling, a projection: int64 ids and mask, two outputs."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(3)
    inits = [numpy_helper.from_array(rng.standard_normal((VOCAB, DIM)).astype(np.float32) * 0.5, "E"),
             numpy_helper.from_array((rng.standard_normal((32, DIM)) / 8).astype(np.float32), "W"),
             numpy_helper.from_array(np.zeros(32, np.float32), "B"),
             numpy_helper.from_array(np.array([1], np.int64), "one_axis"),
             numpy_helper.from_array(np.array([-1], np.int64), "last_axis")]
    nodes = [
        helper.make_node("Gather", ["E", "input_ids"], ["emb"], name="/embed/Gather"),
        helper.make_node("Cast", ["attention_mask"], ["maskf"], name="/mask/Cast", to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["maskf", "last_axis"], ["mask3"], name="/mask/Unsqueeze"),
        helper.make_node("Mul", ["emb", "mask3"], ["tokens"], name="/mask/Mul"),
        helper.make_node("ReduceSum", ["tokens", "one_axis"], ["summed"], name="/pool/ReduceSum", keepdims=0),
        helper.make_node("ReduceSum", ["mask3", "one_axis"], ["count"], name="/pool/Count", keepdims=0),
        helper.make_node("Div", ["summed", "count"], ["pooled"], name="/pool/Div"),
        helper.make_node("Gemm", ["pooled", "W", "B"], ["embedding"], name="/proj/Gemm", transB=1),
    ]
    graph = helper.make_graph(
        nodes, "encoder",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
         helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", 32]),
         helper.make_tensor_value_info("tokens", TensorProto.FLOAT, ["batch", "seq", DIM])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def _tokens(batch: int, seq: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, seq + 1, batch)
    mask = (np.arange(seq)[None, :] < lengths[:, None]).astype(np.int64)
    return {"input_ids": rng.integers(0, VOCAB, (batch, seq)).astype(np.int64) * mask, "attention_mask": mask}


def _ort(onnx: Path, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    from calibration.ort_session import make_session

    s = make_session(onnx)  # exact Q/DQ semantics
    return dict(zip([o.name for o in s.get_outputs()], s.run(None, feeds)))


@pytest.fixture(scope="module")
def encoder(env):
    onnx = _encoder_onnx(env.root / "encoder.onnx")
    calib = _tokens(64, 32, seed=11)
    calib_npz = env.root / "encoder_calib.npz"
    np.savez(calib_npz, **calib)
    return onnx, calib, calib_npz


@pytest.mark.parametrize("precision,min_cos", [("fp32", 0.99999), ("fp16", 0.999), ("int8", 0.98)])
def test_two_int64_inputs_two_profiles(env, encoder, precision, min_cos):
    from pipeline.runtime.trt_runner import TrtRunner

    onnx, _, calib_npz = encoder
    engine, info = env.build(precision, f"encoder_{precision}", onnx=onnx, model=MODEL, calib_data=calib_npz,
                             profiles=PROFILES, calibration_source="tensorrt")
    assert len(info.profiles) == 2 and info.profiles[1]["input_ids"]["max"] == [32, 64]
    if precision == "int8":
        assert info.calibration["batches_fed"] == 64 // 16 and info.calibration["calibration_shapes"]["input_ids"] == [16, 32]
    with TrtRunner(engine) as r:
        assert len(r.profiles) == 2
        for batch, seq, seed in ((2, 8, 1), (16, 32, 2), (4, 16, 3), (1, 4, 4)):  # profile 0, 1, both (first wins), 0
            feeds = _tokens(batch, seq, seed)
            got, ref = r.infer(feeds), _ort(onnx, feeds)
            for name in ("embedding", "tokens"):
                assert got[name].shape == ref[name].shape
                assert env.cosine(got[name], ref[name]) > min_cos, (precision, name, batch, seq)
        with pytest.raises(DataError, match="fit none of the engine's optimization profiles"):
            r.infer(_tokens(2, 40, 5))  # batch 2 is profile 0's, seq 40 is profile 1's


def test_int8_from_the_stage_cache_with_integer_inputs(env, encoder):
    from pipeline.runtime.trt_runner import TrtRunner

    onnx, calib, calib_npz = encoder
    calib_dir = env.stage_calibration(onnx, calib, "encoder_stage")
    engine, info = env.build("int8", "encoder_int8_cache", onnx=onnx, model=MODEL, calib_data=calib_npz,
                             calib_dir=calib_dir, profiles=PROFILES)
    assert info.calibration["source"] == "calibrate stage cache"
    # Every float tensor has a scale; TensorRT still names the two integer inputs (no INT8 for them).
    assert set(info.details["missing_scale_tensors"]) <= {"input_ids", "attention_mask"}, info.details["missing_scale_tensors"]
    feeds = _tokens(16, 32, 6)
    with TrtRunner(engine) as r:
        got = r.infer(feeds)
    ref = _ort(onnx, feeds)
    assert env.cosine(got["embedding"], ref["embedding"]) > 0.98


def _overflow_onnx(path: Path) -> Path:
    """RMS normalization of activations around 300: its mean of squares (~1e5) leaves FP16's range."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(5)
    inits = [numpy_helper.from_array((rng.standard_normal((64, 64)) * 40).astype(np.float32), "W"),
             numpy_helper.from_array(np.array([2.0], np.float32), "two"),
             numpy_helper.from_array(np.array([1e-6], np.float32), "eps")]
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["h"], name="/proj/MatMul"),
        helper.make_node("Pow", ["h", "two"], ["sq"], name="/norm/Pow"),
        helper.make_node("ReduceMean", ["sq"], ["ms"], name="/norm/ReduceMean", axes=[1], keepdims=1),
        helper.make_node("Add", ["ms", "eps"], ["mse"], name="/norm/Add"),
        helper.make_node("Sqrt", ["mse"], ["rms"], name="/norm/Sqrt"),
        helper.make_node("Div", ["h", "rms"], ["y"], name="/norm/Div"),
    ]
    graph = helper.make_graph(nodes, "rmsnorm", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 64])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def test_fp16_keeps_overflowing_nodes_in_fp32(env):
    from pipeline.runtime.trt_runner import TrtRunner

    onnx = _overflow_onnx(env.root / "rmsnorm.onnx")
    x = np.random.default_rng(8).standard_normal((32, 64)).astype(np.float32)
    np.savez(env.root / "rms_calib.npz", x=x)
    model = {"name": "rms", "arch": "x", "inputs": [{"name": "x", "shape": [64]}]}
    engine, info = env.build("fp16", "rms_fp16", onnx=onnx, model=model, calib_data=env.root / "rms_calib.npz",
                             profiles=[{"batch": [1, 8, 32]}])
    kept = "\n".join(info.kept_fp32)
    assert "/norm/ReduceMean" in kept and "/norm/Pow" in kept, info.kept_fp32
    ref = _ort(onnx, {"x": x})["y"]
    with TrtRunner(engine) as r:
        got = r.infer({"x": x})["y"]
    assert np.isfinite(got).all() and env.cosine(got, ref) > 0.999
