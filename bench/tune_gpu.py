"""EfficientNet-Lite0 on a GPU: FP16, full INT8 and the tuned INT8 engines (TensorRT 8.6+),
their latency at batch 1 and 32 and their top-1 agreement with FP32, against two baselines.

Reads the bundle bench/tune_efficientnet.py writes on a CPU (`--bundle`): the FP32 ONNX,
calibrate's ranges.json / calibration.cache / calibrate.json, tune's tune.json, the 256
held-out crops as uint8 (`eval_u8.npz`, normalized here exactly as the pipeline did) and the
FP32 onnxruntime logits on them (`reference_fp32.npy`, the budget's reference). Needs
TensorRT, a GPU, numpy, onnx and onnxruntime; no torch (the GPU kit's Python 3.10 runs it).

Phases (`--phases`, comma-separated; each appends to `--out` as soon as it finishes, so a
call cut short keeps what it measured):

* `main`: engines for fp16, int8 (full INT8, implicit, calibrate's cache), int8_explicit
  (full INT8, calibrate's ranges as a Q/DQ ONNX), int8_tuned
  (implicit, tune.json's `layer_precisions` pinning the kept layers, tune's ranges),
  int8_tuned_cost (the same for the CPU search with `tune.objective: cost`), int8_tuned_explicit
  (the Q/DQ ONNX without Q/DQ on the kept layers, rebuilt here from ranges.json with
  calibration.qdq), and int8_first_last (the heuristic: first and last layer kept in FP16);
* `bisect`: Polygraphy-style contiguous bisection (`debug precision --mode bisect
  --direction forward`) run with TensorRT engines as the measure: the shortest prefix of
  the layers in graph order kept in FP16 that meets the budget; reports builds needed;
* `tune`: the sensitivity search with TensorRT engines as the measure, ordered by the CPU
  sensitivity table of tune.json (pipeline.tuning.search), for when the CPU-tuned set misses
  the budget on the engine.

Every engine: build seconds, the timing cache's state, top-1 agreement with the FP32
reference on all 256 crops (and whether it meets the budget), GPU latency (median of the
device-clock times of `TrtRunner.time`, plain enqueue and CUDA graph) at b1 and b32, and for
tuned engines the precision the engine inspector reports for each kept layer.

    . /tmp/kit/env.sh && PYTHONPATH=$PWD $KITPY bench/tune_gpu.py --bundle /tmp/tune_bundle \\
        --phases main --out $OUT/tune_gpu_main.json --timing-cache /tmp/tune_timing.cache
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

BATCHES = (1, 32)


def _load(bundle: Path, timing_cache: Path, warmup: int, iterations: int,
          fast_rebuilds: bool) -> tuple[Any, dict[str, Any]]:
    import yaml

    from pipeline.config import Config

    data = yaml.safe_load((bundle / "config.yaml").read_text())
    data["build"] = {**data.get("build", {}), "backend": "tensorrt", "timing_cache": str(timing_cache),
                     "calibration_source": "cache", "int8_from_tune": False}
    if fast_rebuilds:  # TensorRT 8.6 cannot reuse the timing cache of Myelin graphs (README, "Fast rebuilds")
        data["build"]["preview_features"] = {"faster_dynamic_shapes_0805": False}
    data["evaluate"] = {**data.get("evaluate", {}), "batch_size": 32,
                        "latency": {"warmup": warmup, "iterations": iterations, "batch_sizes": list(BATCHES)}}
    cfg = Config.model_validate(data)
    tune = json.loads((bundle / "tune.json").read_text())
    return cfg, tune


def _eval_set(bundle: Path) -> tuple[np.ndarray, np.ndarray]:
    from configs.efficientnet_lite0_factory import to_model_input

    with np.load(bundle / "eval_u8.npz") as z:
        u8 = z["crops"]
    return to_model_input(u8), np.load(bundle / "reference_fp32.npy")


def _layers(tune: dict[str, Any]) -> list[Any]:
    from pipeline.tuning.layers import Layer

    return [Layer(d["name"], d["op_type"], d["index"], tuple(d["nodes"]), d["macs"], d.get("forced_float"),
                  d.get("out_elements", 0))
            for d in tune["layers"]]


def _kept_precisions(build_dir: Path, nodes: list[str]) -> dict[str, list[str]]:
    """Engine layers (inspector) whose name holds each kept node, with their precision."""
    from pipeline.backends.trt_build import layer_precision

    f = build_dir / "layers.json"
    if not f.is_file():
        return {}
    layers = json.loads(f.read_text()).get("Layers", [])
    out: dict[str, list[str]] = {}
    for node in nodes:
        out[node] = [f"{layer.get('Name')}: {layer_precision(layer)}" for layer in layers
                     if isinstance(layer, dict) and node in str(layer.get("Name", ""))][:3]
    return out


def _measure(name: str, cfg: Any, precision: str, onnx_path: Path, calib_dir: Path, x: np.ndarray, ref: np.ndarray,
             work: Path, threshold: float, kept_nodes: Optional[list[str]] = None) -> dict[str, Any]:
    import shutil

    from pipeline.backends.base import BuildRequest
    from pipeline.backends.tensorrt_backend import TensorRTBackend
    from pipeline.metrics import agreement
    from pipeline.runtime.trt_runner import TrtRunner

    out = work / name
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    t0 = time.monotonic()
    result = TensorRTBackend(progress=True).build(BuildRequest(precision, onnx_path, out, cfg, calib_dir=calib_dir))
    build_s = time.monotonic() - t0
    row: dict[str, Any] = {"variant": name, "precision": precision, "route": cfg.build.int8_route if precision == "int8" else None,
                           "build_seconds": round(build_s, 2), "builder_seconds": result.details.get("builder_seconds"),
                           "timing_cache": {k: (result.details.get("timing_cache") or {}).get(k)
                                            for k in ("warm", "keys_before", "keys_after")},
                           "pinned_layers": len(((result.details.get("layer_precisions") or {}).get("pinned") or {})),
                           "engine_bytes": (out / result.artifact).stat().st_size}
    with TrtRunner(out / result.artifact) as r:
        logits = np.concatenate([r.infer({"input": x[i:i + 32]})["logits"] for i in range(0, len(x), 32)])
        np.save(work / f"{name}.logits.npy", logits)
        a = agreement(logits, ref, "logits")
        row.update(top1_agreement=a["top1_agreement"], cosine=a["cosine"], snr_db=a["snr_db"],
                   meets_budget=bool(a["top1_agreement"] >= threshold))
        lat: dict[str, Any] = {}
        for bs in BATCHES:
            batch = np.ascontiguousarray(np.concatenate([x] * int(np.ceil(bs / len(x))))[:bs])
            for mode in r.time_modes:
                res = r.time({"input": batch}, cfg.evaluate.latency.warmup, cfg.evaluate.latency.iterations, mode=mode)
                g = np.asarray(res["gpu_times_ms"], np.float64)
                lat[f"b{bs}_{mode}"] = {"gpu_p50_ms": round(float(np.median(g)), 4),
                                        "gpu_p90_ms": round(float(np.percentile(g, 90)), 4),
                                        "host_p50_ms": round(float(np.median(res["times_ms"])), 4)}
        row["latency"] = lat
        row["device"] = r.device()
    for bs in BATCHES:
        row[f"b{bs}_gpu_p50_ms"] = min(v["gpu_p50_ms"] for k, v in lat.items() if k.startswith(f"b{bs}_"))
    if kept_nodes:
        row["kept_layer_precisions"] = _kept_precisions(out, kept_nodes)
    shutil.rmtree(out, ignore_errors=True)
    print(f"{name}: top-1 agreement {100 * row['top1_agreement']:.2f}% (meets {row['meets_budget']}), "
          f"b1 {row['b1_gpu_p50_ms']} ms, b32 {row['b32_gpu_p50_ms']} ms, build {row['build_seconds']} s", flush=True)
    return row


def _boundaries(layers: list[Any], kept: set[str]) -> int:
    """INT8 <-> float changes along the layers in graph order (a rough count of reformats)."""
    flags = [layer.name in kept for layer in layers]
    return sum(1 for a, b in zip(flags, flags[1:]) if a != b)


def _simulation(work: Path, x: np.ndarray, ref: np.ndarray, onnx_path: Path, ranges: dict[str, Any],
                tuned_ranges: dict[str, float], kept: list[str]) -> dict[str, Any]:
    """The Q/DQ ONNX of the full INT8 and the tuned set in onnxruntime (exact and fused) on this CPU,
    each against the FP32 reference and per crop against the engines built from it."""
    from calibration.ort_session import cpu_summary
    from calibration.qdq import quantize_qdq
    from pipeline.metrics import agreement
    from pipeline.onnx_utils import ort_session, run_batched

    full = {k: v["amax"] for k, v in ranges.items()}
    models = {"full": (full, [], ("int8", "int8_explicit")),
              "tuned": ({**full, **tuned_ranges}, kept, ("int8_tuned", "int8_tuned_explicit", "int8_tuned_explicit_fp32"))}
    out: dict[str, Any] = {"cpu": cpu_summary()}
    for name, (amax, exclude, engines) in models.items():
        path = work / f"sim_{name}.qdq.onnx"
        quantize_qdq(onnx_path, path, amax, exclude_nodes=exclude)
        for mode in ("exact", "fused"):
            t0 = time.monotonic()
            y = run_batched(ort_session(path, mode=mode), x, 32)["logits"]
            a = agreement(y, ref, "logits")
            row: dict[str, Any] = {"top1_agreement": a["top1_agreement"], "cosine": a["cosine"],
                                   "seconds": round(time.monotonic() - t0, 2), "vs_engine": {}}
            for e in engines:
                f = work / f"{e}.logits.npy"
                if f.is_file():
                    b = agreement(y, np.load(f), "logits")
                    row["vs_engine"][e] = {"top1_agreement": b["top1_agreement"], "cosine": b["cosine"]}
            out[f"{name}_{mode}"] = row
            print(f"simulation {name} ({mode}): top-1 agreement {100 * row['top1_agreement']:.2f}%; vs engines "
                  + ", ".join(f"{k} {100 * v['top1_agreement']:.2f}%" for k, v in row["vs_engine"].items()), flush=True)
    return out


def _write(path: Path, result: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, default=str) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--phases", default="main")
    ap.add_argument("--work", type=Path, default=Path("/tmp/tune_gpu_work"))
    ap.add_argument("--timing-cache", type=Path, default=Path("/tmp/tune_timing.cache"))
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--iterations", type=int, default=200)
    ap.add_argument("--max-candidates", type=int, default=24, help="bisect/tune phases: engines at most")
    ap.add_argument("--only", default="", help="main phase: only these variants (comma-separated), e.g. "
                    "fp16,int8,int8_tuned; results of earlier calls in --out are kept")
    ap.add_argument("--fast-rebuilds", action="store_true",
                    help="every build with preview feature faster_dynamic_shapes_0805 off (8.6: timing cache reused)")
    a = ap.parse_args()

    from calibration.qdq import quantize_qdq
    from pipeline.runtime.trt_common import require_tensorrt
    from pipeline.tuning.layers import layer_precisions

    trt = require_tensorrt()
    cfg, tune = _load(a.bundle, a.timing_cache, a.warmup, a.iterations, a.fast_rebuilds)
    x, ref = _eval_set(a.bundle)
    onnx_path, calib_dir = a.bundle / "model.onnx", a.bundle / "calibrate"
    threshold = float(tune["budget"]["value"])
    assert tune["budget"]["metric"] == "top1_agreement" and tune["budget"]["bound"] == "min"
    layers = _layers(tune)
    by_name = {layer.name: layer for layer in layers}
    kept = [k["layer"] for k in tune["kept"]]
    kp = tune["keep_precision"]
    result: dict[str, Any] = json.loads(a.out.read_text()) if a.out.is_file() else {}
    result.update({"model": tune["model"], "tensorrt": trt.__version__, "python": platform.python_version(),
                   "preview_features": dict(cfg.build.preview_features),
                   "budget": tune["budget"]["text"], "samples": int(len(x)), "cpu_tune": {
                       "kept": kept, "layers": len(layers), "candidates": len(tune["candidates"]),
                       "metric_full_cpu_simulation": tune["reference_points"]["chosen"]["metric_full"]}})
    result.setdefault("variants", {})
    a.work.mkdir(parents=True, exist_ok=True)

    only = {v.strip() for v in a.only.split(",") if v.strip()}

    def variant(name: str, precision: str, pins: Optional[dict[str, str]] = None, route: str = "implicit",
                calib: Path = calib_dir, nodes: Optional[list[str]] = None, **build_updates: Any) -> None:
        if only and name not in only:
            return
        build = cfg.build.model_copy(update={"layer_precisions": pins or {}, "int8_route": route, **build_updates})
        row = _measure(name, cfg.model_copy(update={"build": build}), precision, onnx_path, calib, x, ref, a.work,
                       threshold, nodes)
        result["variants"][name] = row
        _write(a.out, result)

    phases = [p.strip() for p in a.phases.split(",") if p.strip()]
    ranges = json.loads((calib_dir / "ranges.json").read_text())["tensors"]
    tuned_ranges = {t: v["amax"] for t, v in (tune.get("methods") or {}).get("tensors", {}).items()}
    result["cpu_tune"]["minmax_layers"] = list((tune.get("methods") or {}).get("layers", {}))
    if "main" in phases:
        variant("fp16", "fp16")
        # the typed FP16 ONNX (FP16 initializers, Casts around the nodes kept in FP32), what TensorRT >= 10 builds
        variant("fp16_typed", "fp16", fp16=cfg.build.fp16.model_copy(update={"source": "typed_onnx"}))
        variant("int8", "int8")
        # explicit, nothing kept: calibrate's ranges as Q/DQ (issue 12: the explicit route against the implicit one)
        full_qdq = a.work / "qdq_full"
        full_qdq.mkdir(parents=True, exist_ok=True)
        if not only or "int8_explicit" in only:
            quantize_qdq(onnx_path, full_qdq / "model.qdq.onnx", {k: v["amax"] for k, v in ranges.items()})
        variant("int8_explicit", "int8", route="explicit", calib=full_qdq)
        kept_layers = [by_name[n] for n in kept]
        # implicit: the kept layers pinned, and calibrate's cache with tune's ranges (bundle: tune_calibration.cache)
        tuned_calib = a.work / "calib_tuned"
        tuned_calib.mkdir(parents=True, exist_ok=True)
        shutil.copy(a.bundle / "tune_calibration.cache", tuned_calib / "calibration.cache")
        variant("int8_tuned", "int8", layer_precisions(kept_layers, kp), calib=tuned_calib,
                nodes=[n for k in kept_layers for n in k.nodes])
        if (a.bundle / "tune_cost.json").is_file():  # the CPU search for the cheapest candidate (tune.objective: cost)
            tc = json.loads((a.bundle / "tune_cost.json").read_text())
            cost_layers = [by_name[k["layer"]] for k in tc["kept"]]
            cost_calib = a.work / "calib_tuned_cost"
            cost_calib.mkdir(parents=True, exist_ok=True)
            shutil.copy(a.bundle / "tune_cost_calibration.cache", cost_calib / "calibration.cache")
            variant("int8_tuned_cost", "int8", layer_precisions(cost_layers, kp), calib=cost_calib,
                    nodes=[n for k in cost_layers for n in k.nodes])
            if "int8_tuned_cost" in result["variants"]:
                result["variants"]["int8_tuned_cost"]["kept"] = [k.name for k in cost_layers]
                result["variants"]["int8_tuned_cost"]["cpu_metric_full"] = tc["reference_points"]["chosen"]["metric_full"]
            # the same set closed into contiguous regions: every single INT8 layer (graph order) between two kept
            # ones kept too, so the engine pays fewer INT8<->float reformats
            idx = {layer.name: i for i, layer in enumerate(layers)}
            base = {k.name for k in cost_layers}
            marks = sorted(idx[n] for n in base)
            region = base | {layers[i0 + 1].name for i0, i1 in zip(marks, marks[1:]) if i1 - i0 == 2}
            region_layers = [layer for layer in layers if layer.name in region]
            variant("int8_cost_regions", "int8", layer_precisions(region_layers, kp), calib=cost_calib,
                    nodes=[n for k in region_layers for n in k.nodes])
            if "int8_cost_regions" in result["variants"]:
                result["variants"]["int8_cost_regions"]["kept"] = [k.name for k in region_layers]
                result["variants"]["int8_cost_regions"]["boundaries"] = {
                    "cost_set": _boundaries(layers, base), "regions": _boundaries(layers, region)}
        # explicit: the Q/DQ ONNX without Q/DQ on the kept layers, with tune's ranges
        qdq_dir = a.work / "qdq"
        qdq_dir.mkdir(parents=True, exist_ok=True)
        if not only or "int8_tuned_explicit" in only:
            quantize_qdq(onnx_path, qdq_dir / "model.qdq.onnx",
                         {**{k: v["amax"] for k, v in ranges.items()}, **tuned_ranges}, exclude_nodes=kept)
        variant("int8_tuned_explicit", "int8", route="explicit", calib=qdq_dir)
        # the same Q/DQ ONNX with the float layers in FP32 (no FP16 flag): is the FP16 flag the fault?
        variant("int8_tuned_explicit_fp32", "int8", route="explicit", calib=qdq_dir, int8_float_fallback="fp32")
        fl = [layers[0], layers[-1]]
        row_name = "int8_first_last"
        variant(row_name, "int8", layer_precisions(fl, kp), nodes=[n for k in fl for n in k.nodes])
        if row_name in result["variants"]:
            result["variants"][row_name]["kept"] = [k.name for k in fl]
            result["variants"][row_name]["builds_needed"] = 1
        if "int8_tuned" in result["variants"]:
            result["variants"]["int8_tuned"]["kept"] = kept
            result["variants"]["int8_tuned"]["builds_needed_on_gpu"] = 1
        _write(a.out, result)
    if "sim" in phases:  # the exact CPU simulation of the same Q/DQ ONNX against each engine, on this host's CPU
        result["simulation"] = _simulation(a.work, x, ref, onnx_path, ranges, tuned_ranges, kept)
        _write(a.out, result)
    for strategy in ("bisect", "tune"):
        if strategy not in phases:
            continue
        from pipeline.tuning.budget import Budget
        from pipeline.tuning.search import SampleSet, Tuner
        from pipeline.tuning.trt_candidates import TrtCandidates

        t0 = time.monotonic()
        budget = Budget("top1_agreement", "min", threshold, "agreement", True, "top1_agreement", None)
        sets = {k: SampleSet({"input": x}, None, {"logits": ref}) for k in ("full", "search", "sensitivity")}
        alternatives = {}
        if strategy == "tune":  # the inputs of each layer at max|x|, for the layers the CPU table gives minmax
            from pipeline.tuning.methods import minmax_alternatives

            placement = quantize_qdq(onnx_path, a.work / "full.qdq.onnx", {k: v["amax"] for k, v in ranges.items()})
            alternatives = minmax_alternatives(placement, ranges, [layer.name for layer in layers])
        runner = TrtCandidates(cfg, onnx_path, calib_dir, layers, kp, alternatives=alternatives)
        tuner = Tuner(layers, budget, runner, sets, a.max_candidates, 3600.0, None, False)
        table = [dict(r) for r in tune.get("sensitivity", [])] if strategy == "tune" else None
        try:
            chosen, _ = tuner.run("bisect" if strategy == "bisect" else "sensitivity", table)
            builds = runner.builds
        finally:
            runner.close()
        result[f"gpu_{strategy}"] = {
            "strategy": "Polygraphy-style contiguous bisection (forward)" if strategy == "bisect"
            else "sensitivity order from the CPU table, TensorRT engines as the measure",
            "builds_needed": len(builds), "seconds": round(time.monotonic() - t0, 1), "stop_reason": tuner.stop_reason,
            "kept": chosen["kept"], "minmax": chosen["minmax"], "top1_agreement": chosen["metric_full"],
            "meets_budget": chosen["meets_full"],
            "latency_ms": chosen["latency_ms"],
            "candidates": [{k: c[k] for k in ("id", "phase", "kept", "metric_full", "latency_ms", "seconds")}
                           for c in tuner.candidates],
            "builds": builds}
        _write(a.out, result)
        print(f"gpu_{strategy}: {len(chosen['kept'])} kept, top-1 agreement {chosen['metric_full']}, "
              f"{len(builds)} builds, latency {chosen['latency_ms']}", flush=True)


if __name__ == "__main__":
    main()
