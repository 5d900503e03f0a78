"""The gate's verdicts, field by field: every kind of check with its value, threshold,
status and message (NaN never passes; a value exactly at its threshold passes, float noise
aside), the reasons a check is skipped, the markdown summary, the JSON and the JUnit XML CI
reads, and every way the input can be unusable (exit 2) with the message naming it.

Compare reports are the real writer's (compare.build_table over EvalReports, as in
tests/test_gate.py); a few are edited afterwards, as a hand edit or an older trtpipe would."""

from __future__ import annotations

import copy
import dataclasses
import datetime as dt
import json
import math
import subprocess
import sys
import types
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, Optional

import pytest

from pipeline import gate
from pipeline.config import GateConfig
from pipeline.gate import Check, GateInputError, GateResult, evaluate_gate
from tests.stages.test_compare import report as eval_report
from tests.test_gate import FLAG_CHECK, _table_of, synthetic_table

# synthetic_table(): fp32 top1 90.0, fp16 89.9, int8 80.0, PyTorch 90.5; p50 latency (ms) at b1 / b32:
# fp32 0.2 / 2.0, fp16 0.1 / 1.0, int8 0.05 / 0.5 (p90 = 1.1x, p99 = 1.5x); agreement vs fp32 and vs
# PyTorch on the one output 'logits': fp16 cosine 0.9999, int8 cosine 0.95 and top1_agreement 0.85,
# both rel_l2 0.01, max_abs_diff 0.01, snr_db 40.


def judge(section: dict[str, Any], table: Optional[dict[str, Any]] = None, baseline: Optional[dict[str, Any]] = None,
          label: Optional[str] = "base.json") -> GateResult:
    return evaluate_gate(table or synthetic_table(), GateConfig.model_validate(section), baseline, "c.json", label)


def checks(r: GateResult, flags: bool = False) -> list[dict[str, Any]]:
    return [dataclasses.asdict(c) for c in r.checks if flags or c.name != FLAG_CHECK]


def one(r: GateResult) -> dict[str, Any]:
    cs = checks(r)
    assert len(cs) == 1, cs
    return cs[0]


def bad(section: dict[str, Any], table: Optional[dict[str, Any]] = None, baseline: Optional[dict[str, Any]] = None) -> str:
    with pytest.raises(GateInputError) as e:
        judge(section, table, baseline)
    return str(e.value)


# ------------------------------------------------------------------------------ drops vs a reference


def test_drop_check_fields_pass_and_fail() -> None:
    c = one(judge({"thresholds": {"fp16": {"max_drop": {"top1": 0.5}}}}))
    assert c == {"variant": "fp16", "name": "top1 drop vs fp32", "setting": "gate.thresholds.fp16.max_drop.top1",
                 "threshold": 0.5, "op": "<=", "value": pytest.approx(0.1), "status": "pass", "message": "",
                 "detail": "90 -> 89.9"}
    c = one(judge({"thresholds": {"int8": {"max_drop": {"top1": 2.5}}}}))
    assert c == {"variant": "int8", "name": "top1 drop vs fp32", "setting": "gate.thresholds.int8.max_drop.top1",
                 "threshold": 2.5, "op": "<=", "value": 10.0, "status": "fail", "detail": "90 -> 80",
                 "message": "int8: top1 dropped by 10 vs fp32 (90 -> 80), more than gate.thresholds.int8.max_drop.top1 = 2.5"}


def test_drop_vs_pytorch_fields() -> None:
    c = one(judge({"thresholds": {"int8": {"max_drop_vs_pytorch": {"top1": 11.0}}}}))
    assert (c["name"], c["setting"], c["value"], c["detail"], c["status"]) == (
        "top1 drop vs PyTorch", "gate.thresholds.int8.max_drop_vs_pytorch.top1", 10.5, "90.5 -> 80", "pass")
    c = one(judge({"thresholds": {"int8": {"max_drop_vs_pytorch": {"top1": 10.25}}}}))
    assert c["message"] == "int8: top1 dropped by 10.5 vs PyTorch (90.5 -> 80), more than gate.thresholds.int8.max_drop_vs_pytorch.top1 = 10.25"


def test_gate_threshold_boundary_a_drop_exactly_at_the_threshold_passes() -> None:
    """A drop equal to its threshold passes, also when float subtraction lands a hair above it
    (80.3 - 80.1 = 0.2000000000000028); a drop 1e-6 above it fails."""
    evals = {p: eval_report(p, top1, 1.0) for p, top1 in (("fp32", 80.3), ("fp16", 80.1), ("int8", 79.8))}
    table = _table_of(evals)
    assert 80.3 - 80.1 > 0.2
    r = judge({"thresholds": {"fp16": {"max_drop": {"top1": 0.2}}, "int8": {"max_drop": {"top1": 0.5}}}}, table)
    assert [(c["variant"], c["status"]) for c in checks(r)] == [("fp16", "pass"), ("int8", "pass")]
    r = judge({"thresholds": {"fp16": {"max_drop": {"top1": 0.199999}}, "int8": {"max_drop": {"top1": 0.499999}}}}, table)
    assert [(c["variant"], c["status"]) for c in checks(r)] == [("fp16", "fail"), ("int8", "fail")]
    # A rise is no drop: a negative drop passes a threshold of 0.
    assert one(judge({"thresholds": {"fp32": {"max_drop_vs_pytorch": {"top1": 0.0}}}},
                     _table_of({**evals, "fp32": eval_report("fp32", 91.0, 1.0)})))["status"] == "pass"


def test_lower_is_better_rise_fields() -> None:
    evals = {p: eval_report(p, 90.0, 1.0, extra={"loss": loss}) for p, loss in (("fp32", 1.0), ("int8", 1.5))}
    table = _table_of(evals)
    c = one(judge({"lower_is_better": ["loss"], "thresholds": {"int8": {"max_drop": {"loss": 0.25}}}}, table))
    assert (c["name"], c["value"], c["detail"], c["status"]) == ("loss rise vs fp32", 0.5, "1 -> 1.5", "fail")
    assert c["message"] == "int8: loss rose by 0.5 vs fp32 (1 -> 1.5), more than gate.thresholds.int8.max_drop.loss = 0.25"
    assert one(judge({"lower_is_better": ["loss"], "thresholds": {"int8": {"max_drop": {"loss": 0.5}}}}, table))["status"] == "pass"
    # as a higher-is-better metric the same numbers are a gain of 0.5
    assert one(judge({"thresholds": {"int8": {"max_drop": {"loss": 0.0}}}}, table))["value"] == -0.5


def test_gate_nan_metric_fails_on_either_side() -> None:
    """A NaN metric, in the variant or in the reference, fails its drop check with a message saying so."""
    evals = {"fp32": eval_report("fp32", 90.0, 1.0), "int8": eval_report("int8", float("nan"), 1.0)}
    c = one(judge({"thresholds": {"int8": {"max_drop": {"top1": 100.0}}}}, _table_of(evals)))
    assert c["status"] == "fail" and math.isnan(c["value"]) and c["detail"] == "90 -> nan"
    assert c["message"] == "int8: top1 vs fp32 is NaN (90 -> nan); gate.thresholds.int8.max_drop.top1 = 100 cannot be met by a NaN"
    evals = {"fp32": eval_report("fp32", float("nan"), 1.0), "int8": eval_report("int8", 80.0, 1.0)}
    c = one(judge({"lower_is_better": ["top1"], "thresholds": {"int8": {"max_drop": {"top1": 1.0}}}}, _table_of(evals)))
    assert c["status"] == "fail" and c["message"].startswith("int8: top1 vs fp32 is NaN (nan -> 80)")
    c = one(judge({"thresholds": {"int8": {"max_drop_vs_baseline": {"top1": 1.0}}}}, _table_of(evals),
                  baseline=_table_of({"fp32": eval_report("fp32", 90.0, 1.0), "int8": eval_report("int8", float("nan"), 1.0)})))
    assert c["status"] == "fail" and c["message"] == (
        "int8: top1 vs the baseline base.json is NaN (nan -> 80); gate.thresholds.int8.max_drop_vs_baseline.top1 = 1 "
        "cannot be met by a NaN")


