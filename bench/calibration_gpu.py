"""Calibration with the forward on the GPU (issue 21, item 3): the calibrate stage's collection and
entropy search with ``calibration.forward`` onnxruntime (CPU) against tensorrt (an FP32 engine, every
calibrated tensor an output; built cold, then read from the engine cache; its activations binned on
the GPU where the engine leaves them, and once copied to the CPU and binned there), side by side in one run,
each in a fresh process, with a plain FP32 forward of each (onnxruntime and TensorRT, no tensor
exposed) over the same samples for the ratio.

    python3 bench/calibration_gpu.py make DIR             # device python3 (torch, torchvision, skimage)
    $KITPY bench/calibration_gpu.py run DIR --out JSON    # the kit's TensorRT

``make`` writes DIR/resnet18 (make_inputs.py of shared/fixtures/trt86-resnet18-entropy2: the
fixture's ResNet-18 and its 512 images, bit for bit; pass the fixture folder with --fixture) and
DIR/resnet50 (torchvision ResNet-50, torch.manual_seed(0) weights, 512 crops of scikit-image's
photos: bench/calibration_speed.py's prepare). ``run`` calibrates each with 16 batches of 32 under
TensorRT's rules (doubling histograms, EntropyCalibration2) and reports, per forward: seconds (total,
engine start, inference, binning, search), the scales, and for the TensorRT forward how many scales
are bit-identical to the onnxruntime forward's and their largest relative difference; for ResNet-18
both are also compared with TensorRT 8.6.0's own cache (the fixture) as tests/calibration/test_trt_fixture.py
does (relative amax difference, fraction within 1e-5).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
BATCH, BATCHES = 32, 16
SAME = 1e-5


def make(folder: Path, fixture: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, str(fixture / "make_inputs.py"), str(folder / "resnet18")], check=True)
    (folder / "resnet18" / "model.onnx").unlink(missing_ok=True)
    os.replace(folder / "resnet18" / "resnet18.onnx", folder / "resnet18" / "model.onnx")
    sys.path.insert(0, str(ROOT / "bench"))
    from bench.calibration_speed import prepare

    prepare("resnet50", folder / "resnet50", BATCH * BATCHES)


def child(case: Path, forward: str, out: Path) -> None:
    """One calibration (or plain forward) in this process; writes its JSON to ``out``."""
    from calibration.algorithms import amax_to_scale
    from calibration.cache import scale_to_hex
    from calibration.collect import collect_histograms
    from calibration.rules import get_rules, ranges_under

    calib = np.load(case / "calib.npy", mmap_mode="r")
    batches = (np.ascontiguousarray(calib[i * BATCH:(i + 1) * BATCH]) for i in range(BATCHES))
    result: dict[str, Any] = {"forward": forward}
    t0 = time.perf_counter()
    if forward.startswith("plain_"):
        result.update(_plain(case / "model.onnx", forward, batches))
    else:
        factory = None
        if forward.startswith("tensorrt"):
            from pipeline.backends.trt_forward import TrtForward

            factory = lambda model: TrtForward(model, what=str(case))  # noqa: E731
        rules = get_rules("tensorrt")
        device = "cpu" if forward.endswith("_cpubins") else "auto"  # auto: the TensorRT forward bins on the GPU
        collector = collect_histograms(case / "model.onnx", batches, total=BATCHES, progress=False,
                                       growth=rules.growth, forward=factory, device=device)
        t_search = time.perf_counter()
        amax, _, _ = ranges_under(rules, collector.histograms, "entropy", collector.node_ops, 99.99)
        s = collector.stats
        result.update({
            "seconds": {"total": round(time.perf_counter() - t0, 3), "start": round(s.seconds_session, 3),
                        "inference": round(s.seconds_inference, 3), "histogram": round(s.seconds_histogram, 3),
                        "search": round(time.perf_counter() - t_search, 3)},
            "samples": s.samples, "tensors": len(amax), "kernel": s.kernel, "device": s.device,
            "device_note": s.device_note, "histogram_threads": s.histogram_threads,
            "forward_details": s.forward_details,
            "amax": {n: float(a) for n, a in amax.items()},
            "scales_hex": {n: scale_to_hex(amax_to_scale(a)) for n, a in amax.items()},
        })
    out.write_text(json.dumps(result))


def _plain(onnx_path: Path, forward: str, batches: Any) -> dict[str, Any]:
    """The model's own outputs only, over the same batches: what calibration is measured against."""
    t0 = time.perf_counter()
    if forward == "plain_onnxruntime":
        from calibration.ort_session import make_session

        session = make_session(onnx_path, level="all")
        session.run(None, {"input": next(batches)})
        start = time.perf_counter() - t0
        t1 = time.perf_counter()
        for b in batches:
            session.run(None, {"input": b})
    else:
        from calibration.onnx_io import load_model
        from pipeline.backends.trt_forward import TrtForward

        fwd = TrtForward(load_model(onnx_path), what=str(onnx_path))
        first = next(batches)
        fwd.run(["logits"], {"input": first})
        start = time.perf_counter() - t0
        t1 = time.perf_counter()
        for b in batches:
            fwd.run(["logits"], {"input": b})
    # start: session or engine, and the first batch; inference: the other batches
    return {"seconds": {"start": round(start, 3), "inference": round(time.perf_counter() - t1, 3),
                        "total": round(time.perf_counter() - t0, 3)}}


