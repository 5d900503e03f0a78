"""Is the CPU INT8 simulation the same on every CPU, and does it predict the engine?

EfficientNet-Lite0 with its real ImageNet weights (configs/efficientnet_lite0.yaml): the
pipeline's prepare, export, validate and calibrate (entropy, onnxruntime backend) make the
Q/DQ ONNX; then the same Q/DQ model runs in onnxruntime in both modes of
calibration.ort_session on the held-out crops:

* ``exact``: dequantize -> float op -> quantize (QDQ fusion off), what trtpipe now uses;
* ``fused``: onnxruntime's integer kernels (what trtpipe used before), which saturate u8 x s8
  pair sums on x86 CPUs without VNNI;

each against the FP32 ONNX (top-1 agreement, cosine). Three places:

1. here (``--work``: runs the stages, needs torch), writes ``--out`` and the GPU bundle;
2. under an emulated CPU, e.g. ``qemu-x86_64 -cpu Haswell`` (AVX2, no AVX-512, no VNNI),
   with ``--measure-only --limit N --cpu-label ...`` (reads the work folder);
3. on a GPU host with the TensorRT kit (``--gpu --bundle DIR``, no torch): the host CPU in
   both modes, and TensorRT 8.6 engines built from the same Q/DQ ONNX (explicit route) and
   from calibrate's cache (implicit route): each against FP32, and simulation vs engine.

    nice -n 5 .venv/bin/python bench/int8_exactness.py                       # about 3 minutes on 2 cores
    qemu-x86_64 -cpu Haswell $(readlink -f .venv/bin/python) bench/int8_exactness.py --measure-only \\
        --limit 64 --cpu-label "qemu-user -cpu Haswell (AVX2, no AVX-512, no VNNI)" --out bench/results/int8_exactness_haswell.json
    . /tmp/kit/env.sh && $KITPY bench/int8_exactness.py --gpu --bundle /tmp/exact_bundle --out $OUT/int8_exactness_gpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Mapping, Optional

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CONFIG = "configs/efficientnet_lite0.yaml"
FACTORY = "configs/efficientnet_lite0_factory.py"


def _agree(got: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    g, r = got.reshape(len(got), -1).astype(np.float64), ref.reshape(len(ref), -1).astype(np.float64)
    cos = (g * r).sum(1) / np.maximum(np.linalg.norm(g, axis=1) * np.linalg.norm(r, axis=1), 1e-30)
    return {"top1_agreement_pct": round(100 * float((g.argmax(1) == r.argmax(1)).mean()), 2),
            "cosine_mean": round(float(cos.mean()), 5), "cosine_min": round(float(cos.min()), 5), "samples": len(g)}


def _ort(path: Path, x: np.ndarray, mode: str) -> tuple[np.ndarray, float]:
    from calibration.ort_session import make_session

    s = make_session(path, mode=mode)
    name = s.get_inputs()[0].name
    t0 = time.perf_counter()
    out = np.concatenate([s.run(None, {name: x[i:i + 32]})[0] for i in range(0, len(x), 32)])
    return out, time.perf_counter() - t0


def _modes(fp32_onnx: Path, qdq_onnx: Path, x: np.ndarray, ref: Optional[np.ndarray],
           modes: tuple[str, ...] = ("exact", "fused")) -> dict[str, Any]:
    if ref is None:
        ref, _ = _ort(fp32_onnx, x, "exact")
    rows: dict[str, Any] = {}
    outs: dict[str, np.ndarray] = {}
    for mode in modes:
        outs[mode], secs = _ort(qdq_onnx, x, mode)
        rows[mode] = {**_agree(outs[mode], ref), "seconds": round(secs, 2)}
        print(f"[bench] onnxruntime {mode:5s}: {rows[mode]}", flush=True)
    if len(outs) == 2:
        rows["exact_vs_fused"] = _agree(outs["fused"], outs["exact"])
    return {"rows": rows, "outputs": outs, "reference": ref}


def _cpu(label: Optional[str]) -> dict[str, Any]:
    from calibration.ort_session import cpu_features, cpu_summary

    return {"label": label or cpu_summary(), "detected": cpu_features(), "emulated": bool(label)}


def cpu_main(a: argparse.Namespace) -> None:
    work = a.work.resolve()
    if not a.measure_only:
        from bench.tune_efficientnet import _setup

        _setup(work, a.fresh)
    os.chdir(work)
    sys.path.insert(0, str(work))
    A = Path("artifacts")
    if not a.measure_only:
        from pipeline.config import load_config
        from pipeline.stages import calibrate, export, prepare, validate

        from configs.efficientnet_lite0_factory import save_checkpoint

        cfg = load_config(quiet=True)
        if not Path(cfg.model.checkpoint).is_file():
            save_checkpoint(cfg.model.checkpoint)
        for name, report, fn in [
            ("prepare", A / "prepare/prepare.json", lambda: prepare.run(cfg, A / "prepare")),
            ("export", A / "export/export.json", lambda: export.run(cfg, A / "prepare/model.pt", A / "export")),
            ("validate", A / "validate/validate.json", lambda: validate.run(
                cfg, A / "prepare/model.pt", A / "export/model.onnx", A / "prepare/eval.npz", A / "validate")),
            ("calibrate", A / "calibrate/calibrate.json", lambda: calibrate.run(
                cfg, A / "export/model.onnx", A / "prepare/calib.npz", A / "calibrate")),
        ]:
            if report.is_file() and not a.fresh:
                print(f"[bench] {name}: reused", flush=True)
                continue
            t0 = time.perf_counter()
            fn()
            print(f"[bench] {name}: {time.perf_counter() - t0:.1f} s", flush=True)
    with np.load(A / "prepare/eval.npz") as z:
        x = z["input"][: a.limit or None]
    res = _modes(A / "export/model.onnx", A / "calibrate/model.qdq.onnx", x, None, tuple(a.modes.split(",")))
    out = {"model": "EfficientNet-Lite0 (real ImageNet weights)", "calibration": "entropy (calibrate stage, tensorrt rules)",
           "cpu": _cpu(a.cpu_label), "onnxruntime": __import__("onnxruntime").__version__, **res["rows"]}
    _write(a.out, out)
    if a.bundle and not a.measure_only:
        _bundle(a.bundle.resolve(), A, res["reference"], x)


def _bundle(bundle: Path, A: Path, ref: np.ndarray, x: np.ndarray) -> None:
    from configs.efficientnet_lite0_factory import to_model_input

    if bundle.exists():
        shutil.rmtree(bundle)
    (bundle / "calibrate").mkdir(parents=True)
    shutil.copy(A / "export/model.onnx", bundle / "model.onnx")
    for f in ("model.qdq.onnx", "calibration.cache", "ranges.json", "calibrate.json"):
        shutil.copy(A / "calibrate" / f, bundle / "calibrate" / f)
    (bundle / "config.yaml").write_text(Path(CONFIG).read_text())
    u8 = np.rint(x.transpose(0, 2, 3, 1) * 128.0 + 127.0).astype(np.uint8)
    assert np.array_equal(to_model_input(u8), x), "the uint8 crops do not reproduce eval.npz"
    np.savez_compressed(bundle / "eval_u8.npz", crops=u8)
    np.save(bundle / "reference_fp32.npy", ref)
    size = sum(p.stat().st_size for p in bundle.rglob("*") if p.is_file())
    print(f"[bench] GPU bundle: {bundle} ({size / 2**20:.1f} MiB)", flush=True)


def _engine(route: str, bundle: Path, x: np.ndarray, work: Path, timing_cache: Path) -> tuple[np.ndarray, dict[str, Any]]:
    import yaml

    from pipeline.backends.base import BuildRequest
    from pipeline.backends.tensorrt_backend import TensorRTBackend
    from pipeline.config import Config
    from pipeline.runtime.trt_runner import TrtRunner

    data = yaml.safe_load((bundle / "config.yaml").read_text())
    data["build"] = {**data.get("build", {}), "backend": "tensorrt", "timing_cache": str(timing_cache),
                     "calibration_source": "cache", "int8_from_tune": False, "int8_route": route}
    cfg = Config.model_validate(data)
    out = work / route
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    t0 = time.monotonic()
    result = TensorRTBackend(progress=False).build(BuildRequest("int8", bundle / "model.onnx", out, cfg,
                                                                calib_dir=bundle / "calibrate"))
    info = {"route": route, "build_seconds": round(time.monotonic() - t0, 1), "flags": result.flags,
            "calibration": result.calibration}
    with TrtRunner(out / result.artifact) as r:
        got = np.concatenate([r.infer({"input": x[i:i + 32]})["logits"] for i in range(0, len(x), 32)])
        info["device"] = r.device()
    return got, info


def gpu_main(a: argparse.Namespace) -> None:
    from configs.efficientnet_lite0_factory import to_model_input

    bundle = a.bundle.resolve()
    with np.load(bundle / "eval_u8.npz") as z:
        x = to_model_input(z["crops"])
    ref = np.load(bundle / "reference_fp32.npy")
    res = _modes(bundle / "model.onnx", bundle / "calibrate/model.qdq.onnx", x, ref)
    out: dict[str, Any] = {"model": "EfficientNet-Lite0 (real ImageNet weights)", "cpu": _cpu(None),
                           "onnxruntime": __import__("onnxruntime").__version__, "host_cpu": res["rows"], "engines": {}}
    _write(a.out, out)
    work = Path(tempfile.mkdtemp(prefix="exact-engines-"))
    for route in a.routes.split(","):
        try:
            got, info = _engine(route, bundle, x, work, work / "timing.cache")
        except Exception as e:  # keep what was measured; name the failure
            out["engines"][route] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}
            _write(a.out, out)
            continue
        info["vs_fp32"] = _agree(got, ref)
        info["simulation_exact_vs_engine"] = _agree(got, res["outputs"]["exact"])
        info["simulation_fused_vs_engine"] = _agree(got, res["outputs"]["fused"])
        out["engines"][route] = info
        print(f"[bench] TensorRT int8 {route}: vs FP32 {info['vs_fp32']}; exact sim vs engine "
              f"{info['simulation_exact_vs_engine']}; fused sim vs engine {info['simulation_fused_vs_engine']}", flush=True)
        _write(a.out, out)


def _write(path: Path, data: Mapping[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "trtpipe_int8_exactness")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "int8_exactness_cpu.json")
    ap.add_argument("--bundle", type=Path, default=ROOT / "build" / "exact_bundle")
    ap.add_argument("--fresh", action="store_true")
    ap.add_argument("--measure-only", action="store_true", help="reuse the work folder's Q/DQ model; run no stage")
    ap.add_argument("--limit", type=int, default=0, help="evaluate the first N held-out crops only")
    ap.add_argument("--cpu-label", default=None, help="name the CPU (an emulated one: /proc/cpuinfo shows the host's)")
    ap.add_argument("--gpu", action="store_true", help="on a GPU host with the TensorRT kit: read --bundle")
    ap.add_argument("--routes", default="explicit,implicit")
    ap.add_argument("--modes", default="exact,fused", help="onnxruntime modes to run on the CPU (exact, fused)")
    a = ap.parse_args()
    a.out = a.out.resolve()
    gpu_main(a) if a.gpu else cpu_main(a)


if __name__ == "__main__":
    main()