def test_drop_vs_baseline_fields_and_skips() -> None:
    base = synthetic_table()
    cur = copy.deepcopy(base)
    cur["variants"]["int8"]["top1"] = 78.5
    c = one(judge({"thresholds": {"int8": {"max_drop_vs_baseline": {"top1": 1.0}}}}, cur, base, label="main (x via DVC)"))
    assert c == {"variant": "int8", "name": "top1 drop vs baseline", "setting": "gate.thresholds.int8.max_drop_vs_baseline.top1",
                 "threshold": 1.0, "op": "<=", "value": 1.5, "status": "fail", "detail": "80 -> 78.5",
                 "message": "int8: top1 dropped by 1.5 vs the baseline main (x via DVC) (80 -> 78.5), more than "
                            "gate.thresholds.int8.max_drop_vs_baseline.top1 = 1"}
    assert one(judge({"thresholds": {"int8": {"max_drop_vs_baseline": {"top1": 1.5}}}}, cur, base))["status"] == "pass"
    section = {"thresholds": {"int8": {"max_drop_vs_baseline": {"top1": 1.0}}}}
    c = one(judge(section, cur))
    assert (c["status"], c["value"], c["message"]) == ("skip", None, "int8: top1 vs baseline not checked: no --baseline given")
    no_int8 = copy.deepcopy(base)
    del no_int8["variants"]["int8"]
    assert one(judge(section, cur, no_int8))["message"] == "int8: top1 vs baseline not checked: the baseline has no variant int8"
    no_top1 = copy.deepcopy(base)
    del no_top1["variants"]["int8"]["top1"]
    assert one(judge(section, cur, no_top1))["message"] == "int8: top1 vs baseline not checked: the baseline has no metric top1"
    nan_base = copy.deepcopy(base)
    nan_base["variants"]["int8"]["top1"] = "NaN"  # a NaN in the baseline is measured, not skipped
    assert one(judge(section, cur, nan_base))["status"] == "fail"


# ------------------------------------------------------------------------------ agreement bounds


def test_agreement_and_divergence_check_fields() -> None:
    r = judge({"thresholds": {"int8": {"min_agreement": {"top1_agreement": 0.9}, "max_divergence": {"pytorch_rel_l2": 0.001}}}})
    assert checks(r) == [
        {"variant": "int8", "name": "top1_agreement vs fp32 (logits)", "setting": "gate.thresholds.int8.min_agreement.top1_agreement",
         "threshold": 0.9, "op": ">=", "value": 0.85, "status": "fail", "detail": "",
         "message": "int8: top1_agreement vs fp32 on output 'logits' is 0.85, below gate.thresholds.int8.min_agreement.top1_agreement = 0.9"},
        {"variant": "int8", "name": "rel_l2 vs PyTorch (logits)", "setting": "gate.thresholds.int8.max_divergence.pytorch_rel_l2",
         "threshold": 0.001, "op": "<=", "value": 0.01, "status": "fail", "detail": "",
         "message": "int8: rel_l2 vs PyTorch on output 'logits' is 0.01, above gate.thresholds.int8.max_divergence.pytorch_rel_l2 = 0.001"},
    ]
    # explicit fp32_ prefix: the same as none
    c = one(judge({"thresholds": {"int8": {"min_agreement": {"fp32_cosine": 0.9}}}}))
    assert (c["name"], c["value"], c["status"], c["setting"]) == ("cosine vs fp32 (logits)", 0.95, "pass",
                                                                   "gate.thresholds.int8.min_agreement.fp32_cosine")


def test_gate_threshold_boundary_agreement_at_the_bound_passes() -> None:
    """At its bound an agreement (>=) or divergence (<=) passes; a hair beyond, it fails."""
    at = judge({"thresholds": {"int8": {"min_agreement": {"cosine": 0.95, "cosine_min": 0.9499},
                                        "max_divergence": {"rel_l2": 0.01, "max_abs_diff": 0.01}}}})
    assert [c["status"] for c in checks(at)] == ["pass"] * 4
    beyond = judge({"thresholds": {"int8": {"min_agreement": {"cosine": 0.9500001}, "max_divergence": {"rel_l2": 0.0099999}}}})
    assert [c["status"] for c in checks(beyond)] == ["fail", "fail"]


def test_gate_nan_agreement_fails_both_kinds_of_bound() -> None:
    table = synthetic_table()
    for ref in ("fp32", "pytorch"):
        table["agreement"]["int8"][ref]["logits"].update(cosine=float("nan"), rel_l2=float("nan"))
    table = json.loads(json.dumps(table))  # strict JSON round trip: NaN as the report writes it ("NaN")
    r = judge({"thresholds": {"int8": {"min_agreement": {"cosine": -1.0, "pytorch_cosine": -1.0},
                                       "max_divergence": {"rel_l2": 1e9}}}}, table)
    cs = checks(r)
    assert [c["status"] for c in cs] == ["fail", "fail", "fail"] and all(math.isnan(c["value"]) for c in cs)
    assert cs[0]["message"] == "int8: cosine vs fp32 on output 'logits' is nan, below gate.thresholds.int8.min_agreement.cosine = -1"
    assert cs[1]["message"] == ("int8: cosine vs PyTorch on output 'logits' is nan, below "
                                "gate.thresholds.int8.min_agreement.pytorch_cosine = -1")
    assert cs[2]["message"] == "int8: rel_l2 vs fp32 on output 'logits' is nan, above gate.thresholds.int8.max_divergence.rel_l2 = 1e+09"


def test_gate_nan_threshold_is_refused_as_bad_input() -> None:
    """A NaN (or infinite) threshold never reaches a check: the config refuses it, naming the key."""
    from pydantic import ValidationError

    for section in ({"max_drop": {"top1": float("nan")}}, {"min_agreement": {"cosine": float("nan")}},
                    {"max_divergence": {"rel_l2": float("inf")}}, {"min_speedup": float("nan")},
                    {"max_latency_regression": float("nan")}):
        with pytest.raises((ValidationError, ValueError)):
            GateConfig.model_validate({"thresholds": {"int8": section}})


def test_agreement_on_every_output_skips_missing_statistics() -> None:
    """Outputs without the statistic (top1_agreement of a regression head) are left out; none at all is bad input."""
    outs = {"boxes": 0.99, "prob": 0.999}
    evals = {p: eval_report(p, 90.0, 1.0, outputs=outs) for p in ("fp32", "int8")}
    table = _table_of(evals)
    table["agreement"]["int8"]["fp32"]["boxes"].pop("top1_agreement")
    r = judge({"thresholds": {"int8": {"min_agreement": {"top1_agreement": 0.5}}}}, table)
    assert [c["name"] for c in checks(r)] == ["top1_agreement vs fp32 (prob)"]
    table["agreement"]["int8"]["fp32"]["prob"].pop("top1_agreement")
    msg = bad({"thresholds": {"int8": {"min_agreement": {"top1_agreement": 0.5}}}}, table)
    assert msg == "c.json: variant 'int8' has no metric 'fp32_top1_agreement', which gate.thresholds.int8.min_agreement.top1_agreement names"
    msg = bad({"thresholds": {"int8": {"min_agreement": {"pytorch_snr_db@landmarks": 20}}}}, table)
    assert msg == ("c.json: variant 'int8' has no PyTorch agreement on output 'landmarks', which "
                   "gate.thresholds.int8.min_agreement.pytorch_snr_db@landmarks names; outputs: boxes, prob")


