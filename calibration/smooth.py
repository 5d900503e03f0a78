"""SmoothQuant (Xiao et al., "SmoothQuant: Accurate and Efficient Post-Training Quantization for Large
Language Models", 2023): the activation outliers of a MatMul/Gemm's input moved into its weight.

For ``y = x W`` (``W``: [in, out]) and any positive per-input-channel ``s``,
``y = (x / s) (diag(s) W)``: the FP32 model computes the same (to float rounding), while the
quantized one sees an input whose few large channels are scaled down (per-tensor INT8 resolves the
rest) and a weight whose matching rows are scaled up (per-output-channel INT8 absorbs that).
``s_j = max|x_j|^a / max|W_j|^(1 - a)`` (the paper's migration strength ``a``).

* :func:`targets`: the tensors to smooth: activation inputs of MatMul (``x @ W``, ``W`` a 2-D
  initializer) and Gemm (``W`` an initializer, ``transA`` 0), with every such consumer of the
  tensor (Q, K and V share their input: one ``s`` for the three).
* :func:`channel_maxima`: per-channel max|x| (last axis) from one onnxruntime FP32 forward.
* :func:`plan` + :func:`apply`: ``s`` for a migration strength, then a ``Mul(x, 1/s)`` before the
  consumers and their weights' rows scaled by ``s`` (a weight another node also reads is copied).
* :func:`search`: the migration strength (or none) whose INT8 model has the smallest output error
  against FP32 on calibration batches it was not calibrated on (two folds, even/odd batches: each
  candidate smoothed, calibrated and quantized as the calibrate stage does on one fold, scored on the
  other). One strength for the whole model: per-tensor choices by each MatMul's own output
  error were measured worse on MiniLM (they favour 0.9, the model as a whole 0.8).

Only onnx and numpy (onnxruntime through :func:`calibration.ort_session.make_session`).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Optional, Sequence

import numpy as np

from calibration.errors import CalibrationError

#: Migration strengths tried (no smoothing is always a candidate too).
DEFAULT_ALPHAS = (0.3, 0.5, 0.65, 0.8, 0.9)


@dataclass
class Target:
    tensor: str
    consumers: list[tuple[str, str, bool]] = field(default_factory=list)  # (node, weight initializer, transposed)


def _initializers(model: Any) -> dict[str, Any]:
    return {t.name: t for t in model.graph.initializer}


def targets(model: Any) -> dict[str, Target]:
    """tensor -> Target for every activation a MatMul/Gemm multiplies by a 2-D initializer."""
    inits = _initializers(model)
    out: dict[str, Target] = {}
    for n in model.graph.node:
        if n.op_type not in ("MatMul", "Gemm") or len(n.input) < 2:
            continue
        x, w = n.input[0], n.input[1]
        if x in inits or w not in inits or len(inits[w].dims) != 2:
            continue
        attrs = {a.name: a.i for a in n.attribute if a.type == 2}  # INT attributes
        if n.op_type == "Gemm" and attrs.get("transA", 0):
            continue
        transposed = n.op_type == "Gemm" and bool(attrs.get("transB", 0))
        out.setdefault(x, Target(x)).consumers.append((n.name, w, transposed))
    return out


def _weight(init: Any, transposed: bool) -> np.ndarray:
    from onnx import numpy_helper

    w = numpy_helper.to_array(init).astype(np.float32)
    return w.T if transposed else w  # [in, out]


def channel_maxima(model: Any, batches: Iterable[Mapping[str, np.ndarray]], tensors: Sequence[str], *,
                   threads: Optional[int] = None, sentinel_abs: float = 1e30) -> dict[str, np.ndarray]:
    """tensor -> per-channel max|x| over the last axis, from one onnxruntime FP32 forward. A tensor
    that reaches +-Inf or ``sentinel_abs`` (a mask, as calibration.sentinel_abs) is left out: the
    calibration keeps it in higher precision anyway. NaN is an error."""
    from calibration.collect import augment
    from calibration.ort_session import make_session

    graph_inputs = {i.name for i in model.graph.input}
    fed = [n for n in tensors if n in graph_inputs]  # read from the feeds
    names = [n for n in tensors if n not in graph_inputs]
    session = make_session(augment(model, names), threads=threads, what="the model to smooth",
                           failure="onnxruntime cannot run it with the MatMul inputs exposed") if names else None
    maxima: dict[str, np.ndarray] = {}
    measured = 0
    for b, feeds in enumerate(batches):
        measured += 1
        values = session.run(names, dict(feeds)) if session is not None else []
        for name, v in [*zip(names, values), *((n, feeds[n]) for n in fed)]:
            flat = np.asarray(v, np.float32).reshape(-1, v.shape[-1])
            if np.isnan(flat).any():
                raise CalibrationError(f"calibration batch {b}: tensor {name!r} has NaN values; SmoothQuant needs "
                                       "finite activations: check the calibration data (and that the FP32 model is "
                                       "finite on it), or turn calibration.smooth_quant off")
            m = np.abs(flat).max(0)
            maxima[name] = m if name not in maxima else np.maximum(maxima[name], m)
    if not measured:
        raise CalibrationError("SmoothQuant: no calibration batch to measure the MatMul inputs on")
    return {n: m for n, m in maxima.items() if np.isfinite(m).all() and float(m.max()) < sentinel_abs}


def scales_for(chmax: np.ndarray, weights: Sequence[np.ndarray], alpha: float) -> np.ndarray:
    """``s`` of one tensor: max|x_j|^a / max_k max|W_k[j, :]|^(1 - a) over its consumers' weights."""
    wmax = np.max([np.abs(w).max(1) for w in weights], axis=0)
    s = np.maximum(chmax, 1e-5) ** alpha / np.maximum(wmax, 1e-5) ** (1.0 - alpha)
    return np.maximum(s, 1e-5).astype(np.float32)


