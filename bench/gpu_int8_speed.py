"""INT8 at GPU speed, ResNet-50 on one GPU, in two halves that share a work folder.

`prepare` (a Python with PyTorch and torchvision, e.g. the device's python3): exports
torchvision ResNet-50 (seeded random weights) with a dynamic batch axis, cuts 512
calibration and 256 evaluation crops from scikit-image's photos, runs the calibrate
stage's collection on the CPU and on the GPU (the scales must be bit-identical), writes
the calibration cache (TensorRT 8.6 header) and the Q/DQ ONNX (TensorRT placement), and
times PyTorch eager FP16 and torch.compile(mode="reduce-overhead") FP16 on the same GPU.

`engines` (the kit's Python with TensorRT): builds FP16, INT8 from the calibrate stage's
cache (the default route) and, on request, INT8 through TensorRT's own calibrator and the
explicit Q/DQ route; times each build; times every engine at the batch sizes given, as a
plain enqueue and as a CUDA-graph replay (device clock and end to end); compares outputs.

    python3 bench/gpu_int8_speed.py prepare --work /tmp/r50 --out $OUT/int8_speed.json
    $KITPY  bench/gpu_int8_speed.py engines --work /tmp/r50 --out $OUT/int8_speed.json [--explicit] [--trt-calibrator]

The JSON is rewritten after every step (both halves add to the same file), so a call cut
short still reports what it finished.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

T0 = time.monotonic()
BATCHES = (1, 32, 128, 256)
MLPERF_H200_OFFLINE = 94_600.0  # images/s per GPU, MLPerf Inference v4.1 ResNet-50 offline (from the issue)


def log(msg: str) -> None:
    print(f"[int8-speed {time.monotonic() - T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


class Report:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.data: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {}

    def put(self, key: str, value: Any) -> None:
        self.data[key] = value
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(self.data, indent=2, default=str))

    def step(self, key: str, fn: Callable[[], Any]) -> Any:
        log(f"{key} ...")
        t = time.monotonic()
        try:
            value = fn()
        except Exception as e:  # keep going: record the failure
            traceback.print_exc()
            self.put(key, {"error": f"{type(e).__name__}: {e}"})
            return None
        self.put(key, value)
        log(f"{key} done in {time.monotonic() - t:.1f} s")
        return value


def stats(times: list[float], batch: int) -> dict[str, Any]:
    t = np.asarray(times, np.float64)
    return {"p50_ms": round(float(np.median(t)), 4), "p99_ms": round(float(np.percentile(t, 99)), 4),
            "mean_ms": round(float(t.mean()), 4), "throughput_per_s": round(batch * 1000.0 / float(np.median(t)), 1)}


# -- prepare (PyTorch side) -------------------------------------------------------------------------
def crops(n: int, seed: int) -> np.ndarray:
    """`n` 224x224 crops (random position and scale) of scikit-image's colour photos, ImageNet-normalized."""
    from PIL import Image
    from skimage import data as skd

    photos = [skd.astronaut(), skd.coffee(), skd.chelsea(), skd.rocket(), skd.hubble_deep_field(), skd.immunohistochemistry()]
    rng = np.random.default_rng(seed)
    mean, std = np.array([0.485, 0.456, 0.406], np.float32), np.array([0.229, 0.224, 0.225], np.float32)
    out = np.empty((n, 3, 224, 224), np.float32)
    for i in range(n):
        img = photos[i % len(photos)]
        h, w = img.shape[:2]
        side = int(rng.integers(min(h, w) // 3, min(h, w)))
        y, x = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
        crop = Image.fromarray(img[y:y + side, x:x + side]).resize((224, 224), Image.BILINEAR)
        out[i] = ((np.asarray(crop, np.float32) / 255.0 - mean) / std).transpose(2, 0, 1)
    return out


def export(work: Path) -> dict[str, Any]:
    import torch
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet50(weights=None).eval()
    torch.onnx.export(model, torch.zeros(1, 3, 224, 224), str(work / "model.onnx"), input_names=["input"],
                      output_names=["logits"], dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
                      opset_version=17, dynamo=False, do_constant_folding=True)
    calib, ev = crops(512, 0), crops(256, 1)
    np.savez(work / "calib.npz", input=calib)
    np.savez(work / "eval.npz", input=ev)
    with torch.no_grad():
        ref = torch.cat([model(torch.from_numpy(ev[i:i + 64])) for i in range(0, 256, 64)]).numpy()
    np.save(work / "reference.npy", ref)
    return {"onnx_bytes": (work / "model.onnx").stat().st_size, "calibration": 512, "evaluation": 256}


def calibrate(work: Path, device: str) -> dict[str, Any]:
    """The calibrate stage's collection and entropy search (tensorrt rules), 16 batches of 32."""
    import resource

    from calibration.algorithms import amax_to_scale
    from calibration.collect import collect_histograms
    from calibration.rules import get_rules, ranges_under

    rules = get_rules("tensorrt")
    x = np.load(work / "calib.npz")["input"]
    batches = ({"input": x[i:i + 32]} for i in range(0, 512, 32))
    t = time.perf_counter()
    col = collect_histograms(work / "model.onnx", batches, total=16, progress=False, growth=rules.growth, device=device)
    t_collect = time.perf_counter() - t
    amax, _, _ = ranges_under(rules, col.histograms, "entropy", col.node_ops, 99.99)
    total = time.perf_counter() - t
    scales = {k: float(amax_to_scale(v)) for k, v in amax.items()}
    (work / f"scales_{device}.json").write_text(json.dumps(scales))
    return {"device": col.stats.device, "device_note": getattr(col.stats, "device_note", None), "seconds": round(total, 2),
            "collect_seconds": round(t_collect, 2), "inference_seconds": round(col.stats.seconds_inference, 2),
            "histogram_seconds": round(col.stats.seconds_histogram, 2), "tensors": len(scales),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


def write_outputs(work: Path) -> dict[str, Any]:
    """Cache (TensorRT 8.6.0 header) and Q/DQ ONNX from the CPU path's ranges; CPU == GPU scales."""
    import numpy as np

    from calibration.cache import write_cache
    from calibration.qdq import quantize_qdq

    cpu = json.loads((work / "scales_cpu.json").read_text())
    gpu_file = work / "scales_cuda.json"
    same = None
    if gpu_file.is_file():
        gpu = json.loads(gpu_file.read_text())
        same = sorted(gpu) == sorted(cpu) and all(np.float32(gpu[k]) == np.float32(cpu[k]) for k in cpu)
    write_cache(work / "calibration.cache", {k: np.float32(v) for k, v in cpu.items()}, "8.6.0", "EntropyCalibration2")
    summary = quantize_qdq(work / "model.onnx", work / "model.qdq.onnx", {k: v * 127.0 for k, v in cpu.items()})
    return {"gpu_scales_identical_to_cpu": same, "tensors": len(cpu), "q_nodes": summary["q_nodes"]}


def torch_baselines(work: Path, iters: int) -> dict[str, Any]:
    """PyTorch eager FP16 and torch.compile(mode="reduce-overhead") FP16, device time (CUDA events)."""
    import torch
    import torchvision

    torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    model = torchvision.models.resnet50(weights=None).eval().cuda().half()
    out: dict[str, Any] = {"torch": torch.__version__, "gpu": torch.cuda.get_device_name(0)}

    def timed(fn: Callable[[torch.Tensor], Any], b: int) -> dict[str, Any]:
        x = torch.randn(b, 3, 224, 224, device="cuda", dtype=torch.half)
        with torch.no_grad():
            for _ in range(10):
                fn(x)
            torch.cuda.synchronize()
            times = []
            for _ in range(iters):
                s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                s.record()
                fn(x)
                e.record()
                e.synchronize()
                times.append(s.elapsed_time(e))
        return stats(times, b)

    out["eager_fp16"] = {f"b{b}": timed(model, b) for b in BATCHES}
    compiled = torch.compile(model, mode="reduce-overhead")
    out["compile_reduce_overhead_fp16"] = {}
    for b in BATCHES:
        t = time.perf_counter()
        with torch.no_grad():
            for _ in range(3):  # compile and capture for this shape
                compiled(torch.randn(b, 3, 224, 224, device="cuda", dtype=torch.half))
        r = timed(compiled, b)
        r["compile_seconds"] = round(time.perf_counter() - t, 1)
        out["compile_reduce_overhead_fp16"][f"b{b}"] = r
    return out


# -- engines (TensorRT side) ---------------------------------------------------------------------------
def build(work: Path, name: str, precision: str, **build_cfg: Any) -> dict[str, Any]:
    from pipeline.backends.base import BuildRequest
    from pipeline.backends.tensorrt_backend import TensorRTBackend
    from pipeline.config import Config

    cfg = Config.model_validate({
        "model": {"name": "resnet50", "source": "torchvision", "arch": "resnet50", "num_classes": 1000,
                  "input": {"name": "input", "shape": [3, 224, 224]}},
        "calibration": {"batch_size": 32, "num_samples": 512},
        "build": {"backend": "tensorrt", "workspace_mb": 8192, "timing_cache": str(work / "timing.cache"),
                  "profile": {"min_batch": 1, "opt_batch": 32, "max_batch": 256}, **build_cfg},
    })
    out = work / name
    import shutil

    shutil.rmtree(out, ignore_errors=True)
    t = time.perf_counter()
    res = TensorRTBackend(heartbeat_s=30).build(BuildRequest(precision, work / "model.onnx", out, cfg,
                                                             calib_dir=work, calib_data=work / "calib.npz"))
    wall = time.perf_counter() - t
    d = res.details
    return {"engine": str(out / res.artifact), "build_wall_seconds": round(wall, 1), "flags": res.flags,
            "calibration": res.calibration, "missing_scale_warnings": d.get("missing_scale_warnings"),
            "by_output_type": d.get("by_output_type"), "engine_layers": d.get("engine_layers"),
            "timing_cache": {k: v for k, v in d.get("timing_cache", {}).items() if k in ("warm", "loaded_bytes", "saved_bytes")}}


def time_engine(engine: str, iters: int) -> dict[str, Any]:
    from pipeline.runtime.trt_runner import TrtRunner

    out: dict[str, Any] = {}
    rng = np.random.default_rng(0)
    with TrtRunner(engine, memory="cuda-python") as r:
        for b in BATCHES:
            x = {"input": rng.standard_normal((b, 3, 224, 224)).astype(np.float32)}
            for mode in r.time_modes:
                t = r.time(x, warmup=20, iterations=iters, mode=mode)
                out[f"b{b}_{mode}"] = {"gpu": stats(t["gpu_times_ms"], b), "e2e": stats(t["times_ms"], b)}
    return out


def outputs(engine: str, work: Path) -> np.ndarray:
    from pipeline.runtime.trt_runner import TrtRunner

    x = np.load(work / "eval.npz")["input"]
    with TrtRunner(engine) as r:
        return np.concatenate([r.infer({"input": x[i:i + 64]})["logits"] for i in range(0, len(x), 64)])


def agreement(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return {"cosine": round(float(cos.mean()), 6), "cosine_min": round(float(cos.min()), 6),
            "top1_agreement": round(float((a.argmax(1) == b.argmax(1)).mean()), 4)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("half", choices=["prepare", "engines"])
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--explicit", action="store_true", help="also build the explicit Q/DQ route")
    ap.add_argument("--trt-calibrator", action="store_true", help="also build INT8 with TensorRT's own calibrator")
    ap.add_argument("--skip-torch", action="store_true")
    a = ap.parse_args(argv)
    a.work.mkdir(parents=True, exist_ok=True)
    rep = Report(a.out)
    if a.half == "prepare":
        rep.step("export", lambda: export(a.work))
        rep.step("calibrate_cpu", lambda: calibrate(a.work, "cpu"))
        rep.step("calibrate_gpu", lambda: calibrate(a.work, "cuda"))
        rep.step("calibration_outputs", lambda: write_outputs(a.work))
        if not a.skip_torch:
            rep.step("torch", lambda: torch_baselines(a.work, a.iters))
        return 0
    import tensorrt as trt

    from pipeline.runtime.cuda_device import device_info

    rep.put("tensorrt", {"version": trt.__version__, "device": device_info(0)})
    variants = {"fp16": ("fp16", {}), "int8_cache": ("int8", {"calibration_source": "cache"})}
    if a.explicit:
        variants["int8_explicit"] = ("int8", {"int8_route": "explicit"})
    if a.trt_calibrator:
        variants["int8_trt_calibrator"] = ("int8", {"calibration_source": "tensorrt"})
    ref = np.load(a.work / "reference.npy")
    outs: dict[str, np.ndarray] = {}
    for name, (precision, kw) in variants.items():
        b = rep.step(f"build_{name}", lambda: build(a.work, name, precision, **kw))
        if not b or "engine" not in b:
            continue
        rep.step(f"latency_{name}", lambda: time_engine(b["engine"], a.iters))
        outs[name] = outputs(b["engine"], a.work)
        rep.put(f"agreement_{name}_vs_pytorch_fp32", agreement(outs[name], ref))
    for name in outs:
        if name != "fp16" and "fp16" in outs:
            rep.put(f"agreement_{name}_vs_fp16", agreement(outs[name], outs["fp16"]))
    lat = {k[len("latency_"):]: v for k, v in rep.data.items() if k.startswith("latency_") and isinstance(v, dict)}
    summary: dict[str, Any] = {}
    for name, rows in lat.items():
        best = {b: min((rows[k]["gpu"]["p50_ms"], k.split("_", 1)[1]) for k in rows if k.startswith(f"b{b}_"))
                for b in BATCHES if any(k.startswith(f"b{b}_") for k in rows)}
        summary[name] = {f"b{b}": {"best_p50_ms": v[0], "mode": v[1], "images_per_s": round(b * 1000 / v[0], 1)}
                         for b, v in best.items()}
    if "int8_cache" in summary and "b256" in summary["int8_cache"]:
        summary["int8_cache_b256_vs_mlperf_h200"] = round(summary["int8_cache"]["b256"]["images_per_s"] / MLPERF_H200_OFFLINE, 3)
    rep.put("summary", summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
