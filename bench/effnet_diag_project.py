"""A slim copy of an EfficientNet-Lite0 project (bench/tune_efficientnet.py's --work) that a GPU call
can carry (< 64 MiB): the FP32 ONNX, validate's report, calibrate's and tune's outputs, and the
first 16 evaluation crops; enough for `trtpipe build --precision int8` and `trtpipe diagnose`.

    .venv/bin/python bench/effnet_diag_project.py --work /tmp/tune_effnet --out build/effnet_diag
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import numpy as np

FILES = {"export": ("model.onnx", "export.json"), "validate": ("validate.json",),
         "calibrate": ("calibrate.json", "calibration.cache", "maxima.json", "model.qdq.onnx", "ranges.json"),
         "tune": ("tune.json", "model.qdq.onnx", "layer_precisions.json", "calibration.cache")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--samples", type=int, default=16)
    a = ap.parse_args()
    if a.out.exists():
        shutil.rmtree(a.out)
    for stage, names in FILES.items():
        (a.out / "artifacts" / stage).mkdir(parents=True)
        for n in names:
            shutil.copy2(a.work / "artifacts" / stage / n, a.out / "artifacts" / stage / n)
    shutil.copytree(a.work / "configs", a.out / "configs")
    (a.out / "params.yaml").write_text("config: configs/efficientnet_lite0.yaml\noverride: true\n")
    (a.out / "artifacts" / "prepare").mkdir(parents=True)
    with np.load(a.work / "artifacts" / "prepare" / "eval.npz") as z:
        np.savez(a.out / "artifacts" / "prepare" / "eval16.npz", **{k: z[k][:a.samples] for k in z.files})
    total = sum(p.stat().st_size for p in a.out.rglob("*") if p.is_file())
    print(f"{a.out}: {total / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
