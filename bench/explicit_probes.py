"""Hypothesis probes on a Q/DQ ONNX that TensorRT builds wrong (or not at all): one TensorRT build
per named graph edit, each engine compared with onnxruntime's exact simulation of the *same*
edited ONNX (calibration.ort_session) and with the FP32 model.

Where `explicit_isolate.py` searches blindly (delta debugging over Q/DQ sites, many builds),
this tries the patterns suspected from that search, a handful of builds:

  asis            the Q/DQ ONNX unchanged
  dedicated_dq    every DequantizeLinear read by several nodes cloned, one per reader
  lone_add        activation Q/DQ removed where its only readers are Add nodes whose other
                  input is float (a residual Add with one quantized input)
  drop:I,J        the sites I, J (explicit_isolate.sites order) taken out
  keep_first:N    every site from N on taken out
  gemm_per_tensor Gemm weights re-quantized per tensor (one scale)
  gemm_as_matmul  Gemm (transB=1) written as MatMul on the int8 weight transposed (per-channel
                  axis 1) + Add of the bias: the pattern TensorRT documents for Q/DQ matmuls
  no_gemm_wq      Gemm weights dequantized to float (their weight Q/DQ taken out)
  float_clip      activation Q/DQ removed where the tensor comes from a float (not quantized) Conv
                  through Clip/Relu (and Pad): a float conv + activation fused with an INT8 output
  gemm_pad        Gemm heads with N not a multiple of 16 padded with zero rows, sliced back after
  preact_q        float_clip's sites kept, with a Q/DQ of the same scale before the activation too
                  (calibration.qdq_patterns.quantize_before_activation: what the TensorRT backend builds on 8.x)

Writes `--out` (JSON) after every probe. Needs TensorRT and a GPU; no torch.

    . /tmp/kit/env.sh && PYTHONPATH=$PWD $KITPY bench/explicit_probes.py --qdq model.qdq.onnx \\
        --float-onnx model.onnx --npz eval.npz --probes asis,dedicated_dq,lone_add --out $OUT/probes.json
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from calibration.qdq_patterns import dequantized, float_conv_activation_q, quantize_before_activation  # noqa: E402
from explicit_isolate import Builder, dedicated_dq, sites, without  # noqa: E402


def _init(g: Any) -> dict[str, Any]:
    return {i.name: i for i in g.initializer}


def _producers(g: Any) -> dict[str, Any]:
    return {o: n for n in g.node for o in n.output}


def _copy(model: Any) -> Any:
    import onnx

    m = onnx.ModelProto()
    m.CopyFrom(model)
    return m


def lone_add_sites(model: Any) -> list[int]:
    """Activation sites whose every reader is an Add whose other input is not a DequantizeLinear output."""
    g = model.graph
    prod = _producers(g)
    by_name = {n.name: n for n in g.node}
    out = []
    for i, s in enumerate(sites(model)):
        if s["kind"] != "activation" or not s["dq"]:
            continue
        readers = []
        for d in s["dq"]:
            dq_out = by_name[d].output[0]
            readers += [(n, dq_out) for n in g.node if dq_out in n.input]
        if readers and all(n.op_type == "Add" and all(
                (prod.get(t) is None or prod[t].op_type != "DequantizeLinear") for t in n.input if t != dq_out)
                for n, dq_out in readers):
            out.append(i)
    return out


def _gemm_weight_dqs(model: Any) -> list[tuple[Any, Any]]:
    """(Gemm node, the DequantizeLinear of its weight initializer)."""
    g = model.graph
    prod, inits = _producers(g), _init(g)
    pairs = []
    for n in g.node:
        if n.op_type == "Gemm" and len(n.input) > 1:
            d = prod.get(n.input[1])
            if d is not None and d.op_type == "DequantizeLinear" and d.input[0] in inits:
                pairs.append((n, d))
    return pairs


def _attr(n: Any, name: str, default: Any) -> Any:
    from onnx import helper

    for a in n.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def gemm_per_tensor(model: Any) -> Any:
    from onnx import numpy_helper

    m = _copy(model)
    g = m.graph
    inits = _init(g)
    for _, d in _gemm_weight_dqs(m):
        w = dequantized(d, inits)
        scale = np.float32(max(float(np.abs(w).max()), 1e-12) / 127.0)
        inits[d.input[0]].CopyFrom(numpy_helper.from_array(np.clip(np.round(w / scale), -127, 127).astype(np.int8),
                                                           d.input[0]))
        name_s = f"{d.name}_per_tensor_scale"
        g.initializer.append(numpy_helper.from_array(np.array(scale, np.float32), name_s))
        zp = f"{d.name}_per_tensor_zp"
        g.initializer.append(numpy_helper.from_array(np.array(0, np.int8), zp))
        d.input[1], d.input[2:] = name_s, [zp]
        for a in list(d.attribute):
            if a.name == "axis":
                d.attribute.remove(a)
    return m


def gemm_as_matmul(model: Any) -> Any:
    """Gemm(A, DQ(Wq [N,K], axis 0), C, transB=1, alpha=beta=1) -> Add(MatMul(A, DQ(Wq^T [K,N], axis 1)), C)."""
    from onnx import helper, numpy_helper

    m = _copy(model)
    g = m.graph
    inits = _init(g)
    nodes = list(g.node)
    for gemm, d in _gemm_weight_dqs(m):
        if _attr(gemm, "transB", 0) != 1 or _attr(gemm, "transA", 0) != 0 or _attr(gemm, "alpha", 1.0) != 1.0 \
                or _attr(gemm, "beta", 1.0) != 1.0:
            continue
        q = numpy_helper.to_array(inits[d.input[0]])
        inits[d.input[0]].CopyFrom(numpy_helper.from_array(np.ascontiguousarray(q.T), d.input[0]))
        for a in d.attribute:
            if a.name == "axis":
                a.i = 1
        if not any(a.name == "axis" for a in d.attribute):
            d.attribute.append(helper.make_attribute("axis", 1))
        out = gemm.output[0]
        mm_out = f"{out}_matmul" if len(gemm.input) > 2 and gemm.input[2] else out
        mm = helper.make_node("MatMul", [gemm.input[0], gemm.input[1]], [mm_out], name=f"{gemm.name}_MatMul")
        new = [mm]
        if mm_out != out:
            new.append(helper.make_node("Add", [mm_out, gemm.input[2]], [out], name=f"{gemm.name}_Add"))
        i = nodes.index(gemm)
        nodes[i:i + 1] = new
    del g.node[:]
    g.node.extend(nodes)
    return m


def gemm_pad(model: Any, multiple: int = 16) -> Any:
    """Gemm (transB=1) heads with N output features not a multiple of `multiple`: the int8 weight and the
    bias padded with zero rows to the next multiple, the output sliced back to N (same numbers)."""
    from onnx import helper, numpy_helper

    m = _copy(model)
    g = m.graph
    inits = _init(g)
    nodes = list(g.node)
    for gemm, d in _gemm_weight_dqs(m):
        q = numpy_helper.to_array(inits[d.input[0]])
        n = q.shape[0]
        if _attr(gemm, "transB", 0) != 1 or n % multiple == 0:
            continue
        pad = -n % multiple
        inits[d.input[0]].CopyFrom(numpy_helper.from_array(np.concatenate([q, np.zeros((pad, q.shape[1]), q.dtype)]),
                                                           d.input[0]))
        for k in (1, 2):  # per-channel scale and zero point grow with N
            if len(d.input) > k and d.input[k] in inits:
                v = numpy_helper.to_array(inits[d.input[k]])
                if v.ndim == 1 and v.size == n:
                    fill = np.ones(pad, v.dtype) * (v.max() if k == 1 else 0)
                    inits[d.input[k]].CopyFrom(numpy_helper.from_array(np.concatenate([v, fill]), d.input[k]))
        if len(gemm.input) > 2 and gemm.input[2] in inits:
            b = numpy_helper.to_array(inits[gemm.input[2]])
            inits[gemm.input[2]].CopyFrom(numpy_helper.from_array(np.concatenate([b, np.zeros(pad, b.dtype)]),
                                                                  gemm.input[2]))
        out = gemm.output[0]
        gemm.output[0] = f"{out}_padded"
        names = [f"{gemm.name}_{k}" for k in ("starts", "ends", "axes")]
        for nm, v in zip(names, ([0], [n], [1])):
            g.initializer.append(numpy_helper.from_array(np.array(v, np.int64), nm))
        i = nodes.index(gemm)
        nodes.insert(i + 1, helper.make_node("Slice", [gemm.output[0], *names], [out], name=f"{gemm.name}_Slice"))
    del g.node[:]
    g.node.extend(nodes)
    return m


def float_clip_sites(model: Any) -> list[int]:
    """Activation sites whose tensor comes from a float Conv through Clip/Relu (and Pad)
    (calibration.qdq_patterns.float_conv_activation_q)."""
    found = set(float_conv_activation_q(model))
    return [i for i, s in enumerate(sites(model)) if s["kind"] == "activation" and s["tensor"] in found]


def edit(model: Any, probe: str) -> tuple[Any, dict[str, Any]]:
    all_sites = sites(model)
    if probe == "asis":
        return model, {}
    if probe == "dedicated_dq":
        m, added = dedicated_dq(model)
        return m, {"dq_added": added}
    if probe == "lone_add":
        idx = lone_add_sites(model)
        return without(model, [all_sites[i] for i in idx]), {"removed": idx, "tensors": [all_sites[i]["tensor"] for i in idx]}
    if probe.startswith("drop:"):
        idx = [int(v) for v in probe[5:].split(",") if v]
        return without(model, [all_sites[i] for i in idx]), {"removed": idx, "tensors": [all_sites[i]["tensor"] for i in idx]}
    if probe.startswith("keep_first:"):
        n = int(probe.split(":")[1])
        return without(model, all_sites[n:]), {"removed": list(range(n, len(all_sites)))}
    if probe == "float_clip":
        idx = float_clip_sites(model)
        return without(model, [all_sites[i] for i in idx]), {"removed": idx, "tensors": [all_sites[i]["tensor"] for i in idx]}
    if probe == "preact_q":
        m = _copy(model)
        return m, {"conv_outputs": quantize_before_activation(m)}
    if probe == "gemm_pad":
        return gemm_pad(model), {"gemms": [n.name for n, _ in _gemm_weight_dqs(model)]}
    if probe == "gemm_pad_per_tensor":
        return gemm_pad(gemm_per_tensor(model)), {}
    if probe == "gemm_per_tensor":
        return gemm_per_tensor(model), {"gemms": [n.name for n, _ in _gemm_weight_dqs(model)]}
    if probe == "gemm_as_matmul":
        return gemm_as_matmul(model), {"gemms": [n.name for n, _ in _gemm_weight_dqs(model)]}
    if probe == "no_gemm_wq":
        idx = [i for i, s in enumerate(all_sites) if s["kind"] == "weight" and all("(Gemm)" in c for c in s["consumers"])]
        return without(model, [all_sites[i] for i in idx]), {"removed": idx}
    raise SystemExit(f"unknown probe {probe!r}")


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    d = float(np.linalg.norm(a) * np.linalg.norm(b))
    return float(a @ b / d) if d else float("nan")


def compare(got: dict[str, np.ndarray], sim: dict[str, np.ndarray], ref: dict[str, np.ndarray]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, s in sim.items():
        g = got[k].reshape(s.shape)
        row = {"cosine_vs_sim": round(_cos(g, s), 6), "max_abs_diff_vs_sim": float(np.max(np.abs(g - s))),
               "cosine_sim_vs_fp32": round(_cos(s, ref[k]), 6)}
        if s.ndim == 2 and s.shape[1] > 1:
            row["top1_vs_sim"] = float(np.mean(np.argmax(g, 1) == np.argmax(s, 1)))
            row["top1_vs_fp32"] = float(np.mean(np.argmax(g, 1) == np.argmax(ref[k], 1)))
            row["top1_sim_vs_fp32"] = float(np.mean(np.argmax(s, 1) == np.argmax(ref[k], 1)))
        out[k] = row
    return out


def main() -> None:
    import onnx

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--qdq", type=Path, help="the Q/DQ ONNX (or --tuned-bundle)")
    ap.add_argument("--tuned-bundle", type=Path, help="bench/tune_gpu.py's bundle: its tuned Q/DQ ONNX is made here")
    ap.add_argument("--full-bundle", type=Path, help="the same bundle: calibrate's full-INT8 Q/DQ ONNX made here")
    ap.add_argument("--float-onnx", type=Path)
    ap.add_argument("--npz", type=Path, help="model inputs by input name (or --tuned-bundle's crops)")
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--probes", default="asis,dedicated_dq")
    ap.add_argument("--no-fp16", action="store_true")
    ap.add_argument("--fused", action="store_true", help="also compare with onnxruntime's fused integer kernels")
    ap.add_argument("--timing-cache", type=Path, default=Path("/tmp/probe_timing.cache"))
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()

    from calibration.ort_session import make_session

    if a.full_bundle:  # calibrate's ranges on every layer (full INT8)
        from calibration.qdq import quantize_qdq
        from tune_gpu import _eval_set

        ranges = json.loads((a.full_bundle / "calibrate" / "ranges.json").read_text())["tensors"]
        a.qdq = Path(tempfile.mkdtemp()) / "full.qdq.onnx"
        quantize_qdq(a.full_bundle / "model.onnx", a.qdq, {k: v["amax"] for k, v in ranges.items()})
        a.float_onnx = a.float_onnx or a.full_bundle / "model.onnx"
        x, _ = _eval_set(a.full_bundle)
        feeds = {"input": np.ascontiguousarray(x[:a.samples])}
    elif a.tuned_bundle:
        from calibration.qdq import quantize_qdq
        from tune_gpu import _eval_set

        b = a.tuned_bundle
        tune = json.loads((b / "tune.json").read_text())
        ranges = json.loads((b / "calibrate" / "ranges.json").read_text())["tensors"]
        tuned = {t: v["amax"] for t, v in (tune.get("methods") or {}).get("tensors", {}).items()}
        a.qdq = Path(tempfile.mkdtemp()) / "tuned.qdq.onnx"
        quantize_qdq(b / "model.onnx", a.qdq, {**{k: v["amax"] for k, v in ranges.items()}, **tuned},
                     exclude_nodes=[k["layer"] for k in tune["kept"]])
        a.float_onnx = a.float_onnx or b / "model.onnx"
        x, _ = _eval_set(b)
        feeds = {"input": np.ascontiguousarray(x[:a.samples])}
    else:
        with np.load(a.npz) as z:
            feeds = {}
            for i in onnx.load(str(a.float_onnx), load_external_data=False).graph.input:
                feeds[i.name] = np.ascontiguousarray(z[i.name][:a.samples])
    n = len(next(iter(feeds.values())))
    ref_s = make_session(str(a.float_onnx))
    ref = dict(zip([o.name for o in ref_s.get_outputs()], ref_s.run(None, feeds)))
    model = onnx.load(str(a.qdq))
    trt = __import__("tensorrt")
    from pipeline.runtime.trt_runner import TrtRunner

    from calibration.ort_session import cpu_summary

    result: dict[str, Any] = {"qdq": str(a.qdq), "tensorrt": trt.__version__, "fp16_flag": not a.no_fp16,
                              "cpu": cpu_summary(),
                              "samples": n, "sites": sites(model), "probes": {}}

    def save() -> None:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(result, indent=2) + "\n")

    builder = Builder(not a.no_fp16, (1, n, n), a.timing_cache)
    for probe in [p.strip() for p in a.probes.split(";" if ";" in a.probes else ",") if p.strip()]:
        m, info = edit(model, probe)
        row: dict[str, Any] = {"edit": info}
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "probe.onnx"
            onnx.save(m, str(path))
            sim_s = make_session(str(path))
            sim = dict(zip([o.name for o in sim_s.get_outputs()], sim_s.run(None, feeds)))
            fused = None
            if a.fused:  # onnxruntime's integer kernels on this CPU (issue 18's "before")
                fs = make_session(str(path), mode="fused")
                fused = dict(zip([o.name for o in fs.get_outputs()], fs.run(None, feeds)))
            t0 = time.monotonic()
            plan = builder.build(m)
            error = builder.last_error
            row["build_s"] = round(time.monotonic() - t0, 1)
            if plan is None:
                row["built"], row["error"] = False, error[:400]
            else:
                row["built"] = True
                eng = Path(tmp) / "probe.engine"
                eng.write_bytes(plan)
                with TrtRunner(eng) as r:
                    got = r.infer(feeds)
                row["outputs"] = compare(got, sim, ref)
                if fused is not None:
                    row["outputs_vs_fused_simulation"] = compare(got, fused, ref)
        result["probes"][probe] = row
        save()
        brief = row.get("error", "")[:100] or json.dumps({k: {kk: v for kk, v in o.items() if "top1" in kk or "cosine_vs" in kk}
                                                        for k, o in row.get("outputs", {}).items()})
        print(f"[probe] {probe}: {'built' if row['built'] else 'FAILED'} in {row['build_s']} s {brief}", flush=True)
    save()


if __name__ == "__main__":
    main()
