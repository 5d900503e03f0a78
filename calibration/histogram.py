"""Streaming histogram of |x| per tensor, grown the way TensorRT's calibrators grow it.

The first batch fixes the bin width: ``num_bins`` (2048) equal bins over
``[0, max|x| of that batch]``; a later batch with a smaller max just adds to the existing
bins. A later batch with a *larger* max grows the histogram by one of two rules
(``growth``):

* ``"append"``: the histogram step as NVIDIA's public reference
  implementations describe it. Keep the width and append bins until the new max is
  covered, so the histogram may grow past 2048 bins; old counts are never re-binned.
* ``"double"``: what TensorRT 8.6's own IInt8EntropyCalibrator2 measurably does. The
  number of bins stays ``num_bins``; the range doubles (adjacent bins are merged in
  pairs, so the width doubles) until the new max is covered. Evidence: in TensorRT's
  caches for ResNet-18, ResNet-50 and the digits CNN, every tensor whose max grew after
  the first batch has ``amax / (first max / 2048)`` equal to an odd integer, i.e.
  ``(i + 1/2)`` bins of twice the first width (see :mod:`calibration.rules`).

Merging pairs of bins whose edges sit at ``k * width`` loses nothing: the result is the
histogram of all values seen at the doubled width, except that a value equal to the old
top (the first batch's max, counted in the last bin) stays in the merged bin *below*
that edge. TensorRT does the same: for the digits CNN's Gemm output its amax is
``1024.5`` bins of the doubled width, the candidate that ends exactly there, which only
that placement reproduces.

A batch is taken in two steps, so that callers can bin many tensors in parallel, or on
a GPU: :meth:`AbsHistogram.begin_batch` accounts for the batch's size and max|x|
(initialising or growing the bins) and returns the :class:`BinPlan` (width, number of
bins) to bin it with; :meth:`AbsHistogram.add_counts` adds the counts a kernel of
:mod:`calibration.kernels` computed under that plan. Every kernel computes the bin of
``x`` as ``min(trunc(float64(|x|) / width), num_bins - 1)``, bit for bit.
:meth:`AbsHistogram.update` does both for one array. Activations are never stored, so
memory stays at a few MiB per histogram whatever the dataset size.

All-zero data (e.g. a ReLU output that is dead for the first batch): a bin width cannot
be derived from max|x| = 0, so the histogram stays *uninitialised* (``bin_width == 0``,
``counts`` empty) and only counts the zeros. The first batch with a non-zero max|x| then
sets the width exactly as a first batch would, and the zeros seen so far are put in bin
0, where they belong at any width. A tensor that is zero for the whole dataset keeps
``max_abs == 0``; every algorithm in :mod:`calibration.algorithms` then gives amax 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np

from calibration.errors import CalibrationError
from calibration.kernels import abs_range, bin_counts_numpy

DEFAULT_NUM_BINS = 2048
GROWTH_RULES = ("append", "double")
#: "append" growth past this many bins (128 MiB of counts) is refused instead of allocated.
MAX_APPENDED_BINS = 1 << 24


@dataclass(frozen=True)
class BinPlan:
    """How to bin one batch: ``index = min(trunc(float64(|x|) / width), num_bins - 1)``."""

    width: float
    num_bins: int


class AbsHistogram:
    """Histogram of |x| over ``[0, top]`` with a fixed bin width once initialised.

    Attributes (read-only properties):
        counts: int64 array, one count per bin (empty until a non-zero value is seen).
        bin_width: width of every bin (0.0 until initialised).
        max_abs: largest |x| seen so far.
        num_samples: number of values seen so far (zeros of an all-zero start included).
    """

    def __init__(self, num_bins: int = DEFAULT_NUM_BINS, name: str | None = None, growth: str = "append") -> None:
        if int(num_bins) < 1:
            raise CalibrationError(f"histogram needs at least 1 bin, got num_bins={num_bins}; use 2048 "
                                   "(TensorRT's EntropyCalibration2)")
        if growth not in GROWTH_RULES:
            raise CalibrationError(f"unknown histogram growth {growth!r}; use one of {', '.join(GROWTH_RULES)}")
        self.name = name
        self.growth = growth
        self._initial_bins = int(num_bins)
        self._counts = np.zeros(0, dtype=np.int64)
        self._width = 0.0
        self._top = 0.0  # upper edge of the last bin
        self._max_abs = 0.0
        self._num_samples = 0
        self._pending_zeros = 0

    # -- read-only views ---------------------------------------------------------------
    @property
    def counts(self) -> np.ndarray:
        view = self._counts.view()
        view.flags.writeable = False
        return view

    @property
    def bin_width(self) -> float:
        return self._width

    @property
    def max_abs(self) -> float:
        return self._max_abs

    @property
    def num_samples(self) -> int:
        return self._num_samples

    @property
    def num_bins(self) -> int:
        return int(self._counts.size)

    @property
    def edges(self) -> np.ndarray:
        """Bin edges ``k * bin_width`` (the last one is the exact upper edge)."""
        edges = np.arange(self.num_bins + 1, dtype=np.float64) * self._width
        if edges.size:
            edges[-1] = self._top
        return edges

    def __repr__(self) -> str:
        return (f"AbsHistogram(name={self.name!r}, growth={self.growth!r}, bins={self.num_bins}, "
                f"bin_width={self._width:.6g}, max_abs={self._max_abs:.6g}, num_samples={self._num_samples})")

    # -- collection ---------------------------------------------------------------------
    def update(self, batch: np.ndarray, kernel: Optional[object] = None) -> None:
        """Add the absolute values of one batch (any shape, real dtype) to the histogram.

        Raises CalibrationError on NaN or Inf, naming the tensor: TensorRT would compute
        a meaningless range from such data. ``kernel``: an object with
        ``counts(flat, width, num_bins)`` (:class:`calibration.kernels.CpuKernel`);
        numpy by default.
        """
        flat = self._as_flat_real(batch)
        if flat.size == 0:
            return
        lo, hi = abs_range(flat)
        if not (math.isfinite(lo) and math.isfinite(hi)):
            self._raise_non_finite(flat)
        plan = self.begin_batch(max(hi, -lo, 0.0), int(flat.size))
        if plan is not None:
            counts = (kernel.counts(flat, plan.width, plan.num_bins) if kernel is not None  # type: ignore[attr-defined]
                      else bin_counts_numpy(flat, plan.width, plan.num_bins))
            self.add_counts(plan, counts)

    def begin_batch(self, batch_max: float, size: int) -> Optional[BinPlan]:
        """Account for a batch of ``size`` values whose max|x| is ``batch_max`` (finite,
        ``>= 0``): count its values, initialise or grow the bins (by the growth rule).
        Returns the plan to bin the batch with, then give :meth:`add_counts` its counts;
        ``None`` when there is nothing to bin (an empty batch, or zeros only before the
        bin width is known: they are counted in bin 0 once it is)."""
        if not (batch_max >= 0.0 and math.isfinite(batch_max)):
            raise CalibrationError(f"max|x| of a batch for {self._label()} must be finite and >= 0, got {batch_max!r}")
        if size <= 0:
            return None
        plan: Optional[BinPlan] = None
        if self._width == 0.0 and batch_max == 0.0:
            self._pending_zeros += int(size)
        else:
            if self._width == 0.0:
                self._initialise(float(batch_max))
            elif batch_max > self._top:
                self._grow(float(batch_max))  # may refuse: then nothing has changed
            plan = BinPlan(self._width, int(self._counts.size))
        self._num_samples += int(size)
        self._max_abs = max(self._max_abs, float(batch_max))
        return plan

    def add_counts(self, plan: BinPlan, counts: np.ndarray) -> None:
        """Add the counts of a batch binned under ``plan`` (from :meth:`begin_batch`, with
        no other batch begun since)."""
        if plan.width != self._width or plan.num_bins != self._counts.size:
            raise CalibrationError(f"counts for {self._label()} were binned under {plan}, but the histogram now has "
                                   f"{self._counts.size} bins of width {self._width!r}; bin each batch right "
                                   "after begin_batch")
        counts = np.asarray(counts)
        if counts.shape != self._counts.shape:
            raise CalibrationError(f"counts for {self._label()} have shape {counts.shape}, "
                                   f"expected {self._counts.shape}")
        self._counts += counts.astype(np.int64, copy=False)

    def _initialise(self, first_max: float) -> None:
        n = self._initial_bins
        self._width = first_max / n
        self._top = first_max
        self._counts = np.zeros(n, dtype=np.int64)
        self._counts[0] += self._pending_zeros
        self._pending_zeros = 0

    def _grow(self, new_max: float) -> None:
        if self.growth == "double":
            self._double_until(new_max)
        else:
            self._append_until(new_max)

    def _double_until(self, new_max: float) -> None:
        """Merge adjacent bins in pairs (the width doubles, the bin count stays) until
        ``new_max`` is covered."""
        n = self._counts.size
        while self._top < new_max:
            counts = self._counts if n % 2 == 0 else np.append(self._counts, 0)
            merged = counts.reshape(-1, 2).sum(axis=1)
            self._counts = np.concatenate([merged, np.zeros(n - merged.size, dtype=np.int64)])
            self._width *= 2.0
            self._top *= 2.0

    def _append_until(self, new_max: float) -> None:
        """Append bins of the same width until ``new_max`` is covered (never rescale)."""
        n_old = self._counts.size
        n_new = max(n_old + 1, int(math.ceil(new_max / self._width)))
        if n_new > MAX_APPENDED_BINS:
            raise CalibrationError(
                f"{self._label()}: max|x| grew from {self._top:.4g} to {new_max:.4g}, {n_new} bins of the first "
                f"batch's width (more than {MAX_APPENDED_BINS}); such a jump is a sentinel (a mask value like -1e9), "
                "not a distribution: lower calibration.sentinel_abs below it or exclude the tensor")
        self._counts = np.concatenate([self._counts, np.zeros(n_new - n_old, dtype=np.int64)])
        # n_new * width can round a hair below new_max; the top edge must cover it.
        self._top = max(n_new * self._width, new_max)

    # -- input checks ------------------------------------------------------------------
    def _label(self) -> str:
        return f"tensor {self.name!r}" if self.name else "this tensor"

    def _as_flat_real(self, batch: np.ndarray) -> np.ndarray:
        arr = np.asarray(batch)
        if arr.dtype.kind not in "fiub":
            raise CalibrationError(
                f"calibration data for {self._label()} has dtype {arr.dtype}; histograms need real "
                "numbers: pass the activation as a float array")
        return arr.reshape(-1)

    def _raise_non_finite(self, flat: np.ndarray) -> None:
        n_nan = int(np.count_nonzero(np.isnan(flat)))
        n_inf = int(np.count_nonzero(np.isinf(flat)))
        raise CalibrationError(
            f"calibration batch for {self._label()} has {n_nan} NaN and {n_inf} Inf values out of "
            f"{flat.size}; an INT8 range cannot be calibrated from them. Check the calibration "
            "data (normalisation, corrupt files) and that the FP32 model is finite on it")
