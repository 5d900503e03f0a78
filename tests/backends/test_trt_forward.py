"""calibration.forward: what the TensorRT calibration engine asks of each TensorRT version (the
stand-ins: no precision flag, TF32 off, optimization level 0, one profile fixed at the batch's
shapes, strongly typed on 11 and nothing 11 removed), the one-line refusals, and the collector
running whatever forward it is given (the engine itself runs in tests/gpu/test_trt_forward.py)."""

from __future__ import annotations

import numpy as np
import pytest

from calibration.errors import CalibrationError
from pipeline.errors import PipelineError
from tests.backends.test_trt_versions import V10, V11, V86, _model
from tests.backends.trt_standin import install


@pytest.mark.parametrize("version, net_flags", [(V86, ["EXPLICIT_BATCH"]), (V10, ["EXPLICIT_BATCH", "STRONGLY_TYPED"]),
                                                (V11, ["STRONGLY_TYPED"])])
def test_calibration_engine_per_version(monkeypatch, tmp_path, version, net_flags):
    from calibration.collect import augment
    from calibration.onnx_io import load_model
    from pipeline.backends import trt_forward

    trt = install(monkeypatch, version)
    onnx_path = _model(tmp_path / "model.onnx")
    model = augment(load_model(onnx_path), ["c", "r"])  # what the collector gives it: calibrated tensors as outputs
    fwd = trt_forward.TrtForward(model, what="test")
    blob = fwd._build(trt, onnx_path, {"input": [4, 3, 8, 8]})
    rec = trt._rec
    assert isinstance(blob, bytes) and blob
    assert rec.network_flags == net_flags
    assert rec.flags_set == [] and rec.layer_precision == {} and rec.output_types == {}
    assert "TF32" in rec.flags_cleared
    assert rec.profiles == [{"input": ([4, 3, 8, 8], [4, 3, 8, 8], [4, 3, 8, 8])}]
    assert rec.calibrator is None and rec.calibration_profile is None
    assert fwd.details["builder_optimization_level"] == 0
    if version == V11:
        assert rec.missing == []


def test_resolve_forward(monkeypatch):
    from pipeline.backends import trt_forward

    assert trt_forward.resolve_forward("auto")[0] is None
    assert trt_forward.resolve_forward("onnxruntime")[0] is None
    monkeypatch.setattr("pipeline.runtime.trt_common.tensorrt_usable", lambda: (False, "tensorrt does not import"))
    with pytest.raises(PipelineError, match="calibration.forward: tensorrt needs TensorRT") as e:
        trt_forward.resolve_forward("tensorrt")
    assert "\n" not in str(e.value) and "calibration.forward: onnxruntime" in str(e.value)
    with pytest.raises(PipelineError, match="not one of"):
        trt_forward.resolve_forward("cuda")


class _Forward:
    """onnxruntime without graph optimizations, through the collector's forward interface: a second,
    independent route to the same activations."""

    name = "unoptimized"
    reuses_buffers = False

    def __init__(self, model):
        from calibration.ort_session import make_session

        self.session = make_session(model, level="disable")
        self.runs = 0

    def run(self, names, feeds):
        self.runs += 1
        return self.session.run(list(names), dict(feeds))

    def describe(self):
        return {"runs": self.runs}

    def close(self):
        self.session = None


def test_collector_runs_the_forward_it_is_given(tmp_path):
    from calibration.collect import collect_histograms

    onnx_path = _model(tmp_path / "model.onnx")
    x = np.random.default_rng(3).normal(size=(24, 3, 8, 8)).astype(np.float32)
    batches = [x[i:i + 8] for i in range(0, 24, 8)]
    default = collect_histograms(onnx_path, iter(batches), progress=False)
    other = collect_histograms(onnx_path, iter(batches), progress=False, forward=_Forward)
    assert default.stats.forward == "onnxruntime" and other.stats.forward == "unoptimized"
    assert other.stats.forward_details == {"runs": 3}
    assert set(other.histograms) == set(default.histograms)
    for name, h in default.histograms.items():
        assert other.histograms[name].max_abs == pytest.approx(h.max_abs, rel=1e-5)
        assert other.histograms[name].num_samples == h.num_samples


def test_a_forward_that_reuses_buffers_is_not_pipelined(tmp_path):
    from calibration.collect import ActivationCollector

    class Reusing(_Forward):
        reuses_buffers = True

    with pytest.raises(CalibrationError, match="cannot be pipelined"):
        ActivationCollector(_model(tmp_path / "model.onnx"), pipeline=True, forward=Reusing)
