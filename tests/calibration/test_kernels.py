"""Binning kernels (calibration.kernels, calibration.native, the edge table of the GPU path):
every kernel equals, bit for bit, the commit-9b9dfe4 AbsHistogram (tests/calibration/
reference_histogram.py) and np.histogram in float64, on values placed exactly on bin
edges and one float32 step either side of them, at the top, at +-0, subnormal, and over
ranges grown past 2048 bins."""

from __future__ import annotations

import numpy as np
import pytest

from calibration import native
from calibration.binning import BatchBinner
from calibration.errors import CalibrationError
from calibration.histogram import AbsHistogram, BinPlan
from calibration.kernels import (CpuKernel, abs_range, bin_counts_by_edges, bin_counts_numpy, fold_bincount,
                                 threshold_table)
from tests.calibration.reference_histogram import AbsHistogram as ReferenceHistogram


def _np_hist(values, num_bins, width):
    """np.histogram of |values| in float64 over [0, num_bins * width], values above the
    range in the last bin (an independent statement of the clamp)."""
    a = np.abs(np.asarray(values, dtype=np.float64))
    top = num_bins * width
    counts = np.histogram(np.minimum(a, top), bins=num_bins, range=(0.0, top))[0]
    return counts


def _reference_counts(values, width, num_bins):
    """The old code's arithmetic, written out once more: divide in float64, truncate, clamp."""
    idx = (np.abs(np.asarray(values, dtype=np.float64)) / width).astype(np.int64)
    return np.bincount(np.minimum(idx, num_bins - 1), minlength=num_bins)


def _edge_values(width, num_bins, top, rng, dtype=np.float32):
    """float32 values nearest each edge k*width, one step below and above, random values,
    zeros of both signs, the top and tiny subnormals; both signs; |x| <= top."""
    edges = (np.arange(num_bins + 1, dtype=np.float64) * width).astype(dtype)
    base = np.concatenate([edges, np.nextafter(edges, dtype(0)), np.nextafter(edges, dtype(np.inf)),
                           rng.uniform(0, top, 5000).astype(dtype), np.array([0.0, top, 1e-45, 3e-42], dtype)])
    values = np.concatenate([base, -base, np.array([-0.0], dtype)]).astype(dtype)
    return values[np.abs(values.astype(np.float64)) <= top]


CASES = [  # (num_bins, top, width): the first batch's 2048 bins, odd widths, a grown range
    (2048, 3.7, 3.7 / 2048),
    (2048, 0.1, 0.1 / 2048),
    (2048, 1e-38, 1e-38 / 2048),
    (301, 5.0, 5.0 / 301),
    (2048 * 3 + 7, (2048 * 3 + 7) * (1.3 / 2048), 1.3 / 2048),  # appended bins
    (2048, 2 * 3.3, 2 * 3.3 / 2048),  # after one doubling
    (1, 2.5, 2.5),
]


@pytest.fixture(scope="module")
def native_kernel():
    kernel, why = native.load()
    if kernel is None:
        pytest.skip(f"compiled kernel unavailable here: {why}")
    return kernel


@pytest.mark.parametrize("num_bins, top, width", CASES)
def test_every_kernel_equals_the_reference_arithmetic_on_edges(num_bins, top, width, native_kernel):
    rng = np.random.default_rng(num_bins)
    values = _edge_values(width, num_bins, top, rng)
    want = _reference_counts(values, width, num_bins)
    assert want.sum() == values.size
    np.testing.assert_array_equal(bin_counts_numpy(values, width, num_bins), want)
    np.testing.assert_array_equal(bin_counts_numpy(values, width, num_bins, chunk=1000), want)
    np.testing.assert_array_equal(native_kernel.bin_f32(values, width, num_bins), want)
    table = threshold_table(width, num_bins)
    np.testing.assert_array_equal(bin_counts_by_edges(values, table, num_bins), want)
    # Relu(x) binned from x: the positive part (onnxruntime's Relu is max(x, 0)).
    want_relu = _reference_counts(np.maximum(values, np.float32(0)), width, num_bins)
    np.testing.assert_array_equal(bin_counts_numpy(values, width, num_bins, positive=True), want_relu)
    np.testing.assert_array_equal(native_kernel.bin_f32(values, width, num_bins, positive=True), want_relu)
    np.testing.assert_array_equal(bin_counts_by_edges(values, table, num_bins, positive=True), want_relu)


