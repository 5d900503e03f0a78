"""CPU tests of the GPU runtime's pure-Python parts: errors without TensorRT / a driver,
memory selection, pinned-buffer views, manifest handling, and the calibrator's cache and
batch logic with a fake device memory."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from pipeline.errors import ArtifactError, BackendError


def test_require_tensorrt_says_what_to_install(monkeypatch):
    from pipeline.runtime.trt_common import require_tensorrt

    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(BackendError, match=r"pip install 'trtpipe\[tensorrt\]'.*build.backend: onnxruntime"):
        require_tensorrt()


def test_runtime_modules_import_without_torch_or_tensorrt():
    import subprocess
    from pathlib import Path

    code = (
        "import sys; sys.modules['tensorrt'] = None; sys.modules['torch'] = None\n"
        "import pipeline.runtime.trt_runner, pipeline.runtime.cuda_memory, pipeline.runtime.cuda_device\n"
        "import pipeline.backends.trt_calibrator, pipeline.backends.tensorrt_backend\n"
        "print('ok')"
    )
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr


def test_no_driver_is_a_backend_error(monkeypatch):
    from pipeline.backends import tensorrt_usable
    from pipeline.runtime import cuda_device

    def no_lib():
        raise BackendError("libcuda is not loadable")

    monkeypatch.setattr(cuda_device, "_libcuda", no_lib)
    cuda_device._init.cache_clear()
    try:
        with pytest.raises(BackendError, match="libcuda"):
            cuda_device.gpu_count()
        monkeypatch.setitem(sys.modules, "tensorrt", None)
        ok, why = tensorrt_usable()
        assert not ok and "tensorrt does not import" in why
    finally:
        cuda_device._init.cache_clear()


def test_memory_choice(monkeypatch):
    from pipeline.runtime import cuda_memory

    with pytest.raises(BackendError, match="memory='cupy' is not one of auto, pycuda, cuda-python"):
        cuda_memory.open_memory("cupy")
    monkeypatch.setattr(cuda_memory, "available", lambda: [])
    with pytest.raises(BackendError, match="neither pycuda nor cuda-python"):
        cuda_memory.open_memory("auto")
    monkeypatch.setitem(sys.modules, "pycuda", None)
    monkeypatch.setitem(sys.modules, "pycuda.driver", None)
    with pytest.raises(BackendError, match="pycuda is not installed"):
        cuda_memory.open_memory("pycuda")


def test_host_buffer_views():
    from pipeline.runtime.cuda_memory import HostBuffer

    freed = []
    buf = HostBuffer(np.zeros(64, np.uint8), lambda: freed.append(True))
    v = buf.view((2, 4), np.float32)
    v[:] = 1.5
    assert v.shape == (2, 4) and buf.view((8,), np.float32)[0] == 1.5
    with pytest.raises(BackendError, match="too small"):
        buf.view((3, 8), np.float32)
    buf.free()
    buf.free()
    assert freed == [True]


def test_runner_refuses_missing_or_empty_files(tmp_path):
    from pipeline.runtime.trt_runner import TrtRunner

    with pytest.raises(ArtifactError, match="engine file not found"):
        TrtRunner(tmp_path / "model.engine")
    (tmp_path / "model.engine").write_bytes(b"")
    with pytest.raises(ArtifactError, match="empty file"):
        TrtRunner(tmp_path / "model.engine")


def test_runner_without_tensorrt_says_what_to_install(tmp_path, monkeypatch):
    from pipeline.runtime.trt_runner import TrtRunner

    (tmp_path / "model.engine").write_bytes(b"x" * 100)
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(BackendError, match=r"trtpipe\[tensorrt\]"):
        TrtRunner(tmp_path / "model.engine")


def test_deserialize_errors_are_classified(tmp_path):
    from pipeline.runtime.trt_runner import _deserialize_error

    p = tmp_path / "m.engine"
    magic = _deserialize_error(p, ["Serialization assertion magicTagRead == kMAGIC_TAG failed.Magic tag does not match"], "8.6.0")
    assert isinstance(magic, ArtifactError) and "is not a TensorRT engine" in str(magic) and str(p) in str(magic)
    ver = _deserialize_error(p, ["Serialization assertion stdVersionRead == serializationVersion failed.Version tag does not match"], "8.6.0")
    assert "another TensorRT version" in str(ver) and "8.6.0" in str(ver)


def test_manifest_from_build_info_feeds_the_compat_check():
    from pipeline.compat import check_runs_here
    from pipeline.compat import manifest_from_build_info

    info = {"backend": "tensorrt", "tensorrt": "8.6.0", "device": {"compute_capability": "9.0", "gpu": "H100"}}
    man = manifest_from_build_info(info)
    check_runs_here(man, {"tensorrt": "8.6.0", "compute_capability": "9.0"})
    with pytest.raises(ArtifactError, match=r"compute capability 9.0 \(H100\).*compute capability 8.0"):
        check_runs_here(man, {"tensorrt": "8.6.0", "compute_capability": "8.0", "gpu": "A100"})
    assert manifest_from_build_info({}) is None


# -- the calibrator mixin with a fake device memory ----------------------------------------------------
class _FakeMem:
    name = "fake"

    def __init__(self):
        self.copies = []

    def alloc_device(self, nbytes):
        from pipeline.runtime.cuda_memory import DeviceBuffer

        return DeviceBuffer(4096 + len(self.copies), nbytes, lambda: None)

    def activate(self):
        import contextlib

        return contextlib.nullcontext()

    def htod(self, dst, src):
        self.copies.append((dst, src.shape))

    def close(self):
        pass


def _calibrator(monkeypatch, tmp_path, batches, read_from=None):
    from pipeline.backends.trt_calibrator import _CalibratorMixin
    from pipeline.runtime import cuda_memory

    monkeypatch.setattr(cuda_memory, "open_memory", lambda kind="auto", device=0: _FakeMem())
    cal = _CalibratorMixin()
    logs = []
    cal._setup(kind="entropy2", batches=batches, batch_size=4, cache_path=tmp_path / "out.cache",
               read_cache_from=read_from, memory="auto", progress=False, log=logs.append, trt_version="8.6.0",
               num_batches=len(batches))
    return cal, logs


def test_split_batches():
    from calibration.errors import CalibrationError
    from pipeline.backends.trt_calibrator import split_batches

    batches, dropped = split_batches(np.zeros((10, 3)), 4)
    assert [b.shape[0] for b in batches] == [4, 4] and dropped == 2
    assert split_batches(np.zeros((3, 3)), 4)[0][0].shape[0] == 3
    with pytest.raises(CalibrationError, match="empty"):
        split_batches(np.zeros((0, 3)), 4)


def test_calibrator_feeds_batches_and_counts(monkeypatch, tmp_path):
    cal, _ = _calibrator(monkeypatch, tmp_path, [np.ones((4, 2), np.float32)] * 2)
    assert cal.get_batch_size() == 4
    assert cal.get_batch(["input"]) == [4096] and cal.get_batch(["input"]) is not None
    assert cal.get_batch(["input"]) is None
    assert (cal.get_batch_calls, cal.batches_fed, cal.num_samples) == (3, 2, 8)
    cal.write_calibration_cache(memoryview(b"TRT-8600-EntropyCalibration2\ninput: 3c010204\n"))
    assert (tmp_path / "out.cache").read_bytes().startswith(b"TRT-8600-EntropyCalibration2")
    assert cal.read_calibration_cache() is None and cal.cache_reads == 1


def test_calibrator_errors_surface_after_the_build(monkeypatch, tmp_path):
    cal, _ = _calibrator(monkeypatch, tmp_path, [np.ones((3, 2), np.float32)])
    assert cal.get_batch(["input"]) is None  # TensorRT only sees "no more batches"
    with pytest.raises(Exception, match="batch size is 4"):
        cal.raise_if_failed()


def test_calibrator_cache_header_check(monkeypatch, tmp_path):
    from calibration.cache import write_cache

    good = write_cache(tmp_path / "good.cache", {"input": 0.01}, "8.6.0", "EntropyCalibration2")
    cal, logs = _calibrator(monkeypatch, tmp_path, [], read_from=good)
    assert cal.read_calibration_cache() == good.read_bytes() and cal.cache_used == "TRT-8600-EntropyCalibration2"

    other = write_cache(tmp_path / "other.cache", {"input": 0.01}, "8.5.1", "EntropyCalibration2")
    cal, logs = _calibrator(monkeypatch, tmp_path, [], read_from=other)
    assert cal.read_calibration_cache() is None
    assert "TRT-8501-EntropyCalibration2" in cal.cache_rejected and "TRT-8600-EntropyCalibration2" in cal.cache_rejected
    assert logs and "calibrating with the dataset" in logs[0]

    cal, _ = _calibrator(monkeypatch, tmp_path, [], read_from=tmp_path / "missing.cache")
    assert cal.read_calibration_cache() is None and "does not exist" in cal.cache_rejected


def test_make_calibrator_checks_kind_before_tensorrt(monkeypatch):
    from calibration.errors import CalibrationError
    from pipeline.backends.trt_calibrator import make_calibrator

    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(CalibrationError, match="unknown TensorRT calibrator 'percentile'"):
        make_calibrator("percentile", np.zeros((4, 1), np.float32))
    with pytest.raises(BackendError, match="tensorrt does not import"):
        make_calibrator("entropy2", np.zeros((4, 1), np.float32))
