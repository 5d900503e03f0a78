"""From an |x| histogram to an INT8 range (amax) and scale, per tensor.

``entropy_amax`` is TensorRT's EntropyCalibration2 (its KL divergence search) as
NVIDIA's public reference (pytorch-quantization ``_compute_amax_entropy``) describe it:

2. ``bins[0] = bins[1]`` (hides the spike of exact zeros after a ReLU).
3. For every candidate end bin ``i`` in ``start_bin .. len(bins)`` (inclusive):
   * P = ``bins[:i]`` with the mass of ``bins[i:]`` added to its last bin;
   * Q = ``bins[:i]`` merged into 128 groups of equal width *in value*: bin ``j`` goes to
     group ``floor(128 * j / i)`` (the reference digitizes ``range(i)`` against
     ``linspace(0, i, 129)``), so when ``i`` is not a multiple of 128 groups hold
     ``floor(i/128)`` or ``ceil(i/128)`` bins. Each group's count is spread evenly over
     its non-empty bins; empty bins stay empty;
   * KL(P || Q) with both normalised, natural log; infinite when P has mass where Q has
     none (only possible in bin ``i-1``: empty itself but with tail mass behind it).
4. The largest ``i`` among those with the minimal divergence; ``amax = i * bin_width``.
   "Minimal" is up to float64 rounding (``TIE_ATOL``), so exact ties stay ties.
   TensorRT 8.6 itself puts amax half a bin higher, ``(i + 1/2) * bin_width``
   (``bin_offset=0.5``; see :mod:`calibration.rules`).

The naive loop costs O(bins^2). Here every sum over bins becomes a difference of prefix
sums, so each candidate costs O(128): for candidate ``i`` with groups ``g`` covering bins
``[ceil(g*i/128), ceil((g+1)*i/128))``, with ``p = bins / total``, ``s_g`` the group's
mass and ``c_g`` its number of non-empty bins, ``t`` the tail mass and ``l = i-1``::

    KL = sum_{j<l} p_j log p_j + (p_l + t) log(p_l + t)
         - sum_g s_g log(s_g / c_g) - t log(s_G / c_G) + log(1 - t)

where G is the last group (the one holding bin l). Working on normalised ``p`` keeps
every term O(entropy) in size, so the prefix sums lose no meaningful precision.
"""

from __future__ import annotations

import numpy as np

from calibration.errors import CalibrationError
from calibration.histogram import AbsHistogram

INT8_MAX = 127
NUM_QUANT_BINS = 128  # 2**(8-1): the positive half of a symmetric int8 grid
START_BIN = 128
TIE_ATOL = 1e-12  # divergences this close to the minimum count as equal (see _last_argmin)
_CANDIDATE_CHUNK = 4096  # candidates evaluated at once: bounds (chunk x 129) temporaries

METHODS = ("entropy", "minmax", "percentile", "mse")
#: Percentiles among the candidates of the ``mse`` search.
SEARCH_PERCENTILES = (99.9, 99.99, 99.999)
#: Evenly spaced amax candidates between the smallest named candidate and max|x|.
SEARCH_GRID = 32