def test_kernels_equal_np_histogram_for_power_of_two_widths(native_kernel):
    """With width = 2**-10, k*width and |x|/width are exact, so np.histogram (edges
    compared, no division) is an independent reference."""
    rng = np.random.default_rng(1)
    width, num_bins = 2.0 ** -10, 2048
    values = _edge_values(width, num_bins, num_bins * width, rng)
    want = _np_hist(values, num_bins, width)
    np.testing.assert_array_equal(bin_counts_numpy(values, width, num_bins), want)
    np.testing.assert_array_equal(native_kernel.bin_f32(values, width, num_bins), want)
    np.testing.assert_array_equal(bin_counts_by_edges(values, threshold_table(width, num_bins), num_bins), want)


def test_threshold_table_is_the_first_float32_of_each_bin():
    rng = np.random.default_rng(2)
    for width in [3.7 / 2048, 1e-38 / 2048, rng.uniform(1e-6, 1e3)]:
        table = threshold_table(width, 2048)
        assert table.dtype == np.float32 and table.size == 2047
        assert np.all(np.diff(table.astype(np.float64)) >= 0)
        k = np.arange(1, 2048)
        at = np.floor(table.astype(np.float64) / width)
        below = np.floor(np.nextafter(table, np.float32(0)).astype(np.float64) / width)
        finite = np.isfinite(table)
        assert np.all(at[finite] >= k[finite]) and np.all(below[finite] < k[finite])


def test_table_marks_unreachable_bins_infinite():
    table = threshold_table(1e36, 2048)  # float32 tops out near 3.4e38: bins past 340 are empty
    assert np.isinf(table[-1]) and np.isfinite(table[0])
    x = np.array([3.4e38, -3.4e38, 0.0], np.float32)
    np.testing.assert_array_equal(bin_counts_by_edges(x, table, 2048), _reference_counts(x, 1e36, 2048))


@pytest.mark.parametrize("dtype", [np.float16, np.float64, np.int32, np.int8, np.uint8, bool])
def test_numpy_kernel_on_other_dtypes_matches_the_reference(dtype):
    rng = np.random.default_rng(3)
    if dtype is bool:
        x = rng.random(1000) < 0.3
    elif np.dtype(dtype).kind in "iu":
        info = np.iinfo(dtype)
        x = rng.integers(info.min, info.max, 1000, endpoint=True).astype(dtype)
        x[:2] = [info.min, info.max]
    else:
        x = rng.normal(0, 3, 1000).astype(dtype)
    ref = ReferenceHistogram(name="t")
    ref.update(x)
    new = AbsHistogram(name="t")
    new.update(x, kernel=CpuKernel("auto"))
    np.testing.assert_array_equal(new.counts, ref.counts)
    assert (new.bin_width, new.max_abs, new.num_samples) == (ref.bin_width, ref.max_abs, ref.num_samples)


def test_fold_bincount_is_a_clamp():
    idx = np.array([0, 3, 4, 9, 2, 4])
    np.testing.assert_array_equal(fold_bincount(idx, 5), np.bincount(np.minimum(idx, 4), minlength=5))


def test_abs_range_propagates_nan_and_inf():
    assert abs_range(np.array([1.0, -2.0], np.float32)) == (-2.0, 1.0)
    lo, hi = abs_range(np.array([1.0, np.nan, -2.0], np.float32))
    assert np.isnan(lo) and np.isnan(hi)
    assert abs_range(np.array([1.0, -np.inf], np.float32)) == (-np.inf, 1.0)
    assert abs_range(np.zeros(0, np.float32)) == (0.0, 0.0)


def test_kernel_choice():
    assert CpuKernel("numpy").name == "numpy"
    with pytest.raises(CalibrationError, match="unknown histogram kernel 'fast'"):
        CpuKernel("fast")


def test_native_kernel_off_falls_back_to_numpy(monkeypatch):
    monkeypatch.setattr(native, "_loaded", None)
    monkeypatch.setenv("TRTPIPE_NATIVE", "0")
    kernel = CpuKernel("auto")
    assert kernel.name == "numpy" and "TRTPIPE_NATIVE" in kernel.why_not_native
    with pytest.raises(CalibrationError, match="compiled histogram kernel is not available"):
        CpuKernel("native")
    monkeypatch.setattr(native, "_loaded", None)  # the next user builds it again


def test_native_kernel_without_a_compiler(monkeypatch, tmp_path):
    monkeypatch.setattr(native, "_loaded", None)
    monkeypatch.setenv("TRTPIPE_KERNEL_DIR", str(tmp_path))
    monkeypatch.setenv("PATH", str(tmp_path))  # no cc, gcc or clang
    monkeypatch.delenv("CC", raising=False)
    kernel, why = native.load()
    assert kernel is None and "no C compiler" in why
    monkeypatch.setattr(native, "_loaded", None)


