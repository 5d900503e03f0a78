"""SmoothQuant (calibration.smooth): the smoothed FP32 model computes what the original does (onnxruntime
on both), a weight shared with an unsmoothed node stays as it was for that node, the strength search
picks smoothing where input channels carry outliers and reports every candidate's error, and the
calibrate stage with calibration.smooth_quant writes a Q/DQ ONNX of the smoothed model whose cache
names only tensors of the exported one."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from calibration import smooth

IN, HID, OUT, SEQ = 16, 32, 4, 8


def _model(path: Path, shared: bool = False, outlier: float = 40.0) -> Path:
    """x [N, SEQ, IN] -> MatMul W1 -> Relu -> MatMul W2 (-> out); hidden channels 3 and 7 run 40x larger
    (W1's columns) and meet rows of W2 as much smaller, the outliers SmoothQuant moves. ``shared``: a Gemm on a second input reads W2 too
    (and must keep the original W2)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w1 = rng.normal(0, 0.3, (IN, HID)).astype(np.float32)
    w1[:, [3, 7]] *= outlier
    w2 = rng.normal(0, 0.3, (HID, OUT)).astype(np.float32)
    w2[[3, 7], :] /= outlier  # large channels meet small weights (as in transformers): every channel matters
    inits = [numpy_helper.from_array(w1, "W1"), numpy_helper.from_array(w2, "W2")]
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h"], name="/mm1"),
             helper.make_node("Relu", ["h"], ["r"], name="/relu"),
             helper.make_node("MatMul", ["r", "W2"], ["out"], name="/mm2")]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", SEQ, IN])]
    outputs = [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", SEQ, OUT])]
    if shared:
        inputs.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, ["N", HID]))
        nodes.append(helper.make_node("Gemm", ["z", "W2"], ["out2"], name="/gemm_shared"))
        outputs.append(helper.make_tensor_value_info("out2", TensorProto.FLOAT, ["N", OUT]))
    graph = helper.make_graph(nodes, "mlp", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def _feeds(n: int = 16, seed: int = 1, shared: bool = False) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    f = {"x": rng.normal(size=(n, SEQ, IN)).astype(np.float32)}
    if shared:
        f["z"] = rng.normal(size=(n, HID)).astype(np.float32)
    return f


def _run(path, feeds):
    import onnxruntime as ort

    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return s.run(None, feeds)


@pytest.mark.parametrize("shared", [False, True])
def test_smoothed_model_computes_the_same(tmp_path, shared):
    import onnx

    from calibration.onnx_io import load_model

    path = _model(tmp_path / "m.onnx", shared=shared)
    model = load_model(path)
    found = smooth.targets(model)
    assert set(found) == ({"x", "r", "z"} if shared else {"x", "r"})
    batches = [_feeds(8, seed=s, shared=shared) for s in range(3)]
    maxima = smooth.channel_maxima(model, batches, list(found))
    assert maxima["r"].shape == (HID,) and maxima["r"][[3, 7]].min() > 5 * np.median(maxima["r"])
    scales = smooth.plan(model, found, maxima, 0.5)
    done = smooth.apply(model, found, {"r": scales["r"]})
    assert list(done) == ["r"] and done["r"]["consumers"] == ["/mm2"]
    out = tmp_path / "s.onnx"
    onnx.save(model, str(out))
    feeds = _feeds(5, seed=9, shared=shared)
    for a, b in zip(_run(path, feeds), _run(out, feeds)):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4)
    inits = {t.name for t in model.graph.initializer}
    if shared:  # the Gemm still reads the original W2; /mm2 a scaled copy
        gemm = next(n for n in model.graph.node if n.name == "/gemm_shared")
        mm2 = next(n for n in model.graph.node if n.name == "/mm2")
        assert gemm.input[1] == "W2" and mm2.input[1] != "W2" and mm2.input[1] in inits


def test_search_smooths_outlier_channels_and_reports_every_candidate(tmp_path):
    from calibration.onnx_io import load_model

    path = _model(tmp_path / "m.onnx")
    batches = [_feeds(16, seed=s) for s in range(4)]
    chosen, report = smooth.search(path, lambda: iter(batches), tmp_path / "work", method="minmax")
    errors = report["relative_output_error"]
    assert set(errors) == {"none", *map(str, smooth.DEFAULT_ALPHAS)}
    assert report["alpha"] is not None and errors[str(report["alpha"])] < errors["none"]
    assert errors[str(report["alpha"])] == min(errors.values())
    assert chosen != path and chosen.is_file()
    assert any(n.op_type == "Mul" for n in load_model(chosen).graph.node)
    assert sorted(p.name for p in (tmp_path / "work").iterdir()) == [chosen.name]  # the losers are removed
    feeds = _feeds(4, seed=11)
    np.testing.assert_allclose(_run(chosen, feeds)[0], _run(path, feeds)[0], rtol=1e-4, atol=1e-4)


