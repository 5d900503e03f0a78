"""calibration.algorithms against numbers worked out independently of it: tiny histograms
whose divergences are written here in closed form (DESIGN.md section 4, steps 2-4, done
by hand), a plain re-implementation of those steps with scipy's KL divergence, and
percentile / MinMax answers computed by hand.

The hand examples use num_quant_bins=2 (Q merges bins into 2 groups) so that every
candidate can be checked on paper; the definition is the same as with 128 groups."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

from calibration.algorithms import (
    amax_to_scale,
    compute_amax,
    entropy_amax,
    entropy_divergences,
    percentile_amax,
)
from calibration.errors import CalibrationError
from calibration.histogram import AbsHistogram

ln = math.log


# -- an independent reference: DESIGN.md section 4 as written, scipy for KL -------------
def design_divergences(counts, num_quant_bins=128, start_bin=128):
    """Step 2: bins[0] = bins[1]. Step 3, per candidate i: P = bins[:i] with the tail
    bins[i:] added to its last bin; Q = bins[:i] merged into num_quant_bins groups of equal
    width in value (bin j, covering [j, j+1), goes to the group holding its left edge,
    j * num_quant_bins / i), each group's count spread over its non-empty bins; KL(P||Q)
    with both normalised, natural log (scipy.stats.entropy)."""
    stats = pytest.importorskip("scipy.stats")
    bins = [float(c) for c in counts]
    bins[0] = bins[1]
    out = {}
    for i in range(start_bin, len(bins) + 1):
        p = bins[:i]
        p[-1] += sum(bins[i:])
        groups: dict[int, list[int]] = {}
        for j in range(i):
            groups.setdefault(int(math.floor(j * num_quant_bins / i)), []).append(j)
        q = [0.0] * i
        for members in groups.values():
            full = [j for j in members if bins[j] > 0]
            for j in full:
                q[j] = sum(bins[j] for j in members) / len(full)
        out[i] = float(stats.entropy(p, q))  # inf where P has mass and Q has none
    return out


def design_amax(counts, width, num_quant_bins=128, start_bin=128):
    """Step 4: the largest i among those with the smallest divergence, amax = i * width."""
    div = design_divergences(counts, num_quant_bins, start_bin)
    best = min(div.values())
    return max(i for i, d in div.items() if d <= best + 1e-12) * width


# -- hand-worked examples ------------------------------------------------------------------
# counts -> (after bins[0] = bins[1]) -> divergence of each candidate, worked by hand.
HAND = {
    # [9, 2, 1, 1] -> [2, 2, 1, 1] (total 6)
    #   i=2: P=[2, 4], Q=[2, 2]                      1/3 ln(2/3) + 2/3 ln(4/3)
    #   i=3: P=[2, 2, 2], Q=[2, 2, 1] (bins 0,1 share a group)  2/3 ln(5/6) + 1/3 ln(5/3)
    #   i=4: P=[2, 2, 1, 1] = Q                      0
    "no_tail_best": ([9, 2, 1, 1], {2: ln(2 / 3) / 3 + 2 * ln(4 / 3) / 3, 3: 2 * ln(5 / 6) / 3 + ln(5 / 3) / 3, 4: 0.0}),
    # [0, 3, 0, 1, 0, 0, 0, 1] -> [3, 3, 0, 1, 0, 0, 0, 1] (total 8)
    #   i=2: P=[3, 5], Q=[3, 3]                      3/8 ln(3/4) + 5/8 ln(5/4)
    #   i=3, 5, 6, 7: bin i-1 empty but a tail behind it: P has mass where Q has none: inf
    #   i=4: P=[3, 3, 0, 2], Q=[3, 3, 0, 1]          3/4 ln(7/8) + 1/4 ln(7/4)
    #   i=8: P=bins, Q=[7/3, 7/3, 0, 7/3, 0, 0, 0, 1]  3/4 ln(9/7) + 1/8 ln(3/7)
    "clipped": ([0, 3, 0, 1, 0, 0, 0, 1], {2: 3 * ln(3 / 4) / 8 + 5 * ln(5 / 4) / 8, 3: math.inf,
                                           4: 3 * ln(7 / 8) / 4 + ln(7 / 4) / 4, 5: math.inf, 6: math.inf,
                                           7: math.inf, 8: 3 * ln(9 / 7) / 4 + ln(3 / 7) / 8}),
    # [2, 2, 1, 3, 0, 0]: empty bins at the top (a histogram whose range doubled) (total 8)
    #   i=2: P=[2, 6], Q=[2, 2]                      1/4 ln(1/2) + 3/4 ln(3/2)
    #   i=3: P=[2, 2, 4], Q=[2, 2, 1]                1/2 ln(5/8) + 1/2 ln(5/2)
    #   i=4: P=[2, 2, 1, 3], Q=[2, 2, 2, 2]          1/8 ln(1/2) + 3/8 ln(3/2)
    #   i=5, 6: P=[2, 2, 1, 3, 0(, 0)], Q=[5/3, 5/3, 5/3, 3, 0(, 0)]  1/2 ln(6/5) + 1/8 ln(3/5)
    #   a tie between 5 and 6: the largest wins
    "empty_top": ([2, 2, 1, 3, 0, 0], {2: ln(1 / 2) / 4 + 3 * ln(3 / 2) / 4, 3: ln(5 / 8) / 2 + ln(5 / 2) / 2,
                                       4: ln(1 / 2) / 8 + 3 * ln(3 / 2) / 8, 5: ln(6 / 5) / 2 + ln(3 / 5) / 8,
                                       6: ln(6 / 5) / 2 + ln(3 / 5) / 8}),
}
HAND_BEST = {"no_tail_best": 4, "clipped": 2, "empty_top": 6}


def strict():
    """numpy floating-point errors raise and warnings are errors: calibration must not
    depend on the caller's np.seterr or on -W error to give its answer."""
    ctx = warnings.catch_warnings()
    ctx.__enter__()
    warnings.simplefilter("error")
    err = np.errstate(all="raise")
    err.__enter__()
    return ctx, err


