"""calibration.qdq_patterns on a real depthwise network: torchvision's MobileNetV2 (ReLU6 exported as
Clip), seeded weights, calibrated on scikit-image photo crops, with layers kept in float as tune keeps
them. Reference: onnxruntime's exact Q/DQ arithmetic on the unedited ONNX."""

from __future__ import annotations

import numpy as np
import pytest

from calibration.algorithms import compute_amax
from calibration.collect import collect_histograms
from calibration.qdq import quantize_qdq
from calibration.qdq_patterns import float_conv_activation_q, quantize_before_activation
from tests.calibration.nets import _photo_crops, export


@pytest.fixture(scope="module")
def mobilenet(tmp_path_factory):
    import onnx
    import torch
    import torchvision

    torch.manual_seed(0)
    net = torchvision.models.mobilenet_v2(weights=None, width_mult=0.35, num_classes=10).eval()
    folder = tmp_path_factory.mktemp("mbv2")
    data = _photo_crops(48, 64, seed=5)
    path = export(net, folder / "mbv2.onnx", data)
    col = collect_histograms(path, [data[k:k + 16] for k in range(0, 32, 16)], progress=False)
    amax = {n: compute_amax(h, "max") for n, h in col.histograms.items()}
    convs = [n.name for n in onnx.load(str(path)).graph.node if n.op_type == "Conv"]
    return path, amax, data[32:], convs, folder


def _run(path, x):
    from calibration.ort_session import make_session

    s = make_session(str(path))
    return s.run(None, {"input": x})[0]


def test_kept_expansion_convs_make_the_pattern_and_the_edit_keeps_every_output(mobilenet):
    """Keeping the expansion 1x1 Convs of three blocks in float puts a Q/DQ after their ReLU6 (Clip):
    found there and only there; the edit adds one Q/DQ before each Clip, with the Q's scale, and
    onnxruntime's outputs do not change (the same integers reach every INT8 layer)."""
    import onnx

    path, amax, x, convs, folder = mobilenet
    kept = [c for c in convs if c.endswith("/conv.0/conv.0.0/Conv")][1:4]
    assert len(kept) == 3
    out = folder / "kept.qdq.onnx"
    quantize_qdq(path, out, amax, exclude_nodes=kept)
    model = onnx.load(str(out))
    found = float_conv_activation_q(model)
    producer = {o: n for n in model.graph.node for o in n.output}
    assert len(found) == 3 and all(producer[t].op_type == "Clip" for t in found)
    assert {producer[producer[t].input[0]].name for t in found} == set(kept)
    quantize_qdq(path, folder / "full.qdq.onnx", amax)
    plain = onnx.load(str(folder / "full.qdq.onnx"))
    assert float_conv_activation_q(plain) == []  # every Conv in INT8: no such site

    conv_outputs = sorted(producer[t].input[0] for t in found)
    edited = quantize_before_activation(model)
    assert sorted(edited) == conv_outputs
    edited_path = folder / "kept.preact.onnx"
    onnx.save(model, str(edited_path))
    assert float_conv_activation_q(model) == []  # the pattern is gone (the Clip now reads a DequantizeLinear)
    g = model.graph
    prod = {o: n for n in g.node for o in n.output}
    for t in found:
        clip = prod[t]
        dq = prod[clip.input[0]]
        q = prod[dq.input[0]]
        assert (dq.op_type, q.op_type, prod[q.input[0]].name in kept) == ("DequantizeLinear", "QuantizeLinear", True)
        post_q = next(n for n in g.node if n.op_type == "QuantizeLinear" and n.input[0] == t)
        assert list(q.input[1:]) == list(post_q.input[1:])  # the same scale and zero point
    onnx.checker.check_model(model)
    a, b = _run(out, x), _run(edited_path, x)
    np.testing.assert_array_equal(b, a)
    ref = _run(path, x)
    assert np.abs(a - ref).max() > 0  # the Q/DQ model differs from FP32: the equality above is not vacuous


def test_a_site_with_a_nonzero_zero_point_is_left_alone(mobilenet):
    """uint8 with a zero point other than 0 (not what trtpipe writes): moving the Q before the Clip would
    change the integers, so nothing is edited."""
    import onnx
    from onnx import numpy_helper

    path, amax, x, convs, folder = mobilenet
    kept = [c for c in convs if c.endswith("/conv.0/conv.0.0/Conv")][1:2]
    out = folder / "zp.qdq.onnx"
    quantize_qdq(path, out, amax, exclude_nodes=kept)
    model = onnx.load(str(out))
    (t,) = float_conv_activation_q(model)
    q = next(n for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == t)
    init = next(i for i in model.graph.initializer if i.name == q.input[2])
    init.CopyFrom(numpy_helper.from_array(np.array(3, np.int8), init.name))
    before = model.SerializeToString()
    assert quantize_before_activation(model) == []
    assert model.SerializeToString() == before