def _vs_cache(amax: dict[str, float], cache_file: Path, onnx_path: Path) -> dict[str, Any]:
    import onnx

    from calibration.cache import read_cache

    cache = read_cache(cache_file, expect_version="8.6.0", expect_algorithm="EntropyCalibration2")
    model = onnx.load(str(onnx_path), load_external_data=False)
    known = {o for n in model.graph.node for o in n.output} | {i.name for i in model.graph.input}
    rel = {n: abs(amax[n] - float(s) * 127.0) / (float(s) * 127.0) for n, s in cache.scales.items()
           if s != 0 and n in known and n in amax}
    d = np.array(list(rel.values()))
    return {"compared": len(rel), "median": float(np.median(d)), "p90": float(np.percentile(d, 90)),
            "worst": float(d.max()), "same_fraction": float(np.mean(d <= SAME))}


def run(folder: Path, out: Path, fixture: Path, cases: list[str]) -> None:
    from bench.calibration_speed import _cpu_name

    results: dict[str, Any] = {"host": {"cpu": _cpu_name(), "cores": os.cpu_count(), "python": platform.python_version()},
                               "batches": f"{BATCHES} x {BATCH}", "rules": "tensorrt", "method": "entropy", "cases": {}}
    try:
        from pipeline.runtime.cuda_device import device_info

        results["host"]["gpu"] = device_info(0).get("gpu")
        import tensorrt

        results["host"]["tensorrt"] = tensorrt.__version__
    except Exception as e:  # noqa: BLE001 - the bench still runs the CPU side
        results["host"]["gpu"] = f"none ({e})"
    engines = Path(tempfile.mkdtemp(prefix="calib-engines-"))
    for case in cases:
        rows: dict[str, Any] = {}
        for forward in ("onnxruntime", "tensorrt_cold", "tensorrt_cached", "tensorrt_cached_cpubins",
                        "plain_onnxruntime", "plain_tensorrt"):
            if forward.endswith("tensorrt") or forward.startswith("tensorrt"):
                if "none" in str(results["host"].get("gpu")):
                    continue
            with tempfile.TemporaryDirectory() as tmp:
                res = Path(tmp) / "r.json"
                env = {**os.environ, "TRTPIPE_CACHE_DIR": str(engines / case)}
                t0 = time.perf_counter()
                p = subprocess.run([sys.executable, __file__, "child", str(folder / case), forward, str(res)], env=env,
                                   capture_output=True, text=True)
                wall = time.perf_counter() - t0
                if p.returncode != 0:
                    rows[forward] = {"error": p.stderr.strip().splitlines()[-1:]}
                    print(f"[{case}] {forward}: failed: {p.stderr[-800:]}", file=sys.stderr)
                    continue
                rows[forward] = json.loads(res.read_text())
                rows[forward]["wall_seconds"] = round(wall, 3)
            print(f"[{case}] {forward}: {rows[forward].get('seconds')}", file=sys.stderr, flush=True)
        ort = rows.get("onnxruntime", {}).get("scales_hex")
        gpu_bins, cpu_bins = rows.get("tensorrt_cached", {}), rows.get("tensorrt_cached_cpubins", {})
        if "scales_hex" in gpu_bins and "scales_hex" in cpu_bins:  # the same engine's values, binned on GPU and CPU
            gpu_bins["vs_cpu_binning"] = {
                "tensors": len(cpu_bins["scales_hex"]),
                "identical_scales": sum(gpu_bins["scales_hex"].get(n) == v for n, v in cpu_bins["scales_hex"].items())}
        for name in ("tensorrt_cold", "tensorrt_cached", "tensorrt_cached_cpubins"):
            r = rows.get(name, {})
            if ort and "scales_hex" in r:
                same = [n for n in ort if r["scales_hex"].get(n) == ort[n]]
                rel = [abs(r["amax"][n] - rows["onnxruntime"]["amax"][n]) / rows["onnxruntime"]["amax"][n]
                       for n in ort if n in r["amax"] and rows["onnxruntime"]["amax"][n] > 0]
                r["vs_onnxruntime"] = {"tensors": len(ort), "identical_scales": len(same),
                                       "max_rel_amax_diff": float(max(rel)) if rel else None,
                                       "within_1e-5": int(sum(x <= SAME for x in rel))}
        if case == "resnet18" and (fixture / "tensorrt-8.6.0.cache").is_file():
            for r in rows.values():
                if "amax" in r:
                    r["vs_tensorrt_cache"] = _vs_cache(r["amax"], fixture / "tensorrt-8.6.0.cache",
                                                       folder / case / "model.onnx")
        for r in rows.values():
            r.pop("amax", None)
            r.pop("scales_hex", None)
        results["cases"][case] = rows
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=1))
    print(json.dumps({c: {f: (r.get("seconds", {}).get("total"), r.get("vs_onnxruntime"), r.get("vs_tensorrt_cache"),
                              r.get("vs_cpu_binning"))
                          for f, r in rows.items()} for c, rows in results["cases"].items()}, indent=1))


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "child":
        child(Path(sys.argv[2]), sys.argv[3], Path(sys.argv[4]))
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=["make", "run"])
    ap.add_argument("dir", type=Path)
    ap.add_argument("--out", type=Path, default=ROOT / "bench/results/calibration_gpu.json")
    ap.add_argument("--cases", default="resnet18,resnet50")
    ap.add_argument("--fixture", type=Path,
                    default=Path(os.environ.get("TRTPIPE_FIXTURE_DIR") or ROOT.parent / "shared/fixtures/trt86-resnet18-entropy2"))
    a = ap.parse_args()
    if a.what == "make":
        make(a.dir, a.fixture)
    else:
        run(a.dir, a.out, a.fixture, [c for c in a.cases.split(",") if c])


if __name__ == "__main__":
    main()
