"""ResNet-50 on the lent GPU with the kit's TensorRT: build FP32 / FP16 / INT8 engines
through TensorRTBackend (with a timing cache; FP32 is built cold and then again warm),
then time batch 1 and 32 through our TrtRunner (GPU-only and end-to-end, with and
without CUDA graph replay) and, side by side, Polygraphy's TrtRunner on the same engines.

    python3 bench/export_torchvision.py /tmp/bench/resnet50.onnx      # device python3 (torch)
    $KITPY bench/gpu_resnet50.py /tmp/bench/resnet50.onnx $OUT/trt_resnet50.json

The JSON is rewritten after every step, so a run cut short still reports what it did.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.backends.base import BuildRequest  # noqa: E402
from pipeline.backends.tensorrt_backend import TensorRTBackend  # noqa: E402
from pipeline.config import Config  # noqa: E402
from pipeline.latency import summarize  # noqa: E402
from pipeline.runtime.cuda_device import device_info  # noqa: E402
from pipeline.runtime.trt_runner import TrtRunner  # noqa: E402

T0 = time.monotonic()


def log(msg: str) -> None:
    print(f"[bench {time.monotonic() - T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


def config(work: Path, calib: int, max_batch: int) -> Config:
    return Config.model_validate({
        "model": {"name": "resnet50", "source": "torchvision", "arch": "resnet50", "num_classes": 1000,
                  "input": {"name": "input", "shape": [3, 224, 224]}},
        "calibration": {"batch_size": 32, "num_samples": calib},
        "build": {"backend": "tensorrt", "workspace_mb": 4096, "timing_cache": str(work / "timing.cache"),
                  "profile": {"min_batch": 1, "opt_batch": max_batch, "max_batch": max_batch}},
    })


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-30))


def stats(times: list[float], batch: int) -> dict[str, Any]:
    s = summarize(times, batch)
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in s.items()}


def time_ours(engine: Path, x: np.ndarray, graph: bool, warmup: int, iters: int) -> dict[str, Any]:
    with TrtRunner(engine, use_cuda_graph=graph) as r:
        t = r.time({"input": x}, warmup=warmup, iterations=iters)
    return {"end_to_end": stats(t["times_ms"], len(x)), "gpu": stats(t["gpu_times_ms"], len(x)),
            "method": t["method"], "memory": t["memory"]}


def time_polygraphy(engine: Path, x: np.ndarray, warmup: int, iters: int) -> dict[str, Any]:
    import polygraphy
    from polygraphy.backend.trt import EngineFromBytes
    from polygraphy.backend.trt import TrtRunner as PgRunner

    host, own = [], []
    with PgRunner(EngineFromBytes(engine.read_bytes())) as r:
        feed = {"input": x}
        for _ in range(warmup):
            r.infer(feed)
        for _ in range(iters):
            t0 = time.perf_counter()
            r.infer(feed)
            host.append((time.perf_counter() - t0) * 1e3)
            own.append(r.last_inference_time() * 1e3)
    return {"end_to_end": stats(host, len(x)), "polygraphy_inference_time": stats(own, len(x)),
            "method": f"polygraphy {polygraphy.__version__} TrtRunner.infer (H2D + execute + D2H, host clock)"}


def time_polygraphy_device(engine: Path, x: np.ndarray, warmup: int, iters: int) -> dict[str, Any]:
    """Polygraphy with the input already on the GPU and outputs left there: its inference
    time is then the engine's execution (plus its own synchronization), the closest thing
    Polygraphy has to our CUDA-event GPU time."""
    import polygraphy
    from polygraphy import cuda
    from polygraphy.backend.trt import EngineFromBytes
    from polygraphy.backend.trt import TrtRunner as PgRunner

    host, own = [], []
    dev = cuda.DeviceArray(shape=x.shape, dtype=x.dtype)
    dev.copy_from(np.ascontiguousarray(x))
    try:
        with PgRunner(EngineFromBytes(engine.read_bytes())) as r:
            feed = {"input": dev}
            for _ in range(warmup):
                r.infer(feed, copy_outputs_to_host=False)
            for _ in range(iters):
                t0 = time.perf_counter()
                r.infer(feed, copy_outputs_to_host=False)
                host.append((time.perf_counter() - t0) * 1e3)
                own.append(r.last_inference_time() * 1e3)
    finally:
        dev.free()
    return {"end_to_end": stats(host, len(x)), "polygraphy_inference_time": stats(own, len(x)),
            "method": f"polygraphy {polygraphy.__version__} TrtRunner.infer on device-resident input, outputs left on the GPU"}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("onnx", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench/work"))
    ap.add_argument("--precisions", default="fp32,fp16,int8")
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--calib", type=int, default=256)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--budget-s", type=float, default=530.0, help="skip what would start after this many seconds")
    args = ap.parse_args(argv)

    import tensorrt as trt

    batches = [int(b) for b in args.batches.split(",")]
    work = args.work
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    cfg = config(work, args.calib, max(batches))
    rng = np.random.default_rng(0)
    calib = rng.standard_normal((args.calib, 3, 224, 224), dtype=np.float32)
    np.save(work / "calib.npy", calib)
    del calib
    result: dict[str, Any] = {"model": "resnet50 (torchvision, random weights, seed 0)", "onnx": str(args.onnx),
                              "tensorrt": trt.__version__, "device": device_info(0), "builds": {}, "accuracy": {},
                              "latency": {}, "skipped": [], "errors": {}}

    def save() -> None:
        result["elapsed_s"] = round(time.monotonic() - T0, 1)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2, default=str) + "\n")

    def over_budget(what: str, expected_s: float = 10.0) -> bool:
        if time.monotonic() - T0 + expected_s > args.budget_s:
            result["skipped"].append(what)
            log(f"skipping {what}: over the {args.budget_s:.0f} s budget")
            save()
            return True
        return False

    backend = TensorRTBackend(heartbeat_s=30.0)

    def build(precision: str, name: str) -> Path:
        req = BuildRequest(precision=precision, onnx_path=args.onnx, out_dir=work / name, config=cfg,
                           calib_data=work / "calib.npy")
        res = backend.build(req)
        info = res.info
        keep = {k: info.get(k) for k in ("build_seconds", "total_seconds", "engine_bytes", "flags", "timing_cache",
                                          "engine_layers", "by_output_type", "calibration")}
        result["builds"][name] = keep
        log(f"{name}: {info['build_seconds']:.1f} s, {info['engine_bytes'] / 1e6:.1f} MB")
        save()
        return work / name / res.artifact

    x8 = rng.standard_normal((8, 3, 224, 224), dtype=np.float32)
    inputs = {b: rng.standard_normal((b, 3, 224, 224), dtype=np.float32) for b in batches}
    outs: dict[str, np.ndarray] = {}

    def check_and_time(precision: str, engine: Path) -> None:
        """Accuracy against the FP32 engine on 8 random inputs, then latency at every batch size."""
        with TrtRunner(engine) as r:
            outs[precision] = r.infer({"input": x8})["logits"]
        if "fp32" in outs:
            out = outs[precision]
            result["accuracy"][precision] = {
                "cosine_vs_fp32": round(cosine(out, outs["fp32"]), 6),
                "top1_agreement_vs_fp32": float((out.argmax(1) == outs["fp32"].argmax(1)).mean()),
                "finite": bool(np.isfinite(out).all())}
        for batch in batches:
            x = inputs[batch]
            key = f"{precision}_b{batch}"
            row = result["latency"].setdefault(key, {"precision": precision, "batch_size": batch})
            for variant, fn in (("ours", lambda: time_ours(engine, x, False, args.warmup, args.iters)),
                                ("ours_cuda_graph", lambda: time_ours(engine, x, True, args.warmup, args.iters)),
                                ("polygraphy", lambda: time_polygraphy(engine, x, args.warmup, args.iters)),
                                ("polygraphy_device", lambda: time_polygraphy_device(engine, x, args.warmup, args.iters))):
                if over_budget(f"{key} {variant}"):
                    continue
                try:
                    row[variant] = fn()
                    e2e = row[variant]["end_to_end"]
                    log(f"{key} {variant}: p50 {e2e['p50_ms']:.3f} ms end-to-end"
                        + (f", gpu p50 {row[variant]['gpu']['p50_ms']:.3f} ms" if "gpu" in row[variant] else ""))
                except Exception as e:
                    row[variant] = {"error": f"{type(e).__name__}: {e}"}
                    traceback.print_exc()
                save()
            if "gpu" in row.get("ours", {}) and "gpu" in row.get("ours_cuda_graph", {}):
                a, b = row["ours"], row["ours_cuda_graph"]
                row["cuda_graph_gain"] = {
                    "gpu_p50_ratio": round(a["gpu"]["p50_ms"] / b["gpu"]["p50_ms"], 3),
                    "end_to_end_p50_ratio": round(a["end_to_end"]["p50_ms"] / b["end_to_end"]["p50_ms"], 3)}
            if "end_to_end" in row.get("ours", {}) and "end_to_end" in row.get("polygraphy", {}):
                row["polygraphy_over_ours_p50"] = round(row["polygraphy"]["end_to_end"]["p50_ms"]
                                                        / row["ours"]["end_to_end"]["p50_ms"], 3)
            if "gpu" in row.get("ours", {}) and "end_to_end" in row.get("polygraphy_device", {}):
                # GPU-resident Polygraphy's host-timed infer vs our CUDA-event engine time
                row["ours_gpu_over_polygraphy_device_p50"] = round(
                    row["ours"]["gpu"]["p50_ms"] / row["polygraphy_device"]["end_to_end"]["p50_ms"], 3)
            save()

    plan = [("fp32", "fp32_cold"), ("fp32", "fp32_warm")] + [(p, p) for p in args.precisions.split(",") if p != "fp32"]
    expected = {"fp32": 70.0, "fp16": 110.0, "int8": 200.0}  # TensorRT 8.6 on an H100, timing cache warm
    for precision, name in plan:
        if over_budget(f"build {name}", expected.get(precision, 120.0)):
            continue
        try:
            engine = build(precision, name)
        except Exception as e:
            result["errors"][f"build {name}"] = f"{type(e).__name__}: {e}"
            traceback.print_exc()
            save()
            continue
        if name == "fp32_cold":
            continue  # timed once, from the warm rebuild
        try:
            check_and_time(precision, engine)
        except Exception as e:
            result["errors"][f"time {name}"] = f"{type(e).__name__}: {e}"
            traceback.print_exc()
            save()
        cold, warm = result["builds"].get("fp32_cold"), result["builds"].get("fp32_warm")
        if cold and warm:
            result["timing_cache_effect"] = {
                "fp32_cold_s": cold["build_seconds"], "fp32_warm_s": warm["build_seconds"],
                "speedup": round(cold["build_seconds"] / max(warm["build_seconds"], 1e-9), 2)}
    log("done")
    save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
