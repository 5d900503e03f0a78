"""`trtpipe tune` with TensorRT engines as the measure, and build@int8 applying its result
through both routes.

The tiny conv net with one planted break: channel 0 of conv1 is scaled up 300x and conv2's
weights on that channel down 300x, so FP32 computes the same function while the range of
conv2's input is set by that one channel (minmax calibration): in INT8, conv2's other 63
input channels round to zero. The tune stage (tune.backend: tensorrt) must meet an output
SNR budget (checked here against onnxruntime FP32, independently of pipeline.metrics) by
keeping conv2 out of INT8, and build@int8 must reproduce that engine from tune's outputs:
implicit (layer_precisions) and explicit (tune's Q/DQ ONNX)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tensorrt", reason="TensorRT is not installed: these need TensorRT and an NVIDIA GPU (pip install -e .[tensorrt]; README, On a GPU)")
pytestmark = pytest.mark.gpu

BUDGET_DB = 20.0
SCALE = 300.0


def _snr_db(got: np.ndarray, ref: np.ndarray) -> float:
    ref = ref.astype(np.float64)
    err = float(((got.astype(np.float64) - ref) ** 2).sum())
    return float("inf") if err == 0 else float(10 * np.log10(float((ref**2).sum()) / err))


def _planted(env, path: Path) -> Path:
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(env.make_tiny_onnx(env.root / "tune_base.onnx")))
    w = {i.name: numpy_helper.to_array(i).copy() for i in model.graph.initializer}
    w["W1"][0] *= SCALE
    w["B1"][0] *= SCALE
    w["W2"][:, 0] /= SCALE
    del model.graph.initializer[:]
    model.graph.initializer.extend(numpy_helper.from_array(v, k) for k, v in w.items())
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


@pytest.fixture(scope="module")
def tuned(env):
    from pipeline.config import Config
    from pipeline.stages import calibrate, tune

    onnx_path = _planted(env, env.root / "planted.onnx")
    x = env.inputs(64, seed=21)
    np.savez(env.root / "tune_eval.npz", input=x)
    cfg = Config.model_validate({
        "model": {"name": "planted", "arch": "tiny", "input": {"name": "input", "shape": list(env.IN_SHAPE)}},
        "calibration": {"method": "minmax", "batch_size": 16, "num_samples": 64},
        "build": {"backend": "tensorrt", "workspace_mb": 256, "profile": dict(env.PROFILE),
                  "timing_cache": str(env.root / "tune.timing.cache"), "calibration_source": "cache",
                  "int8_calibrator": "minmax"},
        "evaluate": {"batch_size": 16, "latency": {"warmup": 3, "iterations": 20, "batch_sizes": [1, 16]}},
        "tune": {"budget": {"metric": "snr_db", "min": BUDGET_DB}, "backend": "tensorrt", "search_samples": 64,
                 "max_candidates": 40},
    })
    calib_dir = env.root / "tune_calibrate"
    calibrate.calibrate(cfg, onnx_path, env.calib_npz, calib_dir, progress=False)
    with pytest.MonkeyPatch.context() as mp:
        try:
            import matplotlib  # noqa: F401
        except ImportError:  # the GPU kit has no matplotlib; tune.png is checked by the CPU tests
            import pipeline.tuning.plot as plot

            mp.setattr(plot, "plot_frontier", lambda path, **_: Path(path).write_bytes(b""))
        report = tune.tune(cfg, onnx_path, calib_dir, env.root / "tune_eval.npz", env.root / "tune_out",
                           calib_data=env.calib_npz, progress=False, backend="tensorrt")
    return cfg, onnx_path, calib_dir, x, env.ort_run(onnx_path, x), report


def test_tune_on_tensorrt_keeps_the_planted_layer_and_meets_the_budget(tuned) -> None:
    _, _, _, _, _, rep = tuned
    assert rep.backend == "tensorrt" and rep.latency_kind != "estimate"
    full = rep.reference_points["full_int8"]
    assert full["metric_full"] < BUDGET_DB  # the planted break is real on the engine
    assert rep.met and rep.reference_points["chosen"]["metric_full"] >= BUDGET_DB
    kept = [k["layer"] for k in rep.kept]
    assert "/conv2/Conv" in kept and len(kept) <= 2, kept
    measured = [c for c in rep.candidates if c.metric is not None or c.metric_sensitivity is not None]
    assert measured and all(set(c.latency_ms) == {"b1", "b16"} for c in measured)  # an engine timed per candidate
    assert rep.reference_points["chosen"]["cost"] == rep.reference_points["chosen"]["latency_ms"]["b16"]
    print(json.dumps({"kept": kept, "full_int8_snr_db": full["metric_full"],
                      "chosen_snr_db": rep.reference_points["chosen"]["metric_full"],
                      "candidates": len(rep.candidates)}))


@pytest.mark.parametrize("route", ["implicit", "explicit"])
def test_build_int8_applies_the_tune_result(tuned, env, route: str) -> None:
    from pipeline.provenance import sha256_of
    from pipeline.runtime.trt_runner import TrtRunner
    from pipeline.stages.build_tune import apply_tune

    cfg, onnx_path, calib_dir, x, ref, rep = tuned
    cfg = cfg.model_copy(update={"build": cfg.build.model_copy(update={"int8_route": route, "int8_from_tune": True})})
    cfg2, src, info = apply_tune(cfg, route, env.root / "tune_out", calib_dir, sha256_of(onnx_path))
    assert info["applied"] and info["kept"] == [k["layer"] for k in rep.kept]
    from pipeline.backends.base import BuildRequest
    from pipeline.backends.tensorrt_backend import TensorRTBackend

    out = env.root / f"tuned_{route}"
    res = TensorRTBackend(heartbeat_s=5.0).build(BuildRequest(precision="int8", onnx_path=onnx_path, out_dir=out,
                                                              config=cfg2, calib_dir=src, calib_data=env.calib_npz))
    with TrtRunner(out / res.artifact) as r:
        got = np.concatenate([r.infer({"input": x[i:i + 16]})["logits"] for i in range(0, len(x), 16)])
    snr = _snr_db(got, ref)
    print(f"{route}: SNR {snr:.2f} dB against onnxruntime FP32")
    assert snr >= BUDGET_DB
