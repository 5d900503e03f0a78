"""Collecting activation histograms with onnxruntime: the right tensors, exact max|x|
against independent references (PyTorch forward hooks; onnxruntime with every tensor
exposed on the whole array at once), one session, and clear errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from calibration.collect import ActivationCollector, calibration_tensors, collect_histograms
from pipeline.data import calibration_batches
from calibration.errors import CalibrationError
from calibration.histogram import AbsHistogram
from tests.calibration.nets import _photo_crops, export, residual_cnn

FIXTURE_CACHE = (Path(__file__).resolve().parents[2] / ".." / "shared" / "fixtures" / "trt86-resnet18-entropy2"
                 / "tensorrt-8.6.0.cache").resolve()


@pytest.fixture(scope="module")
def cnn(tmp_path_factory) -> tuple[Path, np.ndarray, object]:
    data = _photo_crops(100, 24, seed=0)
    net = residual_cnn()
    path = export(net, tmp_path_factory.mktemp("cnn") / "cnn.onnx", data)
    return path, data, net


def _all_outputs_reference(onnx_path: Path, names: list[str], x: np.ndarray) -> dict[str, np.ndarray]:
    """Every named tensor over the whole array in one onnxruntime run (no optimizations)."""
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(onnx_path))
    for n in names:
        if n not in {o.name for o in model.graph.output} and n != "input":
            model.graph.output.append(onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None))
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    wanted = [n for n in names if n != "input"]
    return {"input": x, **dict(zip(wanted, sess.run(wanted, {"input": x})))}


def test_tensors_are_graph_input_and_every_float_activation(cnn):
    import onnx

    path, _, _ = cnn
    model = onnx.load(str(path))
    names = calibration_tensors(model)
    assert names[0] == "input"
    produced = [o for node in model.graph.node for o in node.output]
    assert set(names) - {"input"} <= set(produced)
    ops = {o: node.op_type for node in model.graph.node for o in node.output}
    kinds = {ops[n] for n in names[1:]}
    assert {"Conv", "Relu", "Add", "MaxPool", "ReduceMean", "Gemm"} <= kinds
    assert not any(ops.get(n) in ("Constant", "Shape") for n in names)
    quantizable = calibration_tensors(model, "quantizable")
    consumers = {i for node in model.graph.node if node.op_type in ("Conv", "Gemm") for i in node.input[:1]}
    assert set(quantizable) == consumers | {"input"}
    with pytest.raises(CalibrationError, match="unknown tensor scope"):
        calibration_tensors(model, "some")


def test_max_abs_and_counts_match_independent_references(cnn):
    import torch

    path, data, net = cnn
    x = data[:96]
    col = collect_histograms(path, calibration_batches(x, np.arange(96), 32), total=3, progress=False)
    assert col.stats.batches == 3 and col.stats.samples == 96
    ref = _all_outputs_reference(path, col.tensor_names, x)
    for name, hist in col.histograms.items():
        assert hist.num_samples == ref[name].size, name
        np.testing.assert_allclose(hist.max_abs, np.abs(ref[name]).max(), rtol=1e-5, err_msg=name)
        # Width is fixed by the first batch; the final counts are every value binned at that width.
        first_max = float(np.abs(ref[name][:32]).max())
        width = first_max / 2048
        assert hist.bin_width == pytest.approx(width, rel=1e-5), name
        idx = np.minimum((np.abs(ref[name].astype(np.float64)) / hist.bin_width).astype(np.int64), hist.num_bins - 1)
        expected = np.bincount(idx.ravel(), minlength=hist.num_bins)
        assert np.abs(expected - hist.counts).sum() <= 1e-4 * hist.num_samples + 2, name

    # PyTorch forward hooks: the graph input, the stem ReLU and the logits.
    seen: dict[str, np.ndarray] = {}
    hooks = [net.stem[2].register_forward_hook(lambda m, i, o: seen.__setitem__("relu", o.numpy())),
             net.head.register_forward_hook(lambda m, i, o: seen.__setitem__("logits", o.numpy()))]
    with torch.no_grad():
        net(torch.from_numpy(x))
    for h in hooks:
        h.remove()
    np.testing.assert_allclose(col.histograms["logits"].max_abs, np.abs(seen["logits"]).max(), rtol=1e-4)
    relu = [n for n in col.tensor_names if "stem" in n and n.endswith("Relu_output_0")]
    assert relu, col.tensor_names
    np.testing.assert_allclose(col.histograms[relu[0]].max_abs, np.abs(seen["relu"]).max(), rtol=1e-4)
    assert col.histograms["input"].max_abs == float(np.abs(x).max())


def test_growth_rule_across_batches(cnn):
    path, data, _ = cnn
    x = data[:64].copy()
    x[32:] *= 3.0  # the second batch is larger: bins are appended, the width is kept
    col = collect_histograms(path, calibration_batches(x, np.arange(64), 32), progress=False)
    h = col.histograms["input"]
    assert h.bin_width == pytest.approx(np.abs(x[:32]).max() / 2048)
    assert h.num_bins > 2048
    ref = AbsHistogram(name="input")
    ref.update(x[:32])
    ref.update(x[32:])
    np.testing.assert_array_equal(h.counts, ref.counts)


def test_one_session_for_all_batches(cnn, monkeypatch):
    import onnxruntime as ort

    path, data, _ = cnn
    made = []
    real = ort.InferenceSession

    def counting(*a, **k):
        made.append(1)
        return real(*a, **k)

    monkeypatch.setattr(ort, "InferenceSession", counting)
    collect_histograms(path, calibration_batches(data, np.arange(96), 16), progress=False)
    assert len(made) == 1


def _log_model(path: Path) -> Path:
    """input -> Log -> 'log_out' -> Relu -> 'y'; Log of a negative number is NaN, of 0 is -inf."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Log", ["input"], ["log_out"]), helper.make_node("Relu", ["log_out"], ["y"])], "g",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["b", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 4])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def test_nan_activation_names_tensor_and_batch(tmp_path: Path):
    path = _log_model(tmp_path / "log.onnx")
    x = np.random.default_rng(0).uniform(0.5, 2.0, (48, 4)).astype(np.float32)
    x[37, 2] = -1.0  # log(-1) = NaN in batch 2 (of 16 samples): samples 32..47
    with pytest.raises(CalibrationError,
                       match=r"batch 2 \(samples 32\.\.47 of calib\.npy\).*'log_out' has 1 NaN and 0 Inf"):
        collect_histograms(path, calibration_batches(x, np.arange(48), 16), progress=False, source="calib.npy")


