"""compare: the variants side by side. compare.json (DVC metrics), compare.md (table),
tradeoff.png (accuracy against latency) and latency.json (DVC plot of percentiles)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..config import PRECISIONS, Config
from ..errors import ReportError
from ..fileio import read_json, staging_dir, write_json, write_text

SCHEMA_VERSION = 1
REFERENCE = "fp32"


def _row(ev: dict[str, Any]) -> dict[str, Any]:
    first = next(iter(ev["agreement_fp32"]))
    fp32_agree = ev["agreement_fp32"][first]
    torch_agree = ev.get("agreement_pytorch", {}).get(first, {})
    row: dict[str, Any] = {"backend": ev["backend"], "backend_version": ev.get("backend_version")}
    row.update(ev.get("metrics", {}))
    row.update({f"fp32_{k}": v for k, v in fp32_agree.items() if k in ("cosine", "max_abs_diff", "top1_agreement", "snr_db")})
    row.update({f"pytorch_{k}": v for k, v in torch_agree.items() if k in ("cosine", "max_abs_diff", "top1_agreement")})
    for lat in ev.get("latency", []):
        b = lat["batch_size"]
        src = lat.get("gpu", lat)
        row[f"b{b}_p50_ms"] = src["p50_ms"]
        row[f"b{b}_p99_ms"] = src["p99_ms"]
        row[f"b{b}_throughput"] = src["throughput_per_s"]
        if "gpu" in lat:
            row[f"b{b}_e2e_p50_ms"] = lat["p50_ms"]
    row["engine_bytes"] = ev.get("engine_bytes")
    row["build_seconds"] = ev.get("build_seconds")
    return row


def build_table(evals: dict[str, dict[str, Any]]) -> dict[str, Any]:
    if REFERENCE not in evals:
        raise ReportError(f"compare needs the {REFERENCE} evaluation as its reference; it is missing")
    rows = {p: _row(ev) for p, ev in evals.items()}
    ref = rows[REFERENCE]
    for p, row in rows.items():
        for k in list(row):
            if k.startswith("top") and isinstance(row[k], float):
                row[f"{k}_delta"] = row[k] - ref[k]
            if k.endswith("_p50_ms") and not k.endswith("e2e_p50_ms") and ref.get(k):
                row[k.replace("_p50_ms", "_speedup")] = ref[k] / row[k]
    backends = sorted({r["backend"] for r in rows.values()})
    return {"schema_version": SCHEMA_VERSION, "reference": REFERENCE, "backends": backends, "variants": rows}


def _fmt(v: Any, nd: int = 3) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:+.{nd}f}" if nd < 0 else f"{v:.{nd}f}"
    return str(v)


def to_markdown(table: dict[str, Any], model: str) -> str:
    rows = table["variants"]
    batches = sorted({int(k[1:].split("_")[0]) for r in rows.values() for k in r if k.startswith("b") and k.endswith("_p50_ms") and "e2e" not in k})
    head = ["variant", "backend", "top1 %", "Δtop1", "top1 agree vs fp32", "cosine vs fp32", "max |Δ| vs fp32"]
    head += [f"b{b} p50 ms" for b in batches] + [f"b{b} speedup" for b in batches] + ["size KiB", "build s"]
    lines = [f"# {model}: variants compared (reference: {table['reference']})", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for p, r in rows.items():
        cells = [
            p, f"{r['backend']} {r.get('backend_version') or ''}".strip(), _fmt(r.get("top1"), 2),
            f"{r['top1_delta']:+.2f}" if "top1_delta" in r else "–",
            _fmt(100 * r["fp32_top1_agreement"], 2) + " %" if "fp32_top1_agreement" in r else "–",
            _fmt(r.get("fp32_cosine"), 6), _fmt(r.get("fp32_max_abs_diff"), 4),
        ]
        cells += [_fmt(r.get(f"b{b}_p50_ms"), 3) for b in batches]
        cells += [_fmt(r.get(f"b{b}_speedup"), 2) + "x" if r.get(f"b{b}_speedup") else "–" for b in batches]
        cells += [_fmt((r.get("engine_bytes") or 0) / 1024, 1), _fmt(r.get("build_seconds"), 2)]
        lines.append("| " + " | ".join(cells) + " |")
    cpu = [b for b in table["backends"] if b != "tensorrt"]
    if cpu:
        lines += ["", f"Latency and INT8 numerics from {', '.join(cpu)} on a CPU: a simulation, not a TensorRT engine measurement."]
    return "\n".join(lines) + "\n"


def plot_tradeoff(table: dict[str, Any], path: Path, model: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = table["variants"]
    lat_key = max((k for r in rows.values() for k in r if k.endswith("_p50_ms") and "e2e" not in k), key=lambda k: int(k[1:].split("_")[0]), default=None)
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for p, r in rows.items():
        if lat_key and lat_key in r and "top1" in r:
            ax.scatter(r[lat_key], r["top1"], s=60)
            ax.annotate(f"{p} ({r['backend']})", (r[lat_key], r["top1"]), textcoords="offset points", xytext=(6, 4))
    ax.set_xlabel(f"latency p50, {lat_key.split('_')[0]} (ms)" if lat_key else "latency (ms)")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title(f"{model}: accuracy vs latency")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def latency_points(evals: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    pts = []
    for p, ev in evals.items():
        for lat in ev.get("latency", []):
            src = lat.get("gpu", lat)
            for q in ("p50", "p90", "p99"):
                pts.append({"variant": f"{p}-b{lat['batch_size']}", "percentile": q, "ms": src[f"{q}_ms"]})
    return pts


def run(cfg: Config, eval_dir: Path, out_dir: Path) -> dict[str, Any]:
    evals = {}
    for p in PRECISIONS:
        f = Path(eval_dir) / f"{p}.json"
        if f.is_file():
            ev = read_json(f, "evaluation report")
            if ev.get("schema_version") != SCHEMA_VERSION:
                raise ReportError(f"{f}: schema_version {ev.get('schema_version')} but this trtpipe reads {SCHEMA_VERSION}; re-run evaluate")
            evals[p] = ev
    table = build_table(evals)
    table["model"] = cfg.model.name
    with staging_dir(out_dir) as tmp:
        write_json(tmp / "compare.json", table)
        write_text(tmp / "compare.md", to_markdown(table, cfg.model.name))
        write_json(tmp / "latency.json", latency_points(evals))
        plot_tradeoff(table, tmp / "tradeoff.png", cfg.model.name)
    return table
