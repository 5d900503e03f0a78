"""compare: the variants side by side. compare.json (the full table), metrics.json (DVC's
metrics file: the few numbers per variant `dvc exp show` lists, see dvc_metrics), compare.md
(tables), tradeoff.png (accuracy against latency) and latency.json (DVC plot of percentiles).

compare.json is a CompareReport. `variants.<precision>` is one flat row of numbers, so
that `dvc metrics show/diff` lists e.g. `variants.int8.top1_delta`:

- task metrics (`top1`, user metrics ...), `<m>_delta` against the fp32 variant and
  `<m>_delta_pytorch` against the same metric on PyTorch's outputs;
- agreement, the worst over every output: `fp32_<stat>` (not in the fp32 row itself) and
  `pytorch_<stat>` for cosine, cosine_min, max_abs_diff, mean_abs_diff, rel_l2, snr_db,
  top1_agreement; every output's own numbers are under `agreement.<variant>.<fp32|pytorch>.<output>`;
- latency per batch size B, the headline: the fastest latency mode (TensorRT: plain
  enqueue or CUDA-graph replay) on the device clock where the backend has one:
  `bB_p50_ms`, `bB_p90_ms`, `bB_p99_ms`, `bB_mean_ms`, `bB_throughput`, `bB_speedup`
  (fp32 p50 / this p50), `bB_mode`, `bB_timing` (gpu | host) and `bB_e2e_p50_ms` (host
  clock, end to end, same mode);
- `engine_bytes`, `size_vs_fp32`, `build_seconds`, `backend`, `device`, `timing`, `flagged`.

`flags.<variant>` lists why a variant's numbers cannot be trusted (NaN outputs, agreement
under evaluate.agreement_floor): compare.md shows them above the tables and the gate fails
on them."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from ..config import AGREEMENT_LOWER_BETTER, PRECISIONS, Config
from ..errors import ReportError
from ..fileio import claim_dir, not_a_folder, staging_dir, write_json, write_text
from ..metrics import as_float
from ..reports import (
    LATENCY_COLUMN,
    RESERVED_COLUMN,
    SCHEMA_VERSION,
    CompareReport,
    EvalReport,
    LatencyRow,
    read_report,
    write_report,
)

REFERENCE = "fp32"
AGREEMENT_STATS = ("cosine", "cosine_min", "max_abs_diff", "mean_abs_diff", "rel_l2", "snr_db", "top1_agreement")
LATENCY_STATS = ("p50", "p90", "p99", "mean")


def device_name(dev: dict[str, Any]) -> str:
    if not dev:
        return "unknown"
    if dev.get("gpu"):
        cc = f" (sm {dev['compute_capability']})" if dev.get("compute_capability") else ""
        return f"{dev['gpu']}{cc}"
    if dev.get("device") == "cpu":
        cores = f", {dev['cores']} cores" if dev.get("cores") else ""
        return f"cpu {dev.get('cpu') or ''}{cores}".replace("  ", " ").strip()
    return str(dev.get("device") or dev)


def _worst(per_output: dict[str, Any]) -> dict[str, float]:
    """Per statistic, the worst value over the outputs (NaN wins: it can never pass)."""
    out: dict[str, float] = {}
    for stats in per_output.values():
        for k in AGREEMENT_STATS:
            v = stats.get(k)
            if v is None:
                continue
            v = float(v)
            if k not in out or v != v:
                out[k] = v
            elif out[k] == out[k]:
                out[k] = max(out[k], v) if k in AGREEMENT_LOWER_BETTER else min(out[k], v)
    return out


def _headline(rows: list[LatencyRow]) -> dict[int, tuple[LatencyRow, str]]:
    """Per batch size, the fastest mode by p50 on the device clock where present."""
    best: dict[int, tuple[LatencyRow, str]] = {}
    for r in rows:
        stats, timing = (r.gpu, "gpu") if r.gpu is not None else (r.host, "host")
        cur = best.get(r.batch_size)
        if cur is None:
            best[r.batch_size] = (r, timing)
            continue
        cur_stats = cur[0].gpu if cur[1] == "gpu" else cur[0].host
        if stats.p50_ms < cur_stats.p50_ms:
            best[r.batch_size] = (r, timing)
    return best


def _row(ev: EvalReport, is_reference: bool) -> dict[str, Any]:
    row: dict[str, Any] = {
        "backend": ev.backend,
        "backend_version": ev.backend_version,
        "device": device_name(ev.device or {}),
    }
    for k, v in ev.metrics.items():
        if RESERVED_COLUMN.match(k):
            raise ReportError(f"task metric '{k}' ({ev.precision}) clashes with a compare.json column; rename it")
        row[k] = v
    if not is_reference:
        row.update({f"fp32_{k}": v for k, v in _worst({n: a.model_dump() for n, a in ev.agreement_fp32.items()}).items()})
    row.update({f"pytorch_{k}": v for k, v in _worst({n: a.model_dump() for n, a in ev.agreement_pytorch.items()}).items()})
    timings = set()
    for b, (r, timing) in sorted(_headline(ev.latency).items()):
        src = r.gpu if timing == "gpu" else r.host
        for q in LATENCY_STATS:
            row[f"b{b}_{q}_ms"] = getattr(src, f"{q}_ms")
        row[f"b{b}_throughput"] = src.throughput_per_s
        row[f"b{b}_mode"] = r.mode
        row[f"b{b}_timing"] = timing
        row[f"b{b}_e2e_p50_ms"] = r.host.p50_ms
        timings.add(timing)
    row["timing"] = "gpu" if timings == {"gpu"} else ("host" if timings == {"host"} else "mixed")
    row["engine_bytes"] = ev.engine_bytes
    row["build_seconds"] = ev.build_seconds
    row["flagged"] = bool(ev.flags)
    return row


def task_metric_names(evals: dict[str, EvalReport]) -> list[str]:
    names: list[str] = []
    for ev in evals.values():
        names += [k for k in ev.metrics if k not in names]
    return names


def build_table(evals: dict[str, EvalReport], model: str, primary_metric: Optional[str] = None) -> CompareReport:
    if REFERENCE not in evals:
        raise ReportError(f"compare needs the {REFERENCE} evaluation as its reference; it is missing")
    rows = {p: _row(ev, p == REFERENCE) for p, ev in evals.items()}
    ref = rows[REFERENCE]
    names = task_metric_names(evals)
    pytorch = dict(evals[REFERENCE].reference_metrics.get("pytorch", {}))
    for p, row in rows.items():
        for m in names:
            v = as_float(row.get(m))
            if v is None:
                continue
            if as_float(ref.get(m)) is not None:
                row[f"{m}_delta"] = v - float(as_float(ref[m]))  # type: ignore[arg-type]
            if as_float(pytorch.get(m)) is not None:
                row[f"{m}_delta_pytorch"] = v - float(pytorch[m])
        for k in [k for k in row if LATENCY_COLUMN.match(k)]:
            b, q = LATENCY_COLUMN.match(k).groups()  # type: ignore[union-attr]
            if q == "p50" and ref.get(k) and row[k]:
                row[f"b{b}_speedup"] = ref[k] / row[k]
        if ref.get("engine_bytes") and row.get("engine_bytes"):
            row["size_vs_fp32"] = row["engine_bytes"] / ref["engine_bytes"]
    if primary_metric is None:
        primary_metric = names[0] if names else None
    elif primary_metric not in names:
        raise ReportError(
            f"evaluate.primary_metric '{primary_metric}' is not among the evaluated metrics ({', '.join(names) or 'none'})"
        )
    outputs: list[str] = []
    for ev in evals.values():
        outputs += [n for n in ev.agreement_pytorch if n not in outputs]
    reads: dict[str, Optional[str]] = {}
    for ev in evals.values():
        reads.update(ev.metric_outputs)
    return CompareReport(
        model=model,
        reference=REFERENCE,
        backends=sorted({r["backend"] for r in rows.values()}),
        primary_metric=primary_metric,
        metric_outputs=reads,
        outputs=outputs,
        pytorch=pytorch,
        variants=rows,
        agreement={p: {"fp32": {n: _stats(a) for n, a in ev.agreement_fp32.items()} if p != REFERENCE else {},
                       "pytorch": {n: _stats(a) for n, a in ev.agreement_pytorch.items()}}
                   for p, ev in evals.items()},
        flags={p: list(ev.flags) for p, ev in evals.items() if ev.flags},
        headline={"latency": "per batch size, the fastest latency mode; device time (CUDA events) where the backend "
                             "measures it, else host time", "primary_metric": primary_metric},
    )


def _stats(a: Any) -> dict[str, float]:
    return {k: v for k, v in a.model_dump().items() if k in AGREEMENT_STATS and v is not None}


# --- compare.md ----------------------------------------------------------------------


def _num(v: Any, nd: int = 3, signed: bool = False, pct: bool = False) -> str:
    f = as_float(v)
    if f is None:
        return "–"
    if f != f:
        return "NaN ⚠"
    if f in (float("inf"), float("-inf")):
        return "∞" if f > 0 else "-∞"
    f = 100 * f if pct else f
    return f"{f:+.{nd}f}" if signed else f"{f:.{nd}f}"


def _batches(rows: dict[str, dict[str, Any]]) -> list[int]:
    return sorted({int(m.group(1)) for r in rows.values() for k in r if (m := LATENCY_COLUMN.match(k))})


def to_markdown(table: CompareReport, evals: dict[str, EvalReport]) -> str:
    rows = table.variants
    ref = table.reference
    names = _metric_columns(table)
    out = [f"# {table.model}: variants compared (reference: {ref}, and PyTorch)", ""]
    if table.flags:
        out += ["## ⚠ Flagged: these numbers cannot be trusted", ""]
        for p, reasons in table.flags.items():
            out += [f"- **{p}**: {r}" for r in reasons]
        out.append("")

    # Accuracy: each task metric with its deltas.
    head = ["variant", "backend", "device"]
    for m in names:
        reads = table.metric_outputs.get(m)
        label = f"{m} ({reads})" if reads and len(table.outputs) > 1 else m
        head += [label, f"Δ{m} vs {ref}", f"Δ{m} vs PyTorch"]
    out += ["## Accuracy", ""]
    if table.primary_metric:
        out += [f"Primary metric: **{table.primary_metric}**.", ""]
    out += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    if table.pytorch:
        cells = ["pytorch", "torch (reference)", "cpu"]
        for m in names:
            cells += [_num(table.pytorch.get(m), 2), "–", "–"]
        out.append("| " + " | ".join(cells) + " |")
    for p, r in rows.items():
        cells = [p + (" ⚠" if r.get("flagged") else ""), f"{r['backend']} {r.get('backend_version') or ''}".strip(),
                 r.get("device", "")]
        for m in names:
            cells += [_num(r.get(m), 2), _num(r.get(f"{m}_delta"), 2, True), _num(r.get(f"{m}_delta_pytorch"), 2, True)]
        out.append("| " + " | ".join(cells) + " |")

    # Agreement on every output, against fp32 and PyTorch.
    head = ["variant", "output", f"top-1 agree vs {ref}", f"cosine vs {ref}", f"min cosine vs {ref}", f"SNR dB vs {ref}",
            f"max abs Δ vs {ref}", "cosine vs PyTorch", "SNR dB vs PyTorch", "max abs Δ vs PyTorch"]
    out += ["", "## Agreement, every output", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for p in rows:
        for name in table.outputs:
            a = table.agreement.get(p, {}).get("fp32", {}).get(name, {})
            t = table.agreement.get(p, {}).get("pytorch", {}).get(name, {})
            agree = _num(a.get("top1_agreement"), 2, pct=True)
            cells = [p, name, agree + (" %" if a.get("top1_agreement") is not None else ""), _num(a.get("cosine"), 6),
                     _num(a.get("cosine_min"), 4), _num(a.get("snr_db"), 1), _num(a.get("max_abs_diff"), 4),
                     _num(t.get("cosine"), 6), _num(t.get("snr_db"), 1), _num(t.get("max_abs_diff"), 4)]
            out.append("| " + " | ".join(cells) + " |")

    # Speed and size: the headline, then every mode.
    batches = _batches(rows)
    head = ["variant"]
    for b in batches:
        head += [f"b{b} p50 ms", f"b{b} p99 ms", f"b{b} /s", f"b{b} speedup", f"b{b} mode"]
    head += ["size KiB", f"size vs {ref}"]
    # No build wall time here: it varies run to run, and this file is a cached output of the
    # evaluations alone; build writes it to artifacts/timings/build-<precision>.json (uncached).
    out += ["", "## Latency and size", "",
            "Per batch size the fastest latency mode, on the device clock where the backend has one "
            "(mode and clock in the `mode` column); every mode below. Build wall times: "
            "`artifacts/timings/build-<precision>.json`.", "",
            "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for p, r in rows.items():
        cells = [p]
        for b in batches:
            sp = r.get(f"b{b}_speedup")
            mode = f"{r.get(f'b{b}_mode', '–')}, {r.get(f'b{b}_timing', '–')}"
            cells += [_num(r.get(f"b{b}_p50_ms"), 3), _num(r.get(f"b{b}_p99_ms"), 3), _num(r.get(f"b{b}_throughput"), 0),
                      (_num(sp, 2) + "x") if sp is not None else "–", mode]
        eb = r.get("engine_bytes")
        cells += [_num(eb / 1024 if eb else None, 1), _num(r.get("size_vs_fp32"), 2) + "x" if r.get("size_vs_fp32") else "–"]
        out.append("| " + " | ".join(cells) + " |")
    out += ["", "| variant | batch | mode | device p50 ms | device p99 ms | host p50 ms | host p99 ms | host /s |",
            "|---|---|---|---|---|---|---|---|"]
    for p, ev in evals.items():
        for lr in ev.latency:
            g = lr.gpu
            out.append(f"| {p} | {lr.batch_size} | {lr.mode} | {_num(g.p50_ms if g else None)} | "
                       f"{_num(g.p99_ms if g else None)} | {_num(lr.host.p50_ms)} | {_num(lr.host.p99_ms)} | "
                       f"{_num(lr.host.throughput_per_s, 0)} |")
        for s in ev.latency_skipped:
            out.append(f"| {p} | {s.get('batch_size')} | skipped: {s.get('reason')} | | | | | |")
    cpu = [b for b in table.backends if b != "tensorrt"]
    if cpu:
        out += ["", f"Latency and INT8 numerics from {', '.join(cpu)} on a CPU: a simulation, not a TensorRT engine measurement."]
    return "\n".join(out) + "\n"


def _metric_columns(table: CompareReport) -> list[str]:
    names: list[str] = list(table.pytorch or {})
    for r in table.variants.values():
        names += [k for k, v in r.items() if k not in names and not RESERVED_COLUMN.match(k) and as_float(v) is not None]
    return names


# --- plots -----------------------------------------------------------------------------


def plot_tradeoff(table: CompareReport, path: Path) -> None:
    """One panel per latency batch size: the primary metric against p50 latency, one point per variant."""
    from ..plots import pyplot

    plt = pyplot("tradeoff.png")
    if plt is None:
        return

    rows = table.variants
    # Without a task metric (unlabelled data), plot agreement with PyTorch instead.
    metric = table.primary_metric or "pytorch_cosine"
    batches = _batches(rows) or [None]
    ref = as_float((table.pytorch or {}).get(metric)) if metric else None
    ys = [y for r in rows.values() if (y := as_float(r.get(metric))) is not None and y == y]
    ys += [ref] if ref is not None else []
    style = {"fp32": ("tab:blue", "o", 110), "fp16": ("tab:orange", "s", 70), "int8": ("tab:green", "^", 70)}
    fig, axes = plt.subplots(1, len(batches), figsize=(5.5 * len(batches), 4.2), dpi=120, squeeze=False)
    for ax, b in zip(axes[0], batches):
        key = f"b{b}_p50_ms"
        for p, r in rows.items():
            x, y = as_float(r.get(key)), as_float(r.get(metric))
            if x is None or y is None or y != y:
                continue
            color, marker, size = style.get(p, (None, "D", 70))
            mode = f", {r.get(f'b{b}_mode')}" if r.get(f"b{b}_mode") else ""
            ax.scatter(x, y, s=size, color=color, marker=marker, zorder=3, alpha=0.85,
                       label=f"{p} ({r['backend']}{mode}){' ⚠' if r.get('flagged') else ''}: {y:.4g}, {x:.3g} ms")
        if ref is not None:
            ax.axhline(ref, color="grey", ls="--", lw=1, label=f"PyTorch: {ref:.4g}")
        if ys:
            lo, hi = min(ys), max(ys)
            pad = max(0.15 * (hi - lo), 0.5 if metric.startswith("top") else 1e-4)
            top = hi + pad
            if metric.startswith("top") and hi <= 100.0:
                top = min(top, 100.0 + pad / 5)
            ax.set_ylim(lo - pad, top)
        timing = rows[next(iter(rows))].get(f"b{b}_timing", "host") if b else "host"
        ax.set_xlabel(f"latency p50 at batch {b}, ms ({timing} clock)" if b else "latency (ms)")
        ax.set_ylabel(metric)
        ax.margins(x=0.2)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="best", fontsize=8)
    sim = " (onnxruntime on CPU: simulated)" if "onnxruntime" in table.backends else ""
    fig.suptitle(f"{table.model}: {metric} vs latency{sim}", fontsize=11)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def latency_points(evals: dict[str, EvalReport]) -> list[dict[str, Any]]:
    """Rows for a DVC bar plot (x: ms, y: variant); one per variant, batch size, mode and percentile."""
    pts = []
    for p, ev in evals.items():
        for lat in ev.latency:
            src, timing = (lat.gpu, "gpu") if lat.gpu is not None else (lat.host, "host")
            for q in ("p50", "p90", "p99"):
                pts.append({
                    "variant": f"{p} b{lat.batch_size} {lat.mode} {q}", "precision": p, "batch_size": lat.batch_size,
                    "mode": lat.mode, "percentile": q, "ms": getattr(src, f"{q}_ms"), "timing": timing,
                    "backend": ev.backend,
                })
    return pts


def load_evals(eval_dir: Path) -> dict[str, EvalReport]:
    evals = {}
    for p in PRECISIONS:
        f = Path(eval_dir) / f"{p}.json"
        not_a_folder(f, f"the evaluation report of {p}", ReportError)  # never skip it silently
        if f.is_file():
            ev = read_report(f, EvalReport, "evaluation report", f"evaluate@{p}", ReportError)
            if ev.precision != p:
                raise ReportError(f"{f}: holds the {ev.precision} evaluation, not {p}; re-run evaluate@{p}")
            evals[p] = ev
    if not evals:
        raise ReportError(f"{eval_dir}: no evaluation reports (fp32.json, fp16.json, int8.json); run evaluate first")
    return evals


def _check_same_inputs(evals: dict[str, EvalReport], eval_dir: Path) -> None:
    """Every evaluation must be of the same model, ONNX and evaluation data."""
    for key, what in (("onnx", "ONNX"), ("eval_data", "evaluation data"), ("reference", "PyTorch reference")):
        seen = {p: ev.sha256.get(key) for p, ev in evals.items()}
        if len(set(seen.values())) > 1:
            detail = ", ".join(f"{p} {str(v)[:12]}…" for p, v in seen.items())
            raise ReportError(f"{eval_dir}: the evaluations used different {what} ({detail}); re-run evaluate for "
                              "every variant (dvc repro)")
    models = {ev.model for ev in evals.values()}
    if len(models) > 1:
        raise ReportError(f"{eval_dir}: evaluations of different models ({', '.join(sorted(models))}); re-run evaluate")


def dvc_metrics(table: CompareReport) -> dict[str, dict[str, float]]:
    """metrics.json, what `dvc exp show` and `dvc metrics diff` list: per variant the primary
    metric, the agreement with fp32 (`agree`: top-1 agreement where the model has it, else
    `cos`: cosine) and p50 latency in ms at each batch size (`b32_ms`); finite numbers only,
    under short names so that the table of `dvc exp show` stays narrow (the full table, with
    its long names, is compare.json)."""
    import math

    out: dict[str, dict[str, float]] = {}
    for variant, row in table.variants.items():
        picked: dict[str, Any] = {}
        if table.primary_metric:
            picked[table.primary_metric] = row.get(table.primary_metric)
        for stat, short in (("top1_agreement", "agree"), ("cosine", "cos")):
            if isinstance(row.get(f"fp32_{stat}"), (int, float)) and not isinstance(row.get(f"fp32_{stat}"), bool):
                picked[short] = row[f"fp32_{stat}"]
                break
        for key, value in row.items():
            m = LATENCY_COLUMN.match(key)
            if m and m.group(2) == "p50":
                picked[f"b{m.group(1)}_ms"] = value
        out[variant] = {k: float(v) for k, v in picked.items()
                        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
    return out


def run(cfg: Config, eval_dir: Path, out_dir: Path) -> CompareReport:
    claim_dir(out_dir, "compare", inputs=(eval_dir,))  # only into an output it owns (fileio.claim_dir)
    evals = load_evals(eval_dir)
    _check_same_inputs(evals, Path(eval_dir))
    table = build_table(evals, cfg.model.name, cfg.evaluate.primary_metric)
    with staging_dir(out_dir) as tmp:
        write_report(tmp / "compare.json", table)
        write_json(tmp / "metrics.json", dvc_metrics(table))
        write_text(tmp / "compare.md", to_markdown(table, evals))
        write_json(tmp / "latency.json", latency_points(evals))
        plot_tradeoff(table, tmp / "tradeoff.png")
    return table


__all__ = ["run", "build_table", "to_markdown", "load_evals", "SCHEMA_VERSION", "REFERENCE", "AGREEMENT_STATS"]
