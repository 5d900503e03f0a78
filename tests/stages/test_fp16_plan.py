"""fp16 planned once, by the build stage, from what calibrate measured: calibrate writes the
max|x| of every floating tensor (maxima.json) that an independent onnxruntime pass agrees
with; the nodes whose tensors leave FP16's range stay in FP32 (Casts in the typed FP16 ONNX)
without a second pass over the data; the typed FP16 ONNX is what the backend builds, its
sha256 in build.json; maxima.json of another ONNX, tampered, or missing is refused in one line."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from pipeline.errors import PipelineError, UsageError

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> SimpleNamespace:
    from tests._digits_run import digits_base, digits_config

    base = digits_base(tmp_path_factory)
    tmp = tmp_path_factory.mktemp("fp16plan")
    return SimpleNamespace(base=base, onnx=base / "export" / "model.onnx", calib=base / "prepare" / "calib.npz",
                           validation=base / "validate" / "validate.json", cfg=digits_config(tmp), tmp=tmp)


def _all_float_maxima(onnx_path: Path, feeds: dict[str, np.ndarray]) -> dict[str, float]:
    """The reference: every float tensor of the graph made an output of an unoptimized onnxruntime
    session (no code of the project's), max|x| over the feeds."""
    import onnx
    import onnxruntime as ort

    model = onnx.shape_inference.infer_shapes(onnx.load(str(onnx_path)))
    floats = {v.name for v in list(model.graph.value_info) + list(model.graph.output)
              if v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT}
    have = {o.name for o in model.graph.output}
    for node in model.graph.node:
        for t in node.output:
            if t in floats and t not in have:
                model.graph.output.append(onnx.helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None))
                have.add(t)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    out = {k: float(np.max(np.abs(v))) for k, v in feeds.items()}
    for name, v in zip(names, sess.run(names, feeds)):
        out[name] = float(np.max(np.abs(v)))
    return out


