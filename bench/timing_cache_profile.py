"""Where does a warm (timing-cache) TensorRT build spend its time?

Builds the same ONNX twice in FP32 with one timing cache (cold, then warm) through
TensorRT directly, logging at VERBOSE with timestamps, and reports for each build the
largest gaps between consecutive log lines (the message before a gap names the phase
that took the time) and counts of tactic-timing and kernel-compilation messages.
  usage: bench/timing_cache_profile.py MODEL.onnx OUT.json [--max-batch 32]"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path
from typing import Any

PATTERNS = {
    "timing": r"Timing Runner|Tactic: .* Time",
    "cache_hit": r"timing cache hit|Using cached|cache hit",
    "compile": r"[Cc]ompil|NVRTC|nvrtc|JIT",
    "myelin": r"[Mm]yelin",
}


def build(trt: Any, onnx_path: Path, cache_bytes: bytes, max_batch: int) -> tuple[dict[str, Any], bytes]:
    lines: list[tuple[float, str]] = []

    class Log(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)

        def log(self, severity: Any, msg: str) -> None:
            lines.append((time.perf_counter(), msg))

    logger = Log()
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH))
    parser = trt.OnnxParser(network, logger)
    assert parser.parse(onnx_path.read_bytes()), parser.get_error(0)
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, 4 << 30)
    cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(cache, False)
    profile = builder.create_optimization_profile()
    inp = network.get_input(0)
    shape = list(inp.shape)[1:]
    profile.set_shape(inp.name, [1, *shape], [max_batch, *shape], [max_batch, *shape])
    config.add_optimization_profile(profile)
    t0 = time.perf_counter()
    engine = builder.build_serialized_network(network, config)
    t1 = time.perf_counter()
    assert engine is not None
    inside = [(t, m) for t, m in lines if t0 <= t <= t1]
    gaps = sorted(((b[0] - a[0], a[1][:160]) for a, b in zip(inside, inside[1:])), reverse=True)[:15]
    counts = {k: sum(bool(re.search(p, m)) for _, m in inside) for k, p in PATTERNS.items()}
    return {"build_seconds": round(t1 - t0, 2), "log_lines": len(inside), "counts": counts,
            "largest_gaps": [{"seconds": round(g, 2), "after": m} for g, m in gaps]}, bytes(cache.serialize())


def main() -> None:
    import tensorrt as trt

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("onnx", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--max-batch", type=int, default=32)
    a = ap.parse_args()
    cold, cache = build(trt, a.onnx, b"", a.max_batch)
    warm, _ = build(trt, a.onnx, cache, a.max_batch)
    result = {"tensorrt": trt.__version__, "cold": cold, "warm": warm, "cache_bytes": len(cache),
              "speedup": round(cold["build_seconds"] / warm["build_seconds"], 2)}
    a.out.write_text(json.dumps(result, indent=2) + "\n")
    for k in ("cold", "warm"):
        r = result[k]
        print(k, r["build_seconds"], "s", r["counts"])
        for g in r["largest_gaps"][:6]:
            print(f"   {g['seconds']:6.2f} s after: {g['after']}")


if __name__ == "__main__":
    main()
