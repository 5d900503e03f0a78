"""A budget on one output of a multi-output model: the three-head digit detector
(tests/models/digit_detector.py: boxes, landmarks, class probabilities), trained on the
digits, tuned on a CPU for `snr_db@boxes >= 55` (the boxes head's SNR against FP32).

Runs prepare .. calibrate and tune in `--work`, then measures every head of full INT8 and of
the tuned Q/DQ model against FP32 in onnxruntime, on all evaluation samples, independently
of tune's own numbers; writes `--out`.

    nice -n 5 .venv/bin/python bench/tune_detector.py     # under a minute on 2 cores
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CONFIG = {
    "model": {"name": "digit-detector", "source": "factory", "arch": "digit_detector:make", "checkpoint": "weights.pt",
              "inputs": [{"name": "image", "shape": [1, 8, 8]}]},
    "data": {"source": "digits", "preprocess": {"scale": 0.0625, "mean": [0.5], "std": [0.5]}},
    "calibration": {"num_samples": 96},
    "build": {"backend": "onnxruntime"},
    "evaluate": {"metrics": [{"metric": "top1", "output": "prob"},
                             {"function": "pipeline.examples.task_metrics:box_iou_vs_reference", "output": "boxes"}]},
    "tune": {"budget": {"metric": "snr_db@boxes", "min": 55.0}, "search_samples": 128},
}


def _snr_db(got: np.ndarray, ref: np.ndarray) -> float:
    ref = ref.astype(np.float64)
    err = ((got.astype(np.float64) - ref) ** 2).sum()
    return float("inf") if err == 0 else round(float(10 * np.log10((ref**2).sum() / err)), 3)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "trtpipe_tune_detector")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "tune_digit_detector_cpu.json")
    a = ap.parse_args()
    out_path, a.work = a.out.resolve(), a.work.resolve()
    if a.work.exists():
        shutil.rmtree(a.work)
    (a.work / "configs").mkdir(parents=True)
    shutil.copy(ROOT / "tests" / "models" / "digit_detector.py", a.work / "digit_detector.py")
    (a.work / "configs" / "model.yaml").write_text(yaml.safe_dump(CONFIG, sort_keys=False))
    (a.work / "params.yaml").write_text("config: configs/model.yaml\n")
    os.chdir(a.work)
    sys.path.insert(0, str(a.work.resolve()))

    from calibration.ort_session import make_session

    from digit_detector import train  # type: ignore[import-not-found]
    from pipeline.config import load_config
    from pipeline.stages import calibrate, export, prepare, tune, validate

    train("weights.pt")
    cfg = load_config(quiet=True)
    A = Path("artifacts")
    prepare.run(cfg, A / "prepare")
    export.run(cfg, A / "prepare/model.pt", A / "export")
    validate.run(cfg, A / "prepare/model.pt", A / "export/model.onnx", A / "prepare/eval.npz", A / "validate")
    calibrate.run(cfg, A / "export/model.onnx", A / "prepare/calib.npz", A / "calibrate", progress=False)
    rep = tune.run(cfg, A / "export/model.onnx", A / "calibrate", A / "prepare/eval.npz", A / "tune", progress=False)

    with np.load(A / "prepare/eval.npz") as z:
        x = z["image"]

    def outputs(path: Path) -> dict[str, np.ndarray]:
        s = make_session(path)  # exact Q/DQ semantics
        return dict(zip([o.name for o in s.get_outputs()], s.run(None, {"image": x})))

    ref = outputs(A / "export/model.onnx")
    heads = {name: outputs(path) for name, path in (("int8_full", A / "calibrate/model.qdq.onnx"),
                                                   ("int8_tuned", A / "tune/model.qdq.onnx"))}
    result = {
        "model": "digit-detector (tests/models/digit_detector.py, trained on the digits)",
        "where": "CPU, onnxruntime Q/DQ simulation", "budget": rep.budget["text"], "met": rep.met,
        "layers": [layer.name for layer in rep.layers], "kept": [k["layer"] for k in rep.kept],
        "minmax_layers": list(rep.methods.get("layers", {})), "candidates_evaluated": len(rep.candidates),
        "snr_db_vs_fp32_per_output": {name: {o: _snr_db(v[o], ref[o]) for o in ref} for name, v in heads.items()},
        "samples": int(len(x)), "seconds": rep.seconds,
    }
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