def test_agreement_of_the_reference_with_itself_is_bad_input_with_a_hint() -> None:
    msg = bad({"thresholds": {"fp32": {"min_agreement": {"cosine": 0.9}}}})
    assert msg == ("c.json: variant 'fp32' has no metric 'fp32_cosine', which gate.thresholds.fp32.min_agreement.cosine names "
                   "(the reference has no agreement with itself; use pytorch_cosine); it has: none")
    msg = bad({"thresholds": {"fp32": {"min_agreement": {"cosine@logits": 0.9}}}})
    assert msg == ("c.json: variant 'fp32' has no metric 'fp32_cosine', which gate.thresholds.fp32.min_agreement.cosine@logits "
                   "names (the reference has no agreement with itself; use pytorch_cosine); it has: none")
    # a report whose reference carries agreement on some output (written by hand or another tool): named with its output
    table = synthetic_table()
    table["agreement"]["fp32"]["fp32"] = {"logits": dict(table["agreement"]["fp32"]["pytorch"]["logits"])}
    msg = bad({"thresholds": {"fp32": {"min_agreement": {"cosine@boxes": 0.9}}}}, table)
    assert msg == ("c.json: variant 'fp32' has no fp32 agreement on output 'boxes', which gate.thresholds.fp32.min_agreement.cosine@boxes "
                   "names (the reference has no agreement with itself; use pytorch_cosine@boxes); outputs: logits")
    del table["agreement"]["fp32"]["fp32"]["logits"]["snr_db"]
    msg = bad({"thresholds": {"fp32": {"min_agreement": {"snr_db": 30}}}}, table)
    assert msg == ("c.json: variant 'fp32' has no metric 'fp32_snr_db', which gate.thresholds.fp32.min_agreement.snr_db names "
                   "(the reference has no agreement with itself; use pytorch_snr_db)")
    # against PyTorch the reference has agreement, on its own output
    c = one(judge({"thresholds": {"fp32": {"min_agreement": {"pytorch_cosine@logits": 0.9}}}}))
    assert (c["name"], c["value"], c["status"]) == ("cosine vs PyTorch (logits)", 0.9999, "pass")
    # an output the other variants lack, on a variant that is not the reference: no hint
    msg = bad({"thresholds": {"int8": {"min_agreement": {"cosine@boxes": 0.9}}}})
    assert msg == ("c.json: variant 'int8' has no fp32 agreement on output 'boxes', which "
                   "gate.thresholds.int8.min_agreement.cosine@boxes names; outputs: logits")


def test_an_older_report_without_per_output_agreement_uses_the_flat_row() -> None:
    table = synthetic_table()
    del table["agreement"]
    c = one(judge({"thresholds": {"int8": {"min_agreement": {"cosine": 0.96}}}}, table))
    assert (c["name"], c["value"], c["status"]) == ("cosine vs fp32 ((all outputs))", 0.95, "fail")
    assert c["message"] == ("int8: cosine vs fp32 on output '(all outputs)' is 0.95, below "
                            "gate.thresholds.int8.min_agreement.cosine = 0.96")
    c = one(judge({"thresholds": {"int8": {"max_divergence": {"pytorch_max_abs_diff": 0.01}}}}, table))
    assert (c["name"], c["value"], c["status"]) == ("max_abs_diff vs PyTorch ((all outputs))", 0.01, "pass")
    msg = bad({"thresholds": {"fp32": {"min_agreement": {"snr_db": 30}}}}, table)
    assert msg == ("c.json: variant 'fp32' has no metric 'fp32_snr_db', which gate.thresholds.fp32.min_agreement.snr_db names "
                   "(the reference has no agreement with itself; use pytorch_snr_db); it has: none")
    del table["variants"]["int8"]["fp32_top1_agreement"]  # the same kind of column is listed, no hint
    msg = bad({"thresholds": {"int8": {"min_agreement": {"top1_agreement": 0.5}}}}, table)
    assert msg == ("c.json: variant 'int8' has no metric 'fp32_top1_agreement', which gate.thresholds.int8.min_agreement.top1_agreement "
                   "names; it has: fp32_cosine, fp32_cosine_min, fp32_max_abs_diff, fp32_mean_abs_diff, fp32_rel_l2, fp32_snr_db")


# ------------------------------------------------------------------------------- compare flags


def test_flag_check_fields() -> None:
    evals = {"fp32": eval_report("fp32", 90.0, 1.0),
             "int8": eval_report("int8", 90.0, 1.0, flags=["output 'logits' has 3 NaN/Inf values", "cosine 0.1 under the floor"])}
    r = judge({"thresholds": {"fp32": {"max_drop_vs_pytorch": {"top1": 1.0}}, "int8": {"max_drop": {"top1": 1.0}}}}, _table_of(evals))
    flags = [c for c in checks(r, flags=True) if c["name"] == FLAG_CHECK]
    assert flags == [
        {"variant": "fp32", "name": FLAG_CHECK, "setting": "evaluate.agreement_floor / NaN outputs", "threshold": 0, "op": "<=",
         "value": 0.0, "status": "pass", "message": "", "detail": ""},
        {"variant": "int8", "name": FLAG_CHECK, "setting": "evaluate.agreement_floor / NaN outputs", "threshold": 0, "op": "<=",
         "value": 2.0, "status": "fail", "detail": "",
         "message": "int8: flagged by compare: output 'logits' has 3 NaN/Inf values; cosine 0.1 under the floor"}]
    assert not r.passed and r.counts() == {"pass": 3, "fail": 1, "skip": 0}
    table = _table_of(evals)
    del table["flags"]  # an older report without flags: nothing flagged
    assert judge({"thresholds": {"int8": {"max_drop": {"top1": 1.0}}}}, table).passed


# ------------------------------------------------------------------------------------- latency


def test_speedup_check_fields_and_boundary() -> None:
    r = judge({"thresholds": {"int8": {"min_speedup": 4.0}}})
    assert checks(r) == [
        {"variant": "int8", "name": "b1 p50 speedup vs fp32", "setting": "gate.thresholds.int8.min_speedup", "threshold": 4.0,
         "op": ">=", "value": 4.0, "status": "pass", "message": "", "detail": "0.2 ms -> 0.05 ms"},
        {"variant": "int8", "name": "b32 p50 speedup vs fp32", "setting": "gate.thresholds.int8.min_speedup", "threshold": 4.0,
         "op": ">=", "value": 4.0, "status": "pass", "message": "", "detail": "2 ms -> 0.5 ms"}]
    c = checks(judge({"thresholds": {"int8": {"min_speedup": 4.5}}}))[1]
    assert c["status"] == "fail" and c["message"] == (
        "int8: b32 p50 latency speedup vs fp32 is 4.000x (2 ms -> 0.5 ms); gate.thresholds.int8.min_speedup = 4.5x")
    # other percentile, and only the batch sizes asked for
    r = judge({"latency": {"percentile": "p99", "batch_sizes": [32]}, "thresholds": {"fp16": {"min_speedup": 2.0}}})
    assert [(c["name"], c["value"], c["detail"]) for c in checks(r)] == [("b32 p99 speedup vs fp32", 2.0, "3 ms -> 1.5 ms")]


def test_speedup_of_a_zero_or_negative_latency() -> None:
    table = synthetic_table()
    table["variants"]["int8"]["b1_p50_ms"] = 0.0  # below the timer's resolution: infinitely fast
    table["variants"]["int8"]["b32_p50_ms"] = -0.5  # nonsense: never passes
    r = judge({"thresholds": {"int8": {"min_speedup": 1.0}}}, table)
    b1, b32 = checks(r)
    assert (b1["status"], b1["value"]) == ("pass", math.inf)
    assert b32["status"] == "fail" and math.isnan(b32["value"])
    assert b32["message"] == "int8: b32 p50 latency speedup vs fp32 is nanx (2 ms -> -0.5 ms); gate.thresholds.int8.min_speedup = 1x"


