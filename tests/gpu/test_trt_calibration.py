"""Implicit INT8: TensorRT's calibrator fed by data, then a rebuild that reads the cache
and skips calibration; a cache with another header is ignored and reported; the calibrate
stage's cache, completed for the network, builds with no "Missing scale" warning."""

from __future__ import annotations

import shutil

import pytest

pytest.importorskip("tensorrt", reason="TensorRT is not installed: these need TensorRT and an NVIDIA GPU (pip install -e .[tensorrt]; README, On a GPU)")
pytestmark = pytest.mark.gpu


def _out(env, engine):
    from pipeline.runtime.trt_runner import TrtRunner

    with TrtRunner(engine) as r:
        return r.infer({"input": env.x7})["logits"]


def test_calibrated_from_data(env, engines):
    import tensorrt as trt

    from calibration.cache import trt_version_int

    engine, info = engines["int8"]
    cal = info.calibration
    assert cal["source"] == "TensorRT calibrator on the calibration data" and cal["algorithm"] == "EntropyCalibration2"
    assert cal["batches_fed"] == 64 // 16 and cal["num_samples"] == 64
    assert cal["get_batch_calls"] >= cal["batches_fed"]
    assert cal["cache_header"] == f"TRT-{trt_version_int(trt.__version__)}-EntropyCalibration2"
    assert cal["cache_tensors"] and (engine.parent / "calibration.cache").is_file()


def test_rebuild_reads_the_cache_and_skips_calibration(env, engines):
    engine, _ = engines["int8"]
    calib_dir = env.root / "calib_ok"
    calib_dir.mkdir(exist_ok=True)
    shutil.copy(engine.parent / "calibration.cache", calib_dir / "calibration.cache")
    engine2, info = env.build("int8", "int8_from_cache", calib_dir=calib_dir, calibration_source="cache")
    cal = info.calibration
    assert cal["get_batch_calls"] == 0 and cal["source"] == "calibrate stage cache", cal
    assert cal["cache_used"] and cal["cache_rejected"] is None
    assert (engine2.parent / "calibration.cache").is_file()
    assert env.cosine(_out(env, engine2), _out(env, engine)) > 0.999


def test_cache_with_another_header_is_ignored_and_reported(env, engines):
    engine, _ = engines["int8"]
    lines = (engine.parent / "calibration.cache").read_text().splitlines()
    mine = lines[0]
    calib_dir = env.root / "calib_other"
    calib_dir.mkdir(exist_ok=True)
    (calib_dir / "calibration.cache").write_text("\n".join(["TRT-8501-EntropyCalibration2", *lines[1:]]) + "\n")
    _, info = env.build("int8", "int8_other_header", calib_dir=calib_dir, calibration_source="auto")
    cal = info.calibration
    assert cal["source"] == "TensorRT calibrator on the calibration data" and cal["get_batch_calls"] > 0
    assert "TRT-8501-EntropyCalibration2" in cal["why"] and mine in cal["why"]
    from calibration.errors import CalibrationError

    with pytest.raises(CalibrationError, match="calibration.tensorrt_version"):  # asked for the cache: an error
        env.build("int8", "int8_other_header_cache", calib_dir=calib_dir, calibration_source="cache")


def test_minmax_calibrator_with_cuda_python_memory(env):
    pytest.importorskip("cuda.bindings", reason="cuda-python is not installed")
    engine, info = env.build("int8", "int8_minmax", memory="cuda-python", int8_calibrator="minmax",
                             calibration_source="tensorrt")
    cal = info.calibration
    assert cal["algorithm"] == "MinMaxCalibration" and cal["cache_header"].endswith("-MinMaxCalibration")
    assert env.cosine(_out(env, engine), env.ref7) > 0.99


def test_stage_cache_builds_without_missing_scales(env, engines):
    """The calibrate stage's ranges for the ONNX's tensors, completed against the network
    (constants, the MatMul TensorRT makes of the Gemm): no "Missing scale" warning, no
    calibration batch fed, and the engine agrees with the one TensorRT calibrated itself."""
    calib_dir = env.stage_calibration(env.onnx, {"input": env.calib}, "calib_stage")
    engine, info = env.build("int8", "int8_stage_cache", calib_dir=calib_dir, calibration_source="auto")
    cal = info.calibration
    assert cal["source"] == "calibrate stage cache" and cal["batches_fed"] == 0, cal
    assert info.details["missing_scale_warnings"] == 0 and cal["tensors_without_scale"] == 0
    assert sum(cal["added_for_network"].values()) >= 1, cal["added_for_network"]
    assert env.cosine(_out(env, engine), _out(env, engines["int8"][0])) > 0.999
    assert env.cosine(_out(env, engine), env.ref7) > 0.99
