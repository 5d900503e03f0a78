"""Root-causing calibration differences: max|x| per tensor as TensorRT's FP32 engine computes
it, against onnxruntime's (ranges.json `max_abs`), on the same calibration samples.

If TensorRT's activations themselves reach further than onnxruntime's, a cache amax above
our max|x| is numerics, not the entropy algorithm.
  usage: bench/trt_activation_max.py --onnx M --calib calib.npy --ranges ranges.json --num-samples N --out F"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    import onnx

    from pipeline.data import calibration_indices
    from pipeline.backends import BuildRequest
    from pipeline.backends.tensorrt_backend import TensorRTBackend
    from pipeline.config import Config

    ap = argparse.ArgumentParser()
    ap.add_argument("--onnx", type=Path, required=True)
    ap.add_argument("--calib", type=Path, required=True)
    ap.add_argument("--ranges", type=Path, required=True)
    ap.add_argument("--num-samples", type=int, default=320)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/actmax"))
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    ranges = json.loads(a.ranges.read_text())["tensors"]
    model = onnx.load(str(a.onnx))
    have = {o.name for o in model.graph.output} | {i.name for i in model.graph.input}
    for name in ranges:
        if name not in have:
            model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    a.workdir.mkdir(parents=True, exist_ok=True)
    exposed = a.workdir / "exposed.onnx"
    onnx.save(model, str(exposed))
    x = np.load(a.calib)
    x = x[calibration_indices(len(x), a.num_samples, 0)]
    cfg = Config.model_validate({
        "model": {"name": "actmax", "arch": "x", "input": {"shape": list(x.shape[1:])}},
        "build": {"backend": "tensorrt", "profile": {"min_batch": 1, "opt_batch": a.batch_size, "max_batch": a.batch_size}, "timing_cache": None},
    })
    (a.workdir / "build").mkdir(exist_ok=True)
    be = TensorRTBackend()
    res = be.build(BuildRequest("fp32", exposed, a.workdir / "build", cfg))
    maxes: dict[str, float] = {}
    with be.load(a.workdir / "build" / res.artifact, res.info) as runner:
        for i in range(0, len(x) - a.batch_size + 1, a.batch_size):
            outs = runner.infer({runner.input_names[0]: np.ascontiguousarray(x[i:i + a.batch_size])})
            for k, v in outs.items():
                maxes[k] = max(maxes.get(k, 0.0), float(np.abs(v).max()))
    maxes["input"] = float(np.abs(x[: (len(x) // a.batch_size) * a.batch_size]).max())
    rows = {k: {"tensorrt_fp32_max_abs": maxes.get(k), "onnxruntime_max_abs": r["max_abs"],
                "rel_diff_pct": (100 * (maxes[k] - r["max_abs"]) / r["max_abs"]) if maxes.get(k) and r["max_abs"] else None}
            for k, r in ranges.items()}
    a.out.write_text(json.dumps(rows, indent=2) + "\n")
    for k, r in rows.items():
        print(f"{k:40s} trt {r['tensorrt_fp32_max_abs']}  ort {r['onnxruntime_max_abs']:.4f}  {r['rel_diff_pct']}")


if __name__ == "__main__":
    main()