def test_batches_are_the_report_s_sorted_by_size_without_end_to_end_columns() -> None:
    lat = [{"batch_size": b, "mode": "plain", "host": {"batch_size": b, "iterations": 10, "p50_ms": b / 10, "p90_ms": b / 9,
                                                          "p99_ms": b / 8, "mean_ms": b / 10, "std_ms": 0.1, "min_ms": b / 11,
                                                          "throughput_per_s": 100.0},
            "gpu": None, "warmup": 2, "method": "test"} for b in (4, 128, 32)]
    evals = {p: eval_report(p, 90.0, 1.0, latency=lat) for p in ("fp32", "int8")}
    table = _table_of(evals)
    assert {"b4_e2e_p50_ms", "b128_p50_ms"} <= set(table["variants"]["int8"])
    r = judge({"thresholds": {"int8": {"min_speedup": 1.0}}}, table)
    assert [c["name"] for c in checks(r)] == ["b4 p50 speedup vs fp32", "b32 p50 speedup vs fp32", "b128 p50 speedup vs fp32"]


def test_no_latency_is_bad_input() -> None:
    table = synthetic_table()
    table["variants"]["int8"] = {k: v for k, v in table["variants"]["int8"].items() if not k.startswith("b")}
    for section, setting in (({"min_speedup": 1.0}, "min_speedup"), ({"max_latency_regression": 0.1}, "max_latency_regression")):
        msg = bad({"thresholds": {"int8": section}}, table, synthetic_table())
        assert msg == f"c.json: variant 'int8' has no latency (p50), which gate.thresholds.int8.{setting} needs; re-run evaluate"
    msg = bad({"latency": {"batch_sizes": [64]}, "thresholds": {"int8": {"min_speedup": 1.0}}})
    assert msg == "c.json: variant 'int8' has no metric 'b64_p50_ms', which gate.thresholds.int8.min_speedup names; it has: none"
    msg = bad({"latency": {"percentile": "p90", "batch_sizes": [1]}, "thresholds": {"int8": {"min_speedup": 1.0}}},
              _strip(synthetic_table(), "int8", "b1_p90_ms"))
    assert msg == ("c.json: variant 'int8' has no metric 'b1_p90_ms', which gate.thresholds.int8.min_speedup names; it has: "
                   "b1_p50_ms, b1_p99_ms, b1_mean_ms, b1_throughput, b1_e2e_p50_ms, b1_speedup")


def _strip(table: dict[str, Any], variant: str, *keys: str) -> dict[str, Any]:
    for k in keys:
        del table["variants"][variant][k]
    return table


def test_latency_regression_fields() -> None:
    base = synthetic_table()
    cur = copy.deepcopy(base)
    cur["variants"]["int8"]["b32_p50_ms"] = 0.625  # +25% on 0.5 ms
    r = judge({"thresholds": {"int8": {"max_latency_regression": 0.2}}}, cur, base)
    assert checks(r) == [
        {"variant": "int8", "name": "b1 p50 latency vs baseline", "setting": "gate.thresholds.int8.max_latency_regression",
         "threshold": 0.2, "op": "<=", "value": 0.0, "status": "pass", "message": "", "detail": "0.05 ms -> 0.05 ms"},
        {"variant": "int8", "name": "b32 p50 latency vs baseline", "setting": "gate.thresholds.int8.max_latency_regression",
         "threshold": 0.2, "op": "<=", "value": 0.25, "status": "fail", "detail": "0.5 ms -> 0.625 ms",
         "message": "int8: b32 p50 latency 0.625 ms is 25.0% slower than the baseline's 0.5 ms; "
                    "gate.thresholds.int8.max_latency_regression allows 0.2 (20%)"}]
    # a speed-up is a negative regression
    assert checks(judge({"thresholds": {"int8": {"max_latency_regression": 0.0}}}, base, cur))[1]["value"] == pytest.approx(-0.2)


def test_gate_threshold_boundary_latency_regression_and_slack() -> None:
    base = synthetic_table()
    cur = copy.deepcopy(base)
    base["variants"]["int8"]["b32_p50_ms"] = 0.3
    cur["variants"]["int8"]["b32_p50_ms"] = 0.33  # +10%: 0.33 / 0.3 - 1 is 0.10000000000000009
    assert 0.33 / 0.3 - 1 > 0.1
    section = {"latency": {"batch_sizes": [32]}, "thresholds": {"int8": {"max_latency_regression": 0.1}}}
    assert one(judge(section, cur, base))["status"] == "pass"
    assert one(judge({**section, "thresholds": {"int8": {"max_latency_regression": 0.09999}}}, cur, base))["status"] == "fail"
    # slack: a slowdown of exactly slack_ms is ignored, more is not
    base["variants"]["int8"]["b32_p50_ms"], cur["variants"]["int8"]["b32_p50_ms"] = 0.5, 0.75  # +50%, +0.25 ms
    strict = {"batch_sizes": [32], "slack_ms": 0.25}
    assert one(judge({"latency": strict, "thresholds": {"int8": {"max_latency_regression": 0.1}}}, cur, base))["status"] == "pass"
    strict["slack_ms"] = 0.2499
    assert one(judge({"latency": strict, "thresholds": {"int8": {"max_latency_regression": 0.1}}}, cur, base))["status"] == "fail"


def test_gate_nan_or_zero_baseline_latency() -> None:
    base = synthetic_table()
    cur = copy.deepcopy(base)
    section = {"latency": {"batch_sizes": [32]}, "thresholds": {"int8": {"max_latency_regression": 0.5}}}
    base["variants"]["int8"]["b32_p50_ms"] = 0.0  # under the timer's resolution: nothing to regress from
    c = one(judge(section, cur, base))
    assert (c["status"], c["value"]) == ("pass", 0.0)
    base["variants"]["int8"]["b32_p50_ms"] = -1.0
    c = one(judge(section, cur, base))
    assert c["status"] == "fail" and math.isnan(c["value"])
    base["variants"]["int8"]["b32_p50_ms"] = 0.5
    cur["variants"]["int8"]["b32_p50_ms"] = "NaN"
    c = one(judge(section, cur, base))
    assert c["status"] == "fail" and c["message"] == (
        "int8: b32 p50 latency nan ms is nan% slower than the baseline's 0.5 ms; "
        "gate.thresholds.int8.max_latency_regression allows 0.5 (50%)")


def test_latency_regression_skips_say_why() -> None:
    base = synthetic_table()
    section = {"latency": {"batch_sizes": [32]}, "thresholds": {"int8": {"max_latency_regression": 0.5}}}

    def skipped(baseline: Optional[dict[str, Any]]) -> str:
        c = one(judge(section, synthetic_table(), baseline))
        assert c["status"] == "skip" and c["value"] is None
        return c["message"]

    assert skipped(None) == "int8: b32 p50 latency vs baseline not checked: no --baseline given"
    b = copy.deepcopy(base)
    del b["variants"]["int8"]
    assert skipped(b) == "int8: b32 p50 latency vs baseline not checked: the baseline has no variant int8"
    assert skipped(_strip(copy.deepcopy(base), "int8", "b32_p50_ms")) == (
        "int8: b32 p50 latency vs baseline not checked: the baseline has no b32_p50_ms")
    for key, value in (("backend", "tensorrt"), ("device", "NVIDIA A100 (sm 8.0)"), ("timing", "gpu")):
        b = copy.deepcopy(base)
        b["variants"]["int8"][key] = value
        there = {"backend": "onnxruntime", "device": "cpu x86_64, 4 cores", "timing": "host", key: value}
        assert skipped(b) == ("int8: b32 p50 latency vs baseline not checked: measured on "
                              f"{there['backend']} / {there['device']} / {there['timing']} there, "
                              "onnxruntime / cpu x86_64, 4 cores / host here")


# ----------------------------------------------------------------------------- the whole verdict


