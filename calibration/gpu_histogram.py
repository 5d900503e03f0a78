"""Binning on a CUDA device with PyTorch or CuPy, giving exactly the CPU's counts.

The device never divides. For a plan (``width``, ``num_bins``) the CPU computes, once,
the table of bin edges as float32 values (:func:`calibration.kernels.threshold_table`:
``T[k - 1]`` is the smallest float32 whose bin, by the float64 arithmetic every CPU
kernel uses, is ``>= k``). The device then runs

    counts = bincount(searchsorted(T, |x|, right=True), minlength=num_bins)

(``max(x, 0)`` in place of ``|x|`` for a Relu output binned from its input). ``|x|`` of
a float32 is exact, ``searchsorted`` only compares float32 values, and
``bincount`` adds integers: no step can round, so the device's counts equal the CPU
kernels' counts (and the bin is clamped to the last one, since ``T`` has ``num_bins - 1``
entries). float16 activations are widened to float32 on the device (exact); other dtypes
stay on the CPU kernel.

Backends, imported only when chosen: :class:`TorchOps` (``torch``, any device: CUDA on a
GPU machine, the CPU in tests) and :class:`ArrayModuleOps` (CuPy on a GPU, or numpy,
which runs these very steps on the CPU in tests). ``resolve_device("auto")`` is the CPU
kernel, without importing either library: the calibration forward runs in onnxruntime on
the CPU, and copying its activations to a GPU was measured slower than binning them there
(AUTO_NOTE). ``"cuda"`` picks a device (torch or cupy); before it is used,
:func:`self_check` bins edge cases on it and compares with the CPU kernel, and "cuda"
raises if they differ.
"""

from __future__ import annotations

import os
import threading
import warnings
from pathlib import Path
from typing import Any, Optional

import numpy as np

from calibration.errors import CalibrationError
from calibration.kernels import CpuKernel, threshold_table

DEVICES = ("auto", "cpu", "cuda")
DEVICE_DTYPES = (np.dtype(np.float32), np.dtype(np.float16))
#: Elements sent to the device per step: bounds its memory to ~1.5 GiB (values, |x|, indices).
DEVICE_CHUNK = 1 << 27
#: Below this bin width the edge table holds subnormal float32 values, which a device may
#: flush to zero (CuPy on an H200 did: every value landed in the last bin); such plans are
#: binned on the CPU. A subnormal value with a wider bin lands in bin 0 either way.
FLOAT32_TINY = float(np.finfo(np.float32).tiny)


def _subnormal_plan(width: float) -> bool:
    return float(width) < FLOAT32_TINY


class _EdgeTables:
    """Threshold tables per plan, on the host and (per backend) on the device."""

    def __init__(self, to_device: Any) -> None:
        self._to_device = to_device
        self._cache: dict[tuple[float, int], Any] = {}
        self._lock = threading.Lock()

    def get(self, width: float, num_bins: int) -> Any:
        key = (float(width), int(num_bins))
        with self._lock:
            table = self._cache.get(key)
            if table is None:
                if len(self._cache) > 512:  # plans change only when a histogram grows
                    self._cache.clear()
                table = self._cache[key] = self._to_device(threshold_table(width, num_bins))
            return table