# -- EntropyCalibration2 ---------------------------------------------------------------
def entropy_divergences(counts: np.ndarray, num_quant_bins: int = NUM_QUANT_BINS,
                        start_bin: int = START_BIN) -> tuple[np.ndarray, np.ndarray]:
    """KL divergence of every candidate end bin; returns ``(candidates, divergences)``.

    ``counts`` is the raw histogram (``bins[0] = bins[1]`` is applied to a copy here).
    """
    bins = _prepared_bins(counts, start_bin)
    total = bins.sum()
    p = bins / total
    n = p.size
    zero = np.zeros(1)
    # Masses come from cumulative *counts* (exact for integer counts below 2**53), so an
    # empty tail is exactly 0, never a rounding residue that would look like mass.
    cum_counts = np.concatenate([zero, np.cumsum(bins)])
    cum_nonempty = np.concatenate([zero, np.cumsum(bins > 0)])
    with np.errstate(divide="ignore", invalid="ignore"):
        plogp = np.where(p > 0, p * np.log(p), 0.0)
    # Extended precision where the platform has it (x86: 64-bit mantissa): this running sum
    # is the only long accumulation and was the largest source of rounding noise.
    cum_plogp = np.concatenate([zero, np.cumsum(plogp, dtype=np.longdouble)])

    candidates = np.arange(start_bin, n + 1, dtype=np.int64)
    divergences = np.empty(candidates.size, dtype=np.float64)
    for lo in range(0, candidates.size, _CANDIDATE_CHUNK):
        chunk = candidates[lo:lo + _CANDIDATE_CHUNK]
        divergences[lo:lo + chunk.size] = _kl_for_candidates(
            chunk, p, cum_counts, cum_nonempty, cum_plogp, num_quant_bins)
    return candidates, divergences


def entropy_amax(counts: np.ndarray, bin_width: float, num_quant_bins: int = NUM_QUANT_BINS,
                 start_bin: int = START_BIN, bin_offset: float = 0.0) -> float:
    """EntropyCalibration2's amax: ``(i + bin_offset) * bin_width`` for the largest
    minimising ``i`` (offset 0: the reference rules' bin edge; 0.5: TensorRT 8.6's bin centre)."""
    counts = np.asarray(counts)
    if bin_width == 0.0 or not np.any(counts):
        return 0.0  # all-zero tensor (see calibration.histogram): nothing to clip
    candidates, divergences = entropy_divergences(counts, num_quant_bins, start_bin)
    best = _last_argmin(divergences)
    return float((candidates[best] + bin_offset) * bin_width)


def _prepared_bins(counts: np.ndarray, start_bin: int) -> np.ndarray:
    bins = np.array(counts, dtype=np.float64)  # a copy: the caller's histogram is untouched
    if bins.ndim != 1 or bins.size < max(start_bin, 2):
        raise CalibrationError(
            f"entropy calibration needs a 1-D histogram of at least {max(start_bin, 2)} bins, got "
            f"shape {bins.shape}; collect it with AbsHistogram(num_bins=2048)")
    if not np.all(np.isfinite(bins)) or np.any(bins < 0):
        raise CalibrationError("histogram counts must be finite and >= 0; the histogram is corrupt, "
                               "collect it again")
    bins[0] = bins[1]
    if bins.sum() == 0:
        raise CalibrationError("histogram is empty after bins[0] = bins[1]; no data to calibrate on")
    return bins


def _kl_for_candidates(cands: np.ndarray, p: np.ndarray, cum_counts: np.ndarray,
                       cum_nonempty: np.ndarray, cum_plogp: np.ndarray, nq: int) -> np.ndarray:
    """KL(P||Q) for a block of candidate end bins, O(nq) work per candidate."""
    # Group g of candidate i covers bins [ceil(g*i/nq), ceil((g+1)*i/nq)), i.e. exactly the
    # j with floor(nq*j/i) == g. Integer arithmetic: no linspace rounding at the edges.
    g = np.arange(nq + 1, dtype=np.int64)
    edges = (g[None, :] * cands[:, None] + (nq - 1)) // nq  # (k, nq+1); last column == i
    total = cum_counts[-1]
    mass = (cum_counts[edges[:, 1:]] - cum_counts[edges[:, :-1]]) / total  # s_g
    nonempty = cum_nonempty[edges[:, 1:]] - cum_nonempty[edges[:, :-1]]  # c_g
    with np.errstate(divide="ignore", invalid="ignore"):
        group_term = np.where(nonempty > 0, mass * np.log(mass / nonempty), 0.0).sum(axis=1)

    last = cands - 1
    rows = np.arange(cands.size)
    last_group = (nq * last) // cands
    q_last = mass[rows, last_group] / np.maximum(nonempty[rows, last_group], 1)  # Q at bin i-1
    p_last = p[last]
    tail = (total - cum_counts[cands]) / total
    p_end = p_last + tail  # P at bin i-1
    with np.errstate(divide="ignore", invalid="ignore"):
        p_entropy_part = cum_plogp[last] + np.where(p_end > 0, p_end * np.log(p_end), 0.0)
        tail_cross = np.where((tail > 0) & (p_last > 0), tail * np.log(q_last), 0.0)
        kl = p_entropy_part - group_term - tail_cross + np.log1p(-np.minimum(tail, 1.0))
    # P has mass at i-1 but Q has none there: KL is infinite (as scipy.stats.entropy gives).
    kl[(tail > 0) & (p_last == 0)] = np.inf
    return kl