def test_calibrate_writes_every_float_tensors_max_abs(digits, tmp_path):
    from pipeline.data import calibration_indices
    from pipeline.stages import calibrate

    out = tmp_path / "calibrate"
    calibrate.run(digits.cfg, digits.onnx, digits.calib, out, validation=digits.validation, progress=False)
    maxima = json.loads((out / "maxima.json").read_text())
    assert maxima["onnx_sha256"] == hashlib.sha256(digits.onnx.read_bytes()).hexdigest()
    c = digits.cfg.calibration
    x = np.load(digits.calib)["input"]
    idx = calibration_indices(len(x), c.num_samples, c.seed)[: (c.num_samples // c.batch_size) * c.batch_size]
    ref = _all_float_maxima(digits.onnx, {"input": x[idx]})
    assert set(maxima["tensors"]) == set(ref)
    for name, m in ref.items():
        assert maxima["tensors"][name] == pytest.approx(m, rel=1e-5), name
    report = json.loads((out / "calibrate.json").read_text())
    assert report["sha256"]["maxima.json"] == hashlib.sha256((out / "maxima.json").read_bytes()).hexdigest()


def test_maxima_do_not_depend_on_the_calibration_method(digits, tmp_path):
    """Only the ONNX and the samples decide maxima.json: a calibration.method edit re-runs calibrate
    but leaves it byte-identical, so DVC rebuilds no fp16 variant."""
    from tests._digits_run import digits_config
    from pipeline.stages import calibrate

    outs = {}
    for method in ("entropy", "minmax"):
        cfg = digits_config(tmp_path, calibration={"method": method, "exclude": ["/inner/inner.0/*"]}
                            if method == "minmax" else {"method": method})
        outs[method] = tmp_path / method
        calibrate.run(cfg, digits.onnx, digits.calib, outs[method], validation=digits.validation, progress=False)
    a, b = ((outs[m] / "maxima.json").read_bytes() for m in outs)
    assert a == b
    assert (outs["entropy"] / "ranges.json").read_bytes() != (outs["minmax"] / "ranges.json").read_bytes()


def _overflowing_model(path: Path) -> Path:
    """input -> Mul(3e4) -> Relu -> Mul(10) -> ReduceMax -> Mul(1e-5) -> out: the second Mul's
    output and the ReduceMax's reach ~3e5 (beyond FP16's 65504) on the samples; the first Mul's
    and the Relu's stay below 3e4."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    inits = [numpy_helper.from_array(np.array(3e4, np.float32), "a"), numpy_helper.from_array(np.array(10, np.float32), "b"),
             numpy_helper.from_array(np.array(1e-5, np.float32), "c")]
    nodes = [helper.make_node("Mul", ["input", "a"], ["m1"], name="/scale/Mul"),
             helper.make_node("Relu", ["m1"], ["r"], name="/act/Relu"),
             helper.make_node("Mul", ["r", "b"], ["big"], name="/big/Mul"),
             helper.make_node("ReduceMax", ["big"], ["mx"], name="/pool/ReduceMax", axes=[1], keepdims=0),
             helper.make_node("Mul", ["mx", "c"], ["out"], name="/down/Mul")]
    graph = helper.make_graph(nodes, "overflow", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 16])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N"])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def test_fp16_plan_keeps_what_overflows_from_calibrates_maxima_without_a_second_pass(tmp_path, monkeypatch):
    import onnxruntime as ort

    from pipeline.backends import fp16 as fp16_mod
    from pipeline.backends.trt_typed import plan_fp16
    from pipeline.config import Config
    from pipeline.stages import calibrate

    onnx_path = _overflowing_model(tmp_path / "model.onnx")
    x = np.random.default_rng(0).uniform(0.2, 1.0, size=(64, 16)).astype(np.float32)
    np.savez(tmp_path / "calib.npz", input=x)
    cfg = Config.model_validate({"model": {"name": "o", "arch": "o", "inputs": [{"name": "input", "shape": [16]}],
                                           "outputs": [{"name": "out"}]},
                                 "calibration": {"num_samples": 64, "batch_size": 16},
                                 "build": {"backend": "onnxruntime", "fp16": {"keep_fp32_ops": []}}})
    calibrate.calibrate(cfg, onnx_path, tmp_path / "calib.npz", tmp_path / "calibrate", progress=False)

    def no_second_pass(*a, **k):
        raise AssertionError("the fp16 plan measured the data again")

    monkeypatch.setattr(fp16_mod, "tensor_maxima", no_second_pass)
    plan = plan_fp16(onnx_path, cfg, tmp_path / "build", ("typed", "test"), calib_dir=tmp_path / "calibrate")
    # '/big/Mul' and '/pool/ReduceMax' produce ~3e5, '/down/Mul' consumes it; the first Mul and the Relu stay in FP16
    assert set(plan.keep) == {"/big/Mul", "/pool/ReduceMax", "/down/Mul"}, plan.keep
    assert "maxima.json (64 calibration samples)" in plan.keep["/big/Mul"] and "3" in plan.keep["/big/Mul"]
    so = ort.SessionOptions()
    feeds = {"input": x[:8]}
    ref = ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    got = ort.InferenceSession(str(plan.onnx), so, providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    assert np.isfinite(got).all() and np.allclose(got, ref, rtol=2e-3)
    # a kept node reading a graph input reads it in FP32, not through FP16
    keep_first = plan_fp16(onnx_path, cfg.model_copy(update={"build": cfg.build.model_copy(update={"fp16": cfg.build.fp16.model_copy(
        update={"keep_fp32_nodes": ["/scale/Mul"]})})}), tmp_path / "b2", ("typed", "test"), calib_dir=tmp_path / "calibrate")
    import onnx

    g = onnx.load(str(keep_first.onnx)).graph
    assert next(n for n in g.node if n.name == "/scale/Mul").input[0] == "input"
    # without collapsing the FP32 -> FP16 -> FP32 Cast pairs the converter writes between two kept nodes,
    # the kept tensor itself passes through FP16 and the output is inf
    from pipeline.backends import trt_typed

    monkeypatch.setattr(trt_typed, "collapse_round_trips", lambda model: 0)
    trt_typed.write_fp16_onnx(onnx_path, plan.keep, tmp_path / "round_trips.onnx")
    bad = ort.InferenceSession(str(tmp_path / "round_trips.onnx"), so, providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    assert not np.isfinite(bad).any()
    assert plan.typed_onnx["fp32_fp16_fp32_round_trips_removed"] == 3  # big, mx, and the output


def test_build_stage_fp16_records_the_typed_onnx_it_built(digits, tmp_path):
    from pipeline.stages import build

    out = tmp_path / "fp16"
    report = build.run(digits.cfg, "fp16", digits.onnx, out, calib_dir=digits.base / "calibrate",
                       calib_data=digits.calib, validation=digits.validation)
    fp16 = report.details["fp16"]
    assert fp16["route"] == "typed" and "maxima.json" in fp16["maxima_from"]
    typed = report.details["typed_onnx"]
    assert typed["file"] == report.artifact == "model.onnx"
    assert typed["sha256"] == hashlib.sha256((out / "model.onnx").read_bytes()).hexdigest()
    assert typed["fp16_initializers"] > 0 and sorted(p.name for p in out.iterdir()) == ["build.json", "model.onnx"]


def test_fp16_without_calibrate_or_with_its_maxima_wrong_is_refused_in_one_line(digits, tmp_path):
    import shutil

    from pipeline.stages import build

    with pytest.raises(UsageError) as e:
        build.run(digits.cfg, "fp16", digits.onnx, tmp_path / "a", validation=digits.validation)
    assert "\n" not in str(e.value) and "--calib-dir" in str(e.value) and "range_check: false" in str(e.value)
    calib = tmp_path / "calibrate"
    shutil.copytree(digits.base / "calibrate", calib)
    (calib / "maxima.json").unlink()
    with pytest.raises(PipelineError, match=r"maxima.json.*not found; run the calibrate stage first"):
        build.run(digits.cfg, "fp16", digits.onnx, tmp_path / "b", calib_dir=calib, validation=digits.validation)
    data = json.loads((digits.base / "calibrate" / "maxima.json").read_text())
    for bad, match in ((dict(data, onnx_sha256="0" * 64), "measured on another ONNX"),
                       (dict(data, tensors={**data["tensors"], "input": -1.0}), "finite number >= 0")):
        (calib / "maxima.json").write_text(json.dumps(bad))
        with pytest.raises(PipelineError, match=match) as e:
            build.run(digits.cfg, "fp16", digits.onnx, tmp_path / "c", calib_dir=calib, validation=digits.validation)
        assert "\n" not in str(e.value)
        assert not (tmp_path / "c").exists()