def plan(model: Any, found: Mapping[str, Target], maxima: Mapping[str, np.ndarray], alpha: float) -> dict[str, np.ndarray]:
    """tensor -> ``s`` for migration strength ``alpha`` (tensors whose weight rows are not their last axis
    are left out)."""
    inits = _initializers(model)
    out: dict[str, np.ndarray] = {}
    for name, target in found.items():
        if name not in maxima:  # a sentinel-carrying tensor (channel_maxima) or one calibration.exclude names
            continue
        weights = [_weight(inits[w], t) for _, w, t in target.consumers]
        if any(w.shape[0] != maxima[name].shape[0] for w in weights):
            continue
        out[name] = scales_for(maxima[name], weights, alpha)
    return out


def apply(model: Any, found: Mapping[str, Target], scales: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """Edit ``model`` in place: each tensor of ``scales`` gets ``Mul(x, 1/s)`` before its consumers, whose
    weights' rows are scaled by ``s``. Returns {tensor: {"consumers", "mul"}}."""
    from onnx import helper, numpy_helper

    from calibration.onnx_io import fresh_names

    inits = _initializers(model)
    readers: dict[str, int] = {}
    for n in model.graph.node:
        for i in n.input:
            readers[i] = readers.get(i, 0) + 1
    fresh = fresh_names(model)
    nodes = {n.name: n for n in model.graph.node}
    done: dict[str, Any] = {}
    for tensor, s in scales.items():
        s = np.asarray(s, np.float32)
        consumers = found[tensor].consumers
        inv = numpy_helper.from_array((1.0 / s).astype(np.float32), fresh(f"{tensor}_smooth_inv"))
        model.graph.initializer.append(inv)
        out = fresh(f"{tensor}_smoothed")
        first = min(list(model.graph.node).index(nodes[c]) for c, _, _ in consumers)
        mul = helper.make_node("Mul", [tensor, inv.name], [out], name=fresh(f"{tensor}_smooth"))
        model.graph.node.insert(first, mul)
        for node_name, wname, transposed in consumers:
            node = nodes[node_name]
            w = _weight(inits[wname], transposed) * s[:, None]
            data = (w.T if transposed else w).astype(np.float32)
            if readers.get(wname, 0) > 1:  # shared with another node: that one keeps the original
                new = numpy_helper.from_array(data, fresh(f"{wname}_smoothed"))
                model.graph.initializer.append(new)
                node.input[1] = new.name
            else:
                inits[wname].CopyFrom(numpy_helper.from_array(data, wname))
            node.input[0] = out
        done[tensor] = {"consumers": [c for c, _, _ in consumers], "mul": mul.name}
    return done


def _output_error(ref: Any, onnx_q: Any, batches: Iterable[Mapping[str, np.ndarray]],
                  threads: Optional[int]) -> float:
    """The worst sample's relative L2 error of the Q/DQ model's float outputs against the FP32 model's (every
    output's first axis is the sample): a strength that spoils a few inputs loses to one that does not.
    ``ref``: the FP32 model's onnxruntime session."""
    from calibration.ort_session import make_session

    q = make_session(onnx_q, mode="exact", threads=threads, what="the smoothed Q/DQ model")
    worst = 0.0
    for feeds in batches:
        num = den = 0.0
        for r, v in zip(ref.run(None, dict(feeds)), q.run(None, dict(feeds))):
            r, v = np.asarray(r, np.float64), np.asarray(v, np.float64)
            if r.ndim == 0 or r.dtype.kind != "f":
                continue
            axes = tuple(range(1, r.ndim))
            num = num + np.sum((v - r) ** 2, axis=axes)
            den = den + np.sum(r ** 2, axis=axes)
        if np.ndim(num):
            worst = max(worst, float(np.max(num / np.maximum(den, 1e-30))))
    return worst


def search(onnx_path: Any, batches: Any, work: Any, *, alphas: Sequence[float] = DEFAULT_ALPHAS,
           method: str = "entropy", rules: str = "tensorrt", percentile: float = 99.99,
           collect_options: Optional[Mapping[str, Any]] = None,
           threads: Optional[int] = None) -> tuple[Any, dict[str, Any]]:
    """One migration strength for the model, chosen by the INT8 model's output error on calibration batches
    it was not calibrated on: for no smoothing and each ``alphas`` value, and for each of two folds (even and
    odd batches), the model is smoothed with one fold's channel maxima (:func:`plan`, :func:`apply`),
    calibrated on that fold as the calibrate stage does (histograms, ``method`` ranges under ``rules``),
    quantized (Q/DQ) and run against FP32 on the other fold; a candidate's error is the worse of its two
    folds' worst-sample errors. With one batch, it is scored on that batch. The chosen strength is then
    applied with every batch's maxima. ``batches()`` yields the batches anew each time; ``work`` is a
    folder for the candidates. Returns (the chosen ONNX: ``onnx_path`` itself when no smoothing wins,
    report)."""
    from fnmatch import fnmatchcase
    from pathlib import Path

    from calibration.collect import collect_histograms
    from calibration.onnx_io import consumers, load_model, save_model
    from calibration.ort_session import make_session
    from calibration.qdq import quantize_qdq
    from calibration.rules import get_rules, ranges_under

    onnx_path, work = Path(onnx_path), Path(work)
    model = load_model(onnx_path)
    found = targets(model)
    if not found:
        return onnx_path, {"tensors": 0, "alpha": None, "note": "no MatMul/Gemm with a weight initializer to smooth"}
    options = dict(collect_options or {})
    globs = options.get("exclude") or []
    globs = [globs] if isinstance(globs, str) else list(globs)
    left_out = {t: f"calibration.exclude {g!r}" for t in found for g in globs if fnmatchcase(t, g)}
    sentinel = float(options.get("sentinel_abs") or 1e30)
    counter = itertools.count()  # zip draws a batch first: after the pass, next(counter) is the number of batches
    maxima = channel_maxima(model, (b for b, _ in zip(batches(), counter)), [t for t in found if t not in left_out],
                            threads=threads, sentinel_abs=sentinel)
    n_batches = next(counter)
    left_out.update({t: "carries +-Inf or sentinel values (kept in higher precision)" for t in found
                     if t not in left_out and t not in maxima})
    if not maxima:
        return onnx_path, {"tensors": len(found), "alpha": None, "smoothed": 0, "left_out": left_out,
                           "note": "every MatMul/Gemm input is left out (calibration.exclude or sentinels): "
                                   "nothing to smooth"}
    # Two folds (even / odd batches): a candidate is smoothed and calibrated on one fold and scored on the other,
    # so its error is that of inputs whose activations did not set its scales or ranges (as in deployment);
    # in-sample scoring favours the strength whose ranges fit the calibration batches' own extremes.
    folds = [0, 1] if n_batches >= 2 else [None]

    def fold(k: Optional[int], held: bool):
        if k is None:
            return batches()
        return (b for i, b in enumerate(batches()) if (i % 2 == k) != held)

    fold_maxima = {k: channel_maxima(model, fold(k, False), list(maxima), threads=threads, sentinel_abs=sentinel)
                      if k is not None and maxima else maxima for k in folds}
    del model
    r = get_rules(rules)
    ref = make_session(onnx_path, threads=threads, what="the FP32 model")  # one session for every candidate
    errors: dict[str, float] = {}
    smoothed: dict[str, int] = {}
    for alpha in (None, *alphas):
        key = "none" if alpha is None else str(alpha)
        worst = 0.0
        for k in folds:
            path = onnx_path
            if alpha is not None:
                m = load_model(onnx_path)
                smoothed[key] = len(apply(m, found, plan(m, found, fold_maxima[k], float(alpha))))
                path = work / f"smoothed_{key}.onnx"
                save_model(m, path)
                del m
            col = collect_histograms(path, fold(k, False), progress=False, growth=r.growth, **options)
            amax, _, _ = ranges_under(r, col.histograms, method, col.node_ops, percentile)
            q = work / f"q_{key}.onnx"
            quantize_qdq(path, q, amax, exclude_nodes=consumers(path, col.excluded))
            worst = max(worst, _output_error(ref, q, fold(k, True), threads))
            q.unlink(missing_ok=True)
            if path != onnx_path:
                path.unlink(missing_ok=True)
        errors[key] = worst
    best = min(errors, key=lambda k: (errors[k], k != "none"))
    chosen = onnx_path
    if best != "none":  # the chosen strength, smoothed with every calibration batch's maxima
        m = load_model(onnx_path)
        smoothed[best] = len(apply(m, found, plan(m, found, maxima, float(best))))
        chosen = work / f"smoothed_{best}.onnx"
        save_model(m, chosen)
    return chosen, {"tensors": len(found), "alpha": None if best == "none" else float(best),
                    "smoothed": smoothed.get(best, 0), "left_out": left_out,
                    "scored_on": ("the other fold: even/odd calibration batches, each fold smoothed and calibrated "
                                  "on one and scored on the other (worst of both)") if folds != [None] else
                                 "the calibration batches themselves (one batch: no second fold)",
                    "relative_output_error": {k: float(f"{v:.6g}") for k, v in errors.items()}}


__all__ = ["DEFAULT_ALPHAS", "Target", "targets", "channel_maxima", "plan", "apply", "scales_for", "search"]
