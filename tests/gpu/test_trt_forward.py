"""The calibration forward on the GPU (calibration.forward: tensorrt): an FP32 TensorRT engine with
every calibrated tensor an output gives the histograms onnxruntime's forward gives, to float rounding;
the engine is cached and reused; batches of another shape are refused in one line."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("tensorrt", reason="TensorRT is not installed: these need TensorRT and an NVIDIA GPU (pip install -e .[tensorrt]; README, On a GPU)")
pytestmark = pytest.mark.gpu


def _collect(onnx_path, batches, forward=None):
    from calibration.collect import collect_histograms

    return collect_histograms(onnx_path, iter(batches), progress=False, growth="double", forward=forward)


def test_tensorrt_forward_gives_onnxruntimes_histograms(env, tmp_path, monkeypatch):
    from calibration.rules import get_rules, ranges_under
    from pipeline.backends.trt_forward import TrtForward

    monkeypatch.setenv("TRTPIPE_CACHE_DIR", str(tmp_path / "engines"))
    batches = [env.calib[i:i + 16] for i in range(0, 64, 16)]
    ort = _collect(env.onnx, batches)
    trt = _collect(env.onnx, batches, forward=lambda m: TrtForward(m, what="test"))
    assert trt.stats.forward == "tensorrt" and ort.stats.forward == "onnxruntime"
    details = trt.stats.forward_details
    assert details["engine"]["cached"] is False and details["tf32"] is False
    assert details["outputs"] >= 4 and details["shapes"] == {"input": [16, *env.calib.shape[1:]]}
    assert set(trt.histograms) == set(ort.histograms)
    for name, h in ort.histograms.items():
        t = trt.histograms[name]
        assert t.num_samples == h.num_samples
        assert t.max_abs == pytest.approx(h.max_abs, rel=1e-4), name
        # the same values to float rounding: counts move by a few values across a bin edge at most
        moved = np.abs(np.asarray(t.counts, np.int64)[:len(h.counts)] - np.asarray(h.counts, np.int64)[:len(t.counts)])
        assert moved.sum() <= max(8, 1e-4 * h.num_samples), (name, int(moved.sum()))
    rules = get_rules("tensorrt")
    a_ort = ranges_under(rules, ort.histograms, "entropy", ort.node_ops, 99.99)[0]
    a_trt = ranges_under(rules, trt.histograms, "entropy", trt.node_ops, 99.99)[0]
    for name in a_ort:
        assert a_trt[name] == pytest.approx(a_ort[name], rel=2e-3), name

    again = _collect(env.onnx, batches, forward=lambda m: TrtForward(m, what="test"))
    assert again.stats.forward_details["engine"]["cached"] is True
    assert {n: h.max_abs for n, h in again.histograms.items()} == {n: h.max_abs for n, h in trt.histograms.items()}


def test_another_batch_shape_is_refused_in_one_line(env, tmp_path, monkeypatch):
    from pipeline.backends.trt_forward import TrtForward
    from pipeline.errors import PipelineError

    monkeypatch.setenv("TRTPIPE_CACHE_DIR", str(tmp_path / "engines"))
    with pytest.raises(PipelineError, match="one shape") as e:
        _collect(env.onnx, [env.calib[:16], env.calib[16:24]], forward=lambda m: TrtForward(m, what="test"))
    assert "\n" not in str(e.value)


def test_calibrate_stage_with_the_tensorrt_forward(env, tmp_path, monkeypatch):
    """The stage's report says which forward ran; its scales are onnxruntime's to a bin."""
    import json

    from pipeline.stages.calibrate import calibrate

    monkeypatch.setenv("TRTPIPE_CACHE_DIR", str(tmp_path / "engines"))
    data = tmp_path / "calib.npz"
    np.savez(data, input=env.calib[:64])
    reports = {}
    for forward in ("onnxruntime", "tensorrt"):
        cfg = env.make_config()
        cfg = cfg.model_copy(update={"calibration": cfg.calibration.model_copy(update={"forward": forward})})
        calibrate(cfg, env.onnx, data, tmp_path / forward, progress=False)
        reports[forward] = json.loads((tmp_path / forward / "calibrate.json").read_text())
    assert reports["tensorrt"]["collect"]["forward"] == "tensorrt"
    assert reports["onnxruntime"]["collect"]["forward"] == "onnxruntime"
    r_ort = json.loads((tmp_path / "onnxruntime" / "ranges.json").read_text())["tensors"]
    r_trt = json.loads((tmp_path / "tensorrt" / "ranges.json").read_text())["tensors"]
    assert set(r_ort) == set(r_trt)
    for name, t in r_ort.items():
        assert r_trt[name]["amax"] == pytest.approx(t["amax"], rel=2e-3), name
