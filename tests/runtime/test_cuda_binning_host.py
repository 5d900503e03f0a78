"""The host side of binning on the GPU (pipeline/runtime/cuda_binning.py) without a GPU: a device
stand-in holds "device memory" in numpy and runs the three kernels of kernels/binning.cu the way
the grid does (block b takes the elements i with (i // BLOCK) % grid == b), so the binner's
slots, offsets, partial reductions and host fallbacks are checked against the CPU kernels, and the
collector's device path (a forward whose values stay on the device, binned by its own binner)
against its default. The kernels themselves run on a GPU in tests/gpu/test_cuda_binning.py."""

from __future__ import annotations

import contextlib
import math

import numpy as np
import pytest

from calibration.histogram import BinPlan
from calibration.kernels import CpuKernel, abs_range, bin_counts_numpy
from pipeline.errors import BackendError
from pipeline.runtime import cuda_binning
from pipeline.runtime.cuda_binning import BLOCK, CudaBinner, DeviceTensor
from pipeline.runtime.cuda_memory import DeviceBuffer, HostBuffer, Kernels


class StandInDevice:
    """Device memory as numpy byte arrays at fake addresses, and binning.cu's kernels in numpy."""

    name = "stand-in"

    def __init__(self, kernels_fail: bool = False, side: str = "right", launch_fails: bool = False) -> None:
        self.blocks: dict[int, np.ndarray] = {}
        self.next = 1 << 20
        self.kernels_fail = kernels_fail
        self.side = side  # "left": a kernel that puts values on a bin edge in the bin below
        self.launch_fails = launch_fails  # every launch raises, as a driver error would
        self.syncs = 0

    def _at(self, ptr: int, nbytes: int) -> np.ndarray:
        for base, buf in self.blocks.items():
            if base <= ptr and ptr + nbytes <= base + buf.size:
                return buf[ptr - base:ptr - base + nbytes]
        raise AssertionError(f"no device allocation holds [{ptr}, {ptr + nbytes})")

    def activate(self):
        return contextlib.nullcontext()

    def alloc_device(self, nbytes: int) -> DeviceBuffer:
        base, self.next = self.next, self.next + max(int(nbytes), 1) + 4096
        self.blocks[base] = np.full(max(int(nbytes), 1), 0xAB, np.uint8)  # garbage until written
        return DeviceBuffer(base, nbytes, lambda: self.blocks.pop(base))

    def alloc_host(self, nbytes: int) -> HostBuffer:
        return HostBuffer(np.zeros(max(int(nbytes), 1), np.uint8), lambda: None)

    def htod(self, dst: int, src: np.ndarray) -> None:
        raw = np.ascontiguousarray(src).view(np.uint8).reshape(-1)
        self._at(dst, raw.size)[:] = raw

    def dtoh_async(self, dst: np.ndarray, src: int, stream) -> None:
        dst.view(np.uint8).reshape(-1)[:] = self._at(src, dst.nbytes)

    def memset_async(self, ptr: int, nbytes: int, stream) -> None:
        self._at(ptr, nbytes)[:] = 0

    def synchronize(self, stream) -> None:
        self.syncs += 1

    def put(self, values: np.ndarray) -> DeviceTensor:
        values = np.ascontiguousarray(values)
        buf = self.alloc_device(values.nbytes)
        self.htod(buf.ptr, values)
        return DeviceTensor(buf.ptr, values.shape, values.dtype, lambda: values.copy())

    def _f32(self, ptr: int, n: int) -> np.ndarray:
        return self._at(ptr, 4 * n).view(np.float32)

    def load_kernels(self, ptx: bytes, signatures: dict[str, str]) -> Kernels:
        if self.kernels_fail:
            raise BackendError("stand-in: the driver cannot JIT this PTX")
        assert b".entry range_f32" in ptx and set(signatures) == {"range_f32", "bin_f32_shared", "bin_f32_global"}

        def launch(name, grid, block, stream, args, shared_bytes):
            if self.launch_fails:
                raise RuntimeError("cuLaunchKernel failed: too many resources requested for launch")
            assert block == BLOCK
            x = self._f32(args[0], args[1])
            owner = (np.arange(x.size) // BLOCK) % grid
            if name == "range_f32":
                lo, hi, nan = (self._at(p, 4 * grid) for p in args[2:5])
                for b in range(grid):
                    part = x[owner == b]
                    ok = part[~np.isnan(part)]
                    lo.view(np.float32)[b] = ok.min() if ok.size else np.inf
                    hi.view(np.float32)[b] = ok.max() if ok.size else -np.inf
                    nan.view(np.uint32)[b] = np.isnan(part).sum()
                return
            table_ptr, num_bins, positive, counts_ptr = args[2:6]
            if name == "bin_f32_shared":
                assert shared_bytes == num_bins * 4 + (num_bins - 1) * 4 <= 48 * 1024
            table = self._f32(table_ptr, num_bins - 1)
            v = np.maximum(x, np.float32(0)) if positive else np.abs(x)
            counts = self._at(counts_ptr, 8 * num_bins).view(np.uint64)
            counts += np.bincount(np.searchsorted(table, v, side=self.side), minlength=num_bins).astype(np.uint64)

        return Kernels(launch, list(signatures))


@pytest.fixture()
def dev():
    return StandInDevice()


def test_ranges_of_many_tensors_from_one_copy(dev):
    rng = np.random.default_rng(0)
    a = rng.standard_normal(BLOCK * 16 * 5 + 7).astype(np.float32)  # five blocks' worth and a ragged end
    b = np.float32([1.0, np.nan, -2.0])
    c = np.float32([np.inf, -5.0])
    e = rng.standard_normal(100).astype(np.float16)
    h = rng.standard_normal(300).astype(np.float32)
    binner = CudaBinner(dev, None, CpuKernel("numpy"))
    syncs = dev.syncs
    got = binner.ranges([dev.put(a), dev.put(b), dev.put(c), dev.put(np.zeros(0, np.float32)), dev.put(e), h])
    assert got[0] == abs_range(a) and got[2] == (-5.0, math.inf) and got[3] == (0.0, 0.0)
    assert all(math.isnan(v) for v in got[1])
    assert got[4] == abs_range(e) and got[5] == abs_range(h)
    assert dev.syncs == syncs + 1 and binner.launched["range_f32"] == 3  # float32 tensors only, one copy back


@pytest.mark.parametrize("num_bins", [2048, 6144, 6145, 20_000])
def test_counts_of_many_tensors_under_their_plans(dev, num_bins):
    rng = np.random.default_rng(num_bins)
    a = (rng.standard_normal(50_000) * 3).astype(np.float32)
    b = rng.uniform(-1, 1, 7000).astype(np.float32)
    jobs = [(dev.put(a), BinPlan(12.0 / num_bins, num_bins), False), (dev.put(b), BinPlan(1.0 / num_bins, num_bins), True),
            (dev.put(a * np.float32(1e-40)), BinPlan(1e-42, 16), False),  # subnormal width: the CPU kernel
            (dev.put(a.astype(np.float16)), BinPlan(0.01, 2048), False),  # float16: the CPU kernel
            (b, BinPlan(0.5, 1), False)]
    want = [bin_counts_numpy(np.asarray(x.host() if isinstance(x, DeviceTensor) else x), p.width, p.num_bins,
                             positive=pos) for x, p, pos in jobs]
    binner = CudaBinner(dev, None, CpuKernel("numpy"))
    got = binner.counts(jobs)
    assert jobs == []
    for g, w in zip(got, want):
        assert g.dtype == np.int64 and np.array_equal(g, w)
    kernel = "bin_f32_shared" if num_bins <= 6144 else "bin_f32_global"
    assert binner.launched == {kernel: 2}
    binner.close()
    assert not binner._buffers and not binner._tables


def test_the_ptx_defines_every_kernel_the_binner_launches():
    ptx = cuda_binning.PTX_FILE.read_text()
    for name in cuda_binning.SIGNATURES:
        assert f".entry {name}(" in ptx
    assert ".version 7.0" in ptx and ".target sm_75" in ptx  # loads on CUDA 11.0+ drivers (make ptx)


class _DeviceForward:
    """onnxruntime's values handed over as device tensors of a stand-in device, binned by the
    forward's own binner: the collector's path for the TensorRT forward, without a GPU."""

    name = "stand-in device"
    reuses_buffers = True

    def __init__(self, model, dev: "StandInDevice"):
        from calibration.ort_session import make_session

        self.session = make_session(model, level="disable")
        self.dev = dev
        self.on_device = False

    def run(self, names, feeds):
        out = self.session.run(list(names), dict(feeds))
        return [self.dev.put(np.ascontiguousarray(v)) if self.on_device else v for v in out]

    def binner(self, cpu_kernel, *, required=False, threads=1):
        from pipeline.backends.trt_forward import DeviceBinning

        self.on_device = True
        fwd = self

        class _Runner:
            def device_binner(self, cpu):
                return CudaBinner(fwd.dev, None, cpu)

        self._runner, self._what = _Runner(), "stand-in"
        return DeviceBinning(self, cpu_kernel, required=required, threads=threads)

    def describe(self):
        return {}

    def close(self):
        self.session = None


@pytest.mark.parametrize("kernels_fail, side, launch_fails", [(False, "right", False), (True, "right", False),
                                                              (False, "left", False), (False, "right", True)])
def test_collector_bins_device_values_with_the_forwards_binner(tmp_path, kernels_fail, side, launch_fails):
    from calibration.collect import collect_histograms
    from tests.backends.test_trt_versions import _model

    onnx_path = _model(tmp_path / "model.onnx")
    x = np.random.default_rng(3).normal(size=(24, 3, 8, 8)).astype(np.float32)
    batches = [x[i:i + 8] for i in range(0, 24, 8)]
    plain = collect_histograms(onnx_path, iter(batches), progress=False, optimize=False, growth="double")
    dev = StandInDevice(kernels_fail=kernels_fail, side=side, launch_fails=launch_fails)
    on_dev = collect_histograms(onnx_path, iter(batches), progress=False, growth="double",
                                forward=lambda m: _DeviceForward(m, dev))
    assert set(on_dev.histograms) == set(plain.histograms) and on_dev.derived
    for name, h in plain.histograms.items():
        g = on_dev.histograms[name]
        assert (g.max_abs, g.bin_width, g.num_samples) == (h.max_abs, h.bin_width, h.num_samples), name
        assert np.array_equal(g.counts, h.counts), name
    for k, v in plain.first_outputs.items():
        assert np.array_equal(on_dev.first_outputs[k], v)
    if kernels_fail or side == "left" or launch_fails:  # not loaded, check failed or did not run: the CPU bins
        assert on_dev.stats.device == "cpu" and "binning on the GPU is unavailable" in on_dev.stats.device_note
        why = "cannot JIT" if kernels_fail else "too many resources" if launch_fails else "counts differ from the CPU"
        assert why in on_dev.stats.device_note
    else:
        assert on_dev.stats.device == "cuda" and "PTX" in on_dev.stats.kernel


def test_required_device_binning_that_cannot_load_is_one_line(tmp_path):
    from calibration.collect import collect_histograms
    from tests.backends.test_trt_versions import _model

    onnx_path = _model(tmp_path / "model.onnx")
    x = np.random.default_rng(3).normal(size=(8, 3, 8, 8)).astype(np.float32)
    with pytest.raises(BackendError, match="calibration.device: cuda, but binning on the GPU is unavailable") as e:
        collect_histograms(onnx_path, iter([x]), progress=False, device="cuda",
                           forward=lambda m: _DeviceForward(m, StandInDevice(kernels_fail=True)))
    assert "\n" not in str(e.value)


def test_nan_in_a_device_tensor_names_tensor_and_batch(tmp_path):
    from calibration.collect import collect_histograms
    from calibration.errors import CalibrationError
    from tests.backends.test_trt_versions import _model

    onnx_path = _model(tmp_path / "model.onnx")
    x = np.random.default_rng(3).normal(size=(8, 3, 8, 8)).astype(np.float32)
    x[2, 1, 3, 3] = np.nan
    with pytest.raises(CalibrationError, match=r"batch 0 .* has \d+ NaN") as e:
        collect_histograms(onnx_path, iter([x]), progress=False,
                           forward=lambda m: _DeviceForward(m, StandInDevice()))
    assert "\n" not in str(e.value)
