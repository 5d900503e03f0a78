"""EntropyCalibration2 (vectorised) against a slow step-by-step reference, plus MinMax and
percentile against numpy on the raw data."""

from __future__ import annotations

import math

import numpy as np
import pytest

from calibration.algorithms import (
    amax_to_scale,
    compute_amax,
    entropy_amax,
    entropy_divergences,
    minmax_amax,
    percentile_amax,
)
from calibration.errors import CalibrationError
from calibration.histogram import AbsHistogram


# -- the slow reference: DESIGN.md section 4, steps 2-4, one candidate at a time ----------
def reference_divergences(counts, num_quant_bins=128, start_bin=128):
    """Plain loop over candidates, each built directly from its definition. Groups follow
    NVIDIA's reference literally: bin j goes to the group np.digitize finds for j in
    linspace(0, i, num_quant_bins + 1)."""
    bins = np.array(counts, dtype=np.float64)
    bins[0] = bins[1]  # step 2
    candidates, divergences = [], []
    for i in range(start_bin, len(bins) + 1):  # step 3
        p = bins[:i].copy()
        p[-1] += bins[i:].sum()  # tail mass into the last bin
        group_of = np.digitize(np.arange(i), np.linspace(0, i, num_quant_bins + 1)) - 1
        group_sum = np.bincount(group_of, weights=bins[:i], minlength=num_quant_bins)
        group_nonempty = np.bincount(group_of, weights=bins[:i] > 0, minlength=num_quant_bins)
        q = np.zeros(i)
        nonempty = bins[:i] > 0  # each group's count spread over its non-empty bins only
        q[nonempty] = group_sum[group_of[nonempty]] / group_nonempty[group_of[nonempty]]
        candidates.append(i)
        if np.any((p > 0) & (q == 0)):  # P has mass where Q has none
            divergences.append(math.inf)
            continue
        p /= p.sum()
        q /= q.sum()
        has_mass = p > 0
        divergences.append(float(np.sum(p[has_mass] * np.log(p[has_mass] / q[has_mass]))))
    return np.array(candidates), np.array(divergences)


def reference_amax(counts, bin_width):
    candidates, divergences = reference_divergences(counts)
    best = max(i for i, d in zip(candidates, divergences) if d == divergences.min())  # step 4
    return best * bin_width


def _histogram(batches, num_bins=2048):
    hist = AbsHistogram(num_bins)
    for batch in batches:
        hist.update(batch)
    return hist


def _distributions():
    rng = np.random.default_rng(1234)
    relu = np.maximum(rng.normal(0.2, 1.0, 300_000), 0.0)
    outliers = rng.normal(0, 1, 300_000)
    outliers[rng.choice(outliers.size, 30, replace=False)] *= 80.0
    return {
        "gaussian": [rng.normal(0, 1, 200_000)],
        "laplace": [rng.laplace(0, 0.5, 200_000)],
        "relu": [relu],
        "outliers": [outliers],
        # later batches with larger max|x|: 2048 bins grow to several thousand, which also
        # crosses the 4096-candidate chunk boundary of the vectorised search
        "growing": [rng.normal(0, 1, 50_000), rng.normal(0, 1.5, 50_000), rng.laplace(0, 2, 50_000),
                    rng.normal(0, 0.5, 50_000)],
        # a few distinct values: several candidates tie at KL == 0 exactly (largest i wins)
        "five_values": [rng.integers(0, 5, 100_000).astype(np.float32)],
        "seventeen_values": [rng.integers(0, 17, 100_000).astype(np.float32) * 0.37],
    }


DISTRIBUTIONS = _distributions()
_HISTS = {name: _histogram(batches) for name, batches in DISTRIBUTIONS.items()}


def test_growing_case_really_grows():
    assert _HISTS["growing"].num_bins > 4096 + 128


@pytest.mark.parametrize("name", sorted(DISTRIBUTIONS))
def test_entropy_amax_matches_reference(name):
    hist = _HISTS[name]
    got = entropy_amax(hist.counts, hist.bin_width)
    want = reference_amax(hist.counts, hist.bin_width)
    assert abs(got - want) <= hist.bin_width * (1 + 1e-9), (got, want, hist)


@pytest.mark.parametrize("name", sorted(DISTRIBUTIONS))
def test_divergences_match_reference(name):
    hist = _HISTS[name]
    cand, div = entropy_divergences(hist.counts)
    ref_cand, ref_div = reference_divergences(hist.counts)
    np.testing.assert_array_equal(cand, ref_cand)
    np.testing.assert_array_equal(np.isinf(div), np.isinf(ref_div))
    finite = np.isfinite(ref_div)
    np.testing.assert_allclose(div[finite], ref_div[finite], rtol=1e-9, atol=1e-13)


