"""Does calibrate's weight-side PTQ (GPTQ rounding + bias correction, carried into tune's
candidates) let `trtpipe tune` keep fewer layers out of INT8? EfficientNet-Lite0 (real ImageNet
weights) on a CPU, side by side in one run: the project of bench/tune_efficientnet.py
(prepare .. calibrate reused from ``--work``), then for each recipe calibrate (its own folder)
and tune with the config's budget (top-1 agreement >= 99% on 256 crops), strategy sensitivity,
objective cost (the roofline estimate of pipeline/tuning/cost.py). Reports per recipe: full
INT8's agreement, the kept layers, their INT8 <-> float boundaries, the estimated cost against
all layers kept in FP16, candidates and wall time. Estimates only: no engine is built here.

    nice -n 5 .venv/bin/python bench/tune_weight_ptq.py      # about 12 minutes on 2 cores
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

RECIPES = {
    "entropy": {},  # calibrate's default: what tune used before
    "minmax+gptq+bc": {"method": "minmax", "weight_rounding": "gptq", "bias_correction": True},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "trtpipe_tune_efficientnet")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "tune_weight_ptq_efficientnet_lite0_cpu.json")
    ap.add_argument("--recipes", default=",".join(RECIPES))
    a = ap.parse_args()
    out = a.out.resolve()

    from tune_efficientnet import project

    cfg, A, seconds = project(a.work.resolve(), fresh=False, tune_too=False)

    from calibration.ort_session import cpu_summary
    from pipeline.stages import calibrate, tune
    from pipeline.stages.tune import TuneBudgetError
    from pipeline.tuning.cost import boundaries
    from pipeline.tuning.layers import Layer

    results = {}
    for name in a.recipes.split(","):
        cal = cfg.calibration.model_copy(update=RECIPES[name])
        c = cfg.model_copy(update={"calibration": cal, "tune": cfg.tune.model_copy(
            update={"strategy": "sensitivity", "objective": "cost"})})
        calib_dir = A / "calibrate" if not RECIPES[name] else A / f"calibrate_{name}"
        t0 = time.perf_counter()
        if RECIPES[name] and not (calib_dir / "calibrate.json").is_file():
            calibrate.run(c, A / "export/model.onnx", A / "prepare/calib.npz", calib_dir, progress=False)
        t1 = time.perf_counter()
        tune_dir = A / f"tune_wptq_{name}"
        try:
            tune.run(c, A / "export/model.onnx", calib_dir, A / "prepare/eval.npz", tune_dir, progress=False)
        except TuneBudgetError as e:
            print(f"[bench] {name}: {e}")
        t2 = time.perf_counter()
        rep = json.loads((tune_dir / "tune.json").read_text())
        layers = [Layer(x["name"], x["op_type"], x["index"], tuple(x["nodes"]), x["macs"], x.get("forced_float"),
                        x["out_elements"], x["in_elements"], x["weight_elements"]) for x in rep["layers"]]
        kept = [k["layer"] for k in rep["kept"]]
        rp = rep["reference_points"]
        results[name] = {
            "calibration": {**RECIPES[name]} or {"method": cfg.calibration.method},
            "weights_in_candidates": rep["methods"].get("weights"),
            "full_int8_top1_agreement": rp["full_int8"]["metric_full"],
            "kept_count": len(kept), "layers": len(layers), "boundaries": len(boundaries(layers, kept)),
            "top1_agreement": rp["chosen"]["metric_full"], "meets_budget": rp["chosen"]["meets_full"],
            "estimated_ns_per_sample": {"chosen": rp["chosen"]["cost"], "full_int8": rp["full_int8"]["cost"],
                                        "all_kept_fp16": rp["float"]["cost"]},
            "chosen_vs_fp16": round(rp["chosen"]["cost"] / rp["float"]["cost"], 4),
            "candidates": len(rep["candidates"]), "stop_reason": rep["search"]["stop_reason"], "kept": kept,
            "seconds": {"calibrate": round(t1 - t0, 1), "tune": round(t2 - t1, 1)},
        }
        print(f"[bench] {name}: " + json.dumps({k: v for k, v in results[name].items() if k != "kept"}), flush=True)
    doc = {"model": "efficientnet-lite0 (ImageNet weights)", "where": f"CPU: {cpu_summary()}",
           "data": "256 held-out random crops of scikit-image's sample photos (eval), 512 other crops (calibration)",
           "budget": "top1_agreement >= 0.99 (the config's)", "objective": "cost (roofline estimate, not a latency)",
           "recipes": results, "seconds_project": seconds}
    out.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"[bench] wrote {out}")


if __name__ == "__main__":
    main()