def test_checks_come_in_precision_then_kind_order() -> None:
    base = synthetic_table()
    r = judge({"latency": {"batch_sizes": [32]}, "thresholds": {
        "int8": {"max_latency_regression": 0.5, "max_drop_vs_baseline": {"top1": 1}, "min_speedup": 1.0,
                 "max_divergence": {"rel_l2": 1}, "min_agreement": {"cosine": 0.1}, "max_drop_vs_pytorch": {"top1": 20},
                 "max_drop": {"top1": 20}},
        "fp16": {"max_drop": {"top1": 1}},
        "fp32": {"max_drop_vs_pytorch": {"top1": 1}}}}, base, base)
    assert [(c.variant, c.name) for c in r.checks] == [
        ("fp32", "top1 drop vs PyTorch"), ("fp32", FLAG_CHECK),
        ("fp16", "top1 drop vs fp32"), ("fp16", FLAG_CHECK),
        ("int8", "top1 drop vs fp32"), ("int8", "top1 drop vs PyTorch"), ("int8", "cosine vs fp32 (logits)"),
        ("int8", "rel_l2 vs fp32 (logits)"), ("int8", "b32 p50 speedup vs fp32"), ("int8", "top1 drop vs baseline"),
        ("int8", "b32 p50 latency vs baseline"), ("int8", FLAG_CHECK)]
    assert r.passed and r.counts() == {"pass": 12, "fail": 0, "skip": 0}
    assert (r.report, r.model, r.backends, r.baseline) == ("c.json", "digits-cnn", ["onnxruntime"], "base.json")


def test_result_counts_and_passed() -> None:
    r = GateResult("r.json", "m", ["tensorrt"], checks=[
        Check("int8", "a", "s", 1.0, "<=", status="pass"), Check("int8", "b", "s", 1.0, "<=", status="fail", message="x"),
        Check("int8", "c", "s", 1.0, "<=", status="skip", message="y"), Check("fp16", "d", "s", 1.0, "<=", status="fail")])
    assert r.counts() == {"pass": 1, "fail": 2, "skip": 1}
    assert [c.name for c in r.failures] == ["b", "d"] and not r.passed
    assert GateResult("r.json", "m", []).passed and GateResult("r.json", "m", []).counts() == {"pass": 0, "fail": 0, "skip": 0}


def test_to_dict_is_strict_json() -> None:
    evals = {"fp32": eval_report("fp32", 90.0, 1.0), "int8": eval_report("int8", float("nan"), 1.0)}
    table = _table_of(evals)
    table["variants"]["int8"]["b1_p50_ms"] = 0.0
    r = judge({"latency": {"batch_sizes": [1]}, "thresholds": {"int8": {"max_drop": {"top1": 1.0}, "min_speedup": 2.0}}}, table)
    d = r.to_dict()
    text = json.dumps(d, allow_nan=False)  # no NaN / Infinity constants for CI's JSON readers
    assert json.loads(text) == {
        "passed": False, "report": "c.json", "model": "digits-cnn", "backends": ["onnxruntime"], "baseline": "base.json",
        "counts": {"pass": 2, "fail": 1, "skip": 0},
        "checks": [
            {"variant": "int8", "name": "top1 drop vs fp32", "setting": "gate.thresholds.int8.max_drop.top1", "threshold": 1.0,
             "op": "<=", "value": "nan", "status": "fail", "detail": "90 -> nan",
             "message": "int8: top1 vs fp32 is NaN (90 -> nan); gate.thresholds.int8.max_drop.top1 = 1 cannot be met by a NaN"},
            {"variant": "int8", "name": "b1 p50 speedup vs fp32", "setting": "gate.thresholds.int8.min_speedup", "threshold": 2.0,
             "op": ">=", "value": "inf", "status": "pass", "message": "", "detail": "0.1 ms -> 0 ms"},
            {"variant": "int8", "name": FLAG_CHECK, "setting": "evaluate.agreement_floor / NaN outputs", "threshold": 0,
             "op": "<=", "value": 0.0, "status": "pass", "message": "", "detail": ""}]}


# --------------------------------------------------------------------------------- bad input


def test_bad_compare_reports() -> None:
    def msg(data: Any) -> str:
        with pytest.raises(GateInputError) as e:
            gate.validate_report(data, "x.json")
        return str(e.value)

    assert msg([1, 2]) == "x.json: not a compare report (expected a JSON object)"
    assert msg({**synthetic_table(), "schema_version": "2"}) == (
        "x.json: compare.json schema_version '2', but this trtpipe reads schema_version 2; re-run compare (dvc repro) with this version")
    assert msg({k: v for k, v in synthetic_table().items() if k != "schema_version"}).startswith(
        "x.json: compare.json schema_version None, but")
    assert msg({**synthetic_table(), "variants": {}}) == "x.json: no 'variants' in the compare report; re-run compare"
    assert msg({**synthetic_table(), "variants": None}) == "x.json: no 'variants' in the compare report; re-run compare"
    assert msg({k: v for k, v in synthetic_table().items() if k != "variants"}) == "x.json: no 'variants' in the compare report; re-run compare"
    assert msg({**synthetic_table(), "model": 5}) == "x.json: not a compare report of this trtpipe (model: Input should be a valid string); re-run compare"
    assert msg({**synthetic_table(), "flags": {"int8": "x"}}) == (
        "x.json: not a compare report of this trtpipe (flags.int8: Input should be a valid list); re-run compare")
    good = synthetic_table()
    assert gate.validate_report(good, "x.json") is good


def test_load_report_and_its_errors(tmp_path: Path) -> None:
    p = tmp_path / "compare.json"
    p.write_text(json.dumps(synthetic_table()))
    assert gate.load_report(p) == synthetic_table() == gate.load_report(str(p))
    with pytest.raises(GateInputError) as e:
        gate.load_report(tmp_path / "missing.json")
    assert str(e.value) == (f"{tmp_path / 'missing.json'}: compare report not found; run `dvc repro` (or `trtpipe compare`) first, "
                            "or pass --report")
    with pytest.raises(GateInputError, match=r"^.*: is a folder, but baseline report is a file;"):
        gate.load_report(tmp_path, "baseline report")  # a folder is not a report
    p.write_text('{"schema_version": 2,\n "variants": oops}')
    with pytest.raises(ReportErrorType) as e:
        gate.load_report(p)
    assert str(e.value) == f"{p}: compare report is not valid JSON (Expecting value at line 2)"


from pipeline.errors import ReportError as ReportErrorType  # noqa: E402


def test_gate_input_errors_of_the_verdict() -> None:
    assert bad({"thresholds": {}}) == ("c.json: the config's gate.thresholds is empty, so there is nothing to check; "
                                       "add thresholds per precision")
    other = {**synthetic_table(), "model": "resnet18"}
    with pytest.raises(GateInputError) as e:
        judge({"thresholds": {"int8": {"max_latency_regression": 0.1}}}, baseline=other, label="HEAD~1 (x via DVC)")
    assert str(e.value) == ("baseline HEAD~1 (x via DVC): compares model 'resnet18', this report 'digits-cnn'; "
                            "pick a baseline of the same model")
    table = synthetic_table()
    del table["variants"]["fp32"]
    assert bad({"thresholds": {"int8": {"max_drop": {"top1": 1}}}}, table) == (
        "c.json: no 'fp32' variant, the reference every drop is measured against; re-run compare")
    table = synthetic_table()
    del table["variants"]["fp16"]
    assert bad({"thresholds": {"fp16": {"max_drop": {"top1": 1}}}}, table) == (
        "c.json: no variant 'fp16', but gate.thresholds.fp16 sets thresholds for it; run evaluate@fp16 and compare, "
        "or remove gate.thresholds.fp16")


def test_missing_metric_messages_list_what_there_is() -> None:
    evals = {p: eval_report(p, 90.0, 1.0, extra={"map50": 40.0, "recall": 0.5}) for p in ("fp32", "int8")}
    table = _table_of(evals)
    assert bad({"thresholds": {"int8": {"max_drop": {"map": 1}}}}, table) == (
        "c.json: variant 'int8' has no metric 'map', which gate.thresholds.int8.max_drop.map names; it has: top1, map50, recall")
    table["pytorch"] = {"top1": 90.5}
    assert bad({"thresholds": {"int8": {"max_drop_vs_pytorch": {"map50": 1}}}}, table) == (
        "c.json: the PyTorch reference ('pytorch') has no metric 'map50', which gate.thresholds.int8.max_drop_vs_pytorch.map50 "
        "names; it has: top1")
    table["pytorch"] = {}
    assert bad({"thresholds": {"int8": {"max_drop_vs_pytorch": {"top1": 1}}}}, table).endswith("; it has: none")
    del table["variants"]["fp32"]["map50"]
    assert bad({"thresholds": {"int8": {"max_drop": {"map50": 1}}}}, table) == (
        "c.json: variant 'fp32' has no metric 'map50', which gate.thresholds.int8.max_drop.map50 names; it has: top1, recall")