def test_inf_activation_is_excluded_not_fatal(tmp_path: Path):
    """log(0) = -inf: the tensor is left out of calibration (kept in higher precision) and
    said why; the rest is calibrated (Relu(-inf) = 0 is finite)."""
    path = _log_model(tmp_path / "log.onnx")
    x = np.random.default_rng(0).uniform(0.5, 2.0, (48, 4)).astype(np.float32)
    x[37, 2] = 0.0
    col = collect_histograms(path, calibration_batches(x, np.arange(48), 16), progress=False, source="calib.npy")
    assert set(col.histograms) == {"input", "y"}
    assert "-inf" in col.excluded["log_out"] and "batch 2" in col.excluded["log_out"]
    assert "higher precision" in col.excluded["log_out"]
    assert col.excluded_max_abs["log_out"] == np.inf
    assert col.histograms["y"].num_samples == x.size
    assert col.histograms["y"].max_abs == pytest.approx(float(np.log(x.max())), rel=1e-6)


def test_nan_in_the_data_itself_names_the_input(tmp_path: Path):
    path = _log_model(tmp_path / "log.onnx")
    x = np.ones((32, 4), np.float32)
    x[3, 0] = np.nan
    with pytest.raises(CalibrationError, match=r"batch 0 .*tensor 'input' has 1 NaN"):
        collect_histograms(path, calibration_batches(x, np.arange(32), 16), progress=False)


def test_fewer_samples_than_a_batch_and_bad_tensors(cnn):
    path, data, _ = cnn
    with pytest.raises(CalibrationError, match="fewer than one batch"):
        collect_histograms(path, calibration_batches(data[:5], np.arange(5), 8), progress=False)
    with pytest.raises(CalibrationError, match=r"no_such_tensor.*neither graph inputs nor node outputs"):
        ActivationCollector(path, tensors=["input", "no_such_tensor"])
    with pytest.raises(CalibrationError, match="no calibration batches"):
        collect_histograms(path, iter([]), progress=False)