def _last_argmin(values: np.ndarray, atol: float = TIE_ATOL) -> int:
    """Index of the last value within ``atol`` of the minimum (step 4: largest i wins ties).

    Exact ties are real: data with a few distinct values gives KL == 0 for several
    candidates (each group holds one non-empty bin, so Q == P). Evaluated in floating
    point those zeros come out as +-1e-16 noise, which a strict argmin would let pick a
    smaller i at random; ``atol`` sits far above that noise and far below any divergence
    difference that means something.
    """
    return int(np.flatnonzero(values <= values.min() + atol)[-1])


# -- MinMax and percentile ---------------------------------------------------------------
def minmax_amax(hist: AbsHistogram) -> float:
    """MinMaxCalibration's amax: the largest |x| seen (exact, not a bin edge)."""
    return float(hist.max_abs)


def percentile_amax(counts: np.ndarray, bin_width: float, percentile: float,
                    max_abs: float | None = None) -> float:
    """|x| at the given percentile (0-100, e.g. 99.99) of the histogrammed data.

    Values are taken as uniform within a bin, so the result is interpolated inside the bin
    where the cumulative count reaches ``percentile``; capped at ``max_abs`` when given.
    """
    if not 0.0 <= float(percentile) <= 100.0:
        raise CalibrationError(f"percentile must be within [0, 100], got {percentile}; use e.g. 99.99")
    cum = np.cumsum(np.asarray(counts, dtype=np.float64))
    if bin_width == 0.0 or cum.size == 0 or cum[-1] == 0:
        return 0.0
    target = float(percentile) / 100.0 * cum[-1]
    k = min(int(np.searchsorted(cum, target, side="left")), cum.size - 1)
    below = cum[k - 1] if k > 0 else 0.0
    in_bin = cum[k] - below
    frac = (target - below) / in_bin if in_bin > 0 else 1.0
    amax = (k + frac) * bin_width
    return float(min(amax, max_abs)) if max_abs is not None else float(amax)


# -- MSE search --------------------------------------------------------------------------
def quantization_mse(counts: np.ndarray, bin_width: float, amaxes: np.ndarray) -> np.ndarray:
    """Mean squared error that symmetric INT8 fake quantization with each amax of ``amaxes``
    causes on the data of an |x| histogram (each bin's values taken at its centre):
    ``x -> clip(round_half_even(x / s), 0, 127) * s`` with ``s = amax / 127``, so a value
    above amax costs ``(x - amax)^2`` and one inside the range its rounding error. amax 0
    quantizes everything to 0."""
    counts = np.asarray(counts, dtype=np.float64)
    amaxes = np.atleast_1d(np.asarray(amaxes, dtype=np.float64))
    total = counts.sum()
    if total == 0 or bin_width == 0.0:
        return np.zeros(amaxes.size)
    nz = np.flatnonzero(counts)
    x = (nz + 0.5) * bin_width
    p = counts[nz] / total
    out = np.empty(amaxes.size)
    for k, a in enumerate(amaxes):
        if a <= 0:
            out[k] = float(p @ (x * x))
            continue
        s = a / INT8_MAX
        q = np.clip(np.rint(x / s), 0, INT8_MAX) * s
        out[k] = float(p @ ((x - q) ** 2))
    return out


