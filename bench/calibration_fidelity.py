"""How closely our entropy calibration reproduces TensorRT's own IInt8EntropyCalibrator2.

Two modes, both writing JSON:

  compare  --ranges artifacts/calibrate/ranges.json --trt-cache artifacts/build/int8/calibration.cache --out F
           (after a pipeline run with backend tensorrt: the same ONNX, samples and batches)
  run      --onnx model.onnx --calib calib.npy --num-samples 256 --batch-size 32 --workdir W --out F
           (any ONNX: our calibrate stage, then a TensorRT INT8 build fed the same batches)
  replay   --onnx model.onnx --calib calib.npy ... --trt-cache C --workdir W --out F
           (our calibrate stage on any CPU against a cache TensorRT wrote earlier for the
           same ONNX and batches, e.g. bench/results/h100_fidelity/*.cache)

``--rules tensorrt|reference`` picks calibration.rules (calibration/rules.py).

Per tensor named by both: relative difference of amax (ours) against TensorRT's
scale x 127; the same for max|x| (what minmax would give) as a baseline. Names only
TensorRT has (constants, layers it created: `(Unnamed Layer* N) [...]`) are listed apart.
Needs TensorRT only in `run` mode."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from calibration.cache import read_cache  # noqa: E402


def _stats(rel: dict[str, float]) -> dict[str, Any]:
    if not rel:
        return {"compared": 0}
    v = np.array(list(rel.values()))
    worst = sorted(rel.items(), key=lambda kv: -kv[1])[:5]
    return {
        "compared": len(v),
        "median_pct": float(100 * np.median(v)),
        "p90_pct": float(100 * np.percentile(v, 90)),
        "max_pct": float(100 * v.max()),
        "same_within_1e-5": int((v <= 1e-5).sum()),  # float32 rounding of the cached scale, far below a bin
        "worst": [{"tensor": k, "rel_diff_pct": 100 * d} for k, d in worst],
    }


def compare(ranges_path: Path, trt_cache: Path) -> dict[str, Any]:
    ranges = json.loads(Path(ranges_path).read_text())["tensors"]
    cache = read_cache(trt_cache)
    trt_amax = {k: float(v) * 127.0 for k, v in cache.scales.items()}
    both = [k for k in ranges if k in trt_amax and trt_amax[k] > 0]
    rel_entropy = {k: abs(ranges[k]["amax"] - trt_amax[k]) / trt_amax[k] for k in both}
    rel_maxabs = {k: abs(ranges[k]["max_abs"] - trt_amax[k]) / trt_amax[k] for k in both}
    only_trt = sorted(k for k in trt_amax if k not in ranges)
    return {
        "tensorrt_cache": str(trt_cache),
        "tensorrt_header": cache.header if hasattr(cache, "header") else None,
        "ours": str(ranges_path),
        "entropy_vs_tensorrt": _stats(rel_entropy),
        "max_abs_vs_tensorrt": _stats(rel_maxabs),
        "only_in_tensorrt": {
            "count": len(only_trt),
            "unnamed_layers": sum(k.startswith("(Unnamed Layer") for k in only_trt),
            "zero_scale": sum(trt_amax[k] == 0 for k in only_trt),
            "names": only_trt[:40],
        },
        "only_in_ours": sorted(k for k in ranges if k not in trt_amax),
        "zero_scale_in_tensorrt": sorted(k for k in ranges if k in trt_amax and trt_amax[k] == 0),
    }


def _config(args: argparse.Namespace) -> Any:
    from pipeline.config import Config

    x = np.load(args.calib, mmap_mode="r")
    bs = args.batch_size
    return Config.model_validate({
        "model": {"name": Path(args.onnx).stem, "arch": "bench", "input": {"name": args.input_name, "shape": list(x.shape[1:])}},
        "calibration": {"method": "entropy", "num_samples": args.num_samples, "batch_size": bs, "rules": args.rules},
        "build": {"backend": "tensorrt", "profile": {"min_batch": 1, "opt_batch": bs, "max_batch": bs},
                  "timing_cache": str(Path(args.workdir) / "timing.cache"), "workspace_mb": 4096, "tf32": not args.no_tf32},
    })


def _ours(args: argparse.Namespace, cfg: Any) -> float:
    """Our calibrate stage into WORKDIR/calibrate; returns its seconds."""
    from pipeline.stages import calibrate

    t0 = time.perf_counter()
    calibrate.run(cfg, Path(args.onnx), Path(args.calib), Path(args.workdir) / "calibrate", progress=False)
    return time.perf_counter() - t0


def _settings(out: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    out["samples"], out["batch_size"], out["tf32"], out["rules"] = args.num_samples, args.batch_size, not args.no_tf32, args.rules
    return out


def replay(args: argparse.Namespace) -> dict[str, Any]:
    seconds = _ours(args, _config(args))
    out = compare(Path(args.workdir) / "calibrate" / "ranges.json", args.trt_cache)
    out["seconds"] = {"ours_calibrate": round(seconds, 2)}
    return _settings(out, args)


def run(args: argparse.Namespace) -> dict[str, Any]:
    from pipeline.backends import BuildRequest
    from pipeline.backends.tensorrt_backend import TensorRTBackend

    cfg = _config(args)
    work = Path(args.workdir)
    t0 = time.perf_counter()
    _ours(args, cfg)
    t1 = time.perf_counter()
    (work / "build").mkdir(parents=True, exist_ok=True)
    TensorRTBackend().build(BuildRequest("int8", Path(args.onnx), work / "build", cfg, calib_data=Path(args.calib)))
    t2 = time.perf_counter()
    out = compare(work / "calibrate" / "ranges.json", work / "build" / "calibration.cache")
    out["seconds"] = {"ours_calibrate": round(t1 - t0, 2), "tensorrt_int8_build_with_calibration": round(t2 - t1, 2)}
    return _settings(out, args)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="mode", required=True)
    c = sub.add_parser("compare")
    c.add_argument("--ranges", type=Path, required=True)
    c.add_argument("--trt-cache", type=Path, required=True)
    c.add_argument("--out", type=Path, required=True)
    for mode in ("run", "replay"):
        r = sub.add_parser(mode)
        r.add_argument("--onnx", type=Path, required=True)
        r.add_argument("--calib", type=Path, required=True)
        r.add_argument("--input-name", default="input")
        r.add_argument("--num-samples", type=int, default=256)
        r.add_argument("--batch-size", type=int, default=32)
        r.add_argument("--rules", choices=("tensorrt", "reference"), default="tensorrt")
        r.add_argument("--workdir", type=Path, required=True)
        r.add_argument("--no-tf32", action="store_true",
                       help="calibrate in true FP32 (TensorRT's FP32 layers may use TF32 by default)")
        r.add_argument("--out", type=Path, required=True)
        if mode == "replay":
            r.add_argument("--trt-cache", type=Path, required=True, help="the cache TensorRT wrote for this ONNX and data")
    args = ap.parse_args()
    result = {"compare": lambda: compare(args.ranges, args.trt_cache), "run": lambda: run(args),
              "replay": lambda: replay(args)}[args.mode]()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    for k in ("entropy_vs_tensorrt", "max_abs_vs_tensorrt"):
        s = result[k]
        if s.get("compared"):
            print(f"{k}: {s['compared']} tensors, median {s['median_pct']:.2f}%, p90 {s['p90_pct']:.2f}%, max {s['max_pct']:.2f}%")
    print(f"only in TensorRT's cache: {result['only_in_tensorrt']['count']}; only in ours: {len(result['only_in_ours'])}")


if __name__ == "__main__":
    main()