# ------------------------------------------------------------------------------------- outputs


def _small_result() -> GateResult:
    base = synthetic_table()
    cur = copy.deepcopy(base)
    cur["variants"]["int8"]["b32_p50_ms"] = 0.625
    return judge({"latency": {"batch_sizes": [32]}, "thresholds": {
        "fp16": {"max_drop": {"top1": 0.5}, "min_agreement": {"cosine": 0.99}, "max_divergence": {"rel_l2": 0.05}},
        "int8": {"max_drop": {"top1": 1.0}, "min_speedup": 3.0, "max_latency_regression": 0.2,
                 "max_drop_vs_baseline": {"top1": 1.0}}}}, cur, None)


def test_markdown_summary() -> None:
    md = gate.to_markdown(_small_result())
    assert md == (
        "## ❌ trtpipe gate failed: 1 of 9 checks, digits-cnn\n"
        "\n"
        "Report `c.json` (backends: onnxruntime; onnxruntime numbers are a CPU simulation, not a TensorRT engine)  \n"
        "Baseline: `base.json`  \n"
        "9 checks: 6 passed, 1 failed, 2 skipped\n"
        "\n"
        "**Failures**\n"
        "\n"
        "- int8: top1 dropped by 10 vs fp32 (90 -> 80), more than gate.thresholds.int8.max_drop.top1 = 1\n"
        "\n"
        "| | variant | check | value | threshold | detail | setting |\n"
        "|---|---|---|---|---|---|---|\n"
        "| ✅ | fp16 | top1 drop vs fp32 | 0.1 | ≤ 0.5 | 90 -> 89.9 | `gate.thresholds.fp16.max_drop.top1` |\n"
        "| ✅ | fp16 | cosine vs fp32 (logits) | 0.9999 | ≥ 0.99 |  | `gate.thresholds.fp16.min_agreement.cosine` |\n"
        "| ✅ | fp16 | rel_l2 vs fp32 (logits) | 0.01 | ≤ 0.05 |  | `gate.thresholds.fp16.max_divergence.rel_l2` |\n"
        f"| ✅ | fp16 | {FLAG_CHECK} | 0 | ≤ 0 |  | `evaluate.agreement_floor / NaN outputs` |\n"
        "| ❌ | int8 | top1 drop vs fp32 | 10 | ≤ 1 | 90 -> 80 | `gate.thresholds.int8.max_drop.top1` |\n"
        "| ✅ | int8 | b32 p50 speedup vs fp32 | 3.200x | ≥ 3x | 2 ms -> 0.625 ms | `gate.thresholds.int8.min_speedup` |\n"
        "| ⏭️ | int8 | top1 drop vs baseline | – | ≤ 1 | no --baseline given | `gate.thresholds.int8.max_drop_vs_baseline.top1` |\n"
        "| ⏭️ | int8 | b32 p50 latency vs baseline | – | ≤ 20% | no --baseline given | "
        "`gate.thresholds.int8.max_latency_regression` |\n"
        f"| ✅ | int8 | {FLAG_CHECK} | 0 | ≤ 0 |  | `evaluate.agreement_floor / NaN outputs` |\n")


def test_markdown_summary_of_a_pass_on_tensorrt_with_a_baseline() -> None:
    base = synthetic_table()
    base["backends"] = ["tensorrt"]
    cur = copy.deepcopy(base)
    cur["variants"]["int8"]["b32_p50_ms"] = 0.55
    r = judge({"latency": {"batch_sizes": [32]}, "thresholds": {"int8": {"max_latency_regression": 0.2}}}, cur, base,
              label="HEAD~1 (artifacts/compare/compare.json via DVC)")
    md = gate.to_markdown(r)
    assert md.startswith("## ✅ trtpipe gate passed: digits-cnn\n\nReport `c.json` (backends: tensorrt)  \n"
                         "Baseline: `HEAD~1 (artifacts/compare/compare.json via DVC)`  \n2 checks: 2 passed, 0 failed, 0 skipped\n\n"
                         "| | variant |")
    assert "**Failures**" not in md
    assert "| ✅ | int8 | b32 p50 latency vs baseline | +10.0% | ≤ 20% | 0.5 ms -> 0.55 ms |" in md
    no_base = gate.to_markdown(GateResult("c.json", "m", [], None, []))
    assert "Report `c.json` (backends: ?)  \nBaseline: none (latency and baseline checks skipped)  \n0 checks:" in no_base
    assert gate.bad_input_markdown("c.json: no 'variants'") == "## ⚠️ trtpipe gate could not run (bad input)\n\nc.json: no 'variants'\n"


@pytest.mark.parametrize("setting, threshold, value, shown_threshold, shown_value", [
    ("gate.thresholds.int8.max_latency_regression", 0.25, 0.123, "≤ 25%", "+12.3%"),
    ("gate.thresholds.int8.max_latency_regression", 0.25, -0.05, "≤ 25%", "-5.0%"),
    ("gate.thresholds.int8.min_speedup", 1.5, 2.34567, "≥ 1.5x", "2.346x"),
    ("gate.thresholds.int8.min_agreement.cosine", 0.999, 0.99912345678, "≥ 0.999", "0.999123"),
    ("gate.thresholds.int8.max_divergence.rel_l2", 0.05, 0.0123456789, "≤ 0.05", "0.0123457"),
    ("gate.thresholds.int8.max_drop.top1", 1.0, 0.123456789, "≤ 1", "0.1235"),
    ("gate.thresholds.int8.max_drop.top1", 1.0, None, "≤ 1", "–"),
])
def test_markdown_value_and_threshold_cells(setting: str, threshold: float, value: Optional[float],
                                            shown_threshold: str, shown_value: str) -> None:
    op = ">=" if "min_" in setting else "<="
    c = Check("int8", "x", setting, threshold, op, value=value)
    row = gate.to_markdown(GateResult("c.json", "m", ["tensorrt"], None, [c])).splitlines()[-1]
    assert row == f"| ✅ | int8 | x | {shown_value} | {shown_threshold} |  | `{setting}` |"


def test_fmt() -> None:
    assert gate._fmt(None) == "–"
    assert (gate._fmt(math.nan), gate._fmt(math.inf), gate._fmt(-math.inf)) == ("nan", "inf", "-inf")
    assert gate._fmt(0.123456789) == "0.1235" and gate._fmt(0.123456789, 6) == "0.123457" and gate._fmt(12345.6) == "1.235e+04"


def test_junit_xml(tmp_path: Path) -> None:
    r = _small_result()
    text = gate.to_junit(r, seconds=1.23456)
    assert text.startswith('<?xml version="1.0" encoding="utf-8"?>\n<testsuites>\n  <testsuite ') and text.endswith("</testsuites>\n")
    suite = ET.fromstring(text.split("\n", 1)[1]).find("testsuite")
    assert {k: suite.get(k) for k in ("name", "time", "tests", "failures", "errors", "skipped")} == {
        "name": "trtpipe gate", "time": "1.235", "tests": "9", "failures": "1", "errors": "0", "skipped": "2"}
    stamp = dt.datetime.fromisoformat(suite.get("timestamp"))
    assert stamp.utcoffset() == dt.timedelta(0) and abs((dt.datetime.now(dt.timezone.utc) - stamp).total_seconds()) < 60
    assert stamp.microsecond == 0
    cases = suite.findall("testcase")
    assert [(c.get("classname"), c.get("name"), c.get("time")) for c in cases][:2] == [
        ("trtpipe.gate.fp16", "top1 drop vs fp32", "0"), ("trtpipe.gate.fp16", "cosine vs fp32 (logits)", "0")]
    props = {p.get("name"): p.get("value") for p in cases[0].find("properties")}
    assert props == {"setting": "gate.thresholds.fp16.max_drop.top1", "threshold": "<= 0.5", "value": "0.1"}
    fail = cases[4]
    assert fail.find("skipped") is None and fail.find("error") is None
    f = fail.find("failure")
    assert f.get("type") == "GateFailure" and f.get("message") == f.text == (
        "int8: top1 dropped by 10 vs fp32 (90 -> 80), more than gate.thresholds.int8.max_drop.top1 = 1")
    assert {p.get("name"): p.get("value") for p in fail.find("properties")}["value"] == "10"
    skip = cases[6]
    assert skip.find("failure") is None and skip.find("skipped").get("message") == (
        "int8: top1 vs baseline not checked: no --baseline given")
    assert {p.get("name"): p.get("value") for p in skip.find("properties")} == {
        "setting": "gate.thresholds.int8.max_drop_vs_baseline.top1", "threshold": "<= 1", "value": "–"}
    speed = {p.get("name"): p.get("value") for p in cases[5].find("properties")}
    assert speed == {"setting": "gate.thresholds.int8.min_speedup", "threshold": ">= 3", "value": "3.2"}
    assert cases[0].find("failure") is None and cases[0].find("skipped") is None


