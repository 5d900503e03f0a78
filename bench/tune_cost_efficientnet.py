"""`trtpipe tune` with `objective: cost` on EfficientNet-Lite0 (real ImageNet weights) on a CPU: the
roofline estimate (pipeline/tuning/cost.py) and the contiguity step (Tuner.fill_gaps) on a real
depthwise network. The project is bench/tune_efficientnet.py's (prepare .. calibrate reused from
``--work`` when there); tune runs with the config's budget (top-1 agreement >= 99% on 256 crops),
strategy sensitivity, objective cost. Reports the kept layers, their INT8 <-> float boundaries, the
estimated cost of the result against full INT8 and all layers kept (FP16), the candidates the
contiguity step tried, and the wall time. Estimates only: no engine is built or timed here.

    nice -n 5 .venv/bin/python bench/tune_cost_efficientnet.py   # about 15 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "trtpipe_tune_efficientnet")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "tune_cost_efficientnet_lite0_cpu.json")
    a = ap.parse_args()
    out = a.out.resolve()

    from tune_efficientnet import project

    cfg, A, seconds = project(a.work.resolve(), fresh=False, tune_too=False)

    from calibration.ort_session import cpu_summary
    from pipeline.stages import tune
    from pipeline.stages.tune import TuneBudgetError
    from pipeline.tuning.cost import boundaries
    from pipeline.tuning.layers import Layer

    c = cfg.model_copy(update={"tune": cfg.tune.model_copy(update={"strategy": "sensitivity", "objective": "cost"})})
    t0 = time.perf_counter()
    try:
        tune.run(c, A / "export/model.onnx", A / "calibrate", A / "prepare/eval.npz", A / "tune_cost_roofline")
    except TuneBudgetError as e:
        print(f"[bench] {e}")
    seconds["tune_cost"] = round(time.perf_counter() - t0, 1)
    rep = json.loads((A / "tune_cost_roofline/tune.json").read_text())
    layers = [Layer(x["name"], x["op_type"], x["index"], tuple(x["nodes"]), x["macs"], x.get("forced_float"),
                    x["out_elements"], x["in_elements"], x["weight_elements"]) for x in rep["layers"]]
    kept = [k["layer"] for k in rep["kept"]]
    rp = rep["reference_points"]
    contiguous = [x for x in rep["candidates"] if x["phase"] == "contiguous"]
    result = {
        "model": "efficientnet-lite0 (ImageNet weights)", "where": f"CPU: {cpu_summary()}",
        "estimate": rep["latency_model"], "budget": rep["budget"]["text"] if isinstance(rep["budget"], dict) else rep["budget"],
        "kept": kept, "kept_count": len(kept), "layers": len(layers), "boundaries": len(boundaries(layers, kept)),
        "top1_agreement": rp["chosen"]["metric_full"], "meets_budget": rp["chosen"]["meets_full"],
        "estimated_ns_per_sample": {"chosen": rp["chosen"]["cost"], "full_int8": rp["full_int8"]["cost"],
                                    "all_kept_fp16": rp["float"]["cost"]},
        "chosen_vs_fp16": round(rp["chosen"]["cost"] / rp["float"]["cost"], 4),
        "contiguity": {"tried": len(contiguous), "met_and_cheaper_kept": [x["kept"] for x in contiguous][-1:]},
        "candidates": len(rep["candidates"]), "stop_reason": rep["search"]["stop_reason"], "seconds": seconds,
    }
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: result[k] for k in ("kept_count", "boundaries", "top1_agreement", "estimated_ns_per_sample",
                                              "chosen_vs_fp16", "contiguity", "candidates", "seconds")}, indent=1))


if __name__ == "__main__":
    main()