@pytest.mark.parametrize("name", ["relu", "growing"])
def test_bin_offset_moves_amax_half_a_bin_up(name):
    """TensorRT 8.6's amax is the chosen end bin plus half a bin: the same i as the
    reference, (i + 1/2) * width."""
    hist = _HISTS[name]
    i = round(reference_amax(hist.counts, hist.bin_width) / hist.bin_width)
    got = entropy_amax(hist.counts, hist.bin_width, bin_offset=0.5)
    assert got == pytest.approx((i + 0.5) * hist.bin_width, rel=1e-12)


def test_group_of_bin_is_floor_128j_over_i():
    """The vectorised search puts bin j of candidate i in group floor(128*j/i); that is
    what the reference's digitize over linspace(0, i, 129) gives, multiple of 128 or not."""
    for i in range(128, 5000):
        j = np.arange(i)
        digitized = np.digitize(j, np.linspace(0, i, 129)) - 1
        np.testing.assert_array_equal((128 * j) // i, digitized, err_msg=f"i={i}")


def test_bins0_is_replaced_by_bins1():
    """A huge spike of exact zeros (ReLU) must not drive the search: only bins[1] counts."""
    rng = np.random.default_rng(7)
    values = np.abs(rng.normal(0, 1, 100_000))
    spiky = _histogram([np.concatenate([values, np.zeros(5_000_000)])])
    plain = _histogram([values])
    assert entropy_amax(spiky.counts, spiky.bin_width) == entropy_amax(plain.counts, plain.bin_width)


def test_counts_are_not_modified():
    hist = _HISTS["relu"]
    before = hist.counts.copy()
    entropy_amax(hist.counts, hist.bin_width)
    np.testing.assert_array_equal(hist.counts, before)


def test_all_zero_tensor_gives_zero_amax():
    hist = _histogram([np.zeros(1000, np.float32)])
    for method in ("entropy", "minmax", "percentile"):
        assert compute_amax(hist, method) == 0.0
    assert amax_to_scale(0.0) == 0.0


def test_too_few_bins_is_a_calibration_error():
    with pytest.raises(CalibrationError, match="at least 128 bins"):
        entropy_amax(np.ones(100), 0.1)


# -- MinMax and percentile against numpy on the raw data --------------------------------
@pytest.mark.parametrize("name", sorted(DISTRIBUTIONS))
def test_minmax_is_max_abs(name):
    hist = _HISTS[name]
    want = max(float(np.max(np.abs(b))) for b in DISTRIBUTIONS[name])
    assert minmax_amax(hist) == want
    assert compute_amax(hist, "minmax") == want


@pytest.mark.parametrize("pct", [50.0, 99.0, 99.9, 99.99, 100.0])
@pytest.mark.parametrize("name", sorted(DISTRIBUTIONS))
def test_percentile_matches_numpy(name, pct):
    """Within one bin of np.percentile where data is dense; in a sparse tail the two order
    statistics numpy interpolates between can be bins apart, so the bound is: from the
    lower edge of the lower one's bin to the upper edge of the higher one's bin."""
    hist = _HISTS[name]
    data = np.abs(np.concatenate([np.ravel(b) for b in DISTRIBUTIONS[name]]))
    got = percentile_amax(hist.counts, hist.bin_width, pct, max_abs=hist.max_abs)
    width = hist.bin_width
    lower = float(np.percentile(data, pct, method="lower"))
    higher = float(np.percentile(data, pct, method="higher"))
    last_bin = hist.num_bins - 1  # |x| == top edge is counted in the last bin

    def bin_of(x):
        return min(np.floor(x / width), last_bin)

    slack = 1e-9 * width
    assert bin_of(lower) * width - slack <= got <= (bin_of(higher) + 1) * width + slack
    if pct <= 99.0 or name.endswith("values"):  # dense: plain one-bin agreement
        assert abs(got - float(np.percentile(data, pct))) <= width, (got, width)
    assert compute_amax(hist, "percentile", percentile=pct) == got


def test_percentile_out_of_range():
    with pytest.raises(CalibrationError, match="within"):
        percentile_amax(np.ones(10), 0.1, 100.5)


def test_compute_amax_dispatch():
    hist = _HISTS["laplace"]
    assert compute_amax(hist, "entropy") == entropy_amax(hist.counts, hist.bin_width)
    assert compute_amax(hist, "Entropy") == compute_amax(hist, "entropy")
    with pytest.raises(CalibrationError, match="unknown calibration method 'kl'.*entropy, minmax, percentile, mse"):
        compute_amax(hist, "kl")


def test_amax_to_scale_is_float32_amax_over_127():
    scale = amax_to_scale(2.54)
    assert isinstance(scale, np.float32)
    assert scale == np.float32(2.54 / 127)
    with pytest.raises(CalibrationError):
        amax_to_scale(float("nan"))
