"""GPTQ weight rounding (``calibration.weight_rounding: gptq``, :mod:`calibration.rounding`):
the input second moments against torch's own unfold, the rounding against a brute-force
search and round-to-nearest, and the calibrate stage on the digits model's real data."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from calibration.qdq import quantize_qdq, read_qdq_scales, weight_rounding_inputs
from calibration.qdq_insert import quantize_weight
from calibration.rounding import gptq_rows, second_moments


def _net(rng: np.random.Generator):
    """A padded 3x3 Conv, a strided depthwise Conv with dilation, a Gemm (transB) and a MatMul."""
    inits = [numpy_helper.from_array(rng.normal(0, 1, (8, 3, 3, 3)).astype(np.float32), "wa"),
             numpy_helper.from_array(rng.normal(0, 1, (8, 1, 3, 3)).astype(np.float32), "wb"),
             numpy_helper.from_array(rng.normal(0, 1, (6, 8)).astype(np.float32), "wg"),
             numpy_helper.from_array(rng.normal(0, 1, (6, 4)).astype(np.float32), "wm")]
    nodes = [helper.make_node("Conv", ["x", "wa"], ["a"], name="conv_a", pads=[1, 0, 1, 2]),
             helper.make_node("Relu", ["a"], ["r"], name="relu"),
             helper.make_node("Conv", ["r", "wb"], ["b"], name="conv_dw", group=8, strides=[2, 1], dilations=[1, 2]),
             helper.make_node("GlobalAveragePool", ["b"], ["p"], name="pool"),
             helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
             helper.make_node("Gemm", ["f", "wg"], ["g"], name="gemm", transB=1),
             helper.make_node("MatMul", ["g", "wm"], ["y"], name="matmul")]
    graph = helper.make_graph(nodes, "rounding", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 13, 11])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _torch_moments(model, x: np.ndarray, node: str, every: int = 1) -> np.ndarray:
    """E[patch patch^T] per group, written from torch's unfold (every ``every``-th output row
    and column), the FP32 activations from torch too."""
    import torch
    import torch.nn.functional as F

    w = {i.name: torch.from_numpy(numpy_helper.to_array(i).copy()) for i in model.graph.initializer}
    t = torch.from_numpy(x).double()
    a = F.conv2d(F.pad(t, (0, 2, 1, 1)), w["wa"].double())  # pads [top=1, left=0, bottom=1, right=2]
    r = torch.relu(a)
    if node == "conv_a":
        inp, k, g, stride, dil, pad = t, (3, 3), 1, (1, 1), (1, 1), (0, 2, 1, 1)
    else:
        inp, k, g, stride, dil, pad = r, (3, 3), 8, (2, 1), (1, 2), (0, 0, 0, 0)
    xp = F.pad(inp, pad)
    cols = F.unfold(xp, k, dilation=dil, stride=stride)  # (N, C*K, L)
    oh = (xp.shape[2] - dil[0] * (k[0] - 1) - 1) // stride[0] + 1
    ow = (xp.shape[3] - dil[1] * (k[1] - 1) - 1) // stride[1] + 1
    keep = [i * ow + j for i in range(0, oh, every) for j in range(0, ow, every)]
    cols = cols[:, :, keep]
    n, ck, L = cols.shape
    per = cols.reshape(n, g, ck // g, L).permute(1, 2, 0, 3).reshape(g, ck // g, n * L)
    return (per @ per.transpose(1, 2) / (n * L)).numpy()


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    import onnx

    rng = np.random.default_rng(3)
    path = tmp_path_factory.mktemp("rounding") / "net.onnx"
    onnx.save(_net(rng), str(path))
    x = rng.uniform(-1, 1, (40, 3, 13, 11)).astype(np.float32)
    return path, x


def test_second_moments_equal_torch_unfold_with_pads_strides_dilations_and_groups(small):
    path, x = small
    model, nodes = weight_rounding_inputs(path)
    assert nodes == {"conv_a": "x", "conv_dw": "r", "gemm": "f", "matmul": "g"}
    batches = lambda: ({"x": x[i:i + 16]} for i in range(0, len(x), 16))  # noqa: E731  (a last batch of 8)
    full = second_moments(model, batches(), nodes, max_positions=10**6)
    assert full["conv_a"].shape == (1, 27, 27) and full["conv_dw"].shape == (8, 9, 9)
    np.testing.assert_allclose(full["conv_a"], _torch_moments(model, x, "conv_a"), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(full["conv_dw"], _torch_moments(model, x, "conv_dw"), rtol=1e-5, atol=1e-7)
    # conv_a has 13 x 11 = 143 output positions: at most 16 a sample, r = ceil(sqrt(143 / 16)) = 3, every 3rd row and column
    grid = second_moments(model, batches(), {"conv_a": "x"}, max_positions=16)
    np.testing.assert_allclose(grid["conv_a"], _torch_moments(model, x, "conv_a", every=3), rtol=1e-5, atol=1e-7)
    assert not np.allclose(grid["conv_a"], full["conv_a"])
    # the Gemm's input: E[f f^T] from the model's own pooled features
    import onnxruntime as ort

    from calibration.collect import augment

    s = ort.InferenceSession(augment(model, ["f"]).SerializeToString())
    f = s.run(["f"], {"x": x})[0].astype(np.float64)
    np.testing.assert_allclose(full["gemm"][0], f.T @ f / len(f), rtol=1e-5, atol=1e-9)


def _err(q: np.ndarray, w: np.ndarray, s: np.ndarray, h: np.ndarray) -> float:
    d = q.astype(np.float64) * s - w
    return float(d @ h @ d)


def test_gptq_beats_nearest_on_a_cancelling_kernel_and_keeps_the_grid():
    rng = np.random.default_rng(0)
    # a smooth input (neighbouring taps nearly equal) and an edge-detecting kernel whose taps cancel
    base = rng.normal(0, 1, (5000, 1)) + 0.05 * rng.normal(0, 1, (5000, 6))
    h = base.T @ base / len(base)
    worse, total_gptq, total_near = 0, 0.0, 0.0
    for trial in range(20):
        w = np.array([3.0, -3.0, 2.0, -2.0, 1.0, -1.0]) + rng.normal(0, 0.3, 6)
        _, s = quantize_weight(w[None].astype(np.float32), 0)
        s = s.astype(np.float64)
        q = gptq_rows(w[None], h[None], s)[0]
        near = np.clip(np.rint(w / s), -127, 127)
        best = min(_err(np.array(c), w, s, h) for c in itertools.product(*[(np.floor(v / s[0]), np.ceil(v / s[0]))
                                                                         for v in w]))
        assert np.abs(q).max() <= 127 and q[np.argmax(np.abs(w))] == np.sign(w[np.argmax(np.abs(w))]) * 127
        assert np.all(np.abs(q - w / s) < 1.5)  # a grid point next to the weight, or one further at most
        total_gptq, total_near = total_gptq + _err(q, w, s, h), total_near + _err(near, w, s, h)
        worse += _err(q, w, s, h) > 2 * best + 1e-12
    print(f"gptq {total_gptq:.3g}, nearest {total_near:.3g}, trials above twice the optimum: {worse}")
    assert total_gptq < 0.5 * total_near  # greedy: not every row, but far better in sum
    assert worse <= 4, "GPTQ should land near the exhaustive optimum"


def test_gptq_rounds_an_input_that_is_never_seen_to_nearest_and_shared_rows_alike():
    rng = np.random.default_rng(1)
    x = rng.normal(0, 1, (400, 4))
    x[:, 2] = 0.0  # a dead input channel
    h = (x.T @ x / len(x))[None]
    w = rng.normal(0, 1, (5, 4))
    s = (np.abs(w).max(axis=1) / 127).astype(np.float32)
    q = gptq_rows(w, h, s)
    assert np.array_equal(q[:, 2], np.rint(w[:, 2] / s).astype(np.int8))
    per_row = gptq_rows(w, np.repeat(h, 5, axis=0), s)  # the same H given once per row
    assert np.array_equal(q, per_row)


def test_quantize_qdq_with_gptq_keeps_every_scale_and_lowers_the_weight_error_on_held_out_data(small, tmp_path):
    import onnx

    from calibration.ort_session import make_session

    path, x = small
    model, nodes = weight_rounding_inputs(path)
    calib, held = x[:24], np.random.default_rng(9).uniform(-1, 1, (64, 3, 13, 11)).astype(np.float32)
    moments = second_moments(model, ({"x": calib[i:i + 8]} for i in range(0, 24, 8)), nodes)
    from calibration.collect import collect_histograms
    from calibration.rules import get_rules, ranges_under

    col = collect_histograms(path, (calib[i:i + 8] for i in range(0, 24, 8)), progress=False, growth="double")
    amax, _, _ = ranges_under(get_rules("tensorrt"), col.histograms, "minmax", col.node_ops)
    near, gptq = tmp_path / "near.onnx", tmp_path / "gptq.onnx"
    quantize_qdq(path, near, amax)
    summary = quantize_qdq(path, gptq, amax, weight_moments=moments)
    assert summary["weight_rounding"]["weights"] == 4 and summary["weight_rounding"]["elements_changed"] > 0
    a, b = read_qdq_scales(near), read_qdq_scales(gptq)
    assert a.keys() == b.keys() and all(np.array_equal(a[k]["scale"], b[k]["scale"]) for k in a)

    def weights(p):
        m = onnx.load(str(p))
        return {i.name: numpy_helper.to_array(i) for i in m.graph.initializer if i.name.endswith("_quantized")}

    wn, wg = weights(near), weights(gptq)
    assert wn.keys() == wg.keys() and all(np.abs(v.astype(int)).max() <= 127 for v in wg.values())
    assert len(wg) == 4
    for k, v in wg.items():  # every channel's scale-defining element kept at +-127
        axis = 1 if k.startswith("wm") else 0
        assert np.all(np.abs(np.moveaxis(v.astype(int), axis, 0)).reshape(v.shape[axis], -1).max(axis=1) == 127), k
    # the weights each Q/DQ model holds (q * its scale) put into the FP32 model: the weights' own error
    def dequantized(p):
        m, fp32 = onnx.load(str(p)), onnx.load(str(path))
        inits = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}
        for init in fp32.graph.initializer:
            axis = 1 if init.name == "wm" else 0
            scale = inits[f"{init.name}_scale"].astype(np.float64)
            shape = [1] * inits[f"{init.name}_quantized"].ndim
            shape[axis] = -1
            w = inits[f"{init.name}_quantized"].astype(np.float64) * scale.reshape(shape)
            init.CopyFrom(numpy_helper.from_array(w.astype(np.float32), init.name))
        return fp32

    ref = make_session(path).run(["y"], {"x": held})[0].astype(np.float64)
    e_near = np.mean((make_session(dequantized(near)).run(["y"], {"x": held})[0] - ref) ** 2)
    e_gptq = np.mean((make_session(dequantized(gptq)).run(["y"], {"x": held})[0] - ref) ** 2)
    assert e_gptq < 0.7 * e_near, (e_gptq, e_near)
    # and the whole Q/DQ model (activations quantized too) is no worse
    q_near = np.mean((make_session(near).run(["y"], {"x": held})[0] - ref) ** 2)
    q_gptq = np.mean((make_session(gptq).run(["y"], {"x": held})[0] - ref) ** 2)
    assert q_gptq < q_near, (q_gptq, q_near)


def test_calibrate_stage_weight_rounding_gptq_on_digits(tmp_path_factory, tmp_path: Path):
    import json

    from calibration.ort_session import make_session
    from pipeline.config import CalibrationConfig, load_config
    from pipeline.stages import calibrate
    from tests._digits_run import digits_base

    root = Path(__file__).resolve().parents[2]
    base = digits_base(tmp_path_factory)
    cfg = load_config(root / "configs" / "digits.yaml", params_path=root / "no-params.yaml")
    outs = {}
    for rounding in ("nearest", "gptq"):
        cal = CalibrationConfig(**{**cfg.calibration.model_dump(), "method": "minmax", "weight_rounding": rounding})
        out = tmp_path / rounding
        outs[rounding] = (out, calibrate.run(cfg.model_copy(update={"calibration": cal}), base / "export" / "model.onnx",
                                             base / "prepare" / "calib.npz", out,
                                             validation=base / "validate" / "validate.json", progress=False))
    (near, rn), (gptq, rg) = outs["nearest"], outs["gptq"]
    assert rn.qdq["weight_rounding"] == {"method": "nearest"} and rn.settings["weight_rounding"] == "nearest"
    assert rg.qdq["weight_rounding"]["method"] == "gptq" and rg.qdq["weight_rounding"]["elements_changed"] > 0
    assert json.loads((gptq / "ranges.json").read_text())["weight_rounding"] == "gptq"
    # the cache (implicit route) and the activation scales do not change; the Q/DQ weights do
    assert (near / "calibration.cache").read_bytes() == (gptq / "calibration.cache").read_bytes()
    with np.load(base / "prepare" / "eval.npz") as z:
        x = z["x"] if "x" in z.files else z[[k for k in z.files if k != "y"][0]]
    name = make_session(base / "export" / "model.onnx").get_inputs()[0].name
    ref = make_session(base / "export" / "model.onnx").run(None, {name: x})[0]
    err = {k: float(np.mean((make_session(o / "model.qdq.onnx").run(None, {name: x})[0] - ref) ** 2))
           for k, (o, _) in outs.items()}
    assert err["gptq"] < err["nearest"], err


def test_lazy_block_updates_round_as_the_column_by_column_update_does(monkeypatch):
    from calibration import rounding

    rng = np.random.default_rng(5)
    x = rng.normal(0, 1, (3000, 300)) @ rng.normal(0, 1, (300, 300)) * 0.1  # correlated inputs, D = 300
    h = (x.T @ x / len(x))[None]
    w = rng.normal(0, 1, (40, 300))
    s = (np.abs(w).max(axis=1) / 127).astype(np.float32)
    got = {}
    for block in (7, 128, 10**6):  # 10**6: one block, every column updates the rest of its row itself
        monkeypatch.setattr(rounding, "BLOCK", block)
        got[block] = gptq_rows(w, h, s)
    for block in (7, 128):
        same = np.mean(got[block] == got[10**6])
        assert same > 0.999 and np.abs(got[block].astype(int) - got[10**6]).max() <= 1, (block, same)
    assert np.mean(got[10**6] != np.rint(w / s[:, None])) > 0.05  # and it is not round-to-nearest


def test_bad_weights_and_too_wide_rows_give_one_line_errors_or_nearest(small, tmp_path, monkeypatch):
    import onnx

    from calibration import rounding
    from calibration.errors import CalibrationError
    from calibration.ptq import input_means
    from calibration.qdq import bias_correction_inputs

    path, x = small
    model, nodes = weight_rounding_inputs(path)
    batches = lambda: ({"x": x[i:i + 8]} for i in range(0, 24, 8))  # noqa: E731
    moments = second_moments(model, batches(), nodes)
    means = input_means(onnx.load(str(path)), batches(), bias_correction_inputs(path))
    amax = {t: 4.0 for t in ("x", "r", "f", "g", "a", "b", "p")}
    # a NaN in a weight: the one-line error that names it, with GPTQ and with bias correction alike
    bad = onnx.load(str(path))
    for init in bad.graph.initializer:
        if init.name == "wb":
            w = numpy_helper.to_array(init).copy()
            w[0, 0, 0, 0] = np.nan
            init.CopyFrom(numpy_helper.from_array(w, "wb"))
    onnx.save(bad, str(tmp_path / "bad.onnx"))
    for kwargs in ({"weight_moments": moments}, {"bias_means": means}, {"weight_moments": moments, "bias_means": means}):
        with pytest.raises(CalibrationError, match="'wb'.*NaN or Inf"):
            quantize_qdq(tmp_path / "bad.onnx", tmp_path / "q.onnx", amax, **kwargs)
    assert not (tmp_path / "q.onnx").exists()
    # rows wider than MAX_DIM keep round-to-nearest, and the summary counts them
    monkeypatch.setattr(rounding, "MAX_DIM", 20)  # conv_a's rows are 27 wide
    _, narrow = weight_rounding_inputs(path)
    assert set(narrow) == {"conv_dw", "gemm", "matmul"}
    summary = quantize_qdq(path, tmp_path / "q.onnx", amax, weight_moments=second_moments(model, batches(), narrow))
    assert summary["weight_rounding"]["weights"] == 3 and summary["weight_rounding"]["left_to_nearest"] == 1
    wa = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(tmp_path / "q.onnx")).graph.initializer}["wa_quantized"]
    near, _ = quantize_weight(numpy_helper.to_array(next(i for i in onnx.load(str(path)).graph.initializer
                                                         if i.name == "wa")), 0)
    assert np.array_equal(wa, near)


def test_an_input_with_sentinels_leaves_its_weight_to_nearest(small, tmp_path):
    path, x = small
    model, nodes = weight_rounding_inputs(path)
    poisoned = x[:16].copy()
    poisoned[3, 0, 0, 0] = -np.inf  # a sentinel in the first Conv's input, on one batch of two
    moments = second_moments(model, iter([{"x": x[16:32]}, {"x": poisoned}]), {"conv_a": "x", "gemm": "f"})
    assert "conv_a" not in moments
    assert "gemm" not in moments  # the -inf reaches the pooled features as NaN/Inf too
    summary = quantize_qdq(path, tmp_path / "q.onnx", {t: 4.0 for t in ("x", "r", "f", "g", "b")},
                           weight_moments=moments)
    assert summary["weight_rounding"]["weights"] == 0 and summary["weight_rounding"]["left_to_nearest"] == 4


def test_a_correction_table_made_once_equals_the_means_applied_per_placement(small, tmp_path):
    """tune writes candidates from calibrate's per-node corrections; they must equal what the
    input means give for any set of quantized nodes."""
    import onnx

    from calibration.ptq import input_means
    from calibration.qdq import bias_correction_inputs, bias_correction_table, gptq_weights

    path, x = small
    model, nodes = weight_rounding_inputs(path)
    batches = lambda: ({"x": x[i:i + 8]} for i in range(0, 24, 8))  # noqa: E731
    moments = second_moments(model, batches(), nodes)
    means = input_means(onnx.load(str(path)), batches(), bias_correction_inputs(path))
    rounded = gptq_weights(path, moments)
    table = bias_correction_table(path, means, rounded)
    amax = {t: 4.0 for t in ("x", "r", "f", "g", "a", "b", "p")}
    for exclude in ([], ["conv_dw"], ["conv_a", "matmul"]):
        a, b = tmp_path / "a.onnx", tmp_path / "b.onnx"
        sa = quantize_qdq(path, a, amax, exclude_nodes=exclude, rounded=rounded, bias_means=means)
        sb = quantize_qdq(path, b, amax, exclude_nodes=exclude, rounded=rounded, corrections=table)
        assert sa["bias_corrected"] == sb["bias_corrected"] and not set(exclude) & set(sb["bias_corrected"])
        ia, ib = (({i.name: numpy_helper.to_array(i) for i in onnx.load(str(p)).graph.initializer}) for p in (a, b))
        assert ia.keys() == ib.keys() and all(np.array_equal(ia[k], ib[k]) for k in ia)
