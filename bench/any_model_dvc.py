"""Models a user brings, each through `trtpipe dvc` + `dvc repro` on a CPU, as "Your own model"
describes: the sentence encoder (two int64 inputs, dynamic sequence, mask sentinels), the
three-head digit detector (a metric per output), and EfficientNet-Lite0 with its ImageNet
weights reading image folders of scikit-image photo crops (PNG files written here).

Writes, per model, what compare.json says of every variant: task metrics, agreement with FP32
and PyTorch per output, the tensors calibrate left in higher precision, the stages dvc ran
and the wall time (`--out`, JSON). Projects live in `--work` (default build/any_model).

    python bench/any_model_dvc.py --out bench/results/any_model_cpu.json [--only text,detector,efficientnet]
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

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _project(root: Path, config: dict[str, Any], modules: list[Path]) -> None:
    shutil.rmtree(root, ignore_errors=True)
    (root / "configs").mkdir(parents=True)
    for m in modules:
        shutil.copy(m, root / m.name)
    (root / "configs" / "model.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    (root / "params.yaml").write_text(yaml.safe_dump({"config": "configs/model.yaml"}))


def _sh(*argv: str, cwd: Path) -> str:
    env = {**os.environ, "PYTHONPATH": f"{cwd}:{ROOT}", "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"}
    p = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} in {cwd} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p.stdout + p.stderr


def _repro(root: Path) -> dict[str, Any]:
    bin_dir = Path(sys.executable).parent
    _sh("git", "init", "-q", cwd=root)
    _sh(str(bin_dir / "dvc"), "init", "-q", cwd=root)
    _sh(str(bin_dir / "trtpipe"), "dvc", cwd=root)
    t0 = time.monotonic()
    log = _sh(str(bin_dir / "dvc"), "repro", cwd=root)
    wall = round(time.monotonic() - t0, 1)
    ran = sorted({line.split("'")[1] for line in log.splitlines() if line.startswith("Running stage '")})
    comp = json.loads((root / "artifacts/compare/compare.json").read_text())
    cal = json.loads((root / "artifacts/calibrate/calibrate.json").read_text())
    agreement = {v: {ref: {o: {k: a.get(k) for k in ("cosine", "cosine_min", "snr_db", "top1_agreement")}
                           for o, a in outs.items()} for ref, outs in refs.items()}
                 for v, refs in comp["agreement"].items()}
    return {"dvc_repro_seconds": wall, "stages_run": ran, "outputs": comp["outputs"],
            "metrics": {v: {m: row.get(m) for m in comp["metric_outputs"]} for v, row in comp["variants"].items()},
            "b32_p50_ms": {v: row.get("b32_p50_ms") for v, row in comp["variants"].items()},
            "agreement": agreement, "flags": comp.get("flags"),
            "calibration_excluded": cal.get("excluded"), "backend": {v: row.get("backend") for v, row in comp["variants"].items()}}


def text(work: Path) -> dict[str, Any]:
    import torch

    from tests.test_any_model import TEXT

    root = work / "text"
    _project(root, TEXT, [ROOT / "tests/models/text_encoder.py", ROOT / "tests/models/text_data.py"])
    sys.path.insert(0, str(root))
    from text_encoder import make  # type: ignore[import-not-found]

    torch.manual_seed(0)
    torch.save(make().state_dict(), root / "weights.pt")
    return _repro(root)


def detector(work: Path) -> dict[str, Any]:
    from tests.test_any_model import DETECTOR

    root = work / "detector"
    _project(root, DETECTOR, [ROOT / "tests/models/digit_detector.py"])
    sys.path.insert(0, str(root))
    from digit_detector import train  # type: ignore[import-not-found]

    train(str(root / "weights.pt"))
    return _repro(root)


def efficientnet(work: Path) -> dict[str, Any]:
    from PIL import Image

    from configs.efficientnet_lite0_factory import CALIB_CROPS, CALIB_SEED, EVAL_CROPS, EVAL_SEED, crops_uint8, save_checkpoint

    root = work / "efficientnet"
    config = yaml.safe_load((ROOT / "configs/efficientnet_lite0.yaml").read_text())
    config["model"]["arch"] = "efficientnet_lite0_factory:make"
    config["model"]["checkpoint"] = "weights.pt"
    config["data"] = {"source": "image_folder", "path": "photos/eval", "calibration_path": "photos/calib",
                      "preprocess": config["data"]["preprocess"]}
    config["build"]["int8_from_tune"] = False
    config.pop("tune", None)
    _project(root, config, [ROOT / "configs/efficientnet_lite0_factory.py"])
    save_checkpoint(str(root / "weights.pt"))
    for name, n, seed in (("eval", EVAL_CROPS, EVAL_SEED), ("calib", CALIB_CROPS, CALIB_SEED)):
        folder = root / "photos" / name
        folder.mkdir(parents=True)
        for i, crop in enumerate(crops_uint8(n, seed)):
            Image.fromarray(crop).save(folder / f"{i:04d}.png")
    return _repro(root)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--work", type=Path, default=ROOT / "build" / "any_model")
    ap.add_argument("--only", default="text,detector,efficientnet")
    a = ap.parse_args()
    result: dict[str, Any] = json.loads(a.out.read_text()) if a.out.is_file() else {}
    result["where"] = "CPU (onnxruntime backend: INT8 is the Q/DQ simulation), dvc repro per project"
    for name in [n.strip() for n in a.only.split(",") if n.strip()]:
        print(f"{name} ...", flush=True)
        result[name] = {"fn": name, **{"text": text, "detector": detector, "efficientnet": efficientnet}[name](a.work)}
        a.out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"{name}: dvc repro {result[name]['dvc_repro_seconds']} s, stages {len(result[name]['stages_run'])}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
