"""`trtpipe gate`: real digits runs (a clean one passes; an INT8 variant calibrated at the 1st
percentile fails), every kind of check on compare reports built from EvalReports, NaN never
passing, bad input (exit 2), the markdown / $GITHUB_STEP_SUMMARY / JUnit outputs, and
baselines from a file or a git revision."""

from __future__ import annotations

import copy
import json
import shutil
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, Optional

import pytest
import yaml

from pipeline import cli
from pipeline.config import GateConfig
from pipeline.gate import evaluate_gate
from pipeline.stages import compare
from tests._project import run_tool
from tests.stages.test_compare import report as eval_report
from tests.stages.test_compare import reports as synthetic_evals

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "configs" / "digits.yaml"


def gate(*args: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    cli._extra_commands.clear()  # main() appends the extra subcommands on every call
    rc = cli.main(["gate", "--params", "/nonexistent/params.yaml", *args])
    out, err = capsys.readouterr()
    return rc, out, err


def config_with(tmp: Path, gate_section: dict[str, Any]) -> Path:
    data = yaml.safe_load(DIGITS.read_text())
    data["gate"] = gate_section
    path = tmp / f"cfg-{len(list(tmp.glob('cfg-*')))}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def write_report(path: Path, table: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(table))
    return path


def synthetic_table(**kw: Any) -> dict[str, Any]:
    return json.loads(compare.build_table(synthetic_evals(**kw), "digits-cnn").model_dump_json())


# --- real runs ---------------------------------------------------------------------------


def test_clean_digits_run_passes(clean: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    report = clean / "compare" / "compare.json"
    rc, out, err = gate("--config", str(DIGITS), "--report", str(report), "--baseline", str(report),
                        "--junit", str(tmp_path / "j.xml"), capsys=capsys)
    assert rc == 0, out + err
    assert out.startswith("## ✅ trtpipe gate passed: digits-cnn") and err == ""
    assert "0 failed, 0 skipped" in out
    suite = ET.parse(tmp_path / "j.xml").getroot().find("testsuite")
    n = len(suite.findall("testcase"))
    # configs/digits.yaml: fp32 2 + 2 latency, fp16 2 + 2 latency, int8 3 + 2 latency (batch sizes 1, 32),
    # and one "not flagged by compare" check per variant
    assert n == 16 and suite.get("tests") == "16" and suite.get("failures") == "0"


def test_broken_int8_fails_naming_metric_threshold_and_value(broken: Path, capsys: pytest.CaptureFixture[str]) -> None:
    table = json.loads((broken / "compare" / "compare.json").read_text())
    int8_top1, fp32_top1 = table["variants"]["int8"]["top1"], table["variants"]["fp32"]["top1"]
    assert fp32_top1 - int8_top1 > 1.0  # the breakage is real (1st-percentile ranges clip nearly everything)
    rc, out, err = gate("--config", str(DIGITS), "--report", str(broken / "compare" / "compare.json"), capsys=capsys)
    assert rc == 1
    assert out.startswith("## ❌ trtpipe gate failed")
    drop = f"{fp32_top1 - int8_top1:.4g}"
    expected = (f"int8: top1 dropped by {drop} vs fp32 ({fp32_top1:.4g} -> {int8_top1:.4g}), "
                "more than gate.thresholds.int8.max_drop.top1 = 1")
    assert f"- {expected}" in out
    assert "int8: top1_agreement vs fp32 on output 'logits' is " in out
    assert "below gate.thresholds.int8.min_agreement.top1_agreement = 0.97" in out
    assert "int8: flagged by compare: cosine vs fp32 on output 'logits' is" in out
    # fp16 and fp32 still pass; latency checks are skipped without a baseline.
    assert "| ✅ | fp16 | top1 drop vs fp32 |" in out and "| ⏭️ | int8 | b32 p50 latency vs baseline |" in out
    # stderr: one line, naming the first failure.
    assert err.count("\n") == 1 and err.startswith("trtpipe gate: error: ") and expected in err


def test_broken_run_against_clean_baseline(clean: Path, broken: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    cfg = config_with(tmp_path, {"thresholds": {"int8": {"max_drop_vs_baseline": {"top1": 0.5}}}})
    rc, out, _ = gate("--config", str(cfg), "--report", str(broken / "compare" / "compare.json"),
                      "--baseline", str(clean / "compare" / "compare.json"), capsys=capsys)
    assert rc == 1 and "int8: top1 dropped by" in out and "vs the baseline" in out
    assert "gate.thresholds.int8.max_drop_vs_baseline.top1 = 0.5" in out


# --- each kind of check on synthetic reports --------------------------------------------------


def judge(gate_section: dict[str, Any], table: Optional[dict[str, Any]] = None, baseline: Optional[dict[str, Any]] = None) -> Any:
    return evaluate_gate(table or synthetic_table(), GateConfig.model_validate(gate_section), baseline, "c.json", "base.json")


FLAG_CHECK = "numbers trustworthy (compare flags)"


def statuses(r: Any) -> dict[str, str]:
    """The checks the thresholds asked for (the per-variant flag check aside)."""
    return {f"{c.variant} {c.name}": c.status for c in r.checks if c.name != FLAG_CHECK}


def test_drop_thresholds_and_boundaries() -> None:
    # synthetic: fp32 90.0, fp16 89.9, int8 80.0; PyTorch 90.5
    r = judge({"thresholds": {"fp16": {"max_drop": {"top1": 0.1}}, "int8": {"max_drop": {"top1": 9.99}}}})
    assert statuses(r) == {"fp16 top1 drop vs fp32": "pass", "int8 top1 drop vs fp32": "fail"}
    assert not r.passed and r.failures[0].value == pytest.approx(10.0)
    r = judge({"thresholds": {"int8": {"max_drop": {"top1": 10.0}}, "fp32": {"max_drop_vs_pytorch": {"top1": 0.4}}}})
    assert statuses(r) == {"fp32 top1 drop vs PyTorch": "fail", "int8 top1 drop vs fp32": "pass"}
    assert "fp32: top1 dropped by 0.5 vs PyTorch (90.5 -> 90)" in r.failures[0].message


def test_lower_is_better_metrics() -> None:
    evals = synthetic_evals(extra={"loss": 1.0})
    evals["int8"].metrics["loss"] = 1.3
    table = json.loads(compare.build_table(evals, "m").model_dump_json())
    up = judge({"lower_is_better": ["loss"], "thresholds": {"int8": {"max_drop": {"loss": 0.2}}}}, table)
    assert up.failures and "int8: loss rose by 0.3 vs fp32" in up.failures[0].message
    assert judge({"lower_is_better": ["loss"], "thresholds": {"int8": {"max_drop": {"loss": 0.5}}}}, table).passed
    # Read as higher-is-better, a rising loss is no drop at all.
    assert judge({"thresholds": {"int8": {"max_drop": {"loss": 0.2}}}}, table).passed


def test_agreement_and_divergence() -> None:
    r = judge({"thresholds": {"int8": {
        "min_agreement": {"top1_agreement": 0.9, "cosine": 0.9, "pytorch_snr_db": 30},
        "max_divergence": {"rel_l2": 0.001, "pytorch_max_abs_diff": 0.1},
    }}})
    assert statuses(r) == {
        "int8 top1_agreement vs fp32 (logits)": "fail", "int8 cosine vs fp32 (logits)": "pass",
        "int8 snr_db vs PyTorch (logits)": "pass", "int8 rel_l2 vs fp32 (logits)": "fail",
        "int8 max_abs_diff vs PyTorch (logits)": "pass",
    }
    msgs = [c.message for c in r.failures]
    assert ("int8: top1_agreement vs fp32 on output 'logits' is 0.85, below "
            "gate.thresholds.int8.min_agreement.top1_agreement = 0.9") in msgs
    assert "int8: rel_l2 vs fp32 on output 'logits' is 0.01, above gate.thresholds.int8.max_divergence.rel_l2 = 0.001" in msgs


def test_min_speedup() -> None:
    # synthetic p50 at b32: fp32 2.0, fp16 1.0, int8 0.5 ms
    r = judge({"thresholds": {"fp16": {"min_speedup": 2.5}, "int8": {"min_speedup": 3.0}}})
    assert statuses(r) == {"fp16 b1 p50 speedup vs fp32": "fail", "fp16 b32 p50 speedup vs fp32": "fail",
                           "int8 b1 p50 speedup vs fp32": "pass", "int8 b32 p50 speedup vs fp32": "pass"}
    assert "fp16: b32 p50 latency speedup vs fp32 is 2.000x (2 ms -> 1 ms); gate.thresholds.fp16.min_speedup = 2.5x" in [
        c.message for c in r.failures]


def test_latency_regression_against_a_baseline() -> None:
    base = synthetic_table()
    cur = copy.deepcopy(base)
    cur["variants"]["int8"]["b32_p50_ms"] = 0.65  # +30% on 0.5 ms
    cur["variants"]["int8"]["b32_p90_ms"] = 0.56  # +2% on 0.55 ms
    section = {"thresholds": {"int8": {"max_latency_regression": 0.2}}}
    r = judge(section, cur, base)
    assert statuses(r) == {"int8 b1 p50 latency vs baseline": "pass", "int8 b32 p50 latency vs baseline": "fail"}
    assert r.failures[0].message == ("int8: b32 p50 latency 0.65 ms is 30.0% slower than the baseline's 0.5 ms; "
                                     "gate.thresholds.int8.max_latency_regression allows 0.2 (20%)")
    # Other percentile, batch size filter, slack for timer noise.
    assert judge({**section, "latency": {"percentile": "p90"}}, cur, base).passed
    assert judge({**section, "latency": {"batch_sizes": [1]}}, cur, base).passed
    assert judge({**section, "latency": {"slack_ms": 0.2}}, cur, base).passed
    # Without a baseline the check is skipped (never silently passed); on another device too.
    assert set(statuses(judge(section, cur)).values()) == {"skip"}
    other = copy.deepcopy(base)
    other["variants"]["int8"]["device"] = "NVIDIA A100 (sm 8.0)"
    skipped = [c for c in judge(section, cur, other).checks if c.name != FLAG_CHECK]
    assert {c.status for c in skipped} == {"skip"} and "NVIDIA A100" in skipped[0].message


# --- outputs ---------------------------------------------------------------------------------


def test_summary_step_summary_junit_and_json(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    report = write_report(tmp_path / "compare.json", synthetic_table())
    cfg = config_with(tmp_path, {"thresholds": {"fp16": {"max_drop": {"top1": 0.2}}, "int8": {"max_drop": {"top1": 1.0}}}})
    step = tmp_path / "step_summary.md"
    step.write_text("earlier step\n")
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(step))
    rc, out, err = gate("--config", str(cfg), "--report", str(report), "--summary", str(tmp_path / "s.md"),
                        "--junit", str(tmp_path / "j.xml"), capsys=capsys)
    assert rc == 1
    assert (tmp_path / "s.md").read_text() == out
    assert step.read_text() == "earlier step\n" + out + "\n"  # appended, not replaced
    suite = ET.parse(tmp_path / "j.xml").getroot().find("testsuite")
    cases = suite.findall("testcase")
    assert [(c.get("classname"), c.get("name")) for c in cases] == [
        ("trtpipe.gate.fp16", "top1 drop vs fp32"), ("trtpipe.gate.fp16", FLAG_CHECK),
        ("trtpipe.gate.int8", "top1 drop vs fp32"), ("trtpipe.gate.int8", FLAG_CHECK)]
    assert cases[0].find("failure") is None
    fail = cases[2].find("failure")
    assert "int8: top1 dropped by 10 vs fp32 (90 -> 80), more than gate.thresholds.int8.max_drop.top1 = 1" == fail.get("message")
    assert suite.get("failures") == "1" and suite.get("errors") == "0"
    monkeypatch.delenv("GITHUB_STEP_SUMMARY")
    rc, out, _ = gate("--config", str(cfg), "--report", str(report), "--json", capsys=capsys)
    res = json.loads(out)
    assert rc == 1 and res["passed"] is False and res["counts"] == {"pass": 3, "fail": 1, "skip": 0}


# --- bad input: exit 2, one line naming the file or metric --------------------------------------


def _bad(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    rc, out, err = gate(*args, capsys=capsys)
    assert rc == 2, out + err
    assert out == "" and err.count("\n") == 1 and err.startswith("trtpipe gate: error: ")
    return err


def test_missing_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    err = _bad(capsys, "--config", str(DIGITS), "--report", str(tmp_path / "nope" / "compare.json"))
    assert f"{tmp_path}/nope/compare.json: compare report not found" in err


def test_other_schema_version(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    report = write_report(tmp_path / "compare.json", {**synthetic_table(), "schema_version": 1})
    err = _bad(capsys, "--config", str(DIGITS), "--report", str(report))
    assert f"{report}: compare.json schema_version 1, but this trtpipe reads schema_version 2" in err


def test_threshold_naming_a_metric_the_report_lacks(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    report = write_report(tmp_path / "compare.json", synthetic_table())
    cfg = config_with(tmp_path, {"thresholds": {"int8": {"max_drop": {"top1": 1.0, "map50": 2.0}}}})
    err = _bad(capsys, "--config", str(cfg), "--report", str(report), "--junit", str(tmp_path / "j.xml"))
    assert f"{report}: variant 'int8' has no metric 'map50', which gate.thresholds.int8.max_drop.map50 names" in err
    # CI still gets a JUnit file saying why.
    assert ET.parse(tmp_path / "j.xml").getroot().find("testsuite/testcase/error") is not None


@pytest.mark.parametrize(
    "section, fragment",
    [
        ({"thresholds": {"fp32": {"min_agreement": {"top1_agreement": 0.9}}}},
         "variant 'fp32' has no metric 'fp32_top1_agreement', which gate.thresholds.fp32.min_agreement.top1_agreement names "
         "(the reference has no agreement with itself; use pytorch_top1_agreement)"),
        ({"thresholds": {"int8": {"min_agreement": {"cosine": 0.9}}}, "_drop": "int8"},
         "no variant 'int8', but gate.thresholds.int8 sets thresholds for it"),
        ({"thresholds": {}}, "gate.thresholds is empty"),
        ({"thresholds": {"int8": {"max_dorp": {"top1": 1}}}}, "unknown key 'gate.thresholds.int8.max_dorp'"),
    ],
)
def test_other_bad_inputs(section: dict[str, Any], fragment: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    table = synthetic_table()
    if "_drop" in section:
        del table["variants"][section.pop("_drop")]
    report = write_report(tmp_path / "compare.json", table)
    err = _bad(capsys, "--config", str(config_with(tmp_path, section)), "--report", str(report))
    assert fragment in err


def test_bad_baselines(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    report = write_report(tmp_path / "compare.json", synthetic_table())
    monkeypatch.chdir(tmp_path)  # not a git repository
    err = _bad(capsys, "--config", str(DIGITS), "--report", str(report), "--baseline", "HEAD~1")
    assert "--baseline HEAD~1: no such file, and" in err and "not inside a git repository" in err
    other = write_report(tmp_path / "other.json", {**synthetic_table(), "model": "resnet18"})
    err = _bad(capsys, "--config", str(config_with(tmp_path, {"thresholds": {"int8": {"max_latency_regression": 0.1}}})),
               "--report", str(report), "--baseline", str(other))
    assert "compares model 'resnet18', this report 'digits-cnn'" in err


# --- baseline from an earlier git revision ------------------------------------------------------


def _sh(cwd: Path, *cmd: str) -> str:
    return run_tool(cwd, *cmd, timeout=300)


@pytest.fixture
def repo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    if shutil.which("git") is None or shutil.which("dvc", path=str(Path(sys.executable).parent)) is None:
        pytest.skip("needs git and dvc")
    r = tmp_path / "repo"
    (r / "src").mkdir(parents=True)
    _sh(r, "git", "init", "-q")
    _sh(r, "dvc", "init", "-q")
    # compare.json as a DVC stage output (metrics, cached), as in this project's dvc.yaml.
    (r / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"compare": {
        "cmd": "mkdir -p artifacts/compare && cp src/compare.json artifacts/compare/compare.json",
        "deps": ["src/compare.json"], "metrics": ["artifacts/compare/compare.json"]}}}))
    monkeypatch.chdir(r)
    return r


def _commit_run(r: Path, table: dict[str, Any], msg: str) -> None:
    write_report(r / "src" / "compare.json", table)
    _sh(r, "dvc", "repro", "-q")
    _sh(r, "git", "add", "-A")
    _sh(r, "git", "commit", "-qm", msg)


def test_baseline_from_a_git_revision_via_dvc(repo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fast = synthetic_table()
    slow = copy.deepcopy(fast)
    slow["variants"]["int8"]["b32_p50_ms"] *= 2
    slow["variants"]["int8"]["b32_speedup"] /= 2  # a consistent report (the gate checks its rows agree)
    _commit_run(repo, fast, "baseline")
    _commit_run(repo, slow, "slower int8")
    assert "artifacts/compare/compare.json" not in _sh(repo, "git", "ls-files")  # DVC tracks it, not git
    cfg = config_with(repo.parent, {"thresholds": {"int8": {"max_latency_regression": 0.25}}})
    rc, out, err = gate("--config", str(cfg), "--baseline", "HEAD~1", capsys=capsys)
    assert rc == 1, err
    assert "Baseline: `HEAD~1 (artifacts/compare/compare.json via DVC)`" in out
    assert "int8: b32 p50 latency 1 ms is 100.0% slower than the baseline's 0.5 ms" in out
    rc, out, _ = gate("--config", str(cfg), "--baseline", "HEAD", capsys=capsys)  # against itself
    assert rc == 0, out
    # The revision's output gone from the DVC cache (and no remote), and git does not track it: a clear exit 2.
    shutil.rmtree(repo / ".dvc" / "cache")
    err = _bad(capsys, "--config", str(cfg), "--baseline", "HEAD~1")
    assert "--baseline HEAD~1: cannot read artifacts/compare/compare.json at that revision" in err
    assert "not tracked by git at HEAD~1" in err
    err = _bad(capsys, "--config", str(cfg), "--baseline", "no-such-branch")
    assert "--baseline no-such-branch: neither a compare.json file nor a git revision" in err


def test_baseline_from_a_git_tracked_report(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    if shutil.which("git") is None:
        pytest.skip("needs git")
    r = tmp_path / "plain"
    r.mkdir()
    _sh(r, "git", "init", "-q")
    monkeypatch.chdir(r)
    table = synthetic_table()
    write_report(r / "artifacts" / "compare" / "compare.json", table)
    _sh(r, "git", "add", "-A")
    _sh(r, "git", "commit", "-qm", "baseline")
    worse = copy.deepcopy(table)
    worse["variants"]["int8"]["top1"] = 70.0
    write_report(r / "artifacts" / "compare" / "compare.json", worse)
    cfg = config_with(tmp_path, {"thresholds": {"int8": {"max_drop_vs_baseline": {"top1": 5.0}}}})
    rc, out, _ = gate("--config", str(cfg), "--baseline", "HEAD", capsys=capsys)
    assert rc == 1 and "int8: top1 dropped by 10 vs the baseline HEAD" in out and "(80 -> 70)" in out


# --- NaN never passes; every output is checked ---------------------------------------------------


def _table_of(evals: dict[str, Any]) -> dict[str, Any]:
    return json.loads(compare.build_table(evals, "digits-cnn").model_dump_json())


def test_nan_metric_or_agreement_fails_naming_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    evals = synthetic_evals()
    evals["int8"] = eval_report("int8", float("nan"), 0.5, cosine=float("nan"))
    report = write_report(tmp_path / "compare.json", _table_of(evals))
    cfg = config_with(tmp_path, {"thresholds": {"int8": {"max_drop": {"top1": 1.0}, "min_agreement": {"cosine": 0.99}}}})
    rc, out, err = gate("--config", str(cfg), "--report", str(report), capsys=capsys)
    assert rc == 1
    assert "int8: top1 vs fp32 is NaN (90 -> nan); gate.thresholds.int8.max_drop.top1 = 1 cannot be met by a NaN" in out
    assert "int8: cosine vs fp32 on output 'logits' is nan, below gate.thresholds.int8.min_agreement.cosine = 0.99" in out
    assert err.startswith("trtpipe gate: error: 2 of 3 checks failed: int8: top1 vs fp32 is NaN")


def test_nan_latency_fails_the_speedup_and_regression_checks() -> None:
    table = synthetic_table()
    table["variants"]["int8"]["b32_p50_ms"] = "NaN"
    r = judge({"thresholds": {"int8": {"min_speedup": 1.0, "max_latency_regression": 0.5}}}, table, synthetic_table())
    st = statuses(r)
    assert st["int8 b32 p50 speedup vs fp32"] == "fail" and st["int8 b32 p50 latency vs baseline"] == "fail"
    assert st["int8 b1 p50 speedup vs fp32"] == "pass"


@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf"])
def test_non_finite_threshold_is_bad_input(value: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    report = write_report(tmp_path / "compare.json", synthetic_table())
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(DIGITS.read_text().replace("max_drop: {top1: 1.0}", f"max_drop: {{top1: {value}}}"))
    err = _bad(capsys, "--config", str(cfg), "--report", str(report))
    assert "'gate.thresholds.int8.max_drop.top1'" in err and "not a finite number" in err


def test_each_output_is_checked_and_one_can_be_named() -> None:
    outs = {"boxes": 0.977, "landmarks": 0.999, "prob": 0.9999}
    table = _table_of({p: eval_report(p, 90.0, 1.0, outputs=outs) for p in ("fp32", "int8")})
    r = judge({"thresholds": {"int8": {"min_agreement": {"cosine": 0.99}}}}, table)
    assert statuses(r) == {"int8 cosine vs fp32 (boxes)": "fail", "int8 cosine vs fp32 (landmarks)": "pass",
                           "int8 cosine vs fp32 (prob)": "pass"}
    assert r.failures[0].message.startswith("int8: cosine vs fp32 on output 'boxes' is 0.977")
    r = judge({"thresholds": {"int8": {"min_agreement": {"cosine@prob": 0.999, "cosine@boxes": 0.97}}}}, table)
    assert r.passed and set(statuses(r)) == {"int8 cosine vs fp32 (prob)", "int8 cosine vs fp32 (boxes)"}
    from pipeline.gate import GateInputError

    with pytest.raises(GateInputError, match=r"no fp32 agreement on output 'scores'.*outputs: boxes, landmarks, prob"):
        judge({"thresholds": {"int8": {"min_agreement": {"cosine@scores": 0.9}}}}, table)


def test_a_flagged_variant_fails_without_any_threshold_on_it() -> None:
    evals = synthetic_evals()
    evals["fp16"] = eval_report("fp16", 89.9, 1.0, flags=["cosine vs fp32 on output 'logits' is 0.42, under evaluate.agreement_floor cosine = 0.95"])
    r = judge({"thresholds": {"fp16": {"max_drop": {"top1": 0.5}}}}, _table_of(evals))
    assert statuses(r) == {"fp16 top1 drop vs fp32": "pass"} and not r.passed
    assert r.failures[0].message == ("fp16: flagged by compare: cosine vs fp32 on output 'logits' is 0.42, under "
                                     "evaluate.agreement_floor cosine = 0.95")