def test_junit_xml_of_bad_input() -> None:
    text = gate.to_junit(None, error="c.json: compare report not found", seconds=0.5)
    suite = ET.fromstring(text.split("\n", 1)[1]).find("testsuite")
    assert {k: suite.get(k) for k in ("tests", "failures", "errors", "skipped", "time")} == {
        "tests": "1", "failures": "0", "errors": "1", "skipped": "0", "time": "0.500"}
    (case,) = suite.findall("testcase")
    assert (case.get("classname"), case.get("name"), case.get("time")) == ("trtpipe.gate", "read inputs", "0")
    err = case.find("error")
    assert err.get("type") == "GateInputError" and err.get("message") == err.text == "c.json: compare report not found"
    empty = ET.fromstring(gate.to_junit(None).split("\n", 1)[1]).find("testsuite")
    assert {k: empty.get(k) for k in ("tests", "failures", "errors", "skipped", "time")} == {
        "tests": "0", "failures": "0", "errors": "0", "skipped": "0", "time": "0.000"}


# ---------------------------------------------------------------------------------- baselines


def _git(cwd: Path, *args: str) -> str:
    env = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t",
           "PATH": "/usr/bin:/bin:/usr/local/bin", "HOME": str(cwd)}
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True, env=env).stdout


@pytest.fixture
def repo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A git repository whose first commit tracks artifacts/compare/compare.json; the working
    copy of it is then made worse (int8 top1 70)."""
    import shutil

    if shutil.which("git") is None:
        pytest.skip("needs git")
    r = tmp_path / "repo"
    (r / "artifacts" / "compare").mkdir(parents=True)
    _git(r, "init", "-q")
    (r / "artifacts" / "compare" / "compare.json").write_text(json.dumps(synthetic_table()))
    _git(r, "add", "-A")
    _git(r, "commit", "-qm", "baseline")
    worse = synthetic_table()
    worse["variants"]["int8"]["top1"] = 70.0
    (r / "artifacts" / "compare" / "compare.json").write_text(json.dumps(worse))
    monkeypatch.chdir(r)
    return r


class FakeDvcApi(types.ModuleType):
    """dvc.api.read(path, repo=, rev=): the text of `path` at `rev`, or an error as DVC raises them."""

    def __init__(self, files: dict[tuple[str, str], str], error: Optional[Exception] = None) -> None:
        super().__init__("dvc.api")
        self.files, self.error, self.calls = files, error, []

    def read(self, path: str, repo: Optional[str] = None, rev: Optional[str] = None) -> str:
        self.calls.append((path, repo, rev))
        if self.error is not None:
            raise self.error
        return self.files[(path, rev)]


def _install_dvc(monkeypatch: pytest.MonkeyPatch, api: Optional[types.ModuleType]) -> None:
    dvc = types.ModuleType("dvc")
    if api is None:
        monkeypatch.setitem(sys.modules, "dvc", None)  # not installed
    else:
        dvc.api = api
        monkeypatch.setitem(sys.modules, "dvc", dvc)
    monkeypatch.setitem(sys.modules, "dvc.api", api)


REL = "artifacts/compare/compare.json"


def test_baseline_from_a_file(tmp_path: Path) -> None:
    p = tmp_path / "base.json"
    p.write_text(json.dumps(synthetic_table()))
    data, label = gate.load_baseline(str(p), "artifacts/compare/compare.json")
    assert data == synthetic_table() and label == str(p)
    p.write_text(json.dumps({**synthetic_table(), "schema_version": 1}))
    with pytest.raises(GateInputError, match=rf"^baseline {p}: compare.json schema_version 1, but this trtpipe reads"):
        gate.load_baseline(str(p), "x.json")


def test_baseline_from_git_when_dvc_is_missing(repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _install_dvc(monkeypatch, None)
    data, label = gate.load_baseline("HEAD", repo / REL)
    assert label == f"HEAD ({REL} from git)" and data["variants"]["int8"]["top1"] == 80.0
    (repo / "sub").mkdir()
    monkeypatch.chdir(repo / "sub")  # from a sub-folder, with a path relative to it
    assert gate.load_baseline("HEAD", Path("..") / REL)[1] == f"HEAD ({REL} from git)"
    monkeypatch.chdir(repo)
    with pytest.raises(GateInputError) as e:
        gate.load_baseline("HEAD", repo / "artifacts" / "other.json")
    assert str(e.value) == ("--baseline HEAD: cannot read artifacts/other.json at that revision (dvc is not installed; "
                            "git: artifacts/other.json is not tracked by git at HEAD); DVC reads it from the local cache or the "
                            "default remote, so `dvc push` the baseline's run; or pass a compare.json path")


def test_baseline_through_dvc(repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    older = synthetic_table()
    older["variants"]["int8"]["top1"] = 85.0
    api = FakeDvcApi({(REL, "HEAD"): json.dumps(older)})
    _install_dvc(monkeypatch, api)
    data, label = gate.load_baseline("HEAD", REL)
    assert label == f"HEAD ({REL} via DVC)" and data["variants"]["int8"]["top1"] == 85.0
    assert api.calls == [(REL, str(repo), "HEAD")]
    # what DVC returns is checked like any report, and its error is not hidden behind git's copy
    api.files[(REL, "HEAD")] = "{\n  oops"
    with pytest.raises(GateInputError) as e:
        gate.load_baseline("HEAD", REL)
    assert str(e.value) == f"baseline {REL} at HEAD: not valid JSON (Expecting property name enclosed in double quotes at line 2)"
    api.files[(REL, "HEAD")] = json.dumps({**older, "variants": {}})
    with pytest.raises(GateInputError, match=rf"^baseline {REL} at HEAD: no 'variants' in the compare report"):
        gate.load_baseline("HEAD", REL)


def test_baseline_when_dvc_fails_falls_back_to_git(repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _install_dvc(monkeypatch, FakeDvcApi({}, error=FileNotFoundError(f"'{REL}' does not exist\n  in the cache")))
    assert gate.load_baseline("HEAD", REL)[1] == f"HEAD ({REL} from git)"
    (repo / "untracked.json").write_text("{}")
    with pytest.raises(GateInputError) as e:
        gate.load_baseline("HEAD", repo / "untracked.json")
    assert (f"cannot read untracked.json at that revision (dvc: '{REL}' does not exist in the cache; "
            "git: untracked.json is not tracked by git at HEAD)") in str(e.value)

    class PathMissingError(Exception):
        pass

    _install_dvc(monkeypatch, FakeDvcApi({}, error=PathMissingError()))
    with pytest.raises(GateInputError, match=r"\(dvc: PathMissingError; git: untracked.json is not tracked"):
        gate.load_baseline("HEAD", repo / "untracked.json")
    # git's copy is read as a report too
    _install_dvc(monkeypatch, None)
    (repo / "bad.json").write_text("[1]")
    _git(repo, "add", "bad.json")
    _git(repo, "commit", "-qm", "bad")
    with pytest.raises(GateInputError, match=r"^baseline bad.json at HEAD: not a compare report \(expected a JSON object\)$"):
        gate.load_baseline("HEAD", "bad.json")
    (repo / "bad.json").write_text("{")
    _git(repo, "commit", "-qam", "worse")
    with pytest.raises(GateInputError, match=r"^baseline bad.json at HEAD: not valid JSON \(Expecting property name"):
        gate.load_baseline("HEAD", "bad.json")


def test_baseline_revision_errors(repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(GateInputError) as e:
        gate.load_baseline("v9.9", REL)
    assert str(e.value) == f"--baseline v9.9: neither a compare.json file nor a git revision of {repo}"
    with pytest.raises(GateInputError) as e:
        gate.load_baseline("HEAD", tmp_path / "elsewhere" / "compare.json")
    assert str(e.value) == (f"--baseline HEAD: the report {tmp_path / 'elsewhere' / 'compare.json'} is outside the git "
                            f"repository {repo}")
    outside = tmp_path / "plain"
    outside.mkdir()
    monkeypatch.chdir(outside)
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))
    with pytest.raises(GateInputError) as e:
        gate.load_baseline("HEAD", REL)
    assert str(e.value) == f"--baseline HEAD: no such file, and {outside} is not inside a git repository to read a revision from"
    monkeypatch.setenv("PATH", str(tmp_path / "no-tools"))
    with pytest.raises(GateInputError) as e:
        gate.load_baseline("HEAD", REL)
    assert str(e.value) == "--baseline HEAD: no such file, and git is not installed to read a revision"


def test_markdown_detail_of_a_skip_keeps_the_whole_reason() -> None:
    base = synthetic_table()
    base["variants"]["int8"]["device"] = "gpu: NVIDIA A100 (sm 8.0)"  # a reason with ': ' in it
    r = judge({"latency": {"batch_sizes": [1]}, "thresholds": {"int8": {"max_latency_regression": 0.5}}}, synthetic_table(), base)
    row = gate.to_markdown(r).splitlines()[-2]
    assert row == ("| ⏭️ | int8 | b1 p50 latency vs baseline | – | ≤ 50% | measured on onnxruntime / gpu: NVIDIA A100 (sm 8.0) / host "
                   "there, onnxruntime / cpu x86_64, 4 cores / host here | `gate.thresholds.int8.max_latency_regression` |")


def test_junit_values_keep_eight_significant_digits() -> None:
    r = GateResult("c.json", "m", ["tensorrt"], None, [
        Check("int8", "top1 drop vs fp32", "gate.thresholds.int8.max_drop.top1", 0.5, "<=", value=1 / 3),
        Check("int8", "cosine vs fp32 (logits)", "gate.thresholds.int8.min_agreement.cosine", 0.999, ">=", value=math.nan,
              status="fail", message="int8: cosine is nan")])
    suite = ET.fromstring(gate.to_junit(r).split("\n", 1)[1]).find("testsuite")
    values = [{p.get("name"): p.get("value") for p in c.find("properties")} for c in suite.findall("testcase")]
    assert values == [{"setting": "gate.thresholds.int8.max_drop.top1", "threshold": "<= 0.5", "value": "0.33333333"},
                      {"setting": "gate.thresholds.int8.min_agreement.cosine", "threshold": ">= 0.999", "value": "nan"}]


def test_messages_name_the_default_report_when_no_source_is_given() -> None:
    with pytest.raises(GateInputError) as e:
        evaluate_gate(synthetic_table(), GateConfig.model_validate({"thresholds": {}}))
    assert str(e.value).startswith("artifacts/compare/compare.json: the config's gate.thresholds is empty")
    r = evaluate_gate(synthetic_table(), GateConfig.model_validate({"thresholds": {"int8": {"max_drop": {"top1": 20}}}}))
    assert (r.report, r.baseline, r.passed) == ("artifacts/compare/compare.json", None, True)


def test_gate_threshold_boundary_float_tolerance_is_one_nano() -> None:
    """Float noise up to 1e-9 above a threshold passes (inclusive); more does not."""
    table = synthetic_table()
    table["variants"]["fp32"]["top1"] = 0.5 + 1e-9
    table["variants"]["int8"]["top1"] = 0.0
    assert one(judge({"thresholds": {"int8": {"max_drop": {"top1": 0.5}}}}, table))["status"] == "pass"
    table["variants"]["fp32"]["top1"] = 0.5 + 3e-9
    assert one(judge({"thresholds": {"int8": {"max_drop": {"top1": 0.5}}}}, table))["status"] == "fail"
    base, cur = synthetic_table(), synthetic_table()
    base["variants"]["int8"]["b32_p50_ms"] = 0.5
    cur["variants"]["int8"]["b32_p50_ms"] = 1.0000000005  # 1.0 + 1e-9 slower, exactly
    section = {"latency": {"batch_sizes": [32]}, "thresholds": {"int8": {"max_latency_regression": 1.0}}}
    c = one(judge(section, cur, base))
    assert c["value"] == 1.0 + 1e-9 and c["status"] == "pass"
    cur["variants"]["int8"]["b32_p50_ms"] = 1.000000002
    assert one(judge(section, cur, base))["status"] == "fail"


def test_the_reference_is_the_report_s_own() -> None:
    """Drops and speedups are measured against the variant the report names as its reference."""
    table = synthetic_table()
    table["reference"] = "fp16"
    r = judge({"thresholds": {"int8": {"max_drop": {"top1": 20}, "min_speedup": 1.0}}}, table)
    assert [(c["name"], c["detail"]) for c in checks(r)] == [
        ("top1 drop vs fp16", "89.9 -> 80"), ("b1 p50 speedup vs fp16", "0.1 ms -> 0.05 ms"), ("b32 p50 speedup vs fp16", "1 ms -> 0.5 ms")]
    del table["variants"]["fp16"]
    assert bad({"thresholds": {"int8": {"max_drop": {"top1": 1}}}}, table) == (
        "c.json: no 'fp16' variant, the reference every drop is measured against; re-run compare")


def test_agreement_messages_show_six_significant_digits() -> None:
    table = synthetic_table()
    table["agreement"]["int8"]["fp32"]["logits"]["cosine"] = 0.99912345678
    c = one(judge({"thresholds": {"int8": {"min_agreement": {"cosine": 0.9995}}}}, table))
    assert c["message"] == "int8: cosine vs fp32 on output 'logits' is 0.999123, below gate.thresholds.int8.min_agreement.cosine = 0.9995"


def test_a_skipped_batch_size_does_not_stop_the_others() -> None:
    base = _strip(synthetic_table(), "int8", "b1_p50_ms")
    cur = synthetic_table()
    cur["variants"]["int8"]["b32_p50_ms"] = 1.0
    r = judge({"thresholds": {"int8": {"max_latency_regression": 0.5}}}, cur, base)
    assert [(c["name"], c["status"]) for c in checks(r)] == [("b1 p50 latency vs baseline", "skip"),
                                                              ("b32 p50 latency vs baseline", "fail")]


def test_unusable_reports_are_named_by_their_source(tmp_path: Path) -> None:
    with pytest.raises(GateInputError, match=r"^c\.json: compare\.json schema_version 1, but this trtpipe reads"):
        judge({"thresholds": {"int8": {"max_drop": {"top1": 1}}}}, {**synthetic_table(), "schema_version": 1})
    p = tmp_path / "compare.json"
    p.write_text(json.dumps({**synthetic_table(), "variants": {}}))
    with pytest.raises(GateInputError) as e:
        gate.load_report(p)
    assert str(e.value) == f"{p}: no 'variants' in the compare report; re-run compare"
    p.write_text("{oops")
    with pytest.raises(ReportErrorType) as e2:
        gate.load_baseline(str(p), "x.json")
    assert str(e2.value).startswith(f"{p}: baseline compare report is not valid JSON")
