"""Post-training quantization methods of the calibrate stage (issue 21 item 1): the ``mse``
range search, Clip/ReLU6-aware ranges and bias correction of quantized weights, each on
real runs of the code (histograms, onnxruntime sessions of real Q/DQ models)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from calibration.algorithms import mse_amax, mse_candidates
from calibration.collect import collect_histograms
from calibration.histogram import AbsHistogram
from calibration.ort_session import make_session
from calibration.ptq import clip_amax_bounds, input_means
from calibration.qdq import bias_correction_inputs, quantize_qdq, read_qdq_scales
from calibration.rules import get_rules, ranges_under


# -- mse search ---------------------------------------------------------------------------
def _fake_quant_mse(x: np.ndarray, amax: float) -> float:
    """Symmetric INT8 fake quantization error of the data itself, written here from scratch."""
    s = amax / 127.0
    q = np.clip(np.round(x / s), -127, 127) * s
    return float(np.mean((x - q) ** 2))


def _centre_mse(counts: np.ndarray, width: float, amax: float) -> float:
    """The same error on a histogram, each bin's values at its centre (a loop, not the code's)."""
    total, err = counts.sum(), 0.0
    s = amax / 127.0
    for j, c in enumerate(counts):
        if c:
            x = (j + 0.5) * width
            q = min(round(x / s), 127) * s
            err += c * (x - q) ** 2
    return err / total


@pytest.fixture(scope="module")
def outlier_hist():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(0, 1, 1_000_000), [-30.0]]).astype(np.float32)
    hist = AbsHistogram(2048, name="t", growth="double")
    for part in np.array_split(x, 8):
        hist.update(part)
    return x, hist


def test_mse_search_picks_the_candidate_with_the_least_quantization_error(outlier_hist):
    x, hist = outlier_hist
    cands = mse_candidates(hist, bin_offset=0.5)
    assert {"entropy", "p99.9", "p99.99", "p99.999", "max"} <= set(cands) and len(cands) > 30
    amax, picked = mse_amax(hist, bin_offset=0.5)
    assert cands[picked] == amax
    on_hist = {k: _centre_mse(hist.counts, hist.bin_width, a) for k, a in cands.items()}
    assert all(on_hist[picked] <= e * (1 + 1e-9) for e in on_hist.values())
    # On the data itself the choice is as good as the best candidate to within the binning's
    # approximation, and far better than the outlier's max|x| (30).
    on_data = {k: _fake_quant_mse(x, a) for k, a in cands.items()}
    assert on_data[picked] <= min(on_data.values()) * 1.05
    assert on_data[picked] < 0.3 * on_data["max"]
    assert amax < 10 and hist.max_abs == 30.0


def test_mse_search_on_uniform_data_keeps_the_whole_range():
    x = np.linspace(-3, 3, 100_001).astype(np.float32)
    hist = AbsHistogram(2048)
    hist.update(x)
    amax, _ = mse_amax(hist)
    assert amax == pytest.approx(3.0, rel=0.02)  # clipping uniform data only adds error


# -- a small network: Conv -> Clip(0, 6) -> Pad -> depthwise Conv -> pool -> Gemm -> MatMul ----
def _net(rng: np.random.Generator) -> "onnx.ModelProto":  # noqa: F821
    def spiky(shape, big):
        w = rng.uniform(0.02, 0.3, shape) * rng.choice([-1, 1], shape)
        flat = w.reshape(shape[0], -1)
        flat[:, 0] = big  # one large weight per channel: a coarse scale, a systematic error in the rest
        return w.astype(np.float32)

    inits = [
        numpy_helper.from_array(spiky((8, 3, 3, 3), 4.0), "wa"),
        numpy_helper.from_array(rng.normal(0, 0.5, 8).astype(np.float32), "ba"),
        numpy_helper.from_array(np.array(0.0, np.float32), "lo"),
        numpy_helper.from_array(np.array(6.0, np.float32), "hi"),
        numpy_helper.from_array(np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64), "pads"),
        numpy_helper.from_array(spiky((8, 1, 3, 3), 3.0), "wb"),
        numpy_helper.from_array(spiky((6, 8), 2.0), "wg"),
        numpy_helper.from_array(rng.normal(0, 0.1, 6).astype(np.float32), "bg"),
        numpy_helper.from_array(spiky((6, 4), 2.0).reshape(6, 4), "wm"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "wa", "ba"], ["a"], name="conv_a", pads=[1, 1, 1, 1]),
        helper.make_node("Clip", ["a", "lo", "hi"], ["a6"], name="relu6"),
        helper.make_node("Pad", ["a6", "pads"], ["a6p"], name="pad"),
        helper.make_node("Conv", ["a6p", "wb"], ["b"], name="conv_dw", group=8, strides=[2, 2]),
        helper.make_node("GlobalAveragePool", ["b"], ["p"], name="pool"),
        helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "wg", "bg"], ["g"], name="gemm", transB=1),
        helper.make_node("MatMul", ["g", "wm"], ["y"], name="matmul"),
    ]
    graph = helper.make_graph(nodes, "ptq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 12, 12])],
                              [helper.make_tensor_value_info("b", TensorProto.FLOAT, ["n", 8, 6, 6]),
                               helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    import onnx

    rng = np.random.default_rng(1)
    d = tmp_path_factory.mktemp("ptq")
    path = d / "net.onnx"
    onnx.save(_net(rng), str(path))
    calib = (rng.uniform(0, 1, (256, 3, 12, 12)) + 0.3).astype(np.float32)
    held = (rng.uniform(0, 1, (256, 3, 12, 12)) + 0.3).astype(np.float32)
    batches = lambda: (calib[i:i + 32] for i in range(0, len(calib), 32))  # noqa: E731
    col = collect_histograms(path, batches(), progress=False, growth="double")
    return path, calib, held, batches, col


def test_relu6_bound_caps_the_clip_output_and_what_passes_it_on(small, tmp_path: Path):
    import onnx

    path, _, _, _, col = small
    bounds = clip_amax_bounds(onnx.load(str(path)))
    assert bounds == {"a6": 6.0, "a6p": 6.0}
    assert col.histograms["a6p"].max_abs == 6.0  # the data saturates the clip
    rules = get_rules("tensorrt")
    for method in ("entropy", "mse", "minmax", "percentile"):
        free, _, _ = ranges_under(rules, col.histograms, method, col.node_ops)
        capped, _, _ = ranges_under(rules, col.histograms, method, col.node_ops, bounds=bounds)
        assert capped["a6p"] <= 6.0 and capped["a6"] <= 6.0
        assert capped["x"] == free["x"] and capped["b"] == free["b"]  # unbounded tensors untouched
        if method == "entropy":
            assert free["a6p"] > 6.0  # TensorRT's half-bin offset puts it above the bound
    amax, _, _ = ranges_under(rules, col.histograms, "entropy", col.node_ops, bounds=bounds)
    quantize_qdq(path, tmp_path / "q.onnx", amax)
    assert float(read_qdq_scales(tmp_path / "q.onnx")["a6p"]["scale"]) <= np.float32(6.0 / 127)


def _channel_mean_errors(fp32: Path, qdq: Path, x: np.ndarray) -> dict[str, np.ndarray]:
    ref = make_session(fp32).run(["b", "y"], {"x": x})
    got = make_session(qdq).run(["b", "y"], {"x": x})
    return {"b": (got[0] - ref[0]).astype(np.float64).mean(axis=(0, 2, 3)),
            "y": (got[1] - ref[1]).astype(np.float64).mean(axis=0)}


def test_bias_correction_removes_the_mean_error_per_channel_on_held_out_data(small, tmp_path: Path):
    import onnx

    path, _, held, batches, col = small
    amax, _, _ = ranges_under(get_rules("tensorrt"), col.histograms, "minmax", col.node_ops)
    wanted = bias_correction_inputs(path)
    assert wanted == {"x": "Conv", "a6p": "Conv", "f": "Gemm", "g": "MatMul"}
    means = input_means(onnx.load(str(path)), ({"x": b} for b in batches()), wanted)
    assert means["x"].shape == (3, 12, 12) and means["f"].shape == (8,)

    plain, corrected = tmp_path / "plain.onnx", tmp_path / "corrected.onnx"
    quantize_qdq(path, plain, amax)
    summary = quantize_qdq(path, corrected, amax, bias_means=means)
    assert set(summary["bias_corrected"]) == {"conv_a", "conv_dw", "gemm", "matmul"}
    model = onnx.load(str(corrected))
    dw = next(n for n in model.graph.node if n.name == "conv_dw")
    assert len(dw.input) == 3  # a bias was added to the Conv that had none
    assert sum(n.op_type == "Add" for n in model.graph.node) == 1  # and an Add after the MatMul

    before = _channel_mean_errors(path, plain, held)
    after = _channel_mean_errors(path, corrected, held)
    for out in ("b", "y"):
        scale = np.abs(before[out]).max()
        assert scale > 1e-3, "the test net must have a systematic error to correct"
        assert np.abs(after[out]).max() < 0.35 * scale, (out, before[out], after[out])
        assert np.abs(after[out]).mean() < 0.35 * np.abs(before[out]).mean()


# -- through the calibrate stage ------------------------------------------------------------
def _biases(path: Path) -> dict[str, np.ndarray]:
    import onnx

    m = onnx.load(str(path))
    inits = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}
    return {n.name: inits[n.input[2]] for n in m.graph.node
            if n.op_type in ("Conv", "Gemm") and len(n.input) > 2 and n.input[2] in inits}


@pytest.mark.parametrize("bias_correction", [False, True])
def test_calibrate_stage_mse_clip_aware_and_bias_correction(tmp_path_factory, tmp_path: Path, bias_correction):
    import json

    from calibration.cache import read_cache
    from pipeline.config import CalibrationConfig, load_config
    from pipeline.stages import calibrate
    from tests._digits_run import digits_base

    root = Path(__file__).resolve().parents[2]
    base = digits_base(tmp_path_factory)
    cfg = load_config(root / "configs" / "digits.yaml", params_path=root / "no-params.yaml")
    cal = CalibrationConfig(**{**cfg.calibration.model_dump(), "method": "mse", "clip_aware": True,
                               "bias_correction": bias_correction})
    cfg = cfg.model_copy(update={"calibration": cal})
    out = tmp_path / "calibrate"
    report = calibrate.run(cfg, base / "export" / "model.onnx", base / "prepare" / "calib.npz", out,
                           validation=base / "validate" / "validate.json", progress=False)
    ranges = json.loads((out / "ranges.json").read_text())
    assert ranges["method"] == "mse" and ranges["bias_correction"] is bias_correction
    cache = read_cache(out / "calibration.cache", expect_version="8.6.0", expect_algorithm="EntropyCalibration2")
    assert cache  # mse scales go under EntropyCalibration2, which TensorRT reads as they are
    assert report.settings["clip_aware"] is True and report.qdq["check_first_samples"]["logits"]["cosine_min"] > 0.99
    fp32, qdq = _biases(base / "export" / "model.onnx"), _biases(out / "model.qdq.onnx")
    assert set(qdq) == set(fp32) and fp32
    changed = [n for n in fp32 if not np.array_equal(fp32[n], qdq[n])]
    if bias_correction:
        assert report.qdq["bias_corrected_nodes"] == len(fp32) and len(changed) == len(fp32)
    else:
        assert report.qdq["bias_corrected_nodes"] is None and changed == []


# -- cross-layer equalization of Conv -> ReLU6 -> depthwise ------------------------------------
def _pair_net(rng: np.random.Generator, path: Path) -> None:
    import onnx

    scale = np.geomspace(0.01, 1.0, 8)  # channel c of the first conv spans 1% .. 100% of the range
    wa = (rng.normal(0, 1, (8, 3, 3, 3)) * scale.reshape(-1, 1, 1, 1)).astype(np.float32)
    inits = [numpy_helper.from_array(wa, "wa"), numpy_helper.from_array((0.1 * scale).astype(np.float32), "ba"),
             numpy_helper.from_array(np.array(0.0, np.float32), "lo"),
             numpy_helper.from_array(np.array(6.0, np.float32), "hi"),
             numpy_helper.from_array(np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64), "pads"),
             numpy_helper.from_array(rng.normal(0, 1, (8, 1, 3, 3)).astype(np.float32), "wb"),
             numpy_helper.from_array(rng.normal(0, 0.1, 8).astype(np.float32), "bb")]
    nodes = [helper.make_node("Conv", ["x", "wa", "ba"], ["a"], name="conv_a", pads=[1, 1, 1, 1]),
             helper.make_node("Clip", ["a", "lo", "hi"], ["a6"], name="relu6"),
             helper.make_node("Pad", ["a6", "pads"], ["a6p"], name="pad"),
             helper.make_node("Conv", ["a6p", "wb", "bb"], ["b"], name="conv_dw", group=8)]
    graph = helper.make_graph(nodes, "cle", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 10, 10])],
                              [helper.make_tensor_value_info("b", TensorProto.FLOAT, ["n", 8, 10, 10])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))


def test_equalization_keeps_the_function_and_makes_small_channels_survive_int8(tmp_path: Path):
    import onnx

    from calibration.ptq import channel_max, depthwise_pairs, equalize_depthwise

    rng = np.random.default_rng(2)
    fp32, eq = tmp_path / "fp32.onnx", tmp_path / "eq.onnx"
    _pair_net(rng, fp32)
    calib = rng.normal(0, 2, (128, 3, 10, 10)).astype(np.float32)
    held = rng.normal(0, 2, (64, 3, 10, 10)).astype(np.float32)
    batches = lambda: ({"x": calib[i:i + 32]} for i in range(0, len(calib), 32))  # noqa: E731
    model = onnx.load(str(fp32))
    assert [(p.name, [n.op_type for n in c], d.name) for p, c, d in depthwise_pairs(model)] == \
        [("conv_a", ["Pad", "Clip"], "conv_dw")]
    before = channel_max(model, batches(), ["a6p"])["a6p"]
    assert before.min() < 0.1 * before.max() and before.max() <= 6.0
    scales = equalize_depthwise(model, {"a6p": before}, margin=0.7)
    onnx.save(model, str(eq))
    after = channel_max(onnx.load(str(eq)), batches(), ["a6p"])["a6p"]
    small = before < 0.7 * 6
    assert np.allclose(after[small], 4.2, rtol=1e-5) and np.allclose(after[~small], before[~small])
    assert np.allclose(np.array(scales["conv_dw"]) * before, np.maximum(before, 4.2), rtol=1e-5)

    ref = make_session(fp32).run(None, {"x": held})[0]
    assert np.allclose(make_session(eq).run(None, {"x": held})[0], ref, rtol=1e-4, atol=1e-4)

    def int8_error(src: Path) -> float:
        col = collect_histograms(src, (b["x"] for b in batches()), progress=False, growth="double")
        amax, _, _ = ranges_under(get_rules("tensorrt"), col.histograms, "minmax", col.node_ops)
        quantize_qdq(src, tmp_path / "q.onnx", amax)
        got = make_session(tmp_path / "q.onnx").run(None, {"x": held})[0]
        # relative error of each output channel: the small ones are what per-tensor INT8 loses
        return ((got - ref) ** 2).mean(axis=(0, 2, 3)) / (ref ** 2).mean(axis=(0, 2, 3))

    plain, equalized = int8_error(fp32), int8_error(eq)
    assert equalized.max() < 0.1 * plain.max() and np.median(equalized) < 0.5 * np.median(plain), (plain, equalized)
