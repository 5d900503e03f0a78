"""The CI gate: compare.json against the thresholds in the config's `gate:` section.

Per precision (gate.thresholds.<precision>):
  max_drop               metric -> largest drop against the fp32 variant (the metric's unit;
                         top-k in percentage points). `gate.lower_is_better` names losses.
  max_drop_vs_pytorch    the same against the metric on PyTorch's outputs
  max_drop_vs_baseline   the same against this variant in the --baseline report
  min_agreement          cosine / cosine_min / top1_agreement / snr_db -> least value
                         (against fp32; prefix pytorch_ for against PyTorch)
  max_divergence         max_abs_diff / mean_abs_diff / rel_l2 -> largest value (same prefixes)
  min_speedup            least latency speedup against fp32 (fp32 latency / this latency)
  max_latency_regression largest slowdown against the --baseline report, a fraction (0.2 = 20%)
Latency checks use gate.latency.percentile (p50) at every batch size both reports have
(or gate.latency.batch_sizes), and ignore a slowdown under gate.latency.slack_ms.

Agreement keys name a statistic, optionally prefixed by its reference (fp32_, pytorch_) and
suffixed by one output (`cosine@boxes`); without a suffix every output is checked on its
own. A NaN value never passes a check, and a variant compare flagged (NaN outputs,
agreement under evaluate.agreement_floor) fails the gate.

Outcomes: every check passes (exit 0); a check fails (GateFailure, exit 1); or the input is
unusable (GateInputError, exit 2): a missing report, another schema_version, a threshold
naming a variant or metric the report lacks, a baseline that cannot be read."""

from __future__ import annotations

import datetime as dt
import json
import math
import re
import subprocess
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

from .config import PRECISIONS, GateConfig, split_agreement_key
from .errors import ReportError
from .fileio import read_json
from .metrics import as_float
from .reports import RESERVED_COLUMN, SCHEMA_VERSION, CompareReport

DEFAULT_REPORT = Path("artifacts", "compare", "compare.json")
EPS = 1e-9  # float noise: a drop of exactly the threshold passes
_LAT = re.compile(r"^b\d+_")


class GateInputError(ReportError):
    """The gate cannot judge: bad or missing input (exit status 2)."""


@dataclass
class Check:
    variant: str
    name: str  # "top1 drop vs fp32"
    setting: str  # "gate.thresholds.int8.max_drop.top1"
    threshold: float
    op: str  # "<=" or ">="
    value: Optional[float] = None
    status: str = "pass"  # pass | fail | skip
    message: str = ""
    detail: str = ""  # e.g. "99.72 -> 87.19"


@dataclass
class GateResult:
    report: str
    model: Optional[str]
    backends: list[str]
    baseline: Optional[str] = None
    checks: list[Check] = field(default_factory=list)

    @property
    def failures(self) -> list[Check]:
        return [c for c in self.checks if c.status == "fail"]

    @property
    def passed(self) -> bool:
        return not self.failures

    def counts(self) -> dict[str, int]:
        return {s: sum(c.status == s for c in self.checks) for s in ("pass", "fail", "skip")}

    def to_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed, "report": self.report, "model": self.model, "backends": self.backends,
            "baseline": self.baseline, "counts": self.counts(),
            "checks": [{k: (_fmt(v) if isinstance(v, float) and not math.isfinite(v) else v) for k, v in asdict(c).items()} for c in self.checks],
        }


# --- reading reports -----------------------------------------------------------------


