"""Issue 22's large-data show on a CPU (onnxruntime backend): a folder of 20,000 PNG crops
(224x224, from scikit-image's photos; about 11 GiB as float32 if materialized) through
`dvc repro` with torchvision's MobileNetV3-Small (seeded weights), prepare streaming the
splits (data.stream: auto); the peak RSS of every stage (its timings file); evaluate@fp32's
samples/s against a plain onnxruntime loop over the same files (PIL decode, normalize,
InferenceSession.run in batches) in the same run; and a 1,000-image subset through both paths
(streamed and in memory) whose compare.json numbers must be the same.

    python bench/streaming_20k.py --work /tmp/stream20k --out bench/results/streaming_20k_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field", "retina", "camera",
          "colorwheel", "coins")  # one class folder each


def _crop_worker(args: tuple[int, int, str]) -> None:
    from PIL import Image
    from skimage import data as skd

    start, stop, root = args
    photos = []
    for name in PHOTOS:
        arr = getattr(skd, name)()
        if arr.ndim == 2:
            arr = np.stack([arr] * 3, -1)
        photos.append(Image.fromarray(arr[..., :3].astype(np.uint8)))
    rng = np.random.default_rng(start)
    for i in range(start, stop):
        k = i % len(photos)
        im = photos[k]
        w, h = im.size
        s = int(min(w, h) * rng.uniform(0.35, 1.0))
        x0, y0 = int(rng.integers(0, w - s + 1)), int(rng.integers(0, h - s + 1))
        crop = im.crop((x0, y0, x0 + s, y0 + s)).resize((224, 224), Image.BILINEAR)
        if rng.random() < 0.5:
            crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
        folder = Path(root) / f"{k:02d}_{PHOTOS[k]}"
        folder.mkdir(parents=True, exist_ok=True)
        crop.save(folder / f"{i:05d}.png")


def make_images(root: Path, n: int) -> float:
    from multiprocessing import Pool

    t0 = time.monotonic()
    if root.is_dir() and sum(1 for _ in root.rglob("*.png")) == n:
        return 0.0
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    chunks = [(i, min(n, i + 1000), str(root)) for i in range(0, n, 1000)]
    with Pool(2) as pool:
        pool.map(_crop_worker, chunks)
    return round(time.monotonic() - t0, 1)


def _sh(cwd: Path, *argv: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}",
           "DVC_NO_ANALYTICS": "1", "GIT_AUTHOR_NAME": "b", "GIT_AUTHOR_EMAIL": "b@b", "GIT_COMMITTER_NAME": "b",
           "GIT_COMMITTER_EMAIL": "b@b"}
    p = subprocess.run(list(argv), cwd=cwd, env=env, capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} in {cwd} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p.stdout + p.stderr


def project(root: Path, images: Path, weights: Path, stream: Any, calibration_share: float) -> Path:
    shutil.rmtree(root, ignore_errors=True)
    (root / "configs").mkdir(parents=True)
    config = {
        "model": {"name": "mnv3s", "source": "torchvision", "arch": "mobilenet_v3_small", "checkpoint": str(weights),
                  "num_classes": 1000, "inputs": [{"name": "input", "shape": [3, 224, 224]}], "outputs": [{"name": "logits"}]},
        "data": {"source": "image_folder", "path": str(images), "stream": stream, "seed": 0,
                 "split": {"train": 0.0, "calibration": calibration_share, "evaluation": 1.0 - calibration_share},
                 "preprocess": {"scale": 1 / 255, "mean": MEAN, "std": STD}},
        "validate": {"num_samples": 256, "atol": 1.0e-3, "min_cosine": 0.9999, "batch_size": 32},
        "calibration": {"method": "entropy", "num_samples": 512, "batch_size": 32},
        "build": {"backend": "onnxruntime", "profile": {"min_batch": 1, "opt_batch": 32, "max_batch": 128}},
        "evaluate": {"batch_size": 32, "metrics": ["top1"],
                     "latency": {"warmup": 2, "iterations": 10, "batch_sizes": [1, 32]}},
        "publish": {"precisions": ["fp32", "fp16", "int8"]},
    }
    (root / "configs" / "mnv3s.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    (root / "params.yaml").write_text("config: configs/mnv3s.yaml\n")
    _sh(root, "git", "init", "-q")
    _sh(root, "dvc", "init", "-q")
    _sh(root, "trtpipe", "dvc")
    return root


def repro(root: Path) -> dict[str, Any]:
    t0 = time.monotonic()
    log = _sh(root, "dvc", "repro")
    wall = round(time.monotonic() - t0, 1)
    timings = {p.stem: json.loads(p.read_text()) for p in sorted((root / "artifacts" / "timings").glob("*.json"))}
    comp = json.loads((root / "artifacts" / "compare" / "compare.json").read_text())
    prep = json.loads((root / "artifacts" / "prepare" / "prepare.json").read_text())
    return {"dvc_repro_seconds": wall, "stages": [ln.split("'")[1] for ln in log.splitlines() if ln.startswith("Running stage")],
            "peak_rss_mb": {k: v.get("peak_rss_mb") for k, v in timings.items()},
            "seconds": {k: v.get("seconds", v.get("build_seconds")) for k, v in timings.items()},
            "splits": {k: prep["data"][k] for k in ("train", "calibration", "evaluation")},
            "npz_bytes": {n: (root / "artifacts" / "prepare" / n).stat().st_size for n in ("calib.npz", "eval.npz")},
            "compare": comp}


def plain_loop(files: list[str], onnx_path: Path, batch: int) -> dict[str, Any]:
    """What a user would write: PIL decode + normalize + InferenceSession.run, batch by batch."""
    import onnxruntime as ort
    from PIL import Image

    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    mean, std = np.array(MEAN, np.float32)[:, None, None], np.array(STD, np.float32)[:, None, None]
    t0 = time.monotonic()
    for i in range(0, len(files), batch):
        xs = []
        for f in files[i:i + batch]:
            with Image.open(f) as im:
                a = np.asarray(im.convert("RGB"), np.float32).transpose(2, 0, 1) / 255.0
            xs.append((a - mean) / std)
        sess.run(None, {"input": np.stack(xs)})
    secs = time.monotonic() - t0
    return {"samples": len(files), "seconds": round(secs, 1), "samples_per_s": round(len(files) / secs, 1)}


def numbers(comp: dict[str, Any]) -> dict[str, Any]:
    return {v: {k: row.get(k) for k in ("top1", "fp32_top1_agreement", "samples")} for v, row in comp["variants"].items()} | {
        "agreement": comp.get("agreement")}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/tmp/stream20k"))
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--images", type=int, default=20000)
    ap.add_argument("--subset", type=int, default=1000)
    args = ap.parse_args()
    import torch
    import torchvision

    from calibration.ort_session import cpu_summary

    args.work.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"cpu": cpu_summary(), "images": args.images}
    result["make_images_seconds"] = make_images(args.work / "images", args.images)
    weights = args.work / "mnv3s.pt"
    torch.manual_seed(0)
    torch.save(torchvision.models.mobilenet_v3_small(num_classes=1000).state_dict(), weights)

    # the 1,000-image subset, both ways: the same numbers
    sub = args.work / "subset"
    if not sub.is_dir():
        files = sorted((args.work / "images").rglob("*.png"))[:: max(1, args.images // args.subset)][: args.subset]
        for f in files:
            (sub / f.parent.name).mkdir(parents=True, exist_ok=True)
            os.link(f, sub / f.parent.name / f.name)
    both = {}
    for stream in (True, False):
        root = project(args.work / f"subset-{stream}", sub, weights, stream, 0.2)
        both["streamed" if stream else "in_memory"] = repro(root)
    a, b = (numbers(both[k]["compare"]) for k in ("streamed", "in_memory"))
    result["subset"] = {"images": args.subset, "same_compare_numbers": a == b,
                        "peak_rss_mb": {k: both[k]["peak_rss_mb"] for k in both},
                        "npz_bytes": {k: both[k]["npz_bytes"] for k in both}, "numbers": a}

    root = project(args.work / "full", args.work / "images", weights, "auto", 512 / args.images)
    full = repro(root)
    eval_files = json.loads(bytes(np.load(root / "artifacts" / "prepare" / "eval.npz")["__stream__"]).decode())["files"]
    loop = plain_loop(eval_files, root / "artifacts" / "export" / "model.onnx", 32)
    ev_secs = full["seconds"].get("evaluate-fp32")
    n_eval = full["splits"]["evaluation"]
    result["full"] = {k: v for k, v in full.items() if k != "compare"} | {"numbers": numbers(full["compare"])}
    result["throughput"] = {
        "evaluate_fp32_seconds": ev_secs, "evaluate_fp32_samples_per_s": round(n_eval / ev_secs, 1) if ev_secs else None,
        "plain_onnxruntime_loop": loop,
        "ratio": round((n_eval / ev_secs) / loop["samples_per_s"], 3) if ev_secs else None,
        "note": "evaluate@fp32 includes its latency runs (b1, b32: 2 warmup + 10 iterations each) and loading",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("subset", "throughput")}, indent=2))
    print(json.dumps(result["full"]["peak_rss_mb"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
