"""The side-by-side of TensorRT's routes (bench/device_session.sh routes) as one JSON and a Markdown table:
per model and variant, agreement with the FP32 engine and with PyTorch (top-1 agreement and cosine of the
first output with more than one value per sample, or the output a task metric reads), latency p50 at each
batch size (GPU clock), build seconds and engine bytes; then the issue's checks: FP16 from the typed ONNX
against the flag (agreement and latency within 3%), explicit INT8 against implicit and against the
simulation (top-1 agreement with FP32 within 0.5 points of the simulation, latency <= implicit; with the
number of evaluation samples, and how many samples' top-1 the gap is: at 128 samples one flip is 0.78 points).

    python bench/routes_table.py DIR/routes --out bench/results/routes_h100.json --md bench/results/routes_h100.md
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Optional

VARIANTS = ("fp32", "fp16_flag", "fp16_typed", "int8_implicit", "int8_explicit", "int8_sim")


def _output(ev: dict[str, Any]) -> str:
    agree = ev["agreement_pytorch"]
    with_top1 = [o for o, a in agree.items() if a.get("top1_agreement") is not None]
    return (with_top1 or list(agree))[0]


def _row(d: Path, var: str, output: Optional[str]) -> Optional[dict[str, Any]]:
    p = d / f"eval_{var}.json"
    if not p.is_file():
        return None
    ev = json.loads(p.read_text())
    out = output or _output(ev)
    b = json.loads((d / f"build_{var}.json").read_text()) if (d / f"build_{var}.json").is_file() else {}
    det = b.get("details") or {}
    lat = {str(x["batch_size"]): round(x["gpu"]["p50_ms"], 4) for x in ev.get("latency") or [] if x.get("gpu")}
    f32, pt = (ev.get("agreement_fp32") or {}).get(out, {}), ev["agreement_pytorch"].get(out, {})
    return {"output": out, "backend": ev.get("backend"), "metrics": ev.get("metrics"), "samples": ev.get("samples"),
            "top1_vs_fp32": f32.get("top1_agreement"), "cosine_vs_fp32": f32.get("cosine"),
            "top1_vs_pytorch": pt.get("top1_agreement"), "cosine_vs_pytorch": pt.get("cosine"),
            "gpu_p50_ms": lat, "engine_bytes": ev.get("engine_bytes"), "build_seconds": b.get("build_seconds"),
            "route": det.get("int8_route"), "strongly_typed": det.get("strongly_typed"),
            "flags": det.get("precision_flags_set"), "typed_onnx": (det.get("typed_onnx") or {}).get("file"),
            "qdq_edit": sorted(det.get("qdq_edit") or {}), "flags_raised": ev.get("flags")}


def _within(a: Optional[float], b: Optional[float], rel: float) -> Optional[bool]:
    return None if a is None or b is None else abs(a - b) <= rel * b


def checks(rows: dict[str, dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    f, t = rows.get("fp16_flag"), rows.get("fp16_typed")
    if f and t:
        out["fp16_typed_vs_flag"] = {
            "top1_vs_fp32": [t["top1_vs_fp32"], f["top1_vs_fp32"]], "cosine_vs_fp32": [t["cosine_vs_fp32"], f["cosine_vs_fp32"]],
            "latency_within_3pct": {bs: _within(t["gpu_p50_ms"].get(bs), f["gpu_p50_ms"].get(bs), 0.03) for bs in f["gpu_p50_ms"]}}
    i, e, s = rows.get("int8_implicit"), rows.get("int8_explicit"), rows.get("int8_sim")
    if e and s:
        gap = None if e["top1_vs_pytorch"] is None or s["top1_vs_pytorch"] is None else \
            round(100 * (e["top1_vs_pytorch"] - s["top1_vs_pytorch"]), 3)
        n = e.get("samples") or 0
        out["explicit_vs_simulation"] = {"top1_vs_pytorch_points": gap, "within_0.5_points": None if gap is None else abs(gap) <= 0.5,
                                         # one sample's flip in points: at 128 samples 0.78, so within 0.5 means equal
                                         "samples": n, "one_sample_points": round(100 / n, 3) if n else None,
                                         "samples_apart": None if gap is None or not n else round(abs(gap) * n / 100),
                                         "cosine_vs_pytorch": [e["cosine_vs_pytorch"], s["cosine_vs_pytorch"]]}
    if e and i:
        out["explicit_vs_implicit"] = {
            "top1_vs_pytorch": [e["top1_vs_pytorch"], i["top1_vs_pytorch"]],
            "latency_le_implicit": {bs: (None if e["gpu_p50_ms"].get(bs) is None else e["gpu_p50_ms"][bs] <= v)
                                    for bs, v in i["gpu_p50_ms"].items()},
            "latency_ratio": {bs: round(e["gpu_p50_ms"][bs] / v, 3) for bs, v in i["gpu_p50_ms"].items() if bs in e["gpu_p50_ms"]}}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dir", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--md", type=Path)
    a = ap.parse_args()
    res: dict[str, Any] = {}
    for d in sorted(p for p in a.dir.iterdir() if p.is_dir()):
        first = json.loads((d / "eval_fp32.json").read_text()) if (d / "eval_fp32.json").is_file() else None
        output = _output(first) if first else None
        rows = {v: r for v in VARIANTS if (r := _row(d, v, output)) is not None}
        res[d.name] = {"variants": rows, "checks": checks(rows)}
    a.out.write_text(json.dumps(res, indent=2) + "\n")
    if a.md:
        lines = ["| model | variant | top-1 vs FP32 | cos vs FP32 | top-1 vs PyTorch | cos vs PyTorch | GPU p50 ms (b1 / bN) | engine bytes |",
                 "|---|---|---|---|---|---|---|---|"]
        fmt = lambda v, p=4: "-" if v is None else (f"{100 * v:.2f}%" if p == "%" else f"{v:.{p}f}")  # noqa: E731
        for m, r in res.items():
            for v, row in r["variants"].items():
                lat = " / ".join(f"{x:.3f}" for x in row["gpu_p50_ms"].values()) if row["gpu_p50_ms"] else "-"
                lines.append(f"| {m} | {v} | {fmt(row['top1_vs_fp32'], '%')} | {fmt(row['cosine_vs_fp32'], 6)} | "
                             f"{fmt(row['top1_vs_pytorch'], '%')} | {fmt(row['cosine_vs_pytorch'], 6)} | "
                             f"{lat if row['backend'] == 'tensorrt' else 'CPU'} | {row['engine_bytes'] or '-'} |")
        a.md.write_text("\n".join(lines) + "\n\n```json\n" + json.dumps({m: r["checks"] for m, r in res.items()}, indent=1)
                        + "\n```\n")


if __name__ == "__main__":
    main()