def validate_report(data: Any, source: str) -> dict[str, Any]:
    """A compare report as plain data, checked against CompareReport's form."""
    from pydantic import ValidationError

    if not isinstance(data, dict):
        raise GateInputError(f"{source}: not a compare report (expected a JSON object)")
    if data.get("schema_version") != SCHEMA_VERSION:
        raise GateInputError(
            f"{source}: compare.json schema_version {data.get('schema_version')!r}, but this trtpipe reads "
            f"schema_version {SCHEMA_VERSION}; re-run compare (dvc repro) with this version"
        )
    if not isinstance(data.get("variants"), dict) or not data["variants"]:
        raise GateInputError(f"{source}: no 'variants' in the compare report; re-run compare")
    try:
        CompareReport.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        loc = ".".join(str(x) for x in first["loc"]) or "(top level)"
        raise GateInputError(f"{source}: not a compare report of this trtpipe ({loc}: {first['msg']}); re-run compare") from None
    return data


def load_report(path: Path | str, what: str = "compare report") -> dict[str, Any]:
    path = Path(path)
    from .fileio import not_a_folder

    not_a_folder(path, what, GateInputError)
    if not path.is_file():
        raise GateInputError(f"{path}: {what} not found; run `dvc repro` (or `trtpipe compare`) first, or pass --report")
    return validate_report(read_json(path, what), str(path))


def _git(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True)


def load_baseline(spec: str, report_path: Path | str) -> tuple[dict[str, Any], str]:
    """A baseline compare.json: `spec` is a file, or a git revision at which to read
    `report_path` (a DVC output: through dvc.api.read, i.e. dvc.lock at that revision and
    the DVC cache or remote; or from git, if git tracks the file)."""
    p = Path(spec)
    if p.is_file():
        return validate_report(read_json(p, "baseline compare report"), f"baseline {p}"), str(p)
    cwd = Path.cwd()
    try:
        top = _git(["rev-parse", "--show-toplevel"], cwd)
    except FileNotFoundError:
        raise GateInputError(f"--baseline {spec}: no such file, and git is not installed to read a revision") from None
    if top.returncode != 0:
        raise GateInputError(f"--baseline {spec}: no such file, and {cwd} is not inside a git repository to read a revision from")
    root = Path(top.stdout.strip())
    if _git(["rev-parse", "--verify", "--quiet", f"{spec}^{{commit}}"], root).returncode != 0:
        raise GateInputError(f"--baseline {spec}: neither a compare.json file nor a git revision of {root}")
    try:
        rel = Path(report_path).resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        raise GateInputError(f"--baseline {spec}: the report {report_path} is outside the git repository {root}") from None
    source = f"baseline {rel} at {spec}"
    why = []
    try:
        import dvc.api

        text = dvc.api.read(rel, repo=str(root), rev=spec)
        return validate_report(_parse(text, source), source), f"{spec} ({rel} via DVC)"
    except GateInputError:
        raise
    except ImportError:
        why.append("dvc is not installed")
    except Exception as e:  # dvc raises many kinds: path missing, not in cache, no remote ...
        why.append(f"dvc: {' '.join(str(e).split()) or type(e).__name__}")
    show = _git(["show", f"{spec}:{rel}"], root)
    if show.returncode == 0:
        return validate_report(_parse(show.stdout, source), source), f"{spec} ({rel} from git)"
    why.append(f"git: {rel} is not tracked by git at {spec}")
    raise GateInputError(
        f"--baseline {spec}: cannot read {rel} at that revision ({'; '.join(why)}); "
        "DVC reads it from the local cache or the default remote, so `dvc push` the baseline's run; or pass a compare.json path"
    )