@pytest.fixture
def fp_strict():
    ctx, err = strict()
    yield
    err.__exit__(None, None, None)
    ctx.__exit__(None, None, None)


@pytest.mark.parametrize("name", sorted(HAND))
def test_divergences_of_hand_worked_histograms(name, fp_strict):
    counts, want = HAND[name]
    cand, div = entropy_divergences(np.array(counts, dtype=np.int64), num_quant_bins=2, start_bin=2)
    assert list(cand) == list(want)
    for i, d, w in zip(cand, div, want.values()):
        if math.isinf(w):
            assert d == math.inf, (i, d)
        else:
            assert d == pytest.approx(w, rel=1e-12, abs=1e-15), (i, d, w)


@pytest.mark.parametrize("name", sorted(HAND))
def test_hand_worked_divergences_agree_with_the_design_reference(name):
    counts, want = HAND[name]
    ref = design_divergences(counts, num_quant_bins=2, start_bin=2)
    assert ref.keys() == want.keys()
    for i in want:
        assert ref[i] == pytest.approx(want[i], rel=1e-12, abs=1e-15) or (math.isinf(ref[i]) and math.isinf(want[i]))


@pytest.mark.parametrize("offset", [0.0, 0.5])
@pytest.mark.parametrize("name", sorted(HAND))
def test_amax_of_hand_worked_histograms(name, offset, fp_strict):
    counts, _ = HAND[name]
    i = HAND_BEST[name]
    for width in (1.0, 0.25):
        got = entropy_amax(np.array(counts), width, num_quant_bins=2, start_bin=2, bin_offset=offset)
        assert got == (i + offset) * width


def test_default_offset_is_the_bin_edge():
    """Without bin_offset, amax = i * width (DESIGN.md step 4), exactly."""
    counts, _ = HAND["clipped"]
    assert entropy_amax(np.array(counts), 0.5, num_quant_bins=2, start_bin=2) == 2 * 0.5


def test_start_bin_and_group_count_are_separate_knobs():
    """Candidates start at start_bin whatever num_quant_bins is: with start_bin=3 the
    no_tail_best histogram has candidates 3 and 4; with 4 groups instead of 2, Q of
    candidate 4 is P itself again."""
    counts = np.array(HAND["no_tail_best"][0])
    cand, div = entropy_divergences(counts, num_quant_bins=2, start_bin=3)
    assert list(cand) == [3, 4]
    assert div[0] == pytest.approx(2 * ln(5 / 6) / 3 + ln(5 / 3) / 3, rel=1e-12)
    assert entropy_amax(counts, 1.0, num_quant_bins=2, start_bin=3) == 4.0
    # 4 groups: every candidate's bins each have a group of their own, so Q = bins[:i]
    cand, div = entropy_divergences(counts, num_quant_bins=4, start_bin=2)
    want = design_divergences(list(counts), num_quant_bins=4, start_bin=2)
    assert list(cand) == [2, 3, 4]
    assert list(div) == pytest.approx([want[2], want[3], want[4]], rel=1e-12, abs=1e-15)


