"""PyTorch baselines for the ResNet-50 benchmark, on the device's own python3 (torch,
torchvision): eager FP32, eager FP16, and torch.compile(mode="reduce-overhead") FP16, at
batch 1 and 32. Same random weights as bench/export_torchvision.py (torch.manual_seed(0)).

    python3 bench/torch_gpu_baseline.py $OUT/torch_resnet50.json

GPU time: CUDA events around the forward with the input already on the GPU.
End-to-end: host clock around pinned H2D + forward + D2H + synchronize (as TrtRunner's times_ms).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np


def summarize(times: list[float], batch: int) -> dict[str, Any]:
    t = np.asarray(times, dtype=np.float64)
    mean = float(t.mean())
    return {"batch_size": batch, "iterations": int(t.size), "p50_ms": round(float(np.percentile(t, 50)), 4),
            "p90_ms": round(float(np.percentile(t, 90)), 4), "p99_ms": round(float(np.percentile(t, 99)), 4),
            "mean_ms": round(mean, 4), "throughput_per_s": round(batch * 1000.0 / mean, 2)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--no-compile", action="store_true")
    args = ap.parse_args(argv)

    import torch
    import torchvision

    torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    base = torchvision.models.resnet50(weights=None).eval().cuda()
    result: dict[str, Any] = {
        "torch": torch.__version__, "torchvision": torchvision.__version__, "gpu": torch.cuda.get_device_name(0),
        "cudnn_benchmark": True, "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
        "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32, "latency": {}, "errors": {}}

    def save() -> None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")

    def measure(fn: Callable[[Any], Any], x_host: Any, dtype: Any, compiled: bool) -> dict[str, Any]:
        x_dev = x_host.to("cuda", dtype)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

        def step(x: Any) -> Any:
            if compiled:
                torch.compiler.cudagraph_mark_step_begin()
            return fn(x)

        with torch.inference_mode():
            for _ in range(args.warmup):
                step(x_dev)
            torch.cuda.synchronize()
            gpu = []
            for _ in range(args.iters):
                start.record()
                step(x_dev)
                end.record()
                end.synchronize()
                gpu.append(start.elapsed_time(end))
            e2e = []
            for _ in range(args.iters):
                t0 = time.perf_counter()
                y = step(x_host.to("cuda", non_blocking=True).to(dtype))
                y.float().cpu()
                torch.cuda.synchronize()
                e2e.append((time.perf_counter() - t0) * 1e3)
        b = int(x_host.shape[0])
        return {"gpu": summarize(gpu, b), "end_to_end": summarize(e2e, b)}

    fp16 = torchvision.models.resnet50(weights=None)
    fp16.load_state_dict(base.state_dict())
    fp16 = fp16.eval().cuda().half()
    variants: list[tuple[str, Callable[[], Callable[[Any], Any]], Any, bool]] = [
        ("eager_fp32", lambda: base, torch.float32, False),
        ("eager_fp16", lambda: fp16, torch.float16, False),
    ]
    if not args.no_compile:
        variants.append(("compile_reduce_overhead_fp16",
                         lambda: torch.compile(fp16, mode="reduce-overhead", dynamic=False), torch.float16, True))
    for name, make, dtype, compiled in variants:
        try:
            fn = make()
        except Exception as e:
            result["errors"][name] = f"{type(e).__name__}: {e}"
            continue
        for batch in (int(b) for b in args.batches.split(",")):
            key = f"{name}_b{batch}"
            x_host = torch.randn(batch, 3, 224, 224).pin_memory()
            try:
                t0 = time.perf_counter()
                row = measure(fn, x_host, dtype, compiled)
                row["seconds_incl_warmup_and_compile"] = round(time.perf_counter() - t0, 1)
                result["latency"][key] = row
                print(f"{key}: gpu p50 {row['gpu']['p50_ms']:.3f} ms, end-to-end p50 {row['end_to_end']['p50_ms']:.3f} ms",
                      file=sys.stderr, flush=True)
            except Exception as e:
                result["errors"][key] = f"{type(e).__name__}: {e}"
            save()
    save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