class TorchOps:
    """The steps with PyTorch tensors on ``device`` ("cuda", "cuda:1", "cpu")."""

    def __init__(self, device: str = "cuda") -> None:
        import torch

        self.torch = torch
        self.device = torch.device(device)
        self.name = f"torch:{self.device}"
        self._tables = _EdgeTables(lambda t: torch.from_numpy(t).to(self.device))

    def counts(self, flat: np.ndarray, width: float, num_bins: int, positive: bool = False) -> np.ndarray:
        torch = self.torch
        if _subnormal_plan(width):
            return CpuKernel("numpy").counts(flat, width, num_bins, positive)
        out = np.zeros(int(num_bins), dtype=np.int64)
        if num_bins == 1:
            out[0] = flat.size
            return out
        table = self._tables.get(width, num_bins)
        with warnings.catch_warnings():  # read-only arrays (onnxruntime outputs): torch only reads them
            warnings.simplefilter("ignore", UserWarning)
            for start in range(0, flat.size, DEVICE_CHUNK):
                x = torch.from_numpy(np.ascontiguousarray(flat[start:start + DEVICE_CHUNK])).to(self.device)
                # float16 -> float32 is exact; |x| and max(x, 0) too (not in place: on the CPU,
                # x shares the caller's memory)
                x = x.float().clamp(min=0.0) if positive else x.float().abs()
                idx = torch.searchsorted(table, x, right=True)
                out += torch.bincount(idx, minlength=int(num_bins)).cpu().numpy()
        return out


class ArrayModuleOps:
    """The steps with a numpy-like array module: ``cupy`` on a GPU, ``numpy`` on the CPU
    (the same code, so a CPU test covers the CuPy path's logic)."""

    def __init__(self, xp: Any) -> None:
        self.xp = xp
        self.name = xp.__name__
        self._tables = _EdgeTables(xp.asarray)

    def _host(self, a: Any) -> np.ndarray:
        return a.get() if hasattr(a, "get") else np.asarray(a)

    def counts(self, flat: np.ndarray, width: float, num_bins: int, positive: bool = False) -> np.ndarray:
        xp = self.xp
        if _subnormal_plan(width):
            return CpuKernel("numpy").counts(flat, width, num_bins, positive)
        out = np.zeros(int(num_bins), dtype=np.int64)
        if num_bins == 1:
            out[0] = flat.size
            return out
        table = self._tables.get(width, num_bins)
        for start in range(0, flat.size, DEVICE_CHUNK):
            x = xp.asarray(flat[start:start + DEVICE_CHUNK]).astype(xp.float32)
            x = xp.maximum(x, xp.float32(0)) if positive else xp.abs(x)
            idx = xp.searchsorted(table, x, side="right")
            out += self._host(xp.bincount(idx, minlength=int(num_bins))).astype(np.int64)
        return out


class DeviceKernel:
    """A :class:`calibration.kernels.CpuKernel` look-alike that bins float32/float16 on the
    device and anything else with the CPU kernel."""

    task_elements = 1 << 62  # one task per tensor: the device is not split between threads

    def __init__(self, ops: Any, cpu: Optional[CpuKernel] = None) -> None:
        self.ops = ops
        self.cpu = cpu or CpuKernel("numpy")
        self.name = ops.name

    def counts(self, flat: np.ndarray, width: float, num_bins: int, positive: bool = False) -> np.ndarray:
        if flat.dtype in DEVICE_DTYPES:
            return self.ops.counts(flat, width, num_bins, positive)
        return self.cpu.counts(flat, width, num_bins, positive)

    def range(self, flat: np.ndarray) -> tuple[float, float]:
        """``(min, max)`` on the CPU, as the CPU kernel finds it (its one-pass compiled range
        where it has one): the device only counts."""
        return self.cpu.range(flat)


def _nvidia_driver_visible() -> bool:
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return False
    return Path("/proc/driver/nvidia").exists() or any(Path("/dev").glob("nvidia[0-9]*"))


def cuda_ops(prefer: Optional[str] = None) -> tuple[Optional[Any], str]:
    """``(ops, "")`` for the first of torch, cupy that sees a CUDA device (``prefer``
    first), or ``(None, why not)``."""
    reasons = []
    order = ["torch", "cupy"]
    if prefer in order:
        order.remove(prefer)
        order.insert(0, prefer)
    for lib in order:
        try:
            if lib == "torch":
                import torch

                if torch.cuda.is_available():
                    return TorchOps("cuda"), ""
                reasons.append("torch sees no CUDA device")
            else:
                import cupy

                if cupy.cuda.runtime.getDeviceCount() > 0:
                    return ArrayModuleOps(cupy), ""
                reasons.append("cupy sees no CUDA device")
        except Exception as e:  # ImportError, or a driver/runtime mismatch
            reasons.append(f"{lib}: {type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}".rstrip(": "))
    return None, "; ".join(reasons)


