"""`trtpipe gate`: the CI gate over compare.json (see pipeline.gate for the checks).

Exit 0 when every check passes, 1 on a regression, 2 on bad input. The markdown summary
goes to stdout (and --summary FILE, and is appended to $GITHUB_STEP_SUMMARY when that is
set); --junit FILE writes one testcase per check."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any, Optional

from .cli_args import path_arg
from .errors import ConfigError, GateFailure, ReportError


def _emit(path: Optional[Path], text: str, append: bool = False) -> None:
    if not path:
        return
    from .fileio import write_text

    if append:
        with open(path, "a", encoding="utf-8") as f:
            f.write(text + "\n")
    else:
        write_text(path, text)


def _is_junit(data: bytes) -> bool:
    import xml.etree.ElementTree as ET

    try:
        root = ET.fromstring(data)
    except ET.ParseError:
        return False
    suites = [root] if root.tag == "testsuite" else list(root) if root.tag == "testsuites" else []
    return bool(suites) and all(s.tag == "testsuite" and s.get("name") == "trtpipe gate" for s in suites)


def _is_summary(data: bytes) -> bool:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return text.startswith(("## ✅ trtpipe gate", "## ❌ trtpipe gate", "## ⚠️ trtpipe gate"))


def _claim_outputs(a: argparse.Namespace, step_summary: Optional[str]) -> None:
    """--summary, --junit and $GITHUB_STEP_SUMMARY: never a folder, an input or a file the gate did not write
    (the step summary is appended to, so it must be a text file); refused in one line (exit 2)."""
    from . import gate
    from .errors import ArtifactError
    from .fileio import claim_file

    inputs = (a.report, a.baseline if a.baseline and Path(a.baseline).exists() else None, a.config, a.params)
    try:
        if a.summary:
            claim_file(a.summary, "gate", "--summary", inputs, recognise=_is_summary, kind="markdown summary")
        if a.junit:
            claim_file(a.junit, "gate", "--junit", inputs, recognise=_is_junit, kind="JUnit XML")
        if step_summary:
            claim_file(step_summary, "gate", "$GITHUB_STEP_SUMMARY", inputs, append=True, kind="step summary")
        if a.summary and a.junit and Path(a.summary).resolve() == Path(a.junit).resolve():
            raise ArtifactError(f"--summary and --junit both name {a.junit}; give them different files")
    except ArtifactError as e:
        raise gate.GateInputError(str(e)) from None


def cmd_gate(a: argparse.Namespace) -> None:
    from . import gate
    from .config import load_config

    start = time.perf_counter()
    step_summary = os.environ.get("GITHUB_STEP_SUMMARY") or None
    _claim_outputs(a, step_summary)  # before anything is written: the gate writes only what it owns
    try:
        try:
            cfg = load_config(a.config, a.params)
        except ConfigError as e:
            raise gate.GateInputError(str(e)) from None
        report = gate.load_report(a.report)
        baseline, label = gate.load_baseline(a.baseline, a.report) if a.baseline else (None, None)
        result = gate.evaluate_gate(report, cfg.gate, baseline, str(a.report), label, model=cfg.model.name)
    except ReportError as e:  # bad input: still tell CI why, then exit 2
        msg = " ".join(str(e).split())
        _emit(a.summary, gate.bad_input_markdown(msg))
        _emit(Path(step_summary) if step_summary else None, gate.bad_input_markdown(msg), append=True)
        _emit(a.junit, gate.to_junit(None, error=msg, seconds=time.perf_counter() - start))
        raise gate.GateInputError(msg) from None
    md = gate.to_markdown(result)
    if a.json:
        import json

        print(json.dumps(result.to_dict(), indent=2))
    else:
        print(md, end="")
    sys.stdout.flush()
    _emit(a.summary, md)
    _emit(Path(step_summary) if step_summary else None, md, append=True)
    _emit(a.junit, gate.to_junit(result, seconds=time.perf_counter() - start))
    if not result.passed:
        first = result.failures[0].message
        more = f" (and {len(result.failures) - 1} more; see the summary)" if len(result.failures) > 1 else ""
        raise GateFailure(f"{len(result.failures)} of {len(result.checks)} checks failed: {first}{more}")


def register(subparsers: Any) -> None:
    help = "check compare.json against the config's gate thresholds (exit 0 pass, 1 regression, 2 bad input)"
    p = subparsers.add_parser("gate", help=help, description=help + ". " + (
        "Thresholds per precision live in the config's gate: section (max_drop, min_agreement, max_divergence, "
        "min_speedup, max_latency_regression, ...)."))
    p.add_argument("--config", type=path_arg, default=None, help="configs/<model>.yaml (default: the one params.yaml names)")
    p.add_argument("--params", type=path_arg, default=Path("params.yaml"), help="params file with overrides (default: params.yaml)")
    p.add_argument("--json", action="store_true", help="print the checks as JSON instead of the markdown summary")
    p.add_argument("--report", "--compare", dest="report", type=path_arg, default=Path("artifacts", "compare", "compare.json"),
                   help="the compare.json to judge (default: artifacts/compare/compare.json)")
    p.add_argument("--baseline", default=None, metavar="PATH|REV",
                   help="baseline for latency and baseline checks: a compare.json file, or a git revision (HEAD~1, main) "
                        "at which --report's path is read through DVC (dvc.lock + cache/remote) or git")
    p.add_argument("--summary", type=path_arg, default=None, metavar="FILE", help="also write the markdown summary here")
    p.add_argument("--junit", type=path_arg, default=None, metavar="FILE", help="write JUnit XML, one testcase per check")
    p.set_defaults(func=cmd_gate)
