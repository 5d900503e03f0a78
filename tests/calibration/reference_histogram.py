"""The AbsHistogram of commit 9b9dfe4, before the parallel, compiled and GPU kernels:
kept verbatim below this docstring as the reference the new kernels must equal bit for
bit (tests only; the library never imports it)."""

from __future__ import annotations

import math

import numpy as np

from calibration.errors import CalibrationError

DEFAULT_NUM_BINS = 2048
GROWTH_RULES = ("append", "double")
_CHUNK = 1 << 20  # elements binned per step: bounds temporaries to ~16 MiB


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

    # -- collection --------------------------------------------------------------------
    def update(self, batch: np.ndarray) -> None:
        """Add the absolute values of one batch (any shape, real dtype) to the histogram.

        Raises CalibrationError on NaN or Inf, naming the tensor: TensorRT would compute
        a meaningless range from such data.
        """
        flat = self._as_flat_real(batch)
        if flat.size == 0:
            return
        batch_max = self._checked_abs_max(flat)
        self._num_samples += int(flat.size)
        self._max_abs = max(self._max_abs, batch_max)
        if self._width == 0.0:
            if batch_max == 0.0:
                self._pending_zeros += int(flat.size)
                return
            self._initialise(batch_max)
        elif batch_max > self._top:
            self._grow(batch_max)
        self._accumulate(flat)

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
        self._counts = np.concatenate([self._counts, np.zeros(n_new - n_old, dtype=np.int64)])
        # n_new * width can round a hair below new_max; the top edge must cover it.
        self._top = max(n_new * self._width, new_max)

    def _accumulate(self, flat: np.ndarray) -> None:
        n = self._counts.size
        for start in range(0, flat.size, _CHUNK):
            scaled = np.abs(flat[start:start + _CHUNK], dtype=np.float64)
            scaled /= self._width  # divide, not multiply by 1/width: exact on bin edges
            idx = scaled.astype(np.intp)  # truncation == floor for values >= 0
            np.minimum(idx, n - 1, out=idx)  # |x| == top belongs to the last bin
            self._counts += np.bincount(idx, minlength=n)

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

    def _checked_abs_max(self, flat: np.ndarray) -> float:
        """max|x| of the batch, chunk by chunk; NaN/Inf propagate through max/min."""
        hi, lo = -math.inf, math.inf
        for start in range(0, flat.size, _CHUNK):
            chunk = flat[start:start + _CHUNK]
            hi = max(hi, float(chunk.max()))
            lo = min(lo, float(chunk.min()))
            if not (math.isfinite(hi) and math.isfinite(lo)):
                self._raise_non_finite(flat)
        return max(hi, -lo, 0.0)

    def _raise_non_finite(self, flat: np.ndarray) -> None:
        n_nan = int(np.count_nonzero(np.isnan(flat)))
        n_inf = int(np.count_nonzero(np.isinf(flat)))
        raise CalibrationError(
            f"calibration batch for {self._label()} has {n_nan} NaN and {n_inf} Inf values out of "
            f"{flat.size}; an INT8 range cannot be calibrated from them. Check the calibration "
            "data (normalisation, corrupt files) and that the FP32 model is finite on it")
