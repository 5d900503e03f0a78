"""How much faster is a rebuild with the timing cache, and which builder setting decides it?

For each variant (builder settings) and precision, two builds of the same ONNX through
TensorRTBackend, each in a fresh process as `dvc repro` would run them: a cold build
(empty timing cache) and a warm one (the cache the cold build wrote). The warm engine is
then timed (GPU time, batch 1 and the profile's max batch) through TrtRunner, so a
setting that speeds up the rebuild can be checked for what it costs at run time.

Variants:
  default   TensorRT's own settings
  fds-off   preview feature faster_dynamic_shapes_0805 off (trtexec --preview=-fasterDynamicShapes0805):
            on TensorRT 8.6 it is on by default and sends dynamic-shape subgraphs to the Myelin
            compiler, whose part of the timing cache 8.6 cannot read back
            ("Myelin error from unknown graph"), so every rebuild compiles them again

    $KITPY bench/timing_cache_speedup.py /tmp/bench/resnet50.onnx OUT.json [--variants default,fds-off]
           [--precisions fp32,fp16] [--max-batch 32]

The JSON is rewritten after every build, so a run cut short still reports what it did.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

VARIANTS: dict[str, dict[str, Any]] = {
    "default": {},
    "fds-off": {"preview_features": {"faster_dynamic_shapes_0805": False}},
}


def _config(onnx: Path, cache: Path, max_batch: int, variant: str) -> Any:
    from pipeline.config import Config

    return Config.model_validate({
        "model": {"name": onnx.stem, "arch": "bench", "input": {"name": "input", "shape": [3, 224, 224]}},
        "build": {"backend": "tensorrt", "workspace_mb": 4096, "timing_cache": str(cache),
                  "profile": {"min_batch": 1, "opt_batch": max_batch, "max_batch": max_batch}, **VARIANTS[variant]},
    })


def child(args: argparse.Namespace) -> None:
    """One build in this process; prints one JSON line."""
    t_start = time.monotonic()
    import numpy as np

    from pipeline.backends.base import BuildRequest
    from pipeline.backends.tensorrt_backend import TensorRTBackend
    from pipeline.latency import summarize

    cfg = _config(args.onnx, args.cache, args.max_batch, args.variant)
    out_dir = Path(args.workdir)
    t0 = time.monotonic()
    info = TensorRTBackend(progress=False).build(BuildRequest(args.precision, args.onnx, out_dir, cfg)).info
    result: dict[str, Any] = {
        "build_seconds": info["build_seconds"], "total_seconds": info["total_seconds"],
        "backend_call_seconds": round(time.monotonic() - t0, 3), "engine_bytes": info["engine_bytes"],
        "timing_cache": {k: info["timing_cache"].get(k) for k in ("loaded_bytes", "saved_bytes", "new_bytes", "warm")},
        "preview_features": info.get("preview_features"), "builder_optimization_level": info.get("builder_optimization_level"),
        "engine_layers": info.get("engine_layers"),
    }
    if args.time_engine:
        from pipeline.runtime.trt_runner import TrtRunner

        latency = {}
        for batch in sorted({1, args.max_batch}):
            x = np.random.default_rng(0).standard_normal((batch, 3, 224, 224), dtype=np.float32)
            with TrtRunner(out_dir / "model.engine") as r:
                t = r.time({"input": x}, warmup=30, iterations=200)
            latency[f"b{batch}"] = {k: round(v, 4) if isinstance(v, float) else v
                                    for k, v in summarize(t["gpu_times_ms"], batch).items()}
        result["gpu_latency"] = latency
    result["process_seconds"] = round(time.monotonic() - t_start, 3)
    print("RESULT " + json.dumps(result), flush=True)


def _run_child(onnx: Path, cache: Path, workdir: Path, variant: str, precision: str, max_batch: int,
               time_engine: bool) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", str(onnx), "--cache", str(cache), "--workdir", str(workdir),
           "--variant", variant, "--precision", precision, "--max-batch", str(max_batch)]
    if time_engine:
        cmd.append("--time-engine")
    t0 = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.monotonic() - t0
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        return {"error": f"exit {proc.returncode}: {proc.stderr[-1500:]}"}
    out = json.loads(lines[-1][len("RESULT "):])
    out["wall_seconds"] = round(wall, 3)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("onnx", type=Path)
    ap.add_argument("out", type=Path, nargs="?")
    ap.add_argument("--variants", default="default,fds-off")
    ap.add_argument("--precisions", default="fp32")
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--cache", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--variant", help=argparse.SUPPRESS)
    ap.add_argument("--precision", help=argparse.SUPPRESS)
    ap.add_argument("--time-engine", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    if args.out is None:
        ap.error("OUT.json is required")
    from pipeline.runtime.cuda_device import device_info

    result: dict[str, Any] = {"onnx": str(args.onnx), "max_batch": args.max_batch, "device": device_info(0),
                              "variants": {v: VARIANTS[v] for v in args.variants.split(",")}, "runs": {}}
    for precision in args.precisions.split(","):
        for variant in args.variants.split(","):
            key = f"{precision}/{variant}"
            with tempfile.TemporaryDirectory(prefix="tcache-") as tmp:
                cache = Path(tmp) / "timing.cache"
                cold = _run_child(args.onnx, cache, Path(tmp) / "cold", variant, precision, args.max_batch, False)
                warm = _run_child(args.onnx, cache, Path(tmp) / "warm", variant, precision, args.max_batch, True)
            run: dict[str, Any] = {"cold": cold, "warm": warm}
            if "error" not in cold and "error" not in warm:
                run["speedup_build"] = round(cold["build_seconds"] / warm["build_seconds"], 2)
                run["speedup_backend_call"] = round(cold["backend_call_seconds"] / warm["backend_call_seconds"], 2)
                print(f"{key}: cold {cold['build_seconds']:.1f} s, warm {warm['build_seconds']:.1f} s "
                      f"-> {run['speedup_build']}x; warm engine GPU p50 "
                      + ", ".join(f"{b} {v['p50_ms']:.3f} ms" for b, v in warm["gpu_latency"].items()), flush=True)
            else:
                print(f"{key}: failed: {cold.get('error') or warm.get('error')}", flush=True)
            result["runs"][key] = run
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
