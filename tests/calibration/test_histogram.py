"""AbsHistogram: DESIGN.md section 4, step 1 (2048 bins over the first batch's max|x|,
same-width bins appended for a larger later max, old counts never rescaled), and the
``growth="double"`` rule TensorRT 8.6 follows (2048 bins kept, the range doubled)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from calibration.errors import CalibrationError
from calibration.histogram import AbsHistogram


def _doubled_expectation(values, num_bins, width, first_max):
    """np.histogram at the final width, with the first batch's max (counted in the last
    bin before any doubling) kept in the bin below the edge it sits on, as merging
    pairs of bins leaves it (and as TensorRT 8.6 leaves it)."""
    want = _np_hist(values, num_bins, width)
    k = first_max / width
    if k == int(k) and 0 < k < num_bins:
        hits = int(np.count_nonzero(np.abs(np.asarray(values, dtype=np.float64)) == first_max))
        want[int(k)] -= hits
        want[int(k) - 1] += hits
    return want


def _np_hist(values, num_bins, width):
    """np.histogram of |values| over the bins [k*width, (k+1)*width), last one closed.
    In float64: numpy 2 would otherwise put the edges of a float32 array in float32."""
    absolute = np.abs(np.asarray(values, dtype=np.float64))
    return np.histogram(absolute, bins=num_bins, range=(0.0, num_bins * width))[0]


def test_first_batch_sets_2048_bins_over_its_max():
    rng = np.random.default_rng(0)
    x = rng.normal(0, 1, (8, 3, 50, 50)).astype(np.float32)
    hist = AbsHistogram()
    hist.update(x)
    top = float(np.max(np.abs(x)))
    assert hist.num_bins == 2048
    assert hist.bin_width == top / 2048
    assert hist.max_abs == top
    assert hist.num_samples == x.size
    assert hist.counts.sum() == x.size
    np.testing.assert_array_equal(hist.counts, _np_hist(x, 2048, top / 2048))
    assert hist.edges[-1] == top


def test_value_equal_to_top_goes_in_last_bin():
    hist = AbsHistogram(num_bins=4)
    hist.update(np.array([0.0, -1.0, 4.0, -4.0]))
    np.testing.assert_array_equal(hist.counts, [1, 1, 0, 2])
    hist.update(np.array([4.0]))  # same max: no growth
    assert hist.num_bins == 4
    assert hist.counts[-1] == 3


def test_smaller_later_batch_only_adds_counts():
    rng = np.random.default_rng(1)
    first, second = rng.normal(0, 2, 10_000), rng.normal(0, 1, 10_000)
    second = second[np.abs(second) < np.abs(first).max()]
    hist = AbsHistogram()
    hist.update(first)
    width = hist.bin_width
    hist.update(second)
    assert hist.num_bins == 2048 and hist.bin_width == width
    np.testing.assert_array_equal(hist.counts, _np_hist(first, 2048, width) + _np_hist(second, 2048, width))


def test_larger_later_batch_appends_bins_of_the_same_width():
    rng = np.random.default_rng(2)
    first = rng.normal(0, 1, 20_000)
    hist = AbsHistogram()
    hist.update(first)
    width = hist.bin_width
    old = hist.counts.copy()
    second = rng.normal(0, 3, 20_000)
    hist.update(second)
    expected_bins = math.ceil(np.abs(second).max() / width)
    assert hist.num_bins == expected_bins > 2048
    assert hist.bin_width == width  # never rescaled
    assert hist.max_abs == np.abs(second).max()
    np.testing.assert_array_equal(hist.counts[:2048] - _np_hist(second, expected_bins, width)[:2048], old)
    np.testing.assert_array_equal(hist.counts, np.concatenate([old, np.zeros(expected_bins - 2048, int)])
                                  + _np_hist(second, expected_bins, width))
    assert hist.edges[-1] >= hist.max_abs


def test_growth_over_several_batches_matches_per_batch_histograms():
    """Each batch is binned with the bins that exist once it is seen (|x| == the top edge
    of that moment lands in the then-last bin), and earlier counts stay where they were."""
    rng = np.random.default_rng(3)
    batches = [rng.laplace(0, s, 5_000) for s in (1.0, 0.5, 2.0, 1.0, 4.0)]
    hist = AbsHistogram()
    per_batch = []
    for b in batches:
        hist.update(b)
        per_batch.append(_np_hist(b, hist.num_bins, hist.bin_width))
    width = np.abs(batches[0]).max() / 2048
    assert hist.bin_width == width
    assert hist.num_bins == math.ceil(max(np.abs(b).max() for b in batches) / width)
    want = sum(np.pad(h, (0, hist.num_bins - h.size)) for h in per_batch)
    np.testing.assert_array_equal(hist.counts, want)
    assert hist.num_samples == sum(b.size for b in batches)


def test_doubling_keeps_the_bin_count_and_equals_a_histogram_of_everything():
    """growth='double': a larger later max doubles the range (pairs of bins merged), so the
    result is the histogram of all values at twice the first width (bar the first max)."""
    rng = np.random.default_rng(4)
    first, second = rng.normal(0, 1, 20_000), rng.normal(0, 1.6, 20_000)
    hist = AbsHistogram(growth="double")
    hist.update(first)
    width = hist.bin_width
    assert 1 < np.abs(second).max() / np.abs(first).max() <= 2  # one doubling covers it
    hist.update(second)
    assert hist.num_bins == 2048
    assert hist.bin_width == 2 * width
    assert hist.edges[-1] == 2 * np.abs(first).max()
    both = np.concatenate([first, second])
    np.testing.assert_array_equal(hist.counts, _doubled_expectation(both, 2048, 2 * width, np.abs(first).max()))
    assert hist.counts[1023] == _np_hist(both, 2048, 2 * width)[1023] + 1  # the first max, below its edge


@pytest.mark.parametrize("num_bins", [2048, 301])
def test_doubling_repeats_until_the_new_max_is_covered(num_bins):
    rng = np.random.default_rng(5)
    batches = [rng.laplace(0, 1, 5_000), rng.laplace(0, 0.5, 5_000), rng.laplace(0, 5, 5_000)]
    hist = AbsHistogram(num_bins=num_bins, growth="double")
    for b in batches:
        hist.update(b)
    first_max, overall = np.abs(batches[0]).max(), max(np.abs(b).max() for b in batches)
    factor = 2 ** math.ceil(math.log2(overall / first_max))
    assert factor >= 4
    assert hist.num_bins == num_bins
    assert hist.bin_width == pytest.approx(factor * first_max / num_bins, rel=1e-15)
    assert hist.edges[-1] >= overall
    np.testing.assert_array_equal(hist.counts, _doubled_expectation(np.concatenate(batches), num_bins,
                                                                    hist.bin_width, first_max))
    assert hist.counts.sum() == hist.num_samples


def test_unknown_growth_rule_is_rejected():
    with pytest.raises(CalibrationError, match="unknown histogram growth 'triple'.*append, double"):
        AbsHistogram(growth="triple")


def test_large_batch_is_binned_in_chunks_identically():
    rng = np.random.default_rng(4)
    x = rng.normal(0, 1, 3_000_001).astype(np.float32)  # several internal chunks
    hist = AbsHistogram()
    hist.update(x)
    np.testing.assert_array_equal(hist.counts, _np_hist(x, 2048, hist.bin_width))


def test_non_contiguous_and_other_real_dtypes():
    rng = np.random.default_rng(5)
    x = rng.normal(0, 1, (64, 32)).astype(np.float16)
    a, b = AbsHistogram(), AbsHistogram()
    a.update(x.T)
    b.update(np.ascontiguousarray(x.T).astype(np.float64))
    np.testing.assert_array_equal(a.counts, b.counts)
    ints = AbsHistogram(num_bins=8)
    ints.update(np.array([-8, 0, 3, 7], dtype=np.int32))
    assert ints.max_abs == 8.0 and ints.counts.sum() == 4


def test_all_zero_first_batch_defers_the_width():
    hist = AbsHistogram()
    hist.update(np.zeros((4, 10), np.float32))
    assert hist.bin_width == 0.0 and hist.num_bins == 0 and hist.max_abs == 0.0
    assert hist.num_samples == 40
    hist.update(np.array([0.0, 1.0, -2.0]))
    assert hist.bin_width == 2.0 / 2048
    assert hist.counts[0] == 41  # the 40 earlier zeros plus this batch's one
    assert hist.counts.sum() == 43 == hist.num_samples


def test_empty_batch_is_ignored():
    hist = AbsHistogram()
    hist.update(np.zeros((0, 3), np.float32))
    assert hist.num_samples == 0 and hist.num_bins == 0


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_values_raise_naming_the_tensor(bad):
    hist = AbsHistogram(name="/layer1/relu_output_0")
    hist.update(np.ones(10))
    before = hist.counts.copy()
    x = np.ones(100, np.float32)
    x[17] = bad
    with pytest.raises(CalibrationError, match="/layer1/relu_output_0") as err:
        hist.update(x)
    assert "NaN" in str(err.value) and "Check the calibration data" in str(err.value)
    np.testing.assert_array_equal(hist.counts, before)  # a rejected batch changes nothing
    assert hist.num_samples == 10


def test_non_real_dtype_is_rejected():
    with pytest.raises(CalibrationError, match="dtype complex128"):
        AbsHistogram(name="t").update(np.ones(3, dtype=complex))


def test_counts_are_read_only():
    hist = AbsHistogram()
    hist.update(np.arange(10.0))
    with pytest.raises(ValueError):
        hist.counts[0] = 5


def test_bad_num_bins():
    with pytest.raises(CalibrationError, match="2048"):
        AbsHistogram(num_bins=0)


# -- the two-step API and identity with the commit-9b9dfe4 implementation ------------------------------
def _sequences(rng):
    """Batch sequences that exercise every path: growth by small and large factors, an
    all-zero start, a batch whose max lands exactly on the current top, float32 values
    sitting on bin edges of the first width, and a tensor that stays zero."""
    first = rng.normal(0, 1, 4000).astype(np.float32)
    m = float(np.abs(first).max())
    on_edges = (np.arange(2049) * (m / 2048)).astype(np.float32)
    on_edges = on_edges[on_edges <= m]
    return {
        "grow": [first, rng.normal(0, 0.5, 3000).astype(np.float32), rng.normal(0, 1.7, 3000).astype(np.float32),
                 rng.laplace(0, 9, 3000).astype(np.float32), np.float32([m, -m])],
        "zero_start": [np.zeros(500, np.float32), np.zeros(7, np.float32), np.maximum(first, 0),
                       rng.normal(0, 5, 100).astype(np.float32)],
        "edges": [first, np.concatenate([on_edges, -on_edges]), np.float32([2 * m, m, -m]), on_edges * 2],
        "dead": [np.zeros(100, np.float32)] * 3,
        "relu_mixed": [np.maximum(rng.normal(0, s, 2000), 0).astype(np.float32) for s in (1, 2, 0.5, 4, 4)],
    }


@pytest.mark.parametrize("growth", ["append", "double"])
def test_update_equals_the_reference_implementation(growth):
    from calibration.kernels import CpuKernel
    from tests.calibration.reference_histogram import AbsHistogram as Reference

    rng = np.random.default_rng(7)
    kernels = [None, CpuKernel("numpy"), CpuKernel("auto")]
    for label, batches in _sequences(rng).items():
        ref = Reference(name=label, growth=growth)
        news = [AbsHistogram(name=label, growth=growth) for _ in kernels]
        for b in batches:
            ref.update(b)
            for hist, kernel in zip(news, kernels):
                hist.update(b, kernel=kernel)
        for hist in news:
            np.testing.assert_array_equal(hist.counts, ref.counts, err_msg=label)
            assert hist.bin_width == ref.bin_width and hist.max_abs == ref.max_abs, label
            assert hist.num_samples == ref.num_samples and hist.num_bins == ref.num_bins, label
            np.testing.assert_array_equal(hist.edges, ref.edges, err_msg=label)


def test_begin_batch_then_add_counts():
    hist = AbsHistogram(num_bins=4)
    assert hist.begin_batch(0.0, 10) is None  # zeros before the width is known
    plan = hist.begin_batch(4.0, 3)
    assert plan.width == 1.0 and plan.num_bins == 4
    hist.add_counts(plan, np.array([1, 0, 0, 2]))
    np.testing.assert_array_equal(hist.counts, [11, 0, 0, 2])
    assert hist.num_samples == 13 and hist.max_abs == 4.0
    assert hist.begin_batch(1.0, 0) is None and hist.num_samples == 13
    grown = hist.begin_batch(6.0, 1)
    assert grown.num_bins == 6
    with pytest.raises(CalibrationError, match="binned under"):
        hist.add_counts(plan, np.zeros(4, np.int64))  # a stale plan
    with pytest.raises(CalibrationError, match="must be finite"):
        hist.begin_batch(float("inf"), 3)


def test_appending_absurdly_many_bins_is_refused():
    """A jump from ~1 to 1e9 (a mask sentinel) would append ~1e12 bins; refused by name."""
    hist = AbsHistogram(name="scores")
    hist.update(np.array([1.0, -0.5]))
    with pytest.raises(CalibrationError, match=r"tensor 'scores': max\|x\| grew from 1 to 1e\+09.*sentinel_abs"):
        hist.update(np.array([-1e9]))
    doubled = AbsHistogram(name="scores", growth="double")  # doubling covers any range in 2048 bins
    doubled.update(np.array([1.0, -0.5]))
    doubled.update(np.array([-1e9]))
    assert doubled.num_bins == 2048 and doubled.edges[-1] >= 1e9


def test_a_refused_growth_changes_nothing():
    hist = AbsHistogram(name="scores")
    hist.update(np.array([1.0, -0.5]))
    before = (hist.counts.copy(), hist.num_samples, hist.max_abs, hist.bin_width)
    with pytest.raises(CalibrationError, match="sentinel"):
        hist.update(np.array([-1e9, 0.5]))
    np.testing.assert_array_equal(hist.counts, before[0])
    assert (hist.num_samples, hist.max_abs, hist.bin_width) == before[1:]
