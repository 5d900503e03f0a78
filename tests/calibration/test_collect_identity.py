"""The collector's histograms are bit for bit those of the commit-9b9dfe4 AbsHistogram
(tests/calibration/reference_histogram.py) fed the same activations in the same order,
whatever the kernel (numpy, compiled, the GPU path's edge table on the CPU), the number
of binning threads and pipelining, under both growth rules: on a real CNN's activations
of real photos with a range that grows in later batches, and on a graph built with
onnx.helper whose tensors start all-zero and whose input sits exactly on bin edges."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from calibration.collect import ActivationCollector, collect_histograms
from tests.calibration.nets import _photo_crops, export, residual_cnn
from tests.calibration.reference_histogram import AbsHistogram as Reference

VARIANTS = [
    {"kernel": "numpy", "histogram_threads": 1},
    {"kernel": "auto", "histogram_threads": 3},
    {"kernel": "auto", "histogram_threads": 2, "pipeline": True},
    {"kernel": "numpy", "histogram_threads": 3, "pipeline": True},
    {"device": "cpu:numpy", "histogram_threads": 2},
]


def reference_histograms(path, batches, growth, monkeypatch, **options):
    """Histograms of the commit-9b9dfe4 AbsHistogram, fed every tensor as onnxruntime
    returns it from a collector that fetches them all (``derive=False``: Relu outputs
    come from onnxruntime, not from their inputs)."""
    seen: list[tuple[dict[str, np.ndarray], dict[str, np.ndarray]]] = []
    real = ActivationCollector._run

    def run(self, feeds, where):
        values, seconds = real(self, feeds, where)
        seen.append(({k: v.copy() for k, v in feeds.items()},
                     {n: np.array(v) for n, v in zip(self._outputs, values)}))
        return values, seconds

    with monkeypatch.context() as m:
        m.setattr(ActivationCollector, "_run", run)
        col = collect_histograms(path, batches, progress=False, growth=growth, derive=False, kernel="numpy",
                                 histogram_threads=1, **options)
    assert not col.derived and len(seen) == col.stats.batches
    hists = {n: Reference(name=n, growth=growth) for n in col.tensor_names}
    for feeds, values in seen:
        for n, h in hists.items():
            h.update(feeds[n] if n in feeds else values[n])
    return hists


def _assert_identical(col, ref):
    assert set(col.histograms) == set(ref)
    for name, hist in col.histograms.items():
        want = ref[name]
        np.testing.assert_array_equal(hist.counts, want.counts, err_msg=name)
        assert hist.bin_width == want.bin_width, name
        assert hist.max_abs == want.max_abs, name
        assert hist.num_samples == want.num_samples, name
        np.testing.assert_array_equal(hist.edges, want.edges, err_msg=name)


@pytest.fixture(scope="module")
def cnn(tmp_path_factory):
    data = _photo_crops(96, 24, seed=3)
    data[32:64] *= 3.0  # batch 1 exceeds batch 0's range: growth
    data[64:] *= 0.5
    path = export(residual_cnn(), tmp_path_factory.mktemp("cnn") / "cnn.onnx", data)
    return path, data


def _zero_start_model(path: Path) -> Path:
    """input -> Sub(1.5) -> Relu -> 'shifted' -> Mul(-3) -> 'negated' -> Relu -> 'dead' (never
    positive), and input -> Abs -> 'abs_in'. With inputs below 1.5 in the first batch,
    'shifted' and 'negated' start all-zero."""
    import onnx
    from onnx import TensorProto, helper

    nodes = [helper.make_node("Sub", ["input", "c"], ["sub"]), helper.make_node("Relu", ["sub"], ["shifted"]),
             helper.make_node("Mul", ["shifted", "m"], ["negated"]), helper.make_node("Relu", ["negated"], ["dead"]),
             helper.make_node("Abs", ["input"], ["abs_in"])]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["b", 64])],
        [helper.make_tensor_value_info("dead", TensorProto.FLOAT, ["b", 64]),
         helper.make_tensor_value_info("abs_in", TensorProto.FLOAT, ["b", 64])],
        [helper.make_tensor("c", TensorProto.FLOAT, [], [1.5]), helper.make_tensor("m", TensorProto.FLOAT, [], [-3.0])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def _edge_batches(rng) -> np.ndarray:
    """Batch 0: max|x| = 1.0 exactly, so the width is 2**-11 and every value k * 2**-11 sits
    on an edge; later batches hit those edges, the top, and grow past it."""
    edges = np.arange(2049, dtype=np.float32) / 2048
    b0 = rng.choice(np.concatenate([edges, -edges]), (16, 64)).astype(np.float32)
    b0[0, 0] = 1.0
    b1 = rng.choice(np.concatenate([edges, -edges]), (16, 64)).astype(np.float32)
    b2 = (b1 * 2.75).astype(np.float32)  # grows; 1.5 + k/2048 values in 'shifted'
    b3 = rng.normal(0, 2, (16, 64)).astype(np.float32)
    return np.concatenate([b0, b1, b2, b3])


@pytest.mark.parametrize("growth", ["append", "double"])
@pytest.mark.parametrize("options", VARIANTS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_real_cnn_histograms_are_identical(cnn, monkeypatch, growth, options):
    path, data = cnn
    ref = reference_histograms(path, (data[i:i + 32] for i in range(0, 96, 32)), growth, monkeypatch)
    col = collect_histograms(path, (data[i:i + 32] for i in range(0, 96, 32)), progress=False, growth=growth,
                             **options)
    assert col.stats.batches == 3
    assert {"Relu"} <= {op for op, _, outs in col.node_ops if outs[0] in col.derived}  # Relus binned from inputs
    assert any(h.num_bins > 2048 for h in col.histograms.values()) or growth == "double"
    _assert_identical(col, ref)


@pytest.mark.parametrize("growth", ["append", "double"])
@pytest.mark.parametrize("options", VARIANTS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_zero_start_and_edge_values_are_identical(tmp_path, monkeypatch, growth, options):
    path = _zero_start_model(tmp_path / "zero.onnx")
    x = _edge_batches(np.random.default_rng(0))
    ref = reference_histograms(path, (x[i:i + 16] for i in range(0, 64, 16)), growth, monkeypatch)
    col = collect_histograms(path, (x[i:i + 16] for i in range(0, 64, 16)), progress=False, growth=growth,
                             **options)
    assert set(col.derived) == {"shifted"}  # Relu of 'sub'; 'dead' is a model output, fetched
    doublings = int(np.ceil(np.log2(np.abs(x).max()))) if growth == "double" else 0  # the first max is 1.0
    assert col.histograms["input"].bin_width == 2.0 ** (doublings - 11)
    assert ref["dead"].num_bins == 0 and ref["dead"].num_samples == x.size  # zero all along
    first_shifted = np.maximum(x[:16] - np.float32(1.5), 0)
    assert not first_shifted.any() and ref["shifted"].bin_width > 0  # all-zero first batch, then binned
    _assert_identical(col, ref)


def test_torch_cpu_runs_the_device_path_identically(cnn, monkeypatch):
    pytest.importorskip("torch")
    path, data = cnn
    for growth in ("append", "double"):
        ref = reference_histograms(path, (data[i:i + 32] for i in range(0, 96, 32)), growth, monkeypatch)
        col = collect_histograms(path, (data[i:i + 32] for i in range(0, 96, 32)), progress=False, growth=growth,
                                 device="cpu:torch")
        assert col.stats.kernel == "torch:cpu" and col.stats.device == "cpu"
        _assert_identical(col, ref)


def test_derived_tensors():
    """Relu outputs come from their inputs (positive part), data-movement ops from their
    input as they are; chains resolve to a fetched tensor; model outputs are fetched."""
    from onnx import TensorProto, helper

    from calibration.collect import derivable_tensors

    nodes = [helper.make_node("Conv", ["x", "w"], ["c"]), helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("Flatten", ["r"], ["f"]), helper.make_node("Relu", ["f"], ["rr"]),
             helper.make_node("Reshape", ["c", "shape"], ["c2"]), helper.make_node("Sigmoid", ["c2"], ["s"]),
             helper.make_node("Relu", ["s"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    model = helper.make_model(graph)
    names = ["x", "c", "r", "f", "rr", "c2", "s", "y"]
    assert derivable_tensors(model, names, keep=["y"]) == {"r": ("c", True), "f": ("c", True), "rr": ("c", True),
                                                           "c2": ("c", False)}
    assert derivable_tensors(model, ["x", "r", "f"]) == {"f": ("r", False)}  # 'c' not collected: 'r' is fetched