# Why "auto" bins on the CPU: the calibration forward runs in onnxruntime on the CPU, and copying every
# activation to a GPU to bin it there was slower than binning it where it is (ResNet-50, 512 samples,
# H200 host: 20.27 s with the GPU histograms, 15.05 s on the CPU). "cuda" still asks for the device.
AUTO_NOTE = ("auto: binned on the CPU, where onnxruntime's forward leaves the activations (copying them to a GPU "
             "was measured slower); device='cuda' bins on the GPU")


def resolve_device(device: str, cpu_kernel: CpuKernel) -> tuple[Any, str, str]:
    """``(kernel, "cpu" | "cuda", note on the choice)`` for ``device``: "auto", "cpu",
    "cuda" ("cuda:torch" / "cuda:cupy" pick the library), or "cpu:torch" / "cpu:numpy",
    which run the device path's steps on the CPU (slow; for tests). "auto" is the CPU
    kernel (AUTO_NOTE). "cuda" without a usable device raises."""
    base, _, lib = str(device).partition(":")
    libs = {"cuda": ("torch", "cupy"), "cpu": ("torch", "numpy"), "auto": ()}
    if base not in libs or (lib and lib not in libs[base]):
        raise CalibrationError(f"unknown calibration device {device!r}; use auto, cpu, cuda, cuda:torch or cuda:cupy "
                               "(cpu:torch and cpu:numpy run the GPU code path on the CPU)")
    if base == "cpu":
        if lib == "torch":
            return DeviceKernel(TorchOps("cpu"), cpu_kernel), "cpu", "GPU code path on the CPU (torch)"
        if lib == "numpy":
            return DeviceKernel(ArrayModuleOps(np), cpu_kernel), "cpu", "GPU code path on the CPU (numpy)"
        return cpu_kernel, "cpu", "cpu chosen"
    if base == "auto":  # the forward is onnxruntime on the CPU: bin the activations where they already are
        return cpu_kernel, "cpu", AUTO_NOTE
    ops, why = cuda_ops(prefer=lib or None)
    if ops is not None:
        problem = self_check(ops)
        if problem:
            ops, why = None, f"{ops.name} failed its check against the CPU kernel ({problem})"
    if ops is None:
        if base == "cuda":
            raise CalibrationError(f"device 'cuda' asked for histograms, but no CUDA library can use a GPU here "
                                   f"({why}); install torch or cupy with CUDA, or bin on the CPU "
                                   "(device='cpu'; calibration.device: cpu)")
        return cpu_kernel, "cpu", why
    return DeviceKernel(ops, cpu_kernel), "cuda", f"{ops.name} on CUDA"


def self_check(ops: Any) -> Optional[str]:
    """``ops`` against the numpy kernel on values on and beside bin edges, at the top and
    at zero, for |x| and max(x, 0); ``None`` when every count agrees, else what failed."""
    from calibration.kernels import bin_counts_numpy

    rng = np.random.default_rng(0)
    try:
        for num_bins, top in ((2048, 3.7), (2048 * 2 + 5, 0.01), (1, 1.0)):
            width = top / num_bins
            edges = (np.arange(num_bins + 1) * width).astype(np.float32)
            values = np.concatenate([edges, -edges, np.nextafter(edges, np.float32(0)),
                                     rng.uniform(-top, top, 10_000).astype(np.float32), np.float32([0.0, -0.0])])
            values = values[np.abs(values.astype(np.float64)) <= top]
            for positive in (False, True):
                got = ops.counts(values, width, num_bins, positive)
                if not np.array_equal(got, bin_counts_numpy(values, width, num_bins, positive=positive)):
                    return f"{num_bins} bins, positive={positive}: counts differ"
    except Exception as e:
        return f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
    return None