def test_each_candidate_is_scored_on_the_fold_it_was_not_calibrated_on(tmp_path):
    """The unsmoothed candidate's error, worked by hand: minmax ranges from the even batches, its Q/DQ model's
    worst-sample relative L2 error on the odd ones, and the other way round; the report gives the worse."""
    from calibration.collect import collect_histograms
    from calibration.qdq import quantize_qdq
    from calibration.rules import get_rules, ranges_under

    path = _model(tmp_path / "m.onnx")
    batches = [_feeds(16, seed=s) for s in range(4)]
    batches[3]["x"][0] *= 6.0  # one far sample in the odd fold: in-sample minmax would fit it
    _, report = smooth.search(path, lambda: iter(batches), tmp_path / "work", method="minmax")
    worst = []
    for calib, scored in ((batches[0::2], batches[1::2]), (batches[1::2], batches[0::2])):
        col = collect_histograms(path, iter(calib), progress=False, growth=get_rules("tensorrt").growth)
        amax, _, _ = ranges_under(get_rules("tensorrt"), col.histograms, "minmax", col.node_ops, 99.99)
        q = tmp_path / "q.onnx"
        quantize_qdq(path, q, amax)
        for feeds in scored:
            ref, got = _run(path, feeds)[0].astype(np.float64), _run(q, feeds)[0].astype(np.float64)
            rel = ((got - ref) ** 2).sum(axis=(1, 2)) / (ref ** 2).sum(axis=(1, 2))
            worst.append(rel.max())
    assert report["relative_output_error"]["none"] == pytest.approx(max(worst), rel=1e-4)
    assert "other fold" in report["scored_on"]
    _, one = smooth.search(path, lambda: iter(batches[:1]), tmp_path / "work1", method="minmax")
    assert "themselves" in one["scored_on"] and set(one["relative_output_error"]) == set(report["relative_output_error"])


def test_search_with_every_matmul_input_excluded_changes_nothing(tmp_path):
    path = _model(tmp_path / "m.onnx")
    batches = [_feeds(16, seed=s) for s in range(4)]
    chosen, report = smooth.search(path, lambda: iter(batches), tmp_path / "work", method="minmax",
                                   collect_options={"exclude": "*"})
    assert chosen == path and report["alpha"] is None and report["smoothed"] == 0
    assert set(report["left_out"]) == {"x", "r"} and "nothing to smooth" in report["note"]


def test_search_without_matmul_weights_changes_nothing(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"], name="/relu")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])])
    path = tmp_path / "relu.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    chosen, report = smooth.search(path, lambda: iter([{"x": np.ones((2, 4), np.float32)}]), tmp_path)
    assert chosen == path and report["tensors"] == 0 and report["alpha"] is None


def test_nan_activation_is_one_line(tmp_path):
    from calibration.errors import CalibrationError
    from calibration.onnx_io import load_model

    path = _model(tmp_path / "m.onnx")
    model = load_model(path)
    bad = _feeds(4)
    bad["x"][0, 0, 0] = np.nan
    with pytest.raises(CalibrationError, match="has NaN values") as e:
        smooth.channel_maxima(model, [bad], list(smooth.targets(model)))
    assert "\n" not in str(e.value)


def test_calibrate_stage_with_smooth_quant(tmp_path):
    from calibration.cache import read_cache
    from calibration.onnx_io import load_model
    from pipeline.config import Config
    from pipeline.stages.calibrate import calibrate

    path = _model(tmp_path / "m.onnx")
    data = tmp_path / "calib.npz"
    np.savez(data, x=np.concatenate([_feeds(16, seed=s)["x"] for s in range(4)]))
    reports = {}
    for on in (False, True):
        cfg = Config.model_validate({
            "model": {"name": "mlp", "arch": "mlp", "inputs": [{"name": "x", "shape": [SEQ, IN]}],
                      "outputs": [{"name": "out"}]},
            "calibration": {"batch_size": 16, "num_samples": 64, "method": "minmax", "smooth_quant": on}})
        out = tmp_path / f"cal_{on}"
        calibrate(cfg, path, data, out, progress=False)
        reports[on] = json.loads((out / "calibrate.json").read_text())
        q = load_model(out / "model.qdq.onnx")
        muls = [n for n in q.graph.node if n.op_type == "Mul"]
        assert bool(muls) is on
        cache = read_cache(out / "calibration.cache")
        known = {"x", "h", "r", "out"}
        assert set(cache.scales) <= known  # the smoothed tensors exist only in the Q/DQ ONNX
    sq = reports[True]["qdq"]["smooth_quant"]
    assert sq["alpha"] is not None and sq["tensors"] == 2
    assert sq["relative_output_error"][str(sq["alpha"])] < sq["relative_output_error"]["none"]
    assert "smooth_quant" not in reports[False]["qdq"] and reports[True]["settings"]["smooth_quant"] is True


def test_excluded_and_sentinel_tensors_are_not_smoothed(tmp_path):
    """A tensor calibration.exclude names, or one carrying +-Inf (a mask), keeps its consumers as they
    were: smoothing would hand the MatMul a new, calibrated input and bypass the exclusion."""
    from calibration.onnx_io import load_model

    path = _model(tmp_path / "m.onnx")
    batches = [_feeds(16, seed=s) for s in range(4)]
    chosen, report = smooth.search(path, lambda: iter(batches), tmp_path / "w1", method="minmax",
                                   collect_options={"exclude": ["r"]})
    assert report["left_out"] == {"r": "calibration.exclude 'r'"}
    mm2 = next(n for n in load_model(chosen).graph.node if n.name == "/mm2")
    assert mm2.input[0] == "r"  # not smoothed
    inf = [{"x": np.where(np.arange(IN) == 0, np.inf, b["x"]).astype(np.float32)} for b in batches]
    assert smooth.channel_maxima(load_model(path), inf, ["x"]) == {}  # x carries Inf: left out, not an error
    assert set(smooth.channel_maxima(load_model(path), batches, ["x"])) == {"x"}
