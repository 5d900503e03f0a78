"""Q/DQ ONNX from our ranges: scales bit for bit, TensorRT-friendly placement, float
biases, per-channel weights, and an onnxruntime run close to FP32."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from calibration.algorithms import amax_to_scale, compute_amax
from calibration.collect import collect_histograms
from pipeline.data import calibration_batches
from calibration.errors import CalibrationError
from calibration.qdq import quantize_qdq, read_qdq_scales
from tests.calibration.nets import _photo_crops, export, residual_cnn


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    """The residual CNN, entropy ranges from 128 photo crops, and its Q/DQ model."""
    folder = tmp_path_factory.mktemp("qdq")
    data = _photo_crops(192, 24, seed=1)
    path = export(residual_cnn(), folder / "cnn.onnx", data)
    col = collect_histograms(path, calibration_batches(data, np.arange(128), 32), progress=False)
    amax = {n: compute_amax(h, "entropy") for n, h in col.histograms.items()}
    out = folder / "cnn.qdq.onnx"
    report = quantize_qdq(path, out, amax)
    return path, out, amax, report, data[128:]


def _run(path: Path, x: np.ndarray) -> np.ndarray:
    from calibration.ort_session import make_session

    sess = make_session(path)  # exact Q/DQ semantics on every CPU
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.reshape(len(a), -1).astype(np.float64), b.reshape(len(b), -1).astype(np.float64)
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def test_qdq_runs_in_onnxruntime_close_to_fp32(calibrated):
    import onnx

    fp32, qdq, _, _, held_out = calibrated
    onnx.checker.check_model(onnx.load(str(qdq)), full_check=True)  # valid and topologically sorted
    ref, got = _run(fp32, held_out), _run(qdq, held_out)
    cos = _cosine(ref, got)
    assert cos.min() > 0.99, cos.min()
    assert not np.array_equal(ref, got)  # it really is quantized


def test_activation_scales_equal_our_ranges_bit_for_bit(calibrated):
    _, qdq, amax, report, _ = calibrated
    scales = read_qdq_scales(qdq)
    acts = {n: v for n, v in scales.items() if not v["weight"]}
    assert set(acts) == set(report["activations"]) and "input" in acts
    for name, v in acts.items():
        want = amax_to_scale(amax[name])
        assert v["scale"].dtype == np.float32 and v["scale"].shape == ()
        assert v["scale"].view(np.uint32) == np.array(want).view(np.uint32), name
        assert v["zero_point"].dtype == np.int8 and v["zero_point"] == 0


def test_placement_weights_and_biases(calibrated):
    import onnx
    from onnx import numpy_helper

    fp32_path, qdq_path, _, _, _ = calibrated
    fp32, qdq = onnx.load(str(fp32_path)), onnx.load(str(qdq_path))
    producer = {o: n for n in qdq.graph.node for o in n.output}
    inits = {i.name: i for i in qdq.graph.initializer}
    fp32_inits = {i.name: numpy_helper.to_array(i) for i in fp32.graph.initializer}
    weighted = [n for n in qdq.graph.node if n.op_type in ("Conv", "Gemm")]
    assert len(weighted) == 4
    for node in weighted:
        # activation and weight inputs come from DequantizeLinear; the bias stays float
        x_dq, w_dq = producer[node.input[0]], producer[node.input[1]]
        assert x_dq.op_type == "DequantizeLinear" and w_dq.op_type == "DequantizeLinear"
        assert producer[x_dq.input[0]].op_type == "QuantizeLinear"
        if len(node.input) > 2:
            assert node.input[2] in inits and inits[node.input[2]].data_type == onnx.TensorProto.FLOAT
        # weights: int8, per output channel (axis 0), scale = max|w| / 127 of the channel
        q_w = inits[w_dq.input[0]]
        assert q_w.data_type == onnx.TensorProto.INT8
        axis = next(a.i for a in w_dq.attribute if a.name == "axis")
        scale = numpy_helper.to_array(inits[w_dq.input[1]])
        w_name = w_dq.input[0][: -len("_quantized")]
        w = fp32_inits[w_name]
        transposed = node.op_type == "Gemm" and any(a.name == "transB" and a.i for a in node.attribute)
        assert axis == (0 if node.op_type == "Conv" or transposed else 1)
        per_channel = np.abs(np.moveaxis(w, axis, 0)).reshape(w.shape[axis], -1).max(axis=1)
        np.testing.assert_array_equal(scale, (per_channel.astype(np.float64) / 127).astype(np.float32))
        assert np.abs(numpy_helper.to_array(q_w)).max() == 127
        # no Q/DQ on the output of a weighted op
        consumers = [n for n in qdq.graph.node if node.output[0] in n.input]
        assert all(c.op_type != "QuantizeLinear" for c in consumers)
    # the residual Add sees its skip input quantized (the same Q/DQ as the Conv reading it)
    add = next(n for n in qdq.graph.node if n.op_type == "Add")
    assert any(producer.get(i) is not None and producer[i].op_type == "DequantizeLinear" for i in add.input)
    assert not any(n.op_type in ("QLinearConv", "ConvInteger") for n in qdq.graph.node)


def test_matmul_of_two_activations_and_gemm(tmp_path: Path):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = rng.standard_normal((6, 8)).astype(np.float32)  # Gemm transB: (N, K)
    nodes = [helper.make_node("Gemm", ["a", "W", "bias"], ["g"], transB=1),
             helper.make_node("Transpose", ["g"], ["gt"], perm=[1, 0]),
             helper.make_node("MatMul", ["g", "gt"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("a", TensorProto.FLOAT, [5, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [5, 5])],
                              [numpy_helper.from_array(w, "W"), numpy_helper.from_array(np.ones(6, np.float32), "bias")])
    path = tmp_path / "mm.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    x = rng.standard_normal((5, 8)).astype(np.float32)
    col = collect_histograms(path, [x], progress=False)
    amax = {n: compute_amax(h, "minmax") for n, h in col.histograms.items()}
    quantize_qdq(path, tmp_path / "mm.qdq.onnx", amax)
    scales = read_qdq_scales(tmp_path / "mm.qdq.onnx")
    assert {n for n, v in scales.items() if not v["weight"]} == {"a", "g", "gt"}
    assert scales["W"]["axis"] == 0 and scales["W"]["scale"].shape == (6,)
    assert _cosine(_run(path, x)[None].reshape(1, -1), _run(tmp_path / "mm.qdq.onnx", x).reshape(1, -1))[0] > 0.99


def test_missing_range_zero_range_and_old_opset(calibrated, tmp_path: Path):
    import onnx

    fp32, _, amax, _, held_out = calibrated
    partial = {k: v for k, v in amax.items() if k != "input"}
    with pytest.raises(CalibrationError, match=r"no calibrated range for activation\(s\) \['input'\]"):
        quantize_qdq(fp32, tmp_path / "x.onnx", partial)
    zeroed = dict(amax, input=0.0)
    quantize_qdq(fp32, tmp_path / "z.onnx", zeroed)
    assert read_qdq_scales(tmp_path / "z.onnx")["input"]["scale"] == np.float32(1.0)
    model = onnx.load(str(fp32))
    model.opset_import[0].version = 11
    onnx.save(model, str(tmp_path / "old.onnx"))
    with pytest.raises(CalibrationError, match=r"old\.onnx: opset 11 is too old"):
        quantize_qdq(tmp_path / "old.onnx", tmp_path / "o.onnx", amax)


def test_weights_behind_identity_or_constant_are_quantized_as_weights(tmp_path: Path):
    """Exporters route shared weights and biases through Identity or Constant nodes; they
    must still become per-channel int8 weights, not activations without a range."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    m = rng.standard_normal((4, 6)).astype(np.float32)
    nodes = [helper.make_node("Identity", ["W0"], ["W"]),
             helper.make_node("Identity", ["B0"], ["B"]),
             helper.make_node("Conv", ["x", "W", "B"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("ReduceMean", ["c"], ["r"], axes=[2, 3], keepdims=0),
             helper.make_node("Constant", [], ["M"], value=numpy_helper.from_array(m, "M")),
             helper.make_node("MatMul", ["r", "M"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 6])],
                              [numpy_helper.from_array(w, "W0"), numpy_helper.from_array(np.ones(4, np.float32), "B0")])
    path = tmp_path / "shared.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(path))
    x = rng.standard_normal((16, 3, 8, 8)).astype(np.float32)
    col = collect_histograms(path, [x], progress=False)
    assert set(col.tensor_names) == {"x", "c", "r", "y"}  # no weights, biases or constants
    amax = {n: compute_amax(h, "minmax") for n, h in col.histograms.items()}
    quantize_qdq(path, tmp_path / "shared.qdq.onnx", amax)
    scales = read_qdq_scales(tmp_path / "shared.qdq.onnx")
    assert scales["W"]["weight"] and scales["W"]["axis"] == 0 and scales["W"]["scale"].shape == (4,)
    assert scales["M"]["weight"] and scales["M"]["axis"] == 1 and scales["M"]["scale"].shape == (6,)
    assert "B" not in scales  # the bias stays float
    assert _cosine(_run(path, x), _run(tmp_path / "shared.qdq.onnx", x)).min() > 0.99
