"""Which post-training quantization pays off on a real depthwise network (issue 21, item 1)?

EfficientNet-Lite0 with its real ImageNet weights: the FP32 ONNX, calibration crops (512)
and held-out crops (256) of ``bench/int8_exactness.py``'s work folder (run that first).
Histograms are collected once the way the calibrate stage collects them (TensorRT rules:
doubling histograms, 2048 bins, batches of 32); then every method below makes its ranges,
a Q/DQ ONNX (calibration.qdq.quantize_qdq, tensorrt placement) and runs it in onnxruntime's
exact mode (calibration.ort_session.make_session) on the held-out crops against FP32:
top-1 agreement and logits cosine mean/min.

Methods: entropy (EntropyCalibration2, calibrate's default), percentile 99.99, minmax,
mse (per-tensor range search by quantization MSE on the histogram), each with and without
the ReLU6/Clip cap (``clip``) and bias correction (``bc``); ``gptq``: weights rounded by GPTQ
(calibration.rounding, ``calibration.weight_rounding: gptq``), alone and with ``bc``;
``--decompose``: where the error comes from (weights alone to nearest / by GPTQ, activations
alone, the first depthwise layer's weights alone and its input alone); ``cle``: the same on the model
with its Conv -> ReLU6 -> depthwise pairs equalized (calibration.ptq.equalize_depthwise,
channels scaled to ``--cle-margin`` x 6 on the calibration data).

    nice -n 5 .venv/bin/python bench/ptq_methods.py      # ~3 minutes on 2 cores
    # any folder with artifacts/export/model.onnx and artifacts/prepare/{calib,eval}.npz (input "input"), e.g.
    # EfficientNet-Lite1 (bench/routes/efficientnet_lite1_factory.py): --work DIR --model ... --out ...
"""

from __future__ import annotations

import argparse
import json
import pickle
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

WORK = Path("/tmp/trtpipe_int8_exactness")
BATCH = 32