@pytest.mark.parametrize("threads", [1, 3])
def test_batch_binner_splits_without_changing_counts(threads, monkeypatch):
    import calibration.binning as binning

    monkeypatch.setattr(binning, "RANGE_TASK", 1000)
    monkeypatch.setattr(binning, "BIN_TASK", 777)
    rng = np.random.default_rng(4)
    arrays = [rng.normal(0, s, n).astype(np.float32) for s, n in ((1, 10_000), (3, 5), (0.1, 2501))]
    arrays.append(np.zeros(0, np.float32))
    with BatchBinner(CpuKernel("auto"), threads) as binner:
        ranges = binner.ranges(arrays)
        assert ranges[:3] == [(float(a.min()), float(a.max())) for a in arrays[:3]]
        nan = arrays[0].copy()
        nan[5555] = np.nan
        assert np.isnan(binner.ranges([nan])[0][0])
        plans = [BinPlan(float(np.abs(a).max()) / 2048, 2048) for a in arrays[:3]]
        counts = binner.counts([(a, p, False) for a, p in zip(arrays[:3], plans)])
        positive = binner.counts([(a, p, True) for a, p in zip(arrays[:3], plans)])
    for a, p, c, cp in zip(arrays, plans, counts, positive):
        np.testing.assert_array_equal(c, _reference_counts(a, p.width, p.num_bins))
        np.testing.assert_array_equal(cp, _reference_counts(np.maximum(a, 0), p.width, p.num_bins))


@pytest.mark.parametrize("offset", [0, 1, 3])
def test_native_kernel_on_unaligned_views_and_odd_lengths(offset, native_kernel):
    """The compiled loops are vectorized (both |x| and the Relu part max(x, 0)): views that
    start off the vector alignment and lengths around the vector and block sizes give the
    numpy kernel's counts, with -0.0, zeros and negatives in them."""
    rng = np.random.default_rng(offset)
    data = rng.normal(0, 1, 3 * 2048 + 64).astype(np.float32)
    data[::7] = 0.0
    data[::11] = -0.0
    data[::13] = -np.abs(data[::13])
    top = float(np.abs(data).max())
    for n in (0, 1, 7, 15, 16, 17, 63, 2047, 2048, 2049, 3 * 2048 + 5):
        values = data[offset:offset + n]
        for num_bins in (2048, 301):
            width = top / num_bins
            for positive in (False, True):
                np.testing.assert_array_equal(native_kernel.bin_f32(values, width, num_bins, positive),
                                              bin_counts_numpy(values, width, num_bins, positive=positive),
                                              err_msg=f"n={n} bins={num_bins} positive={positive}")


@pytest.mark.parametrize("num_bins", [2048, 4096, 4097])
def test_native_kernel_counts_past_16_bits_in_one_bin(num_bins, native_kernel):
    """Histograms of up to 4096 bins count in 16-bit sub-histograms flushed into 64-bit ones:
    a million values in one bin (and the rest in bin 0) must not wrap around; above 4096
    bins the 64-bit path counts the same."""
    width = 1.0 / num_bins
    values = np.full(1_000_003, np.float32(0.5), np.float32)
    values[::3] = 0.0
    want = bin_counts_numpy(values, width, num_bins)
    assert want.max() > 4 * 65536
    for positive in (False, True):
        np.testing.assert_array_equal(native_kernel.bin_f32(values, width, num_bins, positive), want)


def test_native_range_equals_numpy_min_max(native_kernel):
    """One compiled pass gives numpy's (min, max): on normal values, +-Inf, the largest and
    the subnormal floats, and NaN anywhere (then both NaN); zeros may differ in sign only."""
    rng = np.random.default_rng(5)
    normal = rng.normal(0, 3, 100_003).astype(np.float32)
    specials = np.array([0.0, -0.0, 1e-45, -1e-45, 3.4e38, -3.4e38, np.inf, -np.inf], np.float32)
    cases = [normal, normal[1:], -np.abs(normal), np.abs(normal), specials, specials[:2], specials[1:2],
             np.zeros(17, np.float32), np.full(5, -0.0, np.float32), np.array([7.0], np.float32),
             np.zeros(0, np.float32)]
    for at in (0, 50_000, 100_002):
        with_nan = normal.copy()
        with_nan[at] = np.nan
        cases.append(with_nan)
    kernel = CpuKernel("native")
    for values in cases:
        want = abs_range(values)
        for got in (native_kernel.range_f32(values), kernel.range(values)):
            for g, w in zip(got, want):
                assert (np.isnan(g) and np.isnan(w)) or g == w, (got, want)
    assert kernel.range(normal.astype(np.float64)) == abs_range(normal.astype(np.float64))  # numpy for others
    with BatchBinner(kernel, 2) as binner:
        assert binner.ranges([normal, normal[::2]]) == [abs_range(normal), abs_range(normal[::2])]
