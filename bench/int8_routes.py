"""Do the two TensorRT INT8 routes and the onnxruntime Q/DQ simulation agree?

On the evaluation set of a finished pipeline run (backend tensorrt): the implicit engine
(IInt8EntropyCalibrator2), the explicit engine (the Q/DQ ONNX built by TensorRT), the
same Q/DQ ONNX in onnxruntime on the CPU, and the FP32 engine. Pairwise top-1 agreement
and cosine, plus each one's top-1: how far CPU INT8 numbers can be trusted."""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.backends.onnxruntime_backend import OrtRunner  # noqa: E402
from pipeline.metrics import agreement, topk  # noqa: E402
from pipeline.stages.evaluate import load_variant, predict  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.data import load_samples  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--artifacts", type=Path, default=Path("artifacts"))
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--explicit", default="build/int8_explicit", help="the explicit INT8 build folder, under --artifacts")
    ap.add_argument("--params", type=Path, default=Path("params.yaml"))
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    cfg = load_config(None, a.params, quiet=True)
    s = load_samples(a.artifacts / "prepare" / "eval.npz", cfg.model.inputs, cfg.data.labels_key, "evaluation data")
    x, y = s.x, s.y
    outputs = {}
    for name, folder in [("tensorrt_fp32", "build/fp32"), ("tensorrt_int8_implicit", "build/int8"),
                         ("tensorrt_int8_explicit", a.explicit)]:
        runner, _ = load_variant(a.artifacts / folder)
        with runner:
            outputs[name] = next(iter(predict(runner, x, a.batch_size).values()))
    with OrtRunner(a.artifacts / "calibrate" / "model.qdq.onnx") as runner:
        outputs["onnxruntime_int8_qdq"] = next(iter(predict(runner, x, a.batch_size).values()))
    result = {
        "samples": len(s),
        "top1": {k: topk(v, y).get("top1") for k, v in outputs.items()},
        "pairs": {},
    }
    for (ka, va), (kb, vb) in itertools.combinations(outputs.items(), 2):
        ag = agreement(va, vb)
        result["pairs"][f"{ka} vs {kb}"] = {"top1_agreement": ag.get("top1_agreement"), "cosine": ag["cosine"], "max_abs_diff": ag["max_abs_diff"]}
    a.out.write_text(json.dumps(result, indent=2) + "\n")
    for k, v in result["pairs"].items():
        print(f"{k}: top-1 agreement {100 * v['top1_agreement']:.2f}%, cosine {v['cosine']:.6f}")
    print("top1:", {k: round(v, 2) for k, v in result["top1"].items() if v is not None})


if __name__ == "__main__":
    main()