def mse_candidates(hist: AbsHistogram, bin_offset: float = 0.0, percentiles: tuple[float, ...] = SEARCH_PERCENTILES,
                   grid: int = SEARCH_GRID, bound: float | None = None) -> dict[str, float]:
    """The named amax candidates of the ``mse`` search: entropy (EntropyCalibration2 at
    ``bin_offset``), the ``percentiles`` and max|x|, then ``grid`` evenly spaced values
    between the smallest of them and max|x|. ``bound`` (a Clip's bound, see
    :mod:`calibration.ptq`) caps every candidate."""
    cands: dict[str, float] = {}
    if hist.bin_width == 0.0 or not np.any(hist.counts):
        return {"max": 0.0}
    cands["entropy"] = entropy_amax(hist.counts, hist.bin_width, bin_offset=bin_offset) \
        if hist.num_bins >= START_BIN else float(hist.max_abs)
    for pct in percentiles:
        cands[f"p{pct:g}"] = percentile_amax(hist.counts, hist.bin_width, pct, max_abs=hist.max_abs)
    cands["max"] = float(hist.max_abs)
    lo = min(cands.values())
    for k, a in enumerate(np.linspace(lo, hist.max_abs, grid + 2)[1:-1] if grid > 0 else []):
        cands[f"grid{k}"] = float(a)
    if bound is not None:
        cands = {k: min(v, float(bound)) for k, v in cands.items()}
    return cands


def mse_amax(hist: AbsHistogram, bin_offset: float = 0.0, percentiles: tuple[float, ...] = SEARCH_PERCENTILES,
             grid: int = SEARCH_GRID, bound: float | None = None) -> tuple[float, str]:
    """The candidate of :func:`mse_candidates` whose quantization MSE on the histogram is the
    smallest (the largest amax among equal ones); returns ``(amax, candidate name)``."""
    cands = mse_candidates(hist, bin_offset, percentiles, grid, bound)
    names = list(cands)
    values = np.array([cands[n] for n in names])
    errors = quantization_mse(hist.counts, hist.bin_width, values)
    best = np.flatnonzero(errors <= errors.min() * (1 + 1e-12))
    pick = int(best[np.argmax(values[best])])
    return float(values[pick]), names[pick]


# -- dispatch and scale --------------------------------------------------------------------
def compute_amax(hist: AbsHistogram, method: str, **opts: float) -> float:
    """amax of one tensor by ``method``: 'entropy' (EntropyCalibration2), 'minmax',
    'percentile' (option ``percentile``, default 99.99) or 'mse' (:func:`mse_amax`: the
    candidate whose quantization MSE is smallest). Extra options go to the method."""
    key = method.lower()
    if key == "entropy":
        return entropy_amax(hist.counts, hist.bin_width, **opts)
    if key in ("minmax", "max"):
        if opts:
            raise CalibrationError(f"method 'minmax' takes no options, got {sorted(opts)}")
        return minmax_amax(hist)
    if key == "percentile":
        pct = opts.pop("percentile", 99.99)
        if opts:
            raise CalibrationError(f"method 'percentile' takes only 'percentile', got {sorted(opts)}")
        return percentile_amax(hist.counts, hist.bin_width, pct, max_abs=hist.max_abs)
    if key == "mse":
        return mse_amax(hist, **opts)[0]
    raise CalibrationError(f"unknown calibration method {method!r}; use one of {', '.join(METHODS)}")


def amax_to_scale(amax: float) -> np.float32:
    """TensorRT's symmetric per-tensor INT8 scale, ``amax / 127``, as float32 (what the
    calibration cache stores)."""
    if not np.isfinite(amax) or amax < 0:
        raise CalibrationError(f"amax must be finite and >= 0, got {amax}; the histogram is corrupt")
    return np.float32(float(amax) / INT8_MAX)
