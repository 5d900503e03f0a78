"""compare: the variants side by side. compare.json (DVC metrics), compare.md (tables),
tradeoff.png (accuracy against latency) and latency.json (DVC plot of percentiles).

compare.json is `{schema_version, model, reference, backends, primary_metric, pytorch,
variants: {<precision>: row}}` with one flat row of numbers per variant, so that
`dvc metrics show/diff` lists e.g. `variants.int8.top1_delta`:

- task metrics (`top1`, user metrics ...), `<m>_delta` against the fp32 variant and
  `<m>_delta_pytorch` against the same metric on PyTorch's outputs;
- agreement on the first output: `fp32_<stat>` (not in the fp32 row itself) and
  `pytorch_<stat>` for cosine, cosine_min, max_abs_diff, mean_abs_diff, rel_l2, snr_db,
  top1_agreement;
- latency per batch size B: `bB_p50_ms`, `bB_p90_ms`, `bB_p99_ms`, `bB_mean_ms`,
  `bB_throughput`, `bB_speedup` (fp32 p50 / this p50); GPU time where the backend gives
  it, then `bB_e2e_p50_ms` is the host end-to-end time;
- `engine_bytes`, `size_vs_fp32`, `build_seconds`, and `backend`, `device`, `timing`.

Infinite values (an SNR of identical outputs) are written as the string "inf"."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Optional

from ..config import PRECISIONS, Config
from ..errors import ReportError
from ..fileio import read_json, staging_dir, write_json, write_text
from ..metrics import as_float, json_number

SCHEMA_VERSION = 1  # compare.json; the gate refuses any other
EVAL_SCHEMA_VERSION = 1  # eval/<precision>.json, as written by evaluate
REFERENCE = "fp32"
AGREEMENT_STATS = ("cosine", "cosine_min", "max_abs_diff", "mean_abs_diff", "rel_l2", "snr_db", "top1_agreement")
LATENCY_STATS = ("p50", "p90", "p99", "mean")
_LAT_KEY = re.compile(r"^b(\d+)_(p50|p90|p99|mean)_ms$")
# Row keys that are not task metrics (a user metric must not take one of these names).
_RESERVED = re.compile(
    r"^(backend|backend_version|device|timing|engine_bytes|size_vs_fp32|build_seconds|samples"
    r"|(fp32|pytorch)_.*|b\d+_.*|.*_delta|.*_delta_pytorch)$"
)


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


def _row(ev: dict[str, Any], is_reference: bool) -> dict[str, Any]:
    first = next(iter(ev["agreement_fp32"]))
    row: dict[str, Any] = {
        "backend": ev["backend"],
        "backend_version": ev.get("backend_version"),
        "device": device_name(ev.get("device") or {}),
    }
    for k, v in ev.get("metrics", {}).items():
        if _RESERVED.match(k):
            raise ReportError(f"task metric '{k}' ({ev.get('precision')}) clashes with a compare.json column; rename it")
        row[k] = v
    if not is_reference:
        row.update({f"fp32_{k}": v for k, v in ev["agreement_fp32"][first].items() if k in AGREEMENT_STATS})
    torch_agree = ev.get("agreement_pytorch", {}).get(first, {})
    row.update({f"pytorch_{k}": v for k, v in torch_agree.items() if k in AGREEMENT_STATS})
    gpu_timed = False
    for lat in ev.get("latency", []):
        b = lat["batch_size"]
        src = lat.get("gpu", lat)
        gpu_timed |= "gpu" in lat
        for q in LATENCY_STATS:
            row[f"b{b}_{q}_ms"] = src[f"{q}_ms"]
        row[f"b{b}_throughput"] = src["throughput_per_s"]
        if "gpu" in lat:
            row[f"b{b}_e2e_p50_ms"] = lat["p50_ms"]
    row["timing"] = "gpu" if gpu_timed else "host"
    row["engine_bytes"] = ev.get("engine_bytes")
    row["build_seconds"] = ev.get("build_seconds")
    return row


def task_metric_names(evals: dict[str, dict[str, Any]]) -> list[str]:
    names: list[str] = []
    for ev in evals.values():
        names += [k for k in ev.get("metrics", {}) if k not in names]
    return names


def build_table(evals: dict[str, dict[str, Any]], primary_metric: Optional[str] = None) -> dict[str, Any]:
    if REFERENCE not in evals:
        raise ReportError(f"compare needs the {REFERENCE} evaluation as its reference; it is missing")
    rows = {p: _row(ev, p == REFERENCE) for p, ev in evals.items()}
    ref = rows[REFERENCE]
    names = task_metric_names(evals)
    pytorch = dict(evals[REFERENCE].get("reference_metrics", {}).get("pytorch", {}))
    for p, row in rows.items():
        for m in names:
            v = as_float(row.get(m))
            if v is None:
                continue
            if as_float(ref.get(m)) is not None:
                row[f"{m}_delta"] = v - as_float(ref[m])
            if as_float(pytorch.get(m)) is not None:
                row[f"{m}_delta_pytorch"] = v - float(pytorch[m])
        for k in [k for k in row if _LAT_KEY.match(k)]:
            b, q = _LAT_KEY.match(k).groups()
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
    backends = sorted({r["backend"] for r in rows.values()})
    table = {
        "schema_version": SCHEMA_VERSION,
        "reference": REFERENCE,
        "backends": backends,
        "primary_metric": primary_metric,
        "pytorch": pytorch,
        "variants": rows,
    }
    return _jsonable(table)


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_jsonable(v) for v in obj]
    return json_number(obj)


# --- compare.md ----------------------------------------------------------------------


def _num(v: Any, nd: int = 3, signed: bool = False, pct: bool = False) -> str:
    f = as_float(v)
    if f is None:
        return "–"
    if f != f or f in (float("inf"), float("-inf")):
        return str(v)
    f = 100 * f if pct else f
    return f"{f:+.{nd}f}" if signed else f"{f:.{nd}f}"


def _batches(rows: dict[str, dict[str, Any]]) -> list[int]:
    return sorted({int(m.group(1)) for r in rows.values() for k in r if (m := _LAT_KEY.match(k))})


def to_markdown(table: dict[str, Any], model: str) -> str:
    rows = table["variants"]
    ref = table["reference"]
    names = _metric_columns(table)
    out = [f"# {model}: variants compared (reference: {ref}, and PyTorch)", ""]

    # Accuracy: each task metric with its deltas.
    head = ["variant", "backend", "device"]
    for m in names:
        head += [m, f"Δ{m} vs {ref}", f"Δ{m} vs PyTorch"]
    out += ["## Accuracy", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    if table.get("pytorch"):
        cells = ["pytorch", "torch (reference)", "cpu"]
        for m in names:
            cells += [_num(table["pytorch"].get(m), 2), "–", "–"]
        out.append("| " + " | ".join(cells) + " |")
    for p, r in rows.items():
        cells = [p, f"{r['backend']} {r.get('backend_version') or ''}".strip(), r.get("device", "")]
        for m in names:
            cells += [_num(r.get(m), 2), _num(r.get(f"{m}_delta"), 2, True), _num(r.get(f"{m}_delta_pytorch"), 2, True)]
        out.append("| " + " | ".join(cells) + " |")

    # Agreement on the first output, against fp32 and PyTorch.
    head = ["variant", f"top-1 agree vs {ref}", f"cosine vs {ref}", f"SNR dB vs {ref}", f"max abs Δ vs {ref}",
            "top-1 agree vs PyTorch", "cosine vs PyTorch", "SNR dB vs PyTorch", "max abs Δ vs PyTorch"]
    out += ["", "## Agreement (first output)", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for p, r in rows.items():
        cells = [p]
        for src in (ref, "pytorch"):
            cells += [
                _num(r.get(f"{src}_top1_agreement"), 2, pct=True) + (" %" if f"{src}_top1_agreement" in r else ""),
                _num(r.get(f"{src}_cosine"), 6), _num(r.get(f"{src}_snr_db"), 1), _num(r.get(f"{src}_max_abs_diff"), 4),
            ]
        out.append("| " + " | ".join(cells) + " |")

    # Speed and size.
    batches = _batches(rows)
    head = ["variant", "timing"]
    for b in batches:
        head += [f"b{b} p50 ms", f"b{b} p99 ms", f"b{b} /s", f"b{b} speedup"]
    head += ["size KiB", f"size vs {ref}", "build s"]
    out += ["", "## Latency, size, build time", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for p, r in rows.items():
        cells = [p, r.get("timing", "")]
        for b in batches:
            sp = r.get(f"b{b}_speedup")
            cells += [_num(r.get(f"b{b}_p50_ms"), 3), _num(r.get(f"b{b}_p99_ms"), 3), _num(r.get(f"b{b}_throughput"), 0),
                      (_num(sp, 2) + "x") if sp is not None else "–"]
        eb = r.get("engine_bytes")
        cells += [_num(eb / 1024 if eb else None, 1), _num(r.get("size_vs_fp32"), 2) + "x" if r.get("size_vs_fp32") else "–",
                  _num(r.get("build_seconds"), 2)]
        out.append("| " + " | ".join(cells) + " |")
    cpu = [b for b in table["backends"] if b != "tensorrt"]
    if cpu:
        out += ["", f"Latency and INT8 numerics from {', '.join(cpu)} on a CPU: a simulation, not a TensorRT engine measurement."]
    if any(r.get("timing") == "gpu" for r in rows.values()):
        out += ["", "GPU-timed rows: CUDA events around the engine alone; `bB_e2e_p50_ms` in compare.json adds the copies."]
    return "\n".join(out) + "\n"


def _metric_columns(table: dict[str, Any]) -> list[str]:
    names: list[str] = list(table.get("pytorch") or {})
    for r in table["variants"].values():
        names += [k for k, v in r.items() if k not in names and not _RESERVED.match(k) and as_float(v) is not None]
    return names


# --- plots -----------------------------------------------------------------------------


def plot_tradeoff(table: dict[str, Any], path: Path, model: str) -> None:
    """One panel per latency batch size: the primary metric against p50 latency, one point per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = table["variants"]
    # Without a task metric (unlabelled data), plot agreement with PyTorch instead.
    metric = table.get("primary_metric") or "pytorch_cosine"
    batches = _batches(rows) or [None]
    ref = as_float((table.get("pytorch") or {}).get(metric)) if metric else None
    ys = [y for r in rows.values() if metric and (y := as_float(r.get(metric))) is not None] + ([ref] if ref is not None else [])
    style = {"fp32": ("tab:blue", "o", 110), "fp16": ("tab:orange", "s", 70), "int8": ("tab:green", "^", 70)}
    timing = "GPU" if any(r.get("timing") == "gpu" for r in rows.values()) else "host"
    fig, axes = plt.subplots(1, len(batches), figsize=(5.5 * len(batches), 4.2), dpi=120, squeeze=False)
    for ax, b in zip(axes[0], batches):
        key = f"b{b}_p50_ms"
        for p, r in rows.items():
            x, y = as_float(r.get(key)), as_float(r.get(metric)) if metric else None
            if x is None or y is None:
                continue
            color, marker, size = style.get(p, (None, "D", 70))
            ax.scatter(x, y, s=size, color=color, marker=marker, zorder=3, alpha=0.85,
                       label=f"{p} ({r['backend']}): {y:.2f}, {x:.3g} ms")
        if ref is not None:
            ax.axhline(ref, color="grey", ls="--", lw=1, label=f"PyTorch: {ref:.2f}")
        if ys:
            lo, hi = min(ys), max(ys)
            pad = max(0.15 * (hi - lo), 0.5)
            top = hi + pad
            if metric and metric.startswith("top") and hi <= 100.0:
                top = min(top, 100.0 + pad / 5)
            ax.set_ylim(lo - pad, top)
        ax.set_xlabel(f"latency p50 at batch {b}, ms ({timing} timing)" if b else "latency (ms)")
        ax.set_ylabel(metric or "accuracy")
        ax.margins(x=0.2)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="best", fontsize=8)
    sim = " (onnxruntime on CPU: simulated)" if "onnxruntime" in table.get("backends", []) else ""
    fig.suptitle(f"{model}: {metric or 'accuracy'} vs latency{sim}", fontsize=11)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def latency_points(evals: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows for a DVC bar plot (x: ms, y: variant); one per variant, batch size and percentile."""
    pts = []
    for p, ev in evals.items():
        for lat in ev.get("latency", []):
            src = lat.get("gpu", lat)
            b = lat["batch_size"]
            for q in ("p50", "p90", "p99"):
                pts.append({
                    "variant": f"{p} b{b} {q}", "precision": p, "batch_size": b, "percentile": q,
                    "ms": src[f"{q}_ms"], "timing": "gpu" if "gpu" in lat else "host", "backend": ev["backend"],
                })
    return pts


def load_evals(eval_dir: Path) -> dict[str, dict[str, Any]]:
    evals = {}
    for p in PRECISIONS:
        f = Path(eval_dir) / f"{p}.json"
        if f.is_file():
            ev = read_json(f, "evaluation report")
            if ev.get("schema_version") != EVAL_SCHEMA_VERSION:
                raise ReportError(
                    f"{f}: schema_version {ev.get('schema_version')} but this trtpipe reads {EVAL_SCHEMA_VERSION}; re-run evaluate"
                )
            if ev.get("precision", p) != p:
                raise ReportError(f"{f}: holds the {ev.get('precision')} evaluation, not {p}; re-run evaluate@{p}")
            evals[p] = ev
    if not evals:
        raise ReportError(f"{eval_dir}: no evaluation reports (fp32.json, fp16.json, int8.json); run evaluate first")
    return evals


def run(cfg: Config, eval_dir: Path, out_dir: Path) -> dict[str, Any]:
    evals = load_evals(eval_dir)
    models = {ev.get("model") for ev in evals.values()} - {None}
    if len(models) > 1:
        raise ReportError(f"{eval_dir}: evaluations of different models ({', '.join(sorted(models))}); re-run evaluate")
    table = build_table(evals, cfg.evaluate.primary_metric)
    table = {"schema_version": table.pop("schema_version"), "model": cfg.model.name, **table}
    with staging_dir(out_dir) as tmp:
        write_json(tmp / "compare.json", table)
        write_text(tmp / "compare.md", to_markdown(table, cfg.model.name))
        write_json(tmp / "latency.json", latency_points(evals))
        plot_tradeoff(table, tmp / "tradeoff.png", cfg.model.name)
    return table
