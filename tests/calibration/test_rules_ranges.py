"""calibration.rules.ranges_under: what each rule set makes of the same histograms (the
numbers the calibrate stage writes), checked on small histograms with hand-computed
answers."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from calibration import rules
from calibration.histogram import AbsHistogram
from calibration.rules import get_rules, ranges_under


def staircase() -> AbsHistogram:
    """10 bins of width 1.0 over [0, 10]: bin k holds k + 1 values (55 in all), all at
    k + 0.5 except the maximum, 10.0, which falls in the last bin."""
    values = [k + 0.5 for k in range(10) for _ in range(k + 1)]
    values[-1] = 10.0
    hist = AbsHistogram(num_bins=10, growth="double")
    hist.update(np.array(values, dtype=np.float32))
    assert hist.bin_width == 1.0 and list(hist.counts) == list(range(1, 11))
    return hist


def wide(seed: int = 3) -> AbsHistogram:
    hist = AbsHistogram(num_bins=2048, growth="double")
    hist.update(np.random.default_rng(seed).laplace(0.0, 1.0, 20_000).astype(np.float32))
    return hist


def test_describe_names_every_rule():
    assert get_rules("tensorrt").describe() == {
        "rules": "tensorrt", "histogram_growth": "double", "amax_bin_offset": 0.5, "range_from_input_ops": ["MaxPool"]}
    assert get_rules("reference").describe() == {
        "rules": "reference", "histogram_growth": "append", "amax_bin_offset": 0.0, "range_from_input_ops": []}


@pytest.mark.parametrize("rule_set", ["tensorrt", "reference"])
def test_percentile_default_is_99_99(rule_set):
    """Cumulative counts 1, 3, 6, ..., 55; 99.99% of 55 = 54.9945 falls in the last bin
    (45 below it, 10 in it): amax = 9 + 9.9945 / 10 = 9.99945."""
    amax, range_from, _ = ranges_under(get_rules(rule_set), {"t": staircase()}, "percentile")
    assert amax == {"t": pytest.approx(9.99945, rel=1e-12)}
    assert range_from == {}


@pytest.mark.parametrize("rule_set", ["tensorrt", "reference"])
def test_percentile_given_is_used(rule_set):
    """50% of 55 = 27.5: bin 6 (21 below, 7 in it): amax = 6 + 6.5 / 7."""
    amax, _, _ = ranges_under(get_rules(rule_set), {"t": staircase()}, "percentile", percentile=50.0)
    assert amax["t"] == pytest.approx(6 + 6.5 / 7, rel=1e-12)


def test_minmax_is_the_largest_value_under_both_rules():
    for name in ("tensorrt", "reference"):
        assert ranges_under(get_rules(name), {"t": staircase()}, "minmax")[0] == {"t": 10.0}


def test_entropy_amax_is_half_a_bin_higher_under_tensorrt_rules():
    hist = wide()
    ref, _, _ = ranges_under(get_rules("reference"), {"t": hist}, "entropy")
    trt, _, _ = ranges_under(get_rules("tensorrt"), {"t": hist}, "entropy")
    i = ref["t"] / hist.bin_width
    assert i == pytest.approx(round(i), abs=1e-9) and 128 <= round(i) <= 2048  # a bin edge
    assert trt["t"] == pytest.approx((round(i) + 0.5) * hist.bin_width, rel=1e-12)


def test_maxpool_outputs_take_their_input_range_only_under_tensorrt_rules():
    hists = {"relu": wide(1), "pool": staircase(), "other": staircase()}
    ops = [("Relu", ["conv"], ["relu"]), ("MaxPool", ["relu"], ["pool"])]
    trt, trt_from, _ = ranges_under(get_rules("tensorrt"), hists, "minmax", ops)
    ref, ref_from, _ = ranges_under(get_rules("reference"), hists, "minmax", ops)
    assert trt == {"relu": hists["relu"].max_abs, "pool": hists["relu"].max_abs, "other": 10.0}
    assert trt_from == {"pool": "relu"}
    assert ref == {"relu": hists["relu"].max_abs, "pool": 10.0, "other": 10.0} and ref_from == {}


def test_search_times_are_milliseconds_per_tensor(monkeypatch):
    """search_ms (reported by the calibrate stage) is each tensor's search time in ms, read
    off time.perf_counter."""
    clock = iter([100.0, 100.25, 200.0, 200.5])
    monkeypatch.setattr(rules, "time", SimpleNamespace(perf_counter=lambda: next(clock)))
    _, _, search_ms = ranges_under(get_rules("tensorrt"), {"a": staircase(), "b": staircase()}, "minmax")
    assert search_ms == [250.0, 500.0]