def test_two_bins_are_the_least_a_histogram_can_have():
    """bins[0] = bins[1] needs two bins; with start_bin=2 a two-bin histogram has one
    candidate, i=2, which is then the answer."""
    assert entropy_amax(np.array([7, 3]), 1.5, num_quant_bins=2, start_bin=2) == 3.0
    with pytest.raises(CalibrationError) as err:
        entropy_amax(np.array([7]), 1.5, num_quant_bins=2, start_bin=1)
    assert str(err.value) == ("entropy calibration needs a 1-D histogram of at least 2 bins, got shape (1,); "
                              "collect it with AbsHistogram(num_bins=2048)")


def test_exactly_128_bins_is_one_candidate():
    """The default search needs 128 bins; with exactly 128 the only candidate is the whole
    histogram: amax is its top edge."""
    assert entropy_amax(np.arange(1, 129), 0.5) == 64.0
    with pytest.raises(CalibrationError, match="at least 128 bins, got shape \\(127,\\)"):
        entropy_amax(np.arange(1, 128), 0.5)


def test_uniform_data_is_not_clipped():
    """Equal counts in all 256 bins: the full range is the only candidate with KL 0 (each
    group of 2 bins spreads its count evenly, which is P itself)."""
    div = design_divergences([1] * 256)
    assert div[256] == 0.0 and min(v for i, v in div.items() if i < 256) > 0
    assert entropy_amax(np.ones(256, dtype=np.int64), 0.1) == pytest.approx(25.6, rel=1e-15)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_amax_equals_the_design_reference_exactly(seed):
    """Not within a bin: the same candidate (the reference's i, the bin edge)."""
    rng = np.random.default_rng(seed)
    hist = AbsHistogram(num_bins=160, growth="double")
    hist.update(rng.gamma(2.0, 1.0, 4000))
    hist.update(rng.gamma(2.0, 1.6, 4000))  # the range doubles: empty bins at the top
    counts = hist.counts
    want = design_amax(list(counts), hist.bin_width)
    assert entropy_amax(counts, hist.bin_width) == pytest.approx(want, rel=1e-12)
    ref = design_divergences(list(counts))
    cand, div = entropy_divergences(counts)
    for i, d in zip(cand, div):
        assert d == pytest.approx(ref[int(i)], rel=1e-9, abs=1e-13) or (math.isinf(d) and math.isinf(ref[int(i)]))


def test_float32_counts_give_the_divergences_of_the_same_int_counts(fp_strict):
    """Counts are summed in float64 whatever their dtype (a float32 histogram of large
    counts would otherwise lose its small bins)."""
    rng = np.random.default_rng(5)
    counts = rng.integers(1, 40, 300) * 1000 + rng.integers(0, 1000, 300)
    counts[1] = 3_000_001
    _, exact = entropy_divergences(counts.astype(np.int64))
    _, from_f32 = entropy_divergences(counts.astype(np.float32))
    assert counts.astype(np.float32).astype(np.int64).tolist() == counts.tolist()  # the same numbers
    np.testing.assert_allclose(from_f32, exact, rtol=1e-12, atol=1e-15)


# -- refusals ------------------------------------------------------------------------------
def test_zero_histograms_give_zero_amax():
    assert entropy_amax(np.zeros(256, dtype=np.int64), 0.25) == 0.0
    assert entropy_amax(np.zeros(0), 0.0) == 0.0


@pytest.mark.parametrize("bad", [-1, np.nan, np.inf])
def test_corrupt_counts_are_refused(bad):
    counts = np.ones(200)
    counts[50] = bad
    with pytest.raises(CalibrationError) as err:
        entropy_amax(counts, 0.1)
    assert str(err.value) == ("histogram counts must be finite and >= 0; the histogram is corrupt, collect it again")


def test_histogram_with_only_bin_zero_is_refused():
    """bins[0] = bins[1] empties a histogram whose only counts are in bin 0."""
    counts = np.zeros(200, dtype=np.int64)
    counts[0] = 5
    with pytest.raises(CalibrationError) as err:
        entropy_amax(counts, 0.1)
    assert str(err.value) == "histogram is empty after bins[0] = bins[1]; no data to calibrate on"


