"""The GPU histogram path (calibration.gpu_histogram): the device only compares |x| with a
table of bin edges computed on the CPU and counts, so its counts equal the CPU kernels'.

Here, on the CPU: the very same steps with torch CPU tensors and with numpy (the CuPy
code path), against the commit-9b9dfe4 arithmetic; how "auto" / "cpu" / "cuda" resolve.
Marked ``gpu`` (skipped without a CUDA device and torch or cupy): the same identity on
the device, and the TensorRT 8.6 fixture comparison run through the GPU path."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from calibration.errors import CalibrationError
from calibration.gpu_histogram import ArrayModuleOps, DeviceKernel, TorchOps, cuda_ops, resolve_device
from calibration.kernels import CpuKernel
from tests.calibration.test_kernels import CASES, _edge_values, _reference_counts
from tests.calibration.test_trt_fixture import fixture_inputs  # noqa: F401  (the fixture, regenerated once)


def _ops_on_cpu():
    ops = [ArrayModuleOps(np)]
    try:
        ops.append(TorchOps("cpu"))
    except ImportError:
        pass
    return ops


@pytest.mark.parametrize("num_bins, top, width", CASES)
def test_device_steps_on_the_cpu_equal_the_reference(num_bins, top, width):
    rng = np.random.default_rng(num_bins)
    values = _edge_values(width, num_bins, top, rng)
    want = _reference_counts(values, width, num_bins)
    want_relu = _reference_counts(np.maximum(values, 0), width, num_bins)
    for ops in _ops_on_cpu():
        before = values.copy()
        np.testing.assert_array_equal(ops.counts(values, width, num_bins), want, err_msg=ops.name)
        np.testing.assert_array_equal(ops.counts(values, width, num_bins, positive=True), want_relu, err_msg=ops.name)
        np.testing.assert_array_equal(values, before, err_msg=f"{ops.name} changed its input")


def test_float16_is_widened_exactly_and_other_dtypes_stay_on_the_cpu():
    rng = np.random.default_rng(1)
    half = rng.normal(0, 2, 5000).astype(np.float16)
    width = float(np.abs(half.astype(np.float64)).max()) / 2048
    for ops in _ops_on_cpu():
        np.testing.assert_array_equal(ops.counts(half, width, 2048), _reference_counts(half, width, 2048))
    kernel = DeviceKernel(ArrayModuleOps(np), CpuKernel("numpy"))
    doubles = rng.normal(0, 2, 5000)
    np.testing.assert_array_equal(kernel.counts(doubles, 0.003, 4000), _reference_counts(doubles, 0.003, 4000))


def test_chunks_on_the_device_sum_exactly(monkeypatch):
    import calibration.gpu_histogram as gh

    monkeypatch.setattr(gh, "DEVICE_CHUNK", 1000)
    rng = np.random.default_rng(2)
    x = rng.laplace(0, 1, 12_345).astype(np.float32)
    width = float(np.abs(x).max()) / 2048
    for ops in _ops_on_cpu():
        np.testing.assert_array_equal(ops.counts(x, width, 2048), _reference_counts(x, width, 2048))


def test_device_choice():
    cpu = CpuKernel("numpy")
    assert resolve_device("cpu", cpu) == (cpu, "cpu", "cpu chosen")
    kernel, device, _ = resolve_device("cpu:numpy", cpu)
    assert isinstance(kernel, DeviceKernel) and device == "cpu" and kernel.name == "numpy"
    with pytest.raises(CalibrationError, match="unknown calibration device 'tpu'"):
        resolve_device("tpu", cpu)
    with pytest.raises(CalibrationError, match="unknown calibration device 'cuda:jax'"):
        resolve_device("cuda:jax", cpu)
    if cuda_ops()[0] is None:
        assert resolve_device("auto", cpu)[1] == "cpu"
        with pytest.raises(CalibrationError, match="device 'cuda' asked for histograms, but no CUDA"):
            resolve_device("cuda", cpu)


def test_self_check_catches_a_device_that_rounds(monkeypatch):
    """A backend that divides in float32 (as torch's CUDA scalar division would round) is
    caught by the check that guards every device before use."""
    import calibration.gpu_histogram as gh

    class Sloppy(ArrayModuleOps):
        def counts(self, flat, width, num_bins, positive=False):
            v = np.maximum(flat, 0) if positive else np.abs(flat)
            idx = np.minimum((v * np.float32(1.0 / width)).astype(np.int64), num_bins - 1)
            return np.bincount(idx, minlength=num_bins)

    assert gh.self_check(ArrayModuleOps(np)) is None
    assert "counts differ" in gh.self_check(Sloppy(np))
    monkeypatch.setattr(gh, "_nvidia_driver_visible", lambda: True)
    monkeypatch.setattr(gh, "cuda_ops", lambda prefer=None: (Sloppy(np), ""))
    with pytest.raises(CalibrationError, match="failed its check"):
        resolve_device("cuda", CpuKernel("numpy"))


def test_auto_bins_on_the_cpu_even_with_a_gpu(monkeypatch):
    """The forward runs on the CPU, so "auto" bins there, without probing a GPU library; "cuda" asks for it."""
    import calibration.gpu_histogram as gh

    probed = []
    monkeypatch.setattr(gh, "_nvidia_driver_visible", lambda: True)
    monkeypatch.setattr(gh, "cuda_ops", lambda prefer=None: (probed.append(prefer), (ArrayModuleOps(np), ""))[1])
    cpu = CpuKernel("numpy")
    kernel, device, why = resolve_device("auto", cpu)
    assert (kernel, device) == (cpu, "cpu") and why == gh.AUTO_NOTE and probed == []
    kernel, device, _ = resolve_device("cuda", cpu)
    assert device == "cuda" and isinstance(kernel, DeviceKernel) and probed == [None]


def test_auto_does_not_import_torch_without_an_nvidia_driver():
    import calibration.gpu_histogram as gh

    if gh._nvidia_driver_visible():
        pytest.skip("an NVIDIA driver is visible here")
    code = ("import sys; from calibration.gpu_histogram import resolve_device; from calibration.kernels import "
            "CpuKernel; k, d, why = resolve_device('auto', CpuKernel('numpy')); "
            "print(d, 'torch' in sys.modules, 'cupy' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["cpu", "False", "False"]


# -- on a CUDA device ------------------------------------------------------------------------------------
def _cuda_backends():
    found = []
    for lib in ("torch", "cupy"):
        ops, _ = cuda_ops(prefer=lib)
        if ops is not None and ops.name.startswith(lib):
            found.append(ops)
    return found


@pytest.fixture(scope="module")
def cuda_backends():
    found = _cuda_backends()
    if not found:
        pytest.skip(f"no CUDA device usable from torch or cupy ({cuda_ops()[1]})")
    return found


@pytest.mark.gpu
@pytest.mark.parametrize("num_bins, top, width", CASES)
def test_cuda_counts_equal_the_reference(cuda_backends, num_bins, top, width):
    rng = np.random.default_rng(num_bins)
    values = _edge_values(width, num_bins, top, rng)
    big = rng.normal(0, top / 4, 3_000_001).astype(np.float32)
    big = np.clip(big, -top, top).astype(np.float32)
    for ops in cuda_backends:
        np.testing.assert_array_equal(ops.counts(values, width, num_bins), _reference_counts(values, width, num_bins),
                                      err_msg=ops.name)
        np.testing.assert_array_equal(ops.counts(values, width, num_bins, positive=True),
                                      _reference_counts(np.maximum(values, 0), width, num_bins), err_msg=ops.name)
        np.testing.assert_array_equal(ops.counts(big, width, num_bins), _reference_counts(big, width, num_bins),
                                      err_msg=ops.name)


@pytest.mark.gpu
@pytest.mark.slow
def test_fixture_through_the_gpu_path_matches_tensorrt_and_the_cpu(cuda_backends, fixture_inputs, record_property):
    """The TensorRT 8.6 fixture comparison (test_trt_fixture.py), with the histograms
    collected by ActivationCollector on the GPU: the same limits against TensorRT's cache,
    and every histogram bit for bit the CPU path's."""
    import json

    from calibration.cache import read_cache
    from calibration.collect import collect_histograms
    from calibration.rules import RULES, ranges_under
    from tests.calibration.test_trt_fixture import BATCH, CACHE_FILE, LIMITS, NUM_BATCHES, SAME, _comparable_names

    cache = read_cache(CACHE_FILE, expect_version="8.6.0", expect_algorithm="EntropyCalibration2")
    onnx_path = fixture_inputs / "resnet18.onnx"
    calib = np.load(fixture_inputs / "calib.npy", mmap_mode="r")
    inputs, outputs = _comparable_names(onnx_path, cache)

    def collect(device, growth):
        batches = (np.ascontiguousarray(calib[b * BATCH:(b + 1) * BATCH]) for b in range(NUM_BATCHES))
        return collect_histograms(onnx_path, batches, progress=False, tensors=inputs + outputs, optimize=False,
                                  growth=growth, device=device)

    for rules, limits in LIMITS.items():
        growth = RULES[rules].growth
        for ops in cuda_backends:
            lib = ops.name.split(":")[0]
            gpu, cpu = collect(f"cuda:{lib}", growth), collect("cpu", growth)
            assert gpu.stats.device == "cuda" and cpu.stats.device == "cpu"
            for name, hist in gpu.histograms.items():
                np.testing.assert_array_equal(hist.counts, cpu.histograms[name].counts, err_msg=name)
                assert hist.bin_width == cpu.histograms[name].bin_width, name
                assert hist.max_abs == cpu.histograms[name].max_abs, name
            amax = ranges_under(RULES[rules], gpu.histograms, "entropy", gpu.node_ops)[0]
            rel = {n: abs(a - float(cache.scales[n]) * 127.0) / (float(cache.scales[n]) * 127.0)
                   for n, a in amax.items()}
            diffs = np.array(list(rel.values()))
            stats = {"compared": len(rel), "median": float(np.median(diffs)), "p90": float(np.percentile(diffs, 90)),
                     "same_fraction": float(np.mean(diffs <= SAME))}
            print(f"\n{lib} on CUDA, {rules} rules vs TensorRT 8.6:", json.dumps(stats))
            record_property(f"{lib}_{rules}_same_fraction", stats["same_fraction"])
            assert stats["compared"] >= 50
            assert stats["median"] <= limits["median"] and stats["p90"] <= limits["p90"], (rules, stats)
            assert stats["same_fraction"] >= limits.get("same_fraction", 0.0), (rules, stats)
