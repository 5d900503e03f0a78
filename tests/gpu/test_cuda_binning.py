"""Binning on the GPU where the TensorRT calibration forward leaves the activations
(pipeline/runtime/cuda_binning.py, kernels/binning.cu): on values on and beside every bin edge the
device's counts and ranges are the CPU kernels', bit for bit (shared-memory and global kernels,
|x| and max(x, 0), NaN, Inf, empty, subnormal widths); and a whole collection through the engine
gives the very histograms the same engine's outputs give when binned on the CPU."""

from __future__ import annotations

import math

import numpy as np
import pytest

pytest.importorskip("tensorrt", reason="TensorRT is not installed: these need TensorRT and an NVIDIA GPU (pip install -e .[tensorrt]; README, On a GPU)")
pytestmark = pytest.mark.gpu


@pytest.fixture()
def device():
    from calibration.kernels import CpuKernel
    from pipeline.runtime.cuda_binning import CudaBinner, DeviceTensor
    from pipeline.runtime.cuda_memory import open_memory

    mem = open_memory("pycuda")
    stream = mem.create_stream()
    buffers = []

    def put(values: np.ndarray) -> DeviceTensor:
        values = np.ascontiguousarray(values)
        buf = mem.alloc_device(max(values.nbytes, 4))
        buffers.append(buf)
        with mem.activate():
            mem.htod(buf.ptr, values)
        return DeviceTensor(buf.ptr, values.shape, values.dtype, lambda: values.copy())

    binner = CudaBinner(mem, stream, CpuKernel("numpy"))
    yield binner, put
    binner.close()
    for b in buffers:
        b.free()
    mem.close()


def _edge_values(top: float, num_bins: int, rng: np.random.Generator) -> np.ndarray:
    width = top / num_bins
    edges = (np.arange(num_bins + 1) * width).astype(np.float32)
    values = np.concatenate([edges, -edges, np.nextafter(edges, np.float32(0)), np.nextafter(edges, np.float32(np.inf)),
                             rng.uniform(-top, top, 200_000).astype(np.float32), np.float32([0.0, -0.0])])
    return values[np.abs(values.astype(np.float64)) <= top]


@pytest.mark.parametrize("num_bins, top", [(2048, 3.7), (2048 * 2 + 5, 0.01), (20_000, 123.0), (1, 1.0)])
def test_counts_and_ranges_equal_the_cpu_kernels(device, num_bins, top):
    from calibration.histogram import BinPlan
    from calibration.kernels import abs_range, bin_counts_numpy
    from pipeline.runtime.cuda_binning import MAX_SHARED_BINS

    binner, put = device
    values = _edge_values(top, num_bins, np.random.default_rng(num_bins))
    width = top / num_bins
    x = put(values)
    assert binner.ranges([x]) == [abs_range(values)]
    for positive in (False, True):
        got = binner.counts([(x, BinPlan(width, num_bins), positive)])[0]
        want = bin_counts_numpy(values, width, num_bins, positive=positive)
        assert np.array_equal(got, want), (num_bins, positive, np.flatnonzero(got != want)[:5])
    kernel = "bin_f32_global" if num_bins > MAX_SHARED_BINS else "bin_f32_shared"
    assert binner.launched[kernel] == (2 if num_bins > 1 else 0) and binner.launched["range_f32"] == 1


def test_many_tensors_in_one_batch_nan_inf_empty_and_host_values(device):
    from calibration.histogram import BinPlan
    from calibration.kernels import abs_range, bin_counts_numpy

    binner, put = device
    rng = np.random.default_rng(1)
    a = rng.standard_normal(3_000_001).astype(np.float32)  # more blocks than one
    b = np.float32([1.0, np.nan, -2.0])
    c = np.float32([np.inf, -5.0])
    d = np.zeros(0, np.float32)
    e = rng.standard_normal(1000).astype(np.float16)  # not float32: binned on the host
    h = rng.standard_normal(5000).astype(np.float32)  # a host array (a fed input)
    got = binner.ranges([put(a), put(b), put(c), put(d), put(e), h])
    assert got[0] == abs_range(a) and got[2] == (-5.0, math.inf) and got[3] == (0.0, 0.0)
    assert math.isnan(got[1][0]) and math.isnan(got[1][1])
    assert got[4] == abs_range(e) and got[5] == abs_range(h)
    plans = [BinPlan(4.5 / 2048, 2048), BinPlan(1e-42, 2048), BinPlan(0.01, 2048), BinPlan(0.02, 2048)]
    tiny = a * np.float32(1e-40)  # subnormal values for the subnormal plan (binned on the host)
    counts = binner.counts([(put(a), plans[0], False), (put(tiny), plans[1], True), (put(e), plans[2], False),
                            (h, plans[3], True)])
    for got_c, arr, plan, positive in zip(counts, [a, tiny, e, h], plans, [False, True, False, True]):
        assert np.array_equal(got_c, bin_counts_numpy(arr, plan.width, plan.num_bins, positive=positive))


def test_collection_binned_on_the_gpu_equals_the_engines_values_binned_on_the_cpu(env, tmp_path, monkeypatch):
    from calibration.collect import collect_histograms
    from pipeline.backends.trt_forward import TrtForward

    monkeypatch.setenv("TRTPIPE_CACHE_DIR", str(tmp_path / "engines"))
    batches = [env.calib[i:i + 16] for i in range(0, 64, 16)]
    runs = {}
    for device in ("auto", "cpu"):
        runs[device] = collect_histograms(env.onnx, iter(batches), progress=False, growth="double", device=device,
                                          forward=lambda m: TrtForward(m, what="test"))
    gpu, cpu = runs["auto"], runs["cpu"]
    assert gpu.stats.device == "cuda" and "PTX" in gpu.stats.kernel, (gpu.stats.kernel, gpu.stats.device_note)
    assert cpu.stats.device == "cpu"
    assert set(gpu.histograms) == set(cpu.histograms) and gpu.derived == cpu.derived
    for name, h in cpu.histograms.items():
        g = gpu.histograms[name]
        assert (g.max_abs, g.bin_width, g.num_samples) == (h.max_abs, h.bin_width, h.num_samples), name
        assert np.array_equal(g.counts, h.counts), name
    assert {k: v.tolist() for k, v in gpu.first_outputs.items()} == {k: v.tolist() for k, v in cpu.first_outputs.items()}
