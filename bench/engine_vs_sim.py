"""One engine against onnxruntime's exact simulation of a Q/DQ ONNX and against FP32, on EfficientNet-Lite0
crops (bench/tune_gpu.py's bundle): top-1 agreement and cosine, batch by batch. Shows that what `trtpipe build`
made of a Q/DQ ONNX (possibly an edited copy, build.json qdq_edit) computes what that ONNX computes.
Needs TensorRT and a GPU; no torch.

    . /tmp/kit/env.sh && PYTHONPATH=$PWD $KITPY bench/engine_vs_sim.py --engine B/model.engine \\
        --qdq tune/model.qdq.onnx --bundle /tmp/tune_bundle --samples 256 --batch 32 --out $OUT/check.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--engine", type=Path, required=True)
    ap.add_argument("--qdq", type=Path, required=True)
    ap.add_argument("--bundle", type=Path, required=True)
    ap.add_argument("--samples", type=int, default=256)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()

    from calibration.ort_session import cpu_summary, make_session
    from explicit_probes import _cos
    from pipeline.runtime.trt_runner import TrtRunner
    from tune_gpu import _eval_set

    x, ref = _eval_set(a.bundle)
    x, ref = x[:a.samples], ref[:a.samples]
    sim_s = make_session(str(a.qdq))
    got, sim = [], []
    with TrtRunner(a.engine) as r:
        for k in range(0, len(x), a.batch):
            feeds = {"input": np.ascontiguousarray(x[k:k + a.batch])}
            got.append(next(iter(r.infer(feeds).values())).reshape(len(feeds["input"]), -1))
            sim.append(sim_s.run(None, feeds)[0])
    g, s = np.concatenate(got), np.concatenate(sim)
    top = lambda u, v: float(np.mean(np.argmax(u, 1) == np.argmax(v, 1)))  # noqa: E731
    res = {"engine": str(a.engine), "qdq": str(a.qdq), "samples": len(g), "cpu": cpu_summary(),
           "top1_engine_vs_sim": top(g, s), "top1_engine_vs_fp32": top(g, ref), "top1_sim_vs_fp32": top(s, ref),
           "cosine_engine_vs_sim": round(_cos(g, s), 6), "cosine_engine_vs_fp32": round(_cos(g, ref), 6),
           "cosine_sim_vs_fp32": round(_cos(s, ref), 6)}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(res))


if __name__ == "__main__":
    main()
