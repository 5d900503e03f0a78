"""Prepare the Q/DQ placement benchmark on a CPU: export a model, calibrate it, write the
TensorRT calibration cache and one Q/DQ ONNX per placement, and check each in onnxruntime.

Full mode (here, with torch, torchvision and scikit-image):

    .venv/bin/python bench/qdq_prepare.py --out .qdqbench/resnet50 --arch resnet50
    .venv/bin/python bench/qdq_prepare.py --out .qdqbench/effnet --arch efficientnet_lite0

1. export: torchvision ResNet-50 / ResNet-18 (``weights=None`` after ``torch.manual_seed(0)``,
   the export bench/export_torchvision.py does) or EfficientNet-Lite0 (built here: timm's
   ``efficientnet_lite0`` layout, ReLU6, no squeeze-excite, seeded random weights); opset
   17, dynamic batch, TorchScript exporter (dynamo=False);
2. calibration data: random crops of scikit-image's photos (``--calib`` for calibration,
   ``--eval`` held out), ImageNet-normalized;
3. ranges: entropy calibration under the ``tensorrt`` rules (what the calibrate stage
   does), written as ``ranges.json`` and ``calibration.cache`` (``TRT-<version>-EntropyCalibration2``);
4. Q/DQ ONNX per ``--variants``: ``old`` (placement "inputs": the earlier one), ``new``
   (placement "tensorrt"), and the new placement with some nodes left float, to test why an
   explicit engine could still trail the implicit one: ``new_gapfloat`` (GlobalAveragePool:
   TensorRT 8.6 imports it as a Reduce layer), ``new_stemfloat`` (the first Conv, 3 input
   channels), ``new_dwfloat`` (depthwise Convs), ``new_fcfloat`` (Gemm / MatMul: a GEMV at
   batch 1); each with its placement summary ``<variant>.placement.json``;
5. onnxruntime (CPU) against the FP32 model on the held-out crops: cosine, top-1
   agreement, Q/DQ node counts -> ``prepare.json``; the held-out inputs (float16) and the
   FP32 logits are saved for the GPU script's accuracy check.

Kit mode (the GPU kit's Python: no torch, no scikit-image), from an FP32 ONNX and the
ranges of a full-mode run, writes only step 4 (with onnxruntime 1.20's onnx), e.g.

    $KITPY bench/qdq_prepare.py --out /tmp/q/resnet50 --onnx /tmp/q/resnet50.onnx --ranges .qdqbench/resnet50/ranges.json

``--parts-mb N`` also packs the files the GPU script needs into ``parts/p1 .. pK`` (each
under N MiB, for one device call each) with the commands to reassemble them.

Keep ``--out`` out of git: outside the checkout, or a folder listed in .git/info/exclude.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sys
import tarfile
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

VARIANTS = {
    "old": {"placement": "inputs", "exclude": []},
    "new": {"placement": "tensorrt", "exclude": []},
    "new_gapfloat": {"placement": "tensorrt", "exclude": ["@gap"]},
    "new_stemfloat": {"placement": "tensorrt", "exclude": ["@stem"]},
    "new_dwfloat": {"placement": "tensorrt", "exclude": ["@depthwise"]},
    "new_fcfloat": {"placement": "tensorrt", "exclude": ["@gemm"]},
}
ARCHS = ("resnet50", "resnet18", "efficientnet_lite0")
T0 = time.monotonic()


def log(msg: str) -> None:
    print(f"[qdq_prepare {time.monotonic() - T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_json(path: Path, data: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    os.replace(tmp, path)


# -- models (torch only in full mode) -------------------------------------------------------
def efficientnet_lite0() -> Any:
    """EfficientNet-Lite0 as timm lays it out (ReLU6, no SE, stem 32 / head 1280 fixed)."""
    import torch
    from torch import nn

    def conv_bn(cin: int, cout: int, k: int, s: int, groups: int = 1, act: bool = True) -> nn.Sequential:
        layers = [nn.Conv2d(cin, cout, k, s, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
        if act:
            layers.append(nn.ReLU6(inplace=True))
        return nn.Sequential(*layers)

    class Block(nn.Module):
        def __init__(self, cin: int, cout: int, k: int, s: int, expand: int) -> None:
            super().__init__()
            mid = cin * expand
            layers = [conv_bn(cin, mid, 1, 1)] if expand != 1 else []
            layers += [conv_bn(mid, mid, k, s, groups=mid), conv_bn(mid, cout, 1, 1, act=False)]
            self.body = nn.Sequential(*layers)
            self.skip = s == 1 and cin == cout

        def forward(self, x: Any) -> Any:
            y = self.body(x)
            return y + x if self.skip else y

    class EfficientNetLite0(nn.Module):
        # (expand, kernel, stride, out channels, repeats): timm's efficientnet_lite0 arch_def
        STAGES = [(1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 5, 2, 40, 2), (6, 3, 2, 80, 3), (6, 5, 1, 112, 3),
                  (6, 5, 2, 192, 4), (6, 3, 1, 320, 1)]

        def __init__(self, num_classes: int = 1000) -> None:
            super().__init__()
            self.stem = conv_bn(3, 32, 3, 2)
            blocks, cin = [], 32
            for e, k, s, c, n in self.STAGES:
                for i in range(n):
                    blocks.append(Block(cin, c, k, s if i == 0 else 1, e))
                    cin = c
            self.blocks = nn.Sequential(*blocks)
            self.head = conv_bn(cin, 1280, 1, 1)
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.classifier = nn.Linear(1280, num_classes)

        def forward(self, x: Any) -> Any:
            x = self.pool(self.head(self.blocks(self.stem(x))))
            return self.classifier(torch.flatten(x, 1))

    net = EfficientNetLite0()
    for m in net.modules():  # timm's _init_weight_goog
        if isinstance(m, nn.Conv2d):
            fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
            nn.init.normal_(m.weight, 0, (2.0 / fan_out) ** 0.5)
        elif isinstance(m, nn.Linear):
            bound = 1.0 / m.weight.shape[0] ** 0.5
            nn.init.uniform_(m.weight, -bound, bound)
            nn.init.zeros_(m.bias)
    return net


def export(arch: str, path: Path, size: int) -> dict[str, Any]:
    import torch

    torch.manual_seed(0)
    import torchvision

    if arch == "efficientnet_lite0":
        model = efficientnet_lite0().eval()
    else:
        model = getattr(torchvision.models, arch)(weights=None).eval()
    x = torch.randn(1, 3, size, size)
    kwargs = dict(input_names=["input"], output_names=["logits"], opset_version=17, do_constant_folding=True,
                  dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    t0 = time.perf_counter()
    with torch.no_grad():
        torch.onnx.export(model, (x,), str(path), dynamo=False, **kwargs)
    return {"arch": arch, "torch": torch.__version__, "torchvision": torchvision.__version__,
            "export_seconds": round(time.perf_counter() - t0, 2), "opset": 17, "seed": 0}


def photo_crops(n: int, size: int, seed: int) -> np.ndarray:
    """Random crops (with flips) of scikit-image's photos, ImageNet-normalized, NCHW float32."""
    from PIL import Image
    from skimage import data as skd

    photos = [skd.astronaut(), skd.coffee(), skd.chelsea(), skd.rocket()]
    rng = np.random.default_rng(seed)
    out = np.empty((n, 3, size, size), np.float32)
    mean, std = np.array([0.485, 0.456, 0.406], np.float32), np.array([0.229, 0.224, 0.225], np.float32)
    for k in range(n):
        im = photos[rng.integers(len(photos))]
        s = int(rng.integers(min(size, min(im.shape[:2])) // 2, min(im.shape[:2]) + 1))
        y, x = rng.integers(0, im.shape[0] - s + 1), rng.integers(0, im.shape[1] - s + 1)
        crop = np.asarray(Image.fromarray(im[y:y + s, x:x + s]).resize((size, size), Image.BILINEAR), np.float32)
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        out[k] = ((crop / 255 - mean) / std).transpose(2, 0, 1)
    return out


# -- calibration and Q/DQ (no torch) ---------------------------------------------------------
def calibrate(onnx_path: Path, data: np.ndarray, batch: int, method: str, rules_name: str,
              threads: Optional[int] = None) -> dict[str, Any]:
    from calibration.collect import collect_histograms
    from calibration.rules import get_rules, ranges_under

    rules = get_rules(rules_name)
    batches = [data[k:k + batch] for k in range(0, len(data) - batch + 1, batch)]
    col = collect_histograms(onnx_path, batches, total=len(batches), progress=False, growth=rules.growth,
                             threads=threads)
    amax, range_from, _ = ranges_under(rules, col.histograms, method, col.node_ops)
    return {"amax": amax, "range_from": range_from, "batches": len(batches), "samples": len(batches) * batch,
            "method": method, "rules": rules_name}


def resolve_variant_excludes(onnx_path: Path, spec: list[str]) -> list[str]:
    """Node names for a variant's exclusions: ``@gap`` the GlobalAveragePool nodes, ``@stem``
    the first Conv, ``@depthwise`` the Convs with group > 1, ``@gemm`` the Gemm / MatMul nodes;
    anything else is a node name or glob and passes as it is."""
    from calibration.onnx_io import load_model

    nodes = load_model(onnx_path).graph.node

    def group(n: Any) -> int:
        return next((a.i for a in n.attribute if a.name == "group"), 1)

    picks = {"@gap": lambda n: n.op_type == "GlobalAveragePool",
             "@depthwise": lambda n: n.op_type == "Conv" and group(n) > 1,
             "@gemm": lambda n: n.op_type in ("Gemm", "MatMul")}
    out: list[str] = []
    for item in spec:
        if item == "@stem":
            out += [next(n.name for n in nodes if n.op_type == "Conv")]
        elif item in picks:
            out += [n.name for n in nodes if picks[item](n)]
        else:
            out.append(item)
    return out


def write_variants(onnx_path: Path, out: Path, stem: str, amax: dict[str, float], variants: list[str]) -> dict[str, Any]:
    from calibration.qdq import quantize_qdq

    done: dict[str, Any] = {}
    for name in variants:
        spec = VARIANTS[name]
        path = out / f"{stem}.{name}.qdq.onnx"
        t0 = time.perf_counter()
        exclude = resolve_variant_excludes(onnx_path, spec["exclude"])
        summary = quantize_qdq(onnx_path, path, amax, placement=spec["placement"], exclude_nodes=exclude)
        write_json(out / f"{stem}.{name}.placement.json", summary)
        counts = {"q_nodes": summary["q_nodes"], "dq_nodes": summary["dq_nodes"],
                  "activations": len(summary["activations"]), "weights": len(summary["weights"]),
                  "residual_adds": len(summary["residual_adds"]), "concat_groups": len(summary["concat_groups"]),
                  "pools": len(summary["pools"]),
                  "int8_nodes": sum(v == "int8" for v in summary["expected_precision"].values())}
        done[name] = {"file": path.name, "placement": spec["placement"], "exclude_nodes": exclude, **counts,
                      "seconds": round(time.perf_counter() - t0, 2)}
        log(f"{name}: {path.name} ({counts['q_nodes']} Q, {counts['dq_nodes']} DQ, "
            f"{counts['residual_adds']} residual Adds, {counts['pools']} pools)")
    return done


def ort_check(fp32: Path, qdq: Path, x: np.ndarray, ref: Optional[np.ndarray] = None) -> dict[str, Any]:
    from calibration.ort_session import make_session

    def run(path: Path) -> np.ndarray:
        sess = make_session(path)  # exact Q/DQ semantics
        name = sess.get_inputs()[0].name
        return np.concatenate([sess.run(None, {name: x[k:k + 16]})[0] for k in range(0, len(x), 16)])

    ref = run(fp32) if ref is None else ref
    got = run(qdq)
    a, b = ref.reshape(len(ref), -1).astype(np.float64), got.reshape(len(got), -1).astype(np.float64)
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-30)
    return {"samples": int(len(x)), "cosine_mean": float(cos.mean()), "cosine_min": float(cos.min()),
            "top1_agreement": float((a.argmax(1) == b.argmax(1)).mean()),
            "max_abs_diff": float(np.abs(a - b).max())}


def pack_parts(out: Path, files: list[Path], part_mb: int, dest: str) -> dict[str, Any]:
    """One uncompressed tar of ``files`` cut into ``parts/pK/bundle.tar.NNN`` (< part_mb MiB
    each), and ``parts/ASSEMBLE.txt``: the device commands that put them together in ``dest``."""
    parts = out / "parts"
    if parts.exists():
        for p in sorted(parts.rglob("*"), reverse=True):
            p.unlink() if p.is_file() else p.rmdir()
    parts.mkdir()
    tar_path = out / "bundle.tar"
    with tarfile.open(tar_path, "w") as tar:
        for f in files:
            tar.add(f, arcname=f.name)
    limit = part_mb << 20
    digest = sha256(tar_path)
    names = []
    with open(tar_path, "rb") as src:
        k = 0
        while True:
            block = src.read(limit)
            if not block:
                break
            folder = parts / f"p{k + 1}"
            folder.mkdir()
            (folder / f"bundle.tar.{k:03d}").write_bytes(block)
            names.append(f"{folder.relative_to(out)}/bundle.tar.{k:03d}")
            k += 1
    tar_path.unlink()
    try:  # carry paths are relative to the repository root
        rel = str(out.resolve().relative_to(Path(__file__).resolve().parents[1]))
    except ValueError:
        rel = "<this folder, relative to the repository root: it must be inside the checkout and git-ignored>"
    lines = ["On the device, one `run` call per part, back to back (the machine must stay warm):"]
    for name in names:
        folder = name.rsplit("/", 1)[0]
        lines.append(f'  run carry=["{rel}/{folder}"] command="mkdir -p {dest} && cp {rel}/{folder}/bundle.tar.* {dest}/"')
    lines.append("then, in the next call:")
    lines.append(f"  cd {dest} && cat bundle.tar.* > bundle.tar && echo '{digest}  bundle.tar' | sha256sum -c - "
                 "&& tar -xf bundle.tar && rm bundle.tar bundle.tar.*")
    (parts / "ASSEMBLE.txt").write_text("\n".join(lines) + "\n")
    return {"parts": names, "bundle_sha256": digest, "part_mb": part_mb, "dest": dest,
            "files": [f.name for f in files]}


# -- main ------------------------------------------------------------------------------------
def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="output folder (keep it out of git)")
    ap.add_argument("--arch", choices=ARCHS, default="resnet50")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--calib", type=int, default=256, help="calibration crops (full batches of --batch)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--eval", type=int, default=64, help="held-out crops for the accuracy checks")
    ap.add_argument("--method", default="entropy", choices=("entropy", "minmax", "percentile"))
    ap.add_argument("--rules", default="tensorrt", choices=("tensorrt", "reference"))
    ap.add_argument("--trt-version", default="8.6.0", help="version in the calibration cache header")
    ap.add_argument("--variants", default="old,new", help=f"comma list of {', '.join(VARIANTS)}")
    ap.add_argument("--onnx", type=Path, help="kit mode: an FP32 ONNX already exported (skips export)")
    ap.add_argument("--ranges", type=Path, help="kit mode: ranges.json of a full-mode run (skips calibration)")
    ap.add_argument("--parts-mb", type=int, default=0, help="also pack the GPU files into parts under this size")
    ap.add_argument("--threads", type=int, default=0, help="onnxruntime threads (0: its default)")
    args = ap.parse_args(argv)

    variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        ap.error(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    stem = args.arch if args.onnx is None else args.onnx.stem
    report: dict[str, Any] = {"schema": 1, "arch": args.arch, "out": str(out), "python": platform.python_version(),
                              "numpy": np.__version__, "argv": sys.argv[1:]}
    import onnx
    import onnxruntime

    report.update(onnx=onnx.__version__, onnxruntime=onnxruntime.__version__)

    if args.onnx is not None:  # kit mode
        if args.ranges is None:
            ap.error("--onnx needs --ranges (the ranges.json of a full-mode run)")
        fp32 = args.onnx
        ranges = json.loads(args.ranges.read_text())
        amax = {k: float(v) for k, v in ranges["amax"].items()}
        report.update(mode="kit", onnx=str(fp32), onnx_sha256=sha256(fp32), ranges=str(args.ranges),
                      ranges_onnx_sha256=ranges.get("onnx_sha256"))
        if ranges.get("onnx_sha256") and ranges["onnx_sha256"] != report["onnx_sha256"]:
            log("WARNING: this ONNX differs from the one the ranges were calibrated on (sha256); "
                "tensor names may still match, the scales describe other weights")
        report["variants"] = write_variants(fp32, out, stem, amax, variants)
        write_json(out / "prepare.json", report)
        return 0

    from calibration.algorithms import amax_to_scale
    from calibration.cache import cache_header, write_cache

    fp32 = out / f"{stem}.onnx"
    log(f"exporting {args.arch} to {fp32}")
    report["export"] = export(args.arch, fp32, args.size)
    report["onnx_sha256"] = sha256(fp32)
    write_json(out / "prepare.json", report)

    log(f"{args.calib} calibration + {args.eval} held-out photo crops at {args.size}px")
    data = photo_crops(args.calib + args.eval, args.size, seed=0)
    calib, held_out = data[:args.calib], data[args.calib:]
    t0 = time.perf_counter()
    cal = calibrate(fp32, calib, args.batch, args.method, args.rules, args.threads or None)
    amax = cal.pop("amax")
    report["calibration"] = {**cal, "tensors": len(amax), "seconds": round(time.perf_counter() - t0, 1)}
    log(f"calibrated {len(amax)} tensors in {report['calibration']['seconds']} s")
    write_json(out / "ranges.json", {"amax": amax, "onnx_sha256": report["onnx_sha256"], **cal})
    algorithm = {"entropy": "EntropyCalibration2", "minmax": "MinMaxCalibration",
                 "percentile": "EntropyCalibration2"}[args.method]
    write_cache(out / "calibration.cache", {k: amax_to_scale(v) for k, v in amax.items()}, args.trt_version, algorithm)
    report["cache"] = {"file": "calibration.cache", "header": cache_header(args.trt_version, algorithm)}

    report["variants"] = write_variants(fp32, out, stem, amax, variants)
    write_json(out / "prepare.json", report)

    log("onnxruntime: FP32 against each Q/DQ model on the held-out crops")
    from calibration.ort_session import make_session

    sess = make_session(fp32)  # exact Q/DQ semantics
    eval16 = held_out.astype(np.float16)  # what the GPU script feeds (as float32)
    x = eval16.astype(np.float32)
    ref = np.concatenate([sess.run(None, {"input": x[k:k + 16]})[0] for k in range(0, len(x), 16)])
    np.save(out / "eval_inputs.f16.npy", eval16)
    np.save(out / "eval_logits.fp32.npy", ref.astype(np.float32))
    for name in variants:
        report["variants"][name]["onnxruntime_vs_fp32"] = ort_check(fp32, out / report["variants"][name]["file"], x, ref)
        log(f"{name}: {report['variants'][name]['onnxruntime_vs_fp32']}")
    report["files"] = {p.name: {"bytes": p.stat().st_size, "sha256": sha256(p)}
                       for p in sorted(out.iterdir()) if p.is_file() and p.suffix in (".onnx", ".cache", ".npy", ".json")
                       and p.name != "prepare.json"}
    if args.parts_mb:
        gpu_files = [fp32, out / "calibration.cache", out / "eval_inputs.f16.npy", out / "eval_logits.fp32.npy"]
        for name in variants:
            gpu_files += [out / report["variants"][name]["file"], out / f"{stem}.{name}.placement.json"]
        report["parts"] = pack_parts(out, gpu_files, args.parts_mb, f"/tmp/qdqbench/{stem}")
        log(f"packed {len(report['parts']['parts'])} parts; see {out / 'parts' / 'ASSEMBLE.txt'}")
    report["elapsed_s"] = round(time.monotonic() - T0, 1)
    write_json(out / "prepare.json", report)
    log(f"done: {out / 'prepare.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