# -- percentile, by hand ---------------------------------------------------------------------
# Values are uniform inside a bin: amax is where the piecewise-linear cumulative count
# first reaches percentile/100 of the total.
@pytest.mark.parametrize("counts,width,pct,want", [
    # cumulative 1, 3, 6, 10, 15, 21, 28, 36, 45, 55
    (list(range(1, 11)), 1.0, 50.0, 6 + 6.5 / 7),   # 27.5: 21 below bin 6, 7 in it
    (list(range(1, 11)), 1.0, 99.99, 9.99945),      # 54.9945: 45 below bin 9, 10 in it
    (list(range(1, 11)), 1.0, 100.0, 10.0),         # the top edge
    (list(range(1, 11)), 0.5, 10.0, 0.5 * (2 + 2.5 / 3)),  # 5.5: 3 below bin 2, 3 in it
    ([2, 1, 1], 1.0, 62.5, 1.5),                    # 2.5: 2 below bin 1, 1 in it
    ([4, 4], 1.0, 0.5, 0.01),                       # 0.04 of bin 0's 4
    ([4, 4], 1.0, 0.0, 0.0),                        # the bottom edge
    ([0, 3, 1], 1.0, 0.0, 1.0),                     # 0 is reached where bin 0 (empty) ends
    ([5], 2.0, 50.0, 1.0),                          # one bin
    ([0, 0, 4], 1.0, 50.0, 2.5),                    # empty bins below
    ([0, 1], 1.0, 100.0, 2.0),                      # one sample
])
def test_percentile_by_hand(counts, width, pct, want):
    assert percentile_amax(np.array(counts, dtype=np.int64), width, pct) == pytest.approx(want, rel=1e-12, abs=1e-15)


def test_percentile_is_capped_at_the_largest_value_seen():
    counts = np.array([0, 0, 1])
    assert percentile_amax(counts, 1.0, 100.0) == 3.0
    assert percentile_amax(counts, 1.0, 100.0, max_abs=2.2) == 2.2
    assert percentile_amax(counts, 1.0, 50.0, max_abs=2.9) == 2.5  # below the cap: unchanged


def test_percentile_of_nothing_is_zero():
    assert percentile_amax(np.zeros(0), 1.0, 99.0) == 0.0
    assert percentile_amax(np.zeros(4), 1.0, 99.0) == 0.0
    assert percentile_amax(np.array([3, 1]), 0.0, 99.0) == 0.0


def test_percentile_sums_float32_counts_in_float64():
    counts = np.array([2 ** 25, 1, 1, 1], dtype=np.float32)
    assert percentile_amax(counts, 1.0, 100.0) == 4.0  # the three single values count


@pytest.mark.parametrize("pct", [-0.001, 100.001])
def test_percentile_outside_0_100_is_refused(pct):
    with pytest.raises(CalibrationError, match=f"percentile must be within \\[0, 100\\], got {pct}"):
        percentile_amax(np.ones(4), 1.0, pct)


# -- dispatch ----------------------------------------------------------------------------------
def staircase() -> AbsHistogram:
    values = [k + 0.5 for k in range(10) for _ in range(k + 1)]
    values[-1] = 10.0
    hist = AbsHistogram(num_bins=10)
    hist.update(np.array(values))
    return hist


def test_dispatch_by_name():
    hist = staircase()
    for name in ("minmax", "MinMax", "max", "MAX"):
        assert compute_amax(hist, name) == 10.0
    assert compute_amax(hist, "percentile") == pytest.approx(9.99945, rel=1e-12)
    assert compute_amax(hist, "Percentile", percentile=50.0) == pytest.approx(6 + 6.5 / 7, rel=1e-12)


def test_options_a_method_does_not_take_are_named():
    hist = staircase()
    with pytest.raises(CalibrationError) as err:
        compute_amax(hist, "minmax", percentile=99.0)
    assert str(err.value) == "method 'minmax' takes no options, got ['percentile']"
    with pytest.raises(CalibrationError) as err:
        compute_amax(hist, "percentile", percentile=99.0, bin_offset=0.5)
    assert str(err.value) == "method 'percentile' takes only 'percentile', got ['bin_offset']"


@pytest.mark.parametrize("amax", [float("nan"), float("inf"), -0.5])
def test_scale_of_a_broken_amax_is_refused(amax):
    with pytest.raises(CalibrationError) as err:
        amax_to_scale(amax)
    assert str(err.value) == f"amax must be finite and >= 0, got {amax}; the histogram is corrupt"


def test_scale_is_amax_over_127_in_float32():
    assert amax_to_scale(127.0) == np.float32(1.0)
    assert amax_to_scale(0.0) == np.float32(0.0)
    assert amax_to_scale(1.0).dtype == np.float32 and amax_to_scale(1.0) == np.float32(1.0 / 127)
