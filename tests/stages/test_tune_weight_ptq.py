"""tune carries calibrate's weight-side PTQ (GPTQ's rounded weights, bias correction) into its
candidates and its result, on the digits model's real stage runs: the Q/DQ weights and biases
tune writes are calibrate's where a layer is quantized, and the FP32 ONNX's where it is kept."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from onnx import numpy_helper

PTQ = {"method": "minmax", "weight_rounding": "gptq", "bias_correction": True}


def _inits(path: Path) -> dict[str, np.ndarray]:
    import onnx

    return {i.name: numpy_helper.to_array(i) for i in onnx.load(str(path)).graph.initializer}


def _conv_gemm(path: Path) -> dict[str, list[str]]:
    import onnx

    return {n.name: list(n.input) for n in onnx.load(str(path)).graph.node if n.op_type in ("Conv", "Gemm")}


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    import shutil

    from tests._digits_run import calibrate, digits_base, digits_config

    base = digits_base(tmp_path_factory)
    d = tmp_path_factory.mktemp("digits-gptq")
    for sub in ("prepare", "export", "validate"):
        shutil.copytree(base / sub, d / sub)
    cfg = digits_config(d, calibration=PTQ)
    calibrate(cfg, d)
    return cfg, d


def test_calibrate_writes_its_weight_ptq_and_tune_carries_it_into_the_result(calibrated, tmp_path):
    import json

    from calibration.ptq_file import load_ptq
    from calibration.qdq_insert import quantize_weight
    from pipeline.stages import tune

    cfg, d = calibrated
    report = json.loads((d / "calibrate" / "calibrate.json").read_text())
    assert report["qdq"]["ptq_file"] == "ptq.npz" and "ptq.npz" in report["sha256"]
    rounded, corrections = load_ptq(d / "calibrate" / "ptq.npz")
    assert rounded and corrections
    # the corrections are per output channel (a few numbers a node), the rounded weights int8
    assert all(c.ndim == 1 for c in corrections.values()) and all(q.dtype == np.int8 for q in rounded.values())
    fp32 = _inits(d / "export" / "model.onnx")
    assert any(not np.array_equal(q, quantize_weight(fp32[w], a)[0]) for (w, a), q in rounded.items())

    out = tmp_path / "tune"
    rep = tune.run(cfg, d / "export" / "model.onnx", d / "calibrate", d / "prepare" / "eval.npz", out,
                   validation=d / "validate" / "validate.json", progress=False)
    assert rep.methods["weights"] == {"weight_rounding": "gptq", "bias_correction": True, "note": None}
    kept = {n for k in rep.kept for n in k["nodes"]}
    cal, tuned = _inits(d / "calibrate" / "model.qdq.onnx"), _inits(out / "model.qdq.onnx")
    cal_nodes, tuned_nodes = _conv_gemm(d / "calibrate" / "model.qdq.onnx"), _conv_gemm(out / "model.qdq.onnx")
    quantized = [n for n in tuned_nodes if n not in kept]
    assert quantized
    for node in quantized:  # the same int8 weight and the same corrected bias as calibrate's
        w, b = tuned_nodes[node][1:3]
        cw = cal_nodes[node][1]
        assert w.endswith("_DequantizeLinear_Output") and cw.endswith("_DequantizeLinear_Output")
        stem = w[: -len("_DequantizeLinear_Output")]
        assert np.array_equal(tuned[f"{stem}_quantized"], cal[f"{cal_nodes[node][1][:-len('_DequantizeLinear_Output')]}_quantized"])
        assert np.array_equal(tuned[b], cal[cal_nodes[node][2]])
        assert not np.array_equal(tuned[b], fp32[_conv_gemm(d / "export" / "model.onnx")[node][2]])


def test_a_candidate_keeps_its_kept_layers_float_and_uncorrected(calibrated, tmp_path):
    from calibration.ptq_file import load_ptq
    from pipeline.tuning.methods import WeightPTQ, write_candidate_qdq

    _, d = calibrated
    rounded, corrections = load_ptq(d / "calibrate" / "ptq.npz")
    import json

    amax = {k: v["amax"] for k, v in json.loads((d / "calibrate" / "ranges.json").read_text())["tensors"].items()}
    nodes = _conv_gemm(d / "export" / "model.onnx")
    keep = next(iter(nodes))  # the first Conv
    path = tmp_path / "candidate.qdq.onnx"
    summary = write_candidate_qdq(d / "export" / "model.onnx", path, amax, {}, [keep], (), (),
                                  WeightPTQ(rounded=rounded, corrections=corrections))
    got, fp32 = _inits(path), _inits(d / "export" / "model.onnx")
    cand = _conv_gemm(path)
    assert cand[keep][1] == nodes[keep][1] and np.array_equal(got[cand[keep][1]], fp32[nodes[keep][1]])
    assert np.array_equal(got[cand[keep][2]], fp32[nodes[keep][2]])  # no correction on a float layer
    assert summary["weight_rounding"]["weights"] == len(nodes) - 1
    assert len(summary["bias_corrected"]) == len(nodes) - 1


def test_a_missing_changed_or_foreign_ptq_file_is_one_line(calibrated, tmp_path):
    import json
    import shutil

    from calibration.errors import CalibrationError
    from pipeline.errors import ConfigError
    from pipeline.stages import tune

    cfg, d = calibrated
    calib = tmp_path / "calibrate"
    shutil.copytree(d / "calibrate", calib)
    (calib / "ptq.npz").unlink()
    with pytest.raises(ConfigError, match="ptq.npz: calibrate's report names it but it is missing; re-run calibrate"):
        tune.tune(cfg, d / "export" / "model.onnx", calib, d / "prepare" / "eval.npz", tmp_path / "t1", progress=False)
    np.savez(calib / "ptq.npz", something=np.zeros(3))
    with pytest.raises(ConfigError, match="ptq.npz: changed since calibrate wrote it"):
        tune.tune(cfg, d / "export" / "model.onnx", calib, d / "prepare" / "eval.npz", tmp_path / "t2", progress=False)
    # a file no report vouches for (sha256 taken out of calibrate.json): read, and refused if foreign
    report = json.loads((calib / "calibrate.json").read_text())
    del report["sha256"]["ptq.npz"]
    (calib / "calibrate.json").write_text(json.dumps(report))
    with pytest.raises(CalibrationError, match="not the calibrate stage's weight PTQ file"):
        tune.tune(cfg, d / "export" / "model.onnx", calib, d / "prepare" / "eval.npz", tmp_path / "t3", progress=False)
    assert not any((tmp_path / t).exists() for t in ("t1", "t2", "t3"))


def test_tune_says_why_it_cannot_carry_calibrates_weight_ptq(calibrated):
    from pipeline.reports import CalibrateReport, read_report
    from pipeline.stages.tune import _carried_ptq

    _, d = calibrated
    report = read_report(d / "calibrate" / "calibrate.json", CalibrateReport, "calibration report", "calibrate")
    assert _carried_ptq(report, d / "calibrate").rounded is not None
    smoothed = report.model_copy(update={"qdq": {**report.qdq, "ptq_file": None}})
    assert "smooth_quant" in _carried_ptq(smoothed, d / "calibrate").note
    older = report.model_copy(update={"qdq": {k: v for k, v in report.qdq.items() if k != "ptq_file"}})
    ptq = _carried_ptq(older, d / "calibrate")
    assert ptq.rounded is None and ptq.corrections is None and "re-run calibrate" in ptq.note
    plain = report.model_copy(update={"settings": {**report.settings, "bias_correction": False,
                                                   "weight_rounding": "nearest"}})
    assert _carried_ptq(plain, d / "calibrate").describe() == {"weight_rounding": "nearest", "bias_correction": False,
                                                              "note": None}