def _parse(text: str, source: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise GateInputError(f"{source}: not valid JSON ({e.msg} at line {e.lineno})") from None


# --- the checks --------------------------------------------------------------------------


def _fmt(v: Optional[float], nd: int = 4) -> str:
    if v is None:
        return "–"
    if math.isinf(v) or math.isnan(v):
        return str(v)
    return f"{v:.{nd}g}"


class _Judge:
    def __init__(self, report: dict[str, Any], source: str, gate: GateConfig, baseline: Optional[dict[str, Any]], baseline_label: Optional[str]):
        self.report, self.source, self.gate = report, source, gate
        self.baseline, self.baseline_label = baseline, baseline_label
        self.variants: dict[str, dict[str, Any]] = report["variants"]
        self.ref_name = report.get("reference", "fp32")
        self.checks: list[Check] = []

    def _value(self, variant: str, key: str, setting: str, row: Optional[dict[str, Any]] = None, what: Optional[str] = None) -> float:
        row = self.variants[variant] if row is None else row
        v = as_float(row.get(key))
        if v is None:
            have = [k for k, x in row.items() if as_float(x) is not None]
            prefix = key.split("_", 1)[0] + "_"
            if prefix in ("fp32_", "pytorch_") or _LAT.match(key):  # name the same kind of column
                have = [k for k in have if k.startswith(prefix)]
            else:  # task metrics
                have = [k for k in have if not RESERVED_COLUMN.match(k)]
            hint = ""
            if variant == self.ref_name and key.startswith(f"{self.ref_name}_"):
                hint = f" (the reference has no agreement with itself; use pytorch_{key.split('_', 1)[1]})"
            raise GateInputError(
                f"{self.source}: {what or f'variant {variant!r}'} has no metric '{key}', which {setting} names{hint}; "
                f"it has: {', '.join(have) or 'none'}"
            )
        return v

    def _add(self, c: Check) -> None:
        self.checks.append(c)

    def drop(self, p: str, m: str, thr: float, against: str) -> None:
        kind = {"fp32": "max_drop", "pytorch": "max_drop_vs_pytorch", "baseline": "max_drop_vs_baseline"}[against]
        setting = f"gate.thresholds.{p}.{kind}.{m}"
        v = self._value(p, m, setting)
        lower = m in self.gate.lower_is_better
        vs_name = {"fp32": self.ref_name, "pytorch": "PyTorch", "baseline": "baseline"}[against]
        c = Check(p, f"{m} {'rise' if lower else 'drop'} vs {vs_name}", setting, thr, "<=")
        if against == "fp32":
            ref = self._value(self.ref_name, m, setting)
        elif against == "pytorch":
            ref = self._value(p, m, setting, row=self.report.get("pytorch") or {}, what="the PyTorch reference ('pytorch')")
        else:
            brow = (self.baseline or {}).get("variants", {}).get(p)
            if self.baseline is None or brow is None or as_float(brow.get(m)) is None:
                c.status = "skip"
                c.message = (f"{p}: {m} vs baseline not checked: "
                             + ("no --baseline given" if self.baseline is None else f"the baseline has no {'variant ' + p if brow is None else 'metric ' + m}"))
                return self._add(c)
            ref = float(as_float(brow[m]))
        d = (v - ref) if lower else (ref - v)
        c.value, c.detail = d, f"{_fmt(ref)} -> {_fmt(v)}"
        vs = {"fp32": self.ref_name, "pytorch": "PyTorch", "baseline": f"the baseline {self.baseline_label}"}[against]
        if d != d:  # a NaN on either side: the drop cannot be measured, so it cannot pass
            c.status = "fail"
            c.message = f"{p}: {m} vs {vs} is NaN ({c.detail}); {setting} = {thr:g} cannot be met by a NaN"
        elif d > thr + EPS:
            c.status = "fail"
            word = "rose" if lower else "dropped"
            c.message = f"{p}: {m} {word} by {_fmt(d)} vs {vs} ({c.detail}), more than {setting} = {thr:g}"
        return self._add(c)

    def bound(self, p: str, key: str, thr: float, kind: str) -> None:
        """An agreement statistic against its bound, on every output (or the one after '@')."""
        ref, stat, output = split_agreement_key(key)
        src = ref or self.ref_name
        setting = f"gate.thresholds.{p}.{kind}.{key}"
        low = kind == "min_agreement"
        vs = "PyTorch" if src == "pytorch" else src
        per_output = ((self.report.get("agreement") or {}).get(p) or {}).get("pytorch" if src == "pytorch" else "fp32") or {}
        if not per_output:  # an older report: the worst over the outputs, from the flat row
            per_output = {"(all outputs)": {stat: self._value(p, f"{src}_{stat}", setting)}}
        if output is not None:
            if output not in per_output:
                hint = f" (the reference has no agreement with itself; use pytorch_{stat}@{output})" if p == self.ref_name and src != "pytorch" else ""
                raise GateInputError(f"{self.source}: variant {p!r} has no {vs} agreement on output '{output}', which "
                                     f"{setting} names{hint}; outputs: {', '.join(per_output) or 'none'}")
            per_output = {output: per_output[output]}
        checked = 0
        for name, stats in per_output.items():
            v = as_float(stats.get(stat))
            if v is None:
                continue
            checked += 1
            c = Check(p, f"{stat} vs {vs} ({name})", setting, thr, ">=" if low else "<=", value=v)
            if not ((v >= thr) if low else (v <= thr)):  # NaN fails both
                c.status = "fail"
                c.message = (f"{p}: {stat} vs {vs} on output '{name}' is {_fmt(v, 6)}, "
                             f"{'below' if low else 'above'} {setting} = {thr:g}")
            self._add(c)
        if not checked:
            hint = f" (the reference has no agreement with itself; use pytorch_{stat})" if p == self.ref_name and src != "pytorch" else ""
            raise GateInputError(f"{self.source}: variant {p!r} has no metric '{src}_{stat}', which {setting} names{hint}")

    def flagged(self, p: str) -> None:
        """A variant compare flagged (its numbers cannot be trusted) fails the gate."""
        reasons = (self.report.get("flags") or {}).get(p) or []
        c = Check(p, "numbers trustworthy (compare flags)", "evaluate.agreement_floor / NaN outputs", 0, "<=",
                  value=float(len(reasons)))
        if reasons:
            c.status = "fail"
            c.message = f"{p}: flagged by compare: " + "; ".join(reasons)
        self._add(c)

    def _batches(self, row: dict[str, Any], q: str) -> list[int]:
        have = sorted(int(k[1:].split("_")[0]) for k in row if k.startswith("b") and k.endswith(f"_{q}_ms") and "e2e" not in k)
        return list(self.gate.latency.batch_sizes) if self.gate.latency.batch_sizes else have

    def speedup(self, p: str, thr: float) -> None:
        q = self.gate.latency.percentile
        setting = f"gate.thresholds.{p}.min_speedup"
        bs = self._batches(self.variants[p], q)
        if not bs:
            raise GateInputError(f"{self.source}: variant {p!r} has no latency ({q}), which {setting} needs; re-run evaluate")
        for b in bs:
            key = f"b{b}_{q}_ms"
            v, ref = self._value(p, key, setting), self._value(self.ref_name, key, setting)
            s = ref / v if v > 0 else (math.inf if v == 0 else math.nan)
            c = Check(p, f"b{b} {q} speedup vs {self.ref_name}", setting, thr, ">=", value=s, detail=f"{_fmt(ref)} ms -> {_fmt(v)} ms")
            if not s >= thr:  # NaN fails
                c.status = "fail"
                c.message = f"{p}: b{b} {q} latency speedup vs {self.ref_name} is {s:.3f}x ({c.detail}); {setting} = {thr:g}x"
            self._add(c)

    def latency(self, p: str, thr: float) -> None:
        q, slack = self.gate.latency.percentile, self.gate.latency.slack_ms
        setting = f"gate.thresholds.{p}.max_latency_regression"
        row = self.variants[p]
        bs = self._batches(row, q)
        if not bs:
            raise GateInputError(f"{self.source}: variant {p!r} has no latency ({q}), which {setting} needs; re-run evaluate")
        brow = (self.baseline or {}).get("variants", {}).get(p)
        for b in bs:
            key = f"b{b}_{q}_ms"
            v = self._value(p, key, setting)
            c = Check(p, f"b{b} {q} latency vs baseline", setting, thr, "<=")
            why = None
            if self.baseline is None:
                why = "no --baseline given"
            elif brow is None:
                why = f"the baseline has no variant {p}"
            elif as_float(brow.get(key)) is None:
                why = f"the baseline has no {key}"
            else:
                here = (row.get("backend"), row.get("device"), row.get("timing"))
                there = (brow.get("backend"), brow.get("device"), brow.get("timing"))
                if here != there:
                    why = f"measured on {' / '.join(map(str, there))} there, {' / '.join(map(str, here))} here"
            if why:
                c.status, c.message = "skip", f"{p}: b{b} {q} latency vs baseline not checked: {why}"
                self._add(c)
                continue
            base = float(as_float(brow[key]))
            reg = v / base - 1 if base > 0 else (0.0 if base == 0 else math.nan)
            c.value, c.detail = reg, f"{_fmt(base)} ms -> {_fmt(v)} ms"
            if reg != reg or (reg > thr + EPS and v - base > slack):  # NaN fails
                c.status = "fail"
                c.message = (f"{p}: b{b} {q} latency {_fmt(v)} ms is {100 * reg:.1f}% slower than the baseline's {_fmt(base)} ms; "
                             f"{setting} allows {thr:g} ({100 * thr:g}%)")
            self._add(c)


def _same(a: Any, b: Any) -> bool:
    fa, fb = as_float(a), as_float(b)
    if fa is None or fb is None:
        return fa is None and fb is None
    if fa != fa or fb != fb:
        return fa != fa and fb != fb
    return math.isclose(fa, fb, rel_tol=1e-9, abs_tol=1e-12)


def consistency(report: dict[str, Any], source: str, model: Optional[str] = None) -> list[Check]:
    """The report is of the configured model, and each row's numbers agree with what they were derived from
    in the same report: `fp32_<stat>`/`pytorch_<stat>` with the worst over `agreement.<variant>` outputs,
    `<m>_delta` with the row and the reference row, `<m>_delta_pytorch` with `pytorch`, `bB_speedup` with the
    p50 latencies, `flagged` with `flags`. A mismatch (an edited or forged report) is a failed check."""
    from .config import AGREEMENT_LOWER_BETTER

    checks: list[Check] = []

    def fail(variant: str, field: str, message: str) -> None:
        checks.append(Check(variant, "report consistent", f"{source}: {field}", 0, "<=", value=1.0, status="fail",
                            message=f"{source}: {field}: {message}; the report was edited or is of another run: "
                                    "re-run compare (dvc repro)"))

    if model is not None and report.get("model") != model:
        fail("*", "model", f"is {report.get('model')!r}, but the config's model.name is {model!r}")
    rows: dict[str, dict[str, Any]] = report.get("variants") or {}
    ref = rows.get(report.get("reference", "fp32")) or {}
    pytorch = report.get("pytorch") or {}
    agreement = report.get("agreement") or {}
    flags = report.get("flags") or {}
    for p, row in rows.items():
        for src in ("fp32", "pytorch"):
            per_output = (agreement.get(p) or {}).get(src) or {}
            if not per_output:
                continue
            for stat in {k.split("_", 1)[1] for k in row if k.startswith(f"{src}_")}:
                vals = [as_float(s.get(stat)) for s in per_output.values() if as_float(s.get(stat)) is not None]
                if not vals:
                    continue
                worst = (math.nan if any(v != v for v in vals) else
                         max(vals) if stat in AGREEMENT_LOWER_BETTER else min(vals))
                if not _same(row.get(f"{src}_{stat}"), worst):
                    fail(p, f"variants.{p}.{src}_{stat}", f"is {row.get(f'{src}_{stat}')!r}, but agreement.{p}.{src} "
                         f"gives {worst!r} (the worst over its outputs)")
        for k, v in row.items():
            if k.endswith("_delta_pytorch") and k[:-len("_delta_pytorch")] in row:
                m = k[:-len("_delta_pytorch")]
                if as_float(pytorch.get(m)) is not None and not _same(v, as_float(row[m]) - as_float(pytorch[m])):
                    fail(p, f"variants.{p}.{k}", f"is {v!r}, but {m} {row[m]!r} - pytorch.{m} {pytorch[m]!r} differ by that")
            elif k.endswith("_delta") and k[:-len("_delta")] in row:
                m = k[:-len("_delta")]
                if as_float(ref.get(m)) is not None and not _same(v, as_float(row[m]) - as_float(ref[m])):
                    fail(p, f"variants.{p}.{k}", f"is {v!r}, but {m} {row[m]!r} minus the reference's {ref[m]!r} is not")
            elif _SPEEDUP.match(k):
                b = _SPEEDUP.match(k).group(1)
                here, there = as_float(row.get(f"b{b}_p50_ms")), as_float(ref.get(f"b{b}_p50_ms"))
                if here and there and not _same(v, there / here):
                    fail(p, f"variants.{p}.{k}", f"is {v!r}, but the p50 latencies give {there / here!r}")
        if "flagged" in row and bool(row["flagged"]) != bool(flags.get(p)):
            fail(p, f"variants.{p}.flagged", f"is {row['flagged']!r}, but flags.{p} is {flags.get(p)!r}")
    return checks


_SPEEDUP = re.compile(r"^b(\d+)_speedup$")


def evaluate_gate(
    report: dict[str, Any],
    gate: GateConfig,
    baseline: Optional[dict[str, Any]] = None,
    source: str = str(DEFAULT_REPORT),
    baseline_label: Optional[str] = None,
    model: Optional[str] = None,
) -> GateResult:
    """Run every configured check. Raises GateInputError for unusable input; failures are in the result."""
    report = validate_report(report, source)
    if not gate.thresholds:
        raise GateInputError(f"{source}: the config's gate.thresholds is empty, so there is nothing to check; add thresholds per precision")
    if baseline is not None and baseline.get("model") != report.get("model"):
        raise GateInputError(
            f"baseline {baseline_label}: compares model {baseline.get('model')!r}, this report {report.get('model')!r}; pick a baseline of the same model"
        )
    j = _Judge(report, source, gate, baseline, baseline_label)
    if model is not None:  # the CLI names the configured model: a forged or foreign report fails first
        j.checks += consistency(report, source, model)
    if j.ref_name not in j.variants:
        raise GateInputError(f"{source}: no '{j.ref_name}' variant, the reference every drop is measured against; re-run compare")
    for p in [p for p in PRECISIONS if p in gate.thresholds]:
        t = gate.thresholds[p]
        if p not in j.variants:
            raise GateInputError(
                f"{source}: no variant '{p}', but gate.thresholds.{p} sets thresholds for it; "
                f"run evaluate@{p} and compare, or remove gate.thresholds.{p}"
            )
        for m, thr in t.max_drop.items():
            j.drop(p, m, thr, "fp32")
        for m, thr in t.max_drop_vs_pytorch.items():
            j.drop(p, m, thr, "pytorch")
        for k, thr in t.min_agreement.items():
            j.bound(p, k, thr, "min_agreement")
        for k, thr in t.max_divergence.items():
            j.bound(p, k, thr, "max_divergence")
        if t.min_speedup is not None:
            j.speedup(p, t.min_speedup)
        for m, thr in t.max_drop_vs_baseline.items():
            j.drop(p, m, thr, "baseline")
        if t.max_latency_regression is not None:
            j.latency(p, t.max_latency_regression)
        j.flagged(p)
    return GateResult(source, report.get("model"), list(report.get("backends") or []), baseline_label, j.checks)


# --- output ----------------------------------------------------------------------------

_ICON = {"pass": "✅", "fail": "❌", "skip": "⏭️"}


def _threshold(c: Check) -> str:
    t = f"{c.threshold:g}"
    if "latency_regression" in c.setting:
        t = f"{100 * c.threshold:g}%"
    elif c.setting.endswith("min_speedup"):
        t = f"{c.threshold:g}x"
    return f"{'≤' if c.op == '<=' else '≥'} {t}"


def _value(c: Check) -> str:
    if c.value is None:
        return "–"
    if "latency_regression" in c.setting:
        return f"{100 * c.value:+.1f}%"
    if c.setting.endswith("min_speedup"):
        return f"{c.value:.3f}x"
    return _fmt(c.value, 6 if "agreement" in c.setting or "divergence" in c.setting else 4)


def to_markdown(r: GateResult) -> str:
    n = r.counts()
    title = (f"## ✅ trtpipe gate passed: {r.model}" if r.passed
             else f"## ❌ trtpipe gate failed: {n['fail']} of {len(r.checks)} checks, {r.model}")
    sim = [b for b in r.backends if b != "tensorrt"]
    lines = [
        title, "",
        f"Report `{r.report}` (backends: {', '.join(r.backends) or '?'}"
        + (f"; {', '.join(sim)} numbers are a CPU simulation, not a TensorRT engine" if sim else "") + ")  ",
        f"Baseline: {f'`{r.baseline}`' if r.baseline else 'none (latency and baseline checks skipped)'}  ",
        f"{len(r.checks)} checks: {n['pass']} passed, {n['fail']} failed, {n['skip']} skipped", "",
    ]
    if r.failures:
        lines += ["**Failures**", ""] + [f"- {c.message}" for c in r.failures] + [""]
    lines += ["| | variant | check | value | threshold | detail | setting |", "|---|---|---|---|---|---|---|"]
    for c in r.checks:
        detail = c.detail if c.status != "skip" else c.message.split(": ", 2)[-1]
        lines.append(f"| {_ICON[c.status]} | {c.variant} | {c.name} | {_value(c)} | {_threshold(c)} | {detail} | `{c.setting}` |")
    return "\n".join(lines) + "\n"


def bad_input_markdown(message: str) -> str:
    return f"## ⚠️ trtpipe gate could not run (bad input)\n\n{message}\n"


def to_junit(r: Optional[GateResult], error: Optional[str] = None, seconds: float = 0.0) -> str:
    """JUnit XML: one testcase per check (or one erroring testcase when the input was bad)."""
    suite = ET.Element("testsuite", name="trtpipe gate", timestamp=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                       time=f"{seconds:.3f}")
    checks = r.checks if r else []
    for c in checks:
        tc = ET.SubElement(suite, "testcase", classname=f"trtpipe.gate.{c.variant}", name=c.name, time="0")
        props = ET.SubElement(tc, "properties")
        for k, v in (("setting", c.setting), ("threshold", f"{c.op} {c.threshold:g}"), ("value", _fmt(c.value, 8))):
            ET.SubElement(props, "property", name=k, value=v)
        if c.status == "fail":
            ET.SubElement(tc, "failure", message=c.message, type="GateFailure").text = c.message
        elif c.status == "skip":
            ET.SubElement(tc, "skipped", message=c.message)
    if error is not None:
        tc = ET.SubElement(suite, "testcase", classname="trtpipe.gate", name="read inputs", time="0")
        ET.SubElement(tc, "error", message=error, type="GateInputError").text = error
    n = r.counts() if r else {"fail": 0, "skip": 0}
    suite.set("tests", str(len(checks) + (error is not None)))
    suite.set("failures", str(n["fail"]))
    suite.set("errors", str(int(error is not None)))
    suite.set("skipped", str(n["skip"]))
    root = ET.Element("testsuites")
    root.append(suite)
    ET.indent(root)
    return '<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"