@pytest.mark.slow
def test_tensorrt_calibrates_the_same_tensors(tmp_path: Path):
    """Every tensor TensorRT 8.6 wrote a non-zero scale for (and the ONNX names) is collected."""
    import torch
    import torchvision

    from calibration.cache import read_cache

    if not FIXTURE_CACHE.is_file():
        pytest.skip(f"TensorRT fixture not found at {FIXTURE_CACHE}")
    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval()
    path = export(model, tmp_path / "resnet18.onnx", np.zeros((1, 3, 224, 224), np.float32))
    import onnx

    names = set(calibration_tensors(onnx.load(str(path))))
    cache = read_cache(FIXTURE_CACHE)
    trt = {n for n, s in cache.scales.items() if s != 0 and not n.startswith("(Unnamed Layer")}
    assert len(trt) >= 50
    assert trt <= names, sorted(trt - names)


def test_pipelined_equals_serial(cnn):
    path, data, _ = cnn
    runs = [collect_histograms(path, calibration_batches(data, np.arange(96), 16), progress=False,
                               pipeline=p, threads=1) for p in (False, True)]
    assert runs[1].stats.pipelined and runs[1].stats.batches == 6
    for name in runs[0].tensor_names:
        a, b = runs[0].histograms[name], runs[1].histograms[name]
        assert (a.bin_width, a.max_abs, a.num_samples) == (b.bin_width, b.max_abs, b.num_samples), name
        np.testing.assert_array_equal(a.counts, b.counts, err_msg=name)
    np.testing.assert_array_equal(runs[0].first_outputs["logits"], runs[1].first_outputs["logits"])


def _typed_by_full_inference(model) -> dict[str, int]:
    """What _element_types gave before: shape inference on the whole model."""
    import onnx

    inferred = onnx.shape_inference.infer_shapes(model, check_type=False, strict_mode=False)
    infos = list(inferred.graph.input) + list(inferred.graph.value_info) + list(inferred.graph.output)
    types = {vi.name: vi.type.tensor_type.elem_type for vi in infos
             if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type}
    types.update({init.name: init.data_type for init in inferred.graph.initializer})
    return types


def test_types_without_the_weights_equal_full_inference(cnn, monkeypatch):
    """Shape inference runs without the values of large initializers (the weights), keeping
    the small ones it reads (Reshape's shape here, from a graph built with large weights, a
    Cast and an int64 path); the types are those inference on the whole model gives, and the
    caller's model keeps its weights. Past protobuf's 2 GiB the whole model goes to inference
    (and fails there, as before)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    import calibration.collect as collect

    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.normal(size=(64, 8192)).astype(np.float32), "w")  # > TYPING_KEEP_ELEMENTS
    shape = numpy_helper.from_array(np.array([-1, 2, 32], np.int64), "shape")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["mm"]), helper.make_node("Reshape", ["mm", "shape"], ["r"]),
             helper.make_node("Cast", ["r"], ["half"], to=TensorProto.FLOAT16),
             helper.make_node("Shape", ["half"], ["dims"]), helper.make_node("Relu", ["r"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None),
                               helper.make_tensor_value_info("dims", TensorProto.INT64, None)], [w, shape])
    built = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    for model in (built, onnx.load(str(cnn[0]))):
        assert collect._element_types(model) == _typed_by_full_inference(model)
    light = collect._typing_copy(built)
    assert [i.HasField("raw_data") for i in light.graph.initializer] == [False, True]  # w left out, shape kept
    assert all(i.HasField("raw_data") for i in built.graph.initializer)  # the caller's model is whole
    assert collect._element_types(built)["r"] == TensorProto.FLOAT and collect._element_types(built)["half"] == 10
    assert collect._element_types(built)["dims"] == TensorProto.INT64
    monkeypatch.setattr(collect, "_PROTOBUF_LIMIT", 1000)  # "too large to serialize": the model itself
    assert collect._typing_copy(built) is built