def _agree(got: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    g, r = got.reshape(len(got), -1).astype(np.float64), ref.reshape(len(ref), -1).astype(np.float64)
    cos = (g * r).sum(1) / np.maximum(np.linalg.norm(g, axis=1) * np.linalg.norm(r, axis=1), 1e-30)
    return {"top1_agreement_pct": round(100 * float((g.argmax(1) == r.argmax(1)).mean()), 2),
            "cosine_mean": round(float(cos.mean()), 5), "cosine_min": round(float(cos.min()), 5), "samples": len(g)}


def _run(model: Any, x: np.ndarray) -> np.ndarray:
    from calibration.ort_session import make_session

    s = make_session(model, mode="exact")
    name = s.get_inputs()[0].name
    return np.concatenate([s.run(None, {name: x[i:i + BATCH]})[0] for i in range(0, len(x), BATCH)])


def _batches(x: np.ndarray):
    return ({"input": np.ascontiguousarray(x[i:i + BATCH])} for i in range(0, len(x) - BATCH + 1, BATCH))


def collect(onnx_path: Path, calib: np.ndarray, cache: Path, moments: bool = True) -> dict[str, Any]:
    """Histograms, node ops, bias-correction means and GPTQ's input moments; cached in ``cache``
    (keyed by sizes)."""
    from calibration.collect import collect_histograms
    from calibration.onnx_io import load_model
    from calibration.ptq import input_means
    from calibration.qdq import bias_correction_inputs, weight_rounding_inputs
    from calibration.rounding import second_moments
    from calibration.rules import get_rules

    key = (str(onnx_path), onnx_path.stat().st_size, calib.shape)
    moments_cache = cache.with_suffix(".moments.pkl")
    if cache.is_file():
        with cache.open("rb") as f:
            got = pickle.load(f)
        if got.get("key") == key:
            print("[bench] histograms and means: reused", flush=True)
            if not moments:
                return {**got, "moments": None, "moments_seconds": None}
            if moments_cache.is_file():
                with moments_cache.open("rb") as f:
                    m = pickle.load(f)
                if m.get("key") == key:
                    return {**got, **m}
            t0 = time.perf_counter()
            model, nodes = weight_rounding_inputs(onnx_path)
            m = {"key": key, "moments": second_moments(model, _batches(calib), nodes),
                 "moments_seconds": round(time.perf_counter() - t0, 2)}
            print(f"[bench] GPTQ input moments {m['moments_seconds']} s", flush=True)
            with moments_cache.open("wb") as f:
                pickle.dump(m, f)
            return {**got, **m}
    t0 = time.perf_counter()
    col = collect_histograms(onnx_path, _batches(calib), total=len(calib) // BATCH, progress=False,
                             num_bins=2048, growth=get_rules("tensorrt").growth)
    t1 = time.perf_counter()
    means = input_means(load_model(onnx_path), _batches(calib), bias_correction_inputs(onnx_path))
    t2 = time.perf_counter()
    model, nodes = weight_rounding_inputs(onnx_path)
    h = second_moments(model, _batches(calib), nodes) if moments else None
    t3 = time.perf_counter()
    print(f"[bench] histograms {t1 - t0:.1f} s, bias-correction means {t2 - t1:.1f} s, GPTQ input moments "
          f"{t3 - t2:.1f} s", flush=True)
    got = {"key": key, "histograms": col.histograms, "node_ops": col.node_ops, "means": means,
           "seconds": {"histograms": round(t1 - t0, 2), "means": round(t2 - t1, 2)}}
    with cache.open("wb") as f:
        pickle.dump(got, f)
    m = {"key": key, "moments": h, "moments_seconds": round(t3 - t2, 2) if moments else None}
    if moments:
        with moments_cache.open("wb") as f:
            pickle.dump(m, f)
    return {**got, **m}


def _with_weights(onnx_path: Path, qdq: Path, only: Any = None) -> Any:
    """The FP32 model with (some of) its weights replaced by what the Q/DQ model holds (q * scale)."""
    import onnx
    from onnx import numpy_helper

    fp32, m = onnx.load(str(onnx_path)), onnx.load(str(qdq))
    inits = {i.name: i for i in m.graph.initializer}
    axis_of = {n.input[0]: next((a.i for a in n.attribute if a.name == "axis"), 1) for n in m.graph.node
               if n.op_type == "DequantizeLinear"}
    for init in fp32.graph.initializer:
        qn = f"{init.name}_quantized"
        if qn not in inits or (only is not None and init.name not in only):
            continue
        q = numpy_helper.to_array(inits[qn]).astype(np.float64)
        scale = numpy_helper.to_array(inits[f"{init.name}_scale"]).astype(np.float64)
        shape = [1] * q.ndim
        if scale.ndim:
            shape[axis_of[qn]] = -1
        init.CopyFrom(numpy_helper.from_array((q * scale.reshape(shape)).astype(np.float32), init.name))
    return fp32


def _activations_only(onnx_path: Path, qdq: Path, keep: Any = None) -> Any:
    """The Q/DQ model with float weights (every weight DequantizeLinear replaced by the FP32
    weight) and, given ``keep``, only the activation Q/DQ pairs of those tensors."""
    import onnx
    from onnx import helper

    fp32 = {i.name: i for i in onnx.load(str(onnx_path)).graph.initializer}
    m = onnx.load(str(qdq))
    inits = {i.name for i in m.graph.initializer}
    rename: dict[str, str] = {}
    nodes = []
    for n in m.graph.node:
        if n.op_type == "DequantizeLinear" and n.input[0].endswith("_quantized") and n.input[0][:-10] in fp32:
            nodes.append(helper.make_node("Constant", [], [n.output[0]], value=fp32[n.input[0][:-10]]))
            continue
        if keep is not None and n.op_type == "QuantizeLinear" and n.input[0] not in inits and n.input[0] not in keep:
            rename[n.output[0]] = n.input[0]
            continue
        nodes.append(n)
    out = []
    for n in nodes:
        if n.op_type == "DequantizeLinear" and n.input[0] in rename:
            rename[n.output[0]] = rename[n.input[0]]
            continue
        for k, i in enumerate(n.input):
            if i in rename:
                n.input[k] = rename[i]
        out.append(n)
    del m.graph.node[:]
    m.graph.node.extend(out)
    return m


def decompose(onnx_path: Path, x: np.ndarray, ref: np.ndarray, data: dict[str, Any], rules: Any) -> dict[str, Any]:
    """Top-1 agreement / cosine of partial quantizations (percentile 99.99 ranges)."""
    from calibration.onnx_io import load_model
    from calibration.qdq import quantize_qdq
    from calibration.rules import ranges_under

    amax, _, _ = ranges_under(rules, data["histograms"], "percentile", data["node_ops"], 99.99)
    model = load_model(onnx_path)
    dw = next(n for n in model.graph.node if n.op_type == "Conv"
              and next((a.i for a in n.attribute if a.name == "group"), 1) > 1)
    out: dict[str, Any] = {"ranges": "percentile 99.99", "first_depthwise": dw.name,
                           "first_depthwise_input": dw.input[0], "first_depthwise_weight": dw.input[1]}
    with tempfile.TemporaryDirectory(prefix="ptq-") as tmp:
        near, gptq = Path(tmp) / "near.onnx", Path(tmp) / "gptq.onnx"
        quantize_qdq(onnx_path, near, amax)
        quantize_qdq(onnx_path, gptq, amax, weight_moments=data["moments"])
        cases = {"weights_only_nearest": _with_weights(onnx_path, near),
                 "weights_only_gptq": _with_weights(onnx_path, gptq),
                 "first_depthwise_weights_only_nearest": _with_weights(onnx_path, near, only={dw.input[1]}),
                 "first_depthwise_weights_only_gptq": _with_weights(onnx_path, gptq, only={dw.input[1]}),
                 "activations_only": _activations_only(onnx_path, near),
                 "first_depthwise_input_only": _activations_only(onnx_path, near, keep={dw.input[0]}),
                 "all_but_first_depthwise_input": _activations_only(
                     onnx_path, near, keep=set(amax) - {dw.input[0]})}
        for name, m in cases.items():
            out[name] = _agree(_run(m, x), ref)
            print(f"[bench] {name:40s} {out[name]}", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=WORK)
    ap.add_argument("--out", type=Path, default=ROOT / "bench/results/ptq_methods_cpu.json")
    ap.add_argument("--methods", default="", help="comma-separated subset of row names")
    ap.add_argument("--decompose", action="store_true", help="also: where the error comes from (see the docstring)")
    ap.add_argument("--cle-margin", type=float, default=0.7, help="equalization target: this times the ReLU6 bound")
    ap.add_argument("--model", default="EfficientNet-Lite0 (real ImageNet weights), configs/efficientnet_lite0.yaml",
                    help="what --work holds, for the JSON")
    ap.add_argument("--data", default="512 calibration / 256 held-out crops (bench/int8_exactness.py work folder)",
                    help="what its samples are, for the JSON")
    a = ap.parse_args()

    from calibration.onnx_io import load_model
    from calibration.ort_session import cpu_summary
    from calibration.ptq import clip_amax_bounds
    from calibration.qdq import quantize_qdq
    from calibration.rules import get_rules, ranges_under

    A = a.work / "artifacts"
    onnx_path = A / "export/model.onnx"
    with np.load(A / "prepare/calib.npz") as z:
        calib = z["input"]
    with np.load(A / "prepare/eval.npz") as z:
        x = z["input"]
    data = collect(onnx_path, calib, a.work / "ptq_methods_cache.pkl")
    ref = _run(load_model(onnx_path), x)
    # Cross-layer equalization of Conv -> ReLU6 -> depthwise pairs (calibration.ptq), its own
    # FP32 model, histograms and means.
    from calibration.ptq import channel_max, depthwise_pairs, equalize_depthwise

    onnx_model = load_model(onnx_path)
    pairs = depthwise_pairs(onnx_model)
    eq_path = a.work / f"model.cle{a.cle_margin:g}.onnx"
    if not eq_path.is_file():
        cmax = channel_max(onnx_model, _batches(calib), [dw.input[0] for _, _, dw in pairs])
        equalize_depthwise(onnx_model, cmax, margin=a.cle_margin)
        import onnx

        onnx.save(onnx_model, str(eq_path))
    eq_data = collect(eq_path, calib, a.work / f"ptq_methods_cache_cle{a.cle_margin:g}.pkl", moments=False)
    del calib
    eq_fp32 = _agree(_run(load_model(eq_path), x), ref)
    print(f"[bench] equalized FP32 vs FP32: {eq_fp32}", flush=True)
    rules = get_rules("tensorrt")
    bounds = clip_amax_bounds(load_model(onnx_path))

    rows: list[tuple[str, str, bool, bool]] = []
    for method in ("entropy", "percentile", "minmax", "mse"):
        for clip in (False, True):
            for bc in (False, True):
                rows.append((method + ("+clip" if clip else "") + ("+bc" if bc else ""), method, clip, bc))
    rows += [(f"{m}+clip+bc+cle", m, True, True) for m in ("entropy", "percentile", "minmax", "mse")]
    rows += [(f"{m}+cle", m, False, False) for m in ("entropy", "mse")]
    rows += [(f"{m}+gptq" + ("+bc" if bc else ""), m, False, bc) for m in ("entropy", "percentile", "minmax", "mse")
             for bc in (False, True)]
    wanted = {m for m in a.methods.split(",") if m}
    results: dict[str, Any] = {}
    for name, method, clip, bc in rows:
        if wanted and name not in wanted:
            continue
        t0 = time.perf_counter()
        cle = name.endswith("cle")
        gptq = "+gptq" in name
        d, src = (eq_data, eq_path) if cle else (data, onnx_path)
        amax, _, _ = ranges_under(rules, d["histograms"], method, d["node_ops"], 99.99,
                                  bounds=bounds if clip else None)
        with tempfile.TemporaryDirectory(prefix="ptq-") as tmp:
            qdq = Path(tmp) / "model.qdq.onnx"
            summary = quantize_qdq(src, qdq, amax, bias_means=d["means"] if bc else None,
                                   weight_moments=d["moments"] if gptq else None)
            out = _run(qdq, x)
        row = {"method": method, "clip_aware": clip, "bias_correction": bc, "equalized": cle,
               "weight_rounding": "gptq" if gptq else "nearest", **_agree(out, ref),
               "bias_corrected_nodes": len(summary.get("bias_corrected", {})),
               "seconds": round(time.perf_counter() - t0, 1)}
        results[name] = row
        print(f"[bench] {name:24s} top-1 {row['top1_agreement_pct']:6.2f}%  cos mean {row['cosine_mean']:.5f} "
              f"min {row['cosine_min']:.5f}", flush=True)
    doc = {"model": a.model, "data": a.data,
           "simulation": "onnxruntime exact mode (calibration.ort_session), Q/DQ tensorrt placement, "
                         "per-channel weights; metrics against the FP32 ONNX",
           "rules": "tensorrt", "clip_bounded_tensors": len(bounds), "cpu": cpu_summary(),
           "cle": {"pairs": len(pairs), "margin": a.cle_margin, "equalized_fp32_vs_fp32": eq_fp32,
                   "note": "Conv -> ReLU6 -> depthwise pairs equalized (calibration.ptq.equalize_depthwise); "
                           "a bench option only, not a calibrate setting"},
           "onnxruntime": __import__("onnxruntime").__version__,
           "collect_seconds": {**data["seconds"], "gptq_moments": data["moments_seconds"]},
           "methods": results}
    if a.decompose:
        doc["decomposition"] = decompose(onnx_path, x, ref, data, rules)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    if a.out.is_file() and wanted:  # a subset run updates the rows it ran
        old = json.loads(a.out.read_text())
        old.get("methods", {}).update(results)
        doc["methods"] = old.get("methods", results)
    a.out.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"[bench] wrote {a.out}", flush=True)


if __name__ == "__main__":
    main()
