"""Exact binning kernels for :class:`calibration.histogram.AbsHistogram`.

One arithmetic defines a bin index, whatever the kernel: for a value ``x`` of a batch
and the histogram's ``width`` and ``num_bins`` at that moment,

    index(x) = min(trunc(float64(|x|) / width), num_bins - 1)

``float64(|x|)`` is exact for every real dtype the histogram takes, the division is one
IEEE-754 float64 division (round to nearest), truncation equals floor for values >= 0,
and the clamp puts ``|x| == top`` in the last bin. Every kernel here returns the counts
of those indices, bit for bit the same:

* :func:`bin_counts_numpy`: the arithmetic above, written out with numpy on chunks that
  stay in the CPU cache (no clamp pass: indices past the end are folded into the last
  bin after ``np.bincount``, which is the clamp).
* :mod:`calibration.native`: the same arithmetic in a small C function (float32 only),
  compiled on first use where a C compiler exists; checked against the numpy kernel on
  edge values when loaded, and never used when that check fails.
* :func:`bin_counts_by_edges`: no division at all. :func:`threshold_table` finds, for
  every bin ``k >= 1``, the smallest float32 ``T[k]`` whose index is ``>= k`` (by
  bisection over float32 bit patterns, each step evaluated with the float64 division
  above). ``index`` is non-decreasing in ``|x|`` (IEEE division by a positive number is
  monotone), so ``index(x) = #{k : T[k] <= |x|}``, a ``searchsorted``: comparisons of
  float32 values, exact on any device. The GPU path (:mod:`calibration.gpu_histogram`)
  uses it, so device arithmetic never decides a bin.

:func:`abs_range` gives ``(min, max)`` of a batch (NaN propagates, so one pass finds
NaN, Inf and max|x|). No torch import here: this module runs in the GPU kit too.
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np

from calibration.errors import CalibrationError

#: Elements per numpy step: a float64 chunk of 512 KiB stays in the CPU's L2 cache.
NUMPY_CHUNK = 1 << 16
KERNELS = ("auto", "native", "numpy")


def abs_range(flat: np.ndarray) -> tuple[float, float]:
    """``(min, max)`` of ``flat`` as Python floats (NaN if any value is NaN); ``(0, 0)``
    for an empty array. ``max|x| = max(hi, -lo, 0)``."""
    if flat.size == 0:
        return 0.0, 0.0
    return float(flat.min()), float(flat.max())


def fold_bincount(indices: np.ndarray, num_bins: int) -> np.ndarray:
    """``np.bincount`` of non-negative ``indices`` with every index ``>= num_bins - 1``
    counted in the last bin (``min(index, num_bins - 1)``, without a pass to clamp)."""
    counts = np.bincount(indices, minlength=num_bins)
    if counts.size > num_bins:
        counts[num_bins - 1] += counts[num_bins:].sum()
        counts = counts[:num_bins]
    return counts.astype(np.int64, copy=False)


def bin_counts_numpy(flat: np.ndarray, width: float, num_bins: int, chunk: int = NUMPY_CHUNK,
                     positive: bool = False) -> np.ndarray:
    """Counts (int64, ``num_bins``) of ``min(trunc(float64(|x|) / width), num_bins - 1)``
    over the 1-D array ``flat`` (any real dtype), chunk by chunk. ``positive``: of
    ``max(x, 0)`` instead of ``|x|`` (the values of ``Relu(x)``, binned from ``x``)."""
    out = np.zeros(num_bins, dtype=np.int64)
    if flat.size == 0:
        return out
    step = min(int(chunk), flat.size)
    scaled = np.empty(step, dtype=np.float64)
    indices = np.empty(step, dtype=np.intp)
    for start in range(0, flat.size, step):
        part = flat[start:start + step]
        q, i = scaled[:part.size], indices[:part.size]
        np.abs(part, out=q, dtype=np.float64)  # converted first, then |.|: exact for every real dtype
        if positive:
            q[part <= 0] = 0.0  # max(x, 0): |x| where x > 0, else 0
        q /= width  # divide, not multiply by 1/width: exact on bin edges
        np.copyto(i, q, casting="unsafe")  # truncation == floor for values >= 0
        out += fold_bincount(i, num_bins)
    return out


# -- division-free: a table of bin edges as float32 values -------------------------------------
_F32_INF_BITS = 0x7F800000


def threshold_table(width: float, num_bins: int) -> np.ndarray:
    """float32 array ``T`` of ``num_bins - 1`` values: ``T[k - 1]`` is the smallest
    float32 ``v >= 0`` with ``trunc(float64(v) / width) >= k`` (``+inf`` where no finite
    float32 reaches bin ``k``). Then for any float32 (or float16) ``x``,
    ``searchsorted(T, |x|, side="right")`` is ``min(trunc(float64(|x|) / width),
    num_bins - 1)`` exactly."""
    if not (width > 0.0 and math.isfinite(width)):
        raise CalibrationError(f"bin width must be a positive finite number, got {width!r}")
    k = np.arange(1, int(num_bins), dtype=np.float64)
    lo = np.zeros(k.size, dtype=np.int64)  # bits of 0.0: index 0 < k
    hi = np.full(k.size, _F32_INF_BITS, dtype=np.int64)  # bits of +inf: index "infinite" >= k
    while True:
        open_ = hi - lo > 1
        if not open_.any():
            break
        mid = (lo + hi) // 2
        value = mid.astype(np.uint32).view(np.float32).astype(np.float64)
        reaches = value / width >= k  # trunc(q) >= k  <=>  q >= k, for q >= 0 and integer k
        hi = np.where(open_ & reaches, mid, hi)
        lo = np.where(open_ & ~reaches, mid, lo)
    return hi.astype(np.uint32).view(np.float32)


def bin_counts_by_edges(flat: np.ndarray, table: np.ndarray, num_bins: int, positive: bool = False) -> np.ndarray:
    """Counts like :func:`bin_counts_numpy`, by comparisons with :func:`threshold_table`
    (float16 / float32 input only). Slow on a CPU; here as the reference for the device
    kernels, which run the same steps."""
    if flat.dtype not in (np.float32, np.float16):
        raise CalibrationError(f"edge-table binning takes float32 or float16, got {flat.dtype}")
    values = flat.astype(np.float32, copy=False)
    absolute = np.maximum(values, np.float32(0)) if positive else np.abs(values)
    indices = np.searchsorted(table, absolute, side="right")
    return np.bincount(indices, minlength=num_bins).astype(np.int64, copy=False)


# -- kernel choice --------------------------------------------------------------------------------
class CpuKernel:
    """The CPU binning kernel: the compiled one for contiguous float32 where it loaded
    (``kernel="auto"`` or ``"native"``), numpy otherwise. ``name`` says which runs;
    ``why_not_native`` why the compiled one does not (``None`` when it does)."""

    def __init__(self, kernel: str = "auto") -> None:
        if kernel not in KERNELS:
            raise CalibrationError(f"unknown histogram kernel {kernel!r}; use one of {', '.join(KERNELS)}")
        self._native = None
        self.why_not_native: Optional[str] = "numpy kernel chosen"
        if kernel != "numpy":
            from calibration import native

            self._native, self.why_not_native = native.load()
            if self._native is None and kernel == "native":
                raise CalibrationError(f"the compiled histogram kernel is not available ({self.why_not_native}); "
                                       "use kernel='numpy' or 'auto', or install a C compiler (cc/gcc)")
        self.name = "native" if self._native is not None else "numpy"

    def range(self, flat: np.ndarray) -> tuple[float, float]:
        """``(min, max)`` of a 1-D array like :func:`abs_range` (NaN when it holds a NaN): in one
        compiled pass for contiguous float32, else numpy's two."""
        if self._native is not None and flat.dtype == np.float32 and flat.flags.c_contiguous:
            return self._native.range_f32(flat)
        return abs_range(flat)

    def counts(self, flat: np.ndarray, width: float, num_bins: int, positive: bool = False) -> np.ndarray:
        """Counts of ``|x|`` (or of ``max(x, 0)`` when ``positive``) under the plan."""
        if (self._native is not None and flat.dtype == np.float32 and flat.flags.c_contiguous
                and num_bins < (1 << 31)):
            return self._native.bin_f32(flat, width, num_bins, positive)
        return bin_counts_numpy(flat, width, num_bins, positive=positive)
