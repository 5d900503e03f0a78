"""calibration.rules: the two rule sets and how a MaxPool output takes its input's range."""

from __future__ import annotations

import pytest

from calibration.errors import CalibrationError
from calibration.rules import RULES, get_rules, range_sources, share_ranges


def test_rule_sets():
    assert set(RULES) == {"tensorrt", "reference"}
    trt, ref = get_rules("tensorrt"), get_rules("reference")
    assert (trt.growth, trt.amax_bin_offset, trt.range_from_input) == ("double", 0.5, True)
    assert (ref.growth, ref.amax_bin_offset, ref.range_from_input) == ("append", 0.0, False)
    assert trt.describe()["range_from_input_ops"] == ["MaxPool"] and ref.describe()["range_from_input_ops"] == []


def test_unknown_rules_name_the_choices():
    with pytest.raises(CalibrationError, match="unknown calibration rules 'trt'.*tensorrt, reference"):
        get_rules("trt")


def test_range_sources_are_maxpool_outputs_only():
    ops = [("Conv", ["x", "w"], ["c"]), ("Relu", ["c"], ["r"]), ("MaxPool", ["r"], ["p"]),
           ("AveragePool", ["p"], ["a"]), ("MaxPool", ["a"], ["q", "idx"])]
    assert range_sources(ops) == {"p": "r", "q": "a"}


def test_share_ranges_follows_chains_to_the_first_own_range():
    amax = {"r": 4.0, "p1": 5.0, "p2": 6.0, "other": 1.0}
    taken = share_ranges(amax, {"p1": "r", "p2": "p1"})
    assert amax == {"r": 4.0, "p1": 4.0, "p2": 4.0, "other": 1.0}
    assert taken == {"p1": "r", "p2": "r"}


def test_share_ranges_leaves_pairs_without_both_ranges():
    amax = {"p": 2.0}
    assert share_ranges(amax, {"p": "not-calibrated", "q": "p"}) == {}
    assert amax == {"p": 2.0}
