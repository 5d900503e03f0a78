"""tune.png: the budget's metric against cost for every candidate tried, the accuracy-cost
frontier through them (search samples), and full INT8, all layers kept (the FP16 point when
`tune.keep_precision` is fp16) and the chosen point measured on the full evaluation set,
with the budget's threshold. The x axis says whether cost is an estimate (CPU) or TensorRT
latency (GPU)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence


def plot_frontier(path: Path, *, model: str, candidates: Sequence[Mapping[str, Any]], frontier: Sequence[int],
                  points: Mapping[str, Mapping[str, Any]], budget_text: str, threshold_full: float, metric: str,
                  cost_label: str, backend: str) -> None:
    from ..plots import pyplot

    plt = pyplot("tune.png")
    if plt is None:
        return

    fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=120)
    pts = [c for c in candidates if c.get("metric") is not None and c["metric"] == c["metric"]
           and c["cost"] == c["cost"]]
    if pts:
        ax.scatter([c["cost"] for c in pts], [c["metric"] for c in pts], s=14, color="tab:gray", alpha=0.45,
                   label=f"candidates tried ({len(candidates)}; search samples)", zorder=2)
    by_id = {c["id"]: c for c in candidates}
    front = [by_id[i] for i in frontier if i in by_id]
    if front:
        ax.plot([c["cost"] for c in front], [c["metric"] for c in front], "-", color="tab:blue", lw=1.4,
                marker="o", ms=4, label="frontier (search samples)", zorder=3)
    style = {"full_int8": ("tab:red", "^", "full INT8"), "float": ("tab:orange", "s", "all layers kept"),
             "chosen": ("tab:green", "*", "chosen")}
    for key, p in points.items():
        if p.get("metric_full") is None or p.get("cost") != p.get("cost"):
            continue
        color, marker, label = style.get(key, ("black", "D", key))
        label = p.get("label", label)
        ax.scatter([p["cost"]], [p["metric_full"]], s=160 if key == "chosen" else 80, color=color, marker=marker,
                   edgecolor="black", linewidth=0.6, zorder=5,
                   label=f"{label}: {p['metric_full']:.4g}, {p['cost']:.4g} ({len(p.get('kept', []))} kept; full set)")
    if threshold_full == threshold_full:
        ax.axhline(threshold_full, color="tab:green", ls="--", lw=1, label=f"budget: {budget_text}")
    ax.set_xlabel(cost_label, fontsize=8)
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=7)
    where = "onnxruntime Q/DQ simulation on a CPU" if backend == "onnxruntime" else "TensorRT engines"
    ax.set_title(f"{model}: {metric} vs cost per candidate\n({where})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
