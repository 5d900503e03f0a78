"""Post-training quantization beyond one range method for all: Clip-aware ranges and bias
correction of quantized weights (the ``mse`` range search is in :mod:`calibration.algorithms`).

* :func:`clip_bounds`: the tensors whose values a Clip (ReLU6: ``Clip(x, 0, 6)``, as
  EfficientNet-Lite's export writes it, min/max as constant inputs; opset < 11 as
  attributes) bounds, followed through ops that cannot leave the bound (a constant Pad
  with a pad value inside it, reshapes, MaxPool, averages, Concat of bounded inputs).
  ``calibration.clip_aware`` caps such a tensor's amax at ``max(|min|, |max|)``.
* :func:`input_means` + :func:`bias_corrections` + :func:`apply_bias_corrections`:
  empirical bias correction (Nagel et al., "Data-Free Quantization Through Weight
  Equalization and Bias Correction", 2019, section 4.2, the empirical variant). Per output
  channel of every Conv / Gemm / MatMul whose weight the Q/DQ model quantizes,
  ``E[W_q x] - E[W x] = E[(W_q - W) x]`` over the calibration samples, with ``x`` the FP32
  model's input to that node; since the op is linear this is the op applied to the mean
  input with weight ``W_q - W`` (for a Conv: the mean input map per position, padding
  included, averaged over output positions; exact, not the per-channel-mean shortcut).
  The correction is subtracted from the bias (a bias is added when the node has none:
  Conv's third input, Gemm's C, an Add after a MatMul), so the Q/DQ model's expected
  output per channel equals the FP32 one on the calibration data.

Only onnx and numpy (onnxruntime through :func:`calibration.ort_session.make_session`).
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Optional, Sequence

import numpy as np

from calibration.errors import CalibrationError
from calibration.onnx_io import fresh_names

#: Ops whose output stays within any bound its (first) input keeps.
_PASS_THROUGH = ("Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Identity", "MaxPool",
                 "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "Slice", "ReduceMean", "ReduceMax",
                 "Resize", "Upsample", "DepthToSpace", "SpaceToDepth", "Split", "Gather")
#: Ops with a weight input whose bias :func:`bias_corrections` can correct.
CORRECTABLE_OPS = ("Conv", "Gemm", "MatMul")


def _constants(model: Any) -> dict[str, np.ndarray]:
    from onnx import numpy_helper

    out = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            out[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    return out


def _scalar(consts: Mapping[str, np.ndarray], name: str) -> Optional[float]:
    if not name or name not in consts or np.asarray(consts[name]).size != 1:
        return None
    value = float(np.asarray(consts[name]).reshape(()))
    return value if np.isfinite(value) else None


def clip_bounds(model: Any) -> dict[str, tuple[float, float]]:
    """``{tensor: (lo, hi)}`` for every tensor a Clip with constant finite min and max bounds,
    and the tensors computed from such ones by ops that stay within the bound; graph order."""
    consts = _constants(model)
    bounds: dict[str, tuple[float, float]] = {}
    for node in model.graph.node:
        op, ins, outs = node.op_type, list(node.input), list(node.output)
        got: Optional[tuple[float, float]] = None
        if op == "Clip":
            attrs = {a.name: a.f for a in node.attribute}
            lo = _scalar(consts, ins[1]) if len(ins) > 1 else attrs.get("min")
            hi = _scalar(consts, ins[2]) if len(ins) > 2 else attrs.get("max")
            if lo is not None and hi is not None:
                got = (float(lo), float(hi))
            elif ins[0] in bounds:
                got = bounds[ins[0]]
        elif ins and ins[0] in bounds and op in _PASS_THROUGH:
            got = bounds[ins[0]]
        elif op == "Pad" and ins and ins[0] in bounds:
            mode = next((a.s.decode() for a in node.attribute if a.name == "mode"), "constant")
            value = _scalar(consts, ins[2]) if len(ins) > 2 and ins[2] else 0.0
            lo, hi = bounds[ins[0]]
            if mode != "constant":
                got = (lo, hi)
            elif value is not None:
                got = (min(lo, value), max(hi, value))
        elif op == "Concat" and ins and all(i in bounds for i in ins):
            got = (min(bounds[i][0] for i in ins), max(bounds[i][1] for i in ins))
        elif op == "Relu" and ins and ins[0] in bounds:
            lo, hi = bounds[ins[0]]
            got = (max(lo, 0.0), max(hi, 0.0))
        if got is not None:
            for o in outs[:1] if op != "Split" else outs:
                if o:
                    bounds[o] = got
    return bounds


def clip_amax_bounds(model: Any) -> dict[str, float]:
    """``{tensor: max(|lo|, |hi|)}`` from :func:`clip_bounds`: the largest amax worth giving it."""
    return {t: max(abs(lo), abs(hi)) for t, (lo, hi) in clip_bounds(model).items()}


def apply_clip_bounds(amax: dict[str, float], bounds: Mapping[str, float]) -> dict[str, float]:
    """Cap ``amax`` (in place) at ``bounds``; returns ``{tensor: amax before}`` of those capped."""
    capped = {}
    for t, b in bounds.items():
        if t in amax and amax[t] > b:
            capped[t] = amax[t]
            amax[t] = float(b)
    return capped


# -- bias correction ---------------------------------------------------------------------
def correctable_nodes(model: Any, weights: Sequence[tuple[str, int, str, Optional[int]]]) -> dict[str, str]:
    """``{node name: its activation input}`` for the nodes of ``weights`` (a Q/DQ plan's
    ``(node, input index, initializer, axis)``) whose weight :func:`bias_corrections` corrects:
    Conv (weight at 1, plain auto_pad), Gemm (B at 1, transA 0), MatMul (B at 1)."""
    nodes = {n.name: n for n in model.graph.node}
    out = {}
    for node_name, index, _, _ in weights:
        node = nodes.get(node_name)
        if node is None or node.op_type not in CORRECTABLE_OPS or index != 1:
            continue
        attrs = {a.name: a for a in node.attribute}
        if node.op_type == "Conv" and attrs.get("auto_pad") is not None \
                and attrs["auto_pad"].s.decode() not in ("NOTSET", "VALID"):
            continue
        if node.op_type == "Gemm" and attrs.get("transA") is not None and attrs["transA"].i:
            continue
        out[node_name] = node.input[0]
    return out


def correction_inputs(model: Any) -> dict[str, str]:
    """``{activation input: op type}`` of every Conv / Gemm / MatMul whose weight (input 1) is
    a constant: the tensors :func:`input_means` must average for bias correction."""
    consts = _constants(model)
    out: dict[str, str] = {}
    for node in model.graph.node:
        if node.op_type in CORRECTABLE_OPS and len(node.input) > 1 and node.input[1] in consts \
                and node.input[0] not in consts:
            out.setdefault(node.input[0], node.op_type)
    return out


def input_means(model: Any, batches: Iterable[Mapping[str, np.ndarray]], tensors: Mapping[str, str],
                threads: Optional[int] = None) -> dict[str, np.ndarray]:
    """Mean over the calibration samples of each tensor in ``tensors`` (name -> the op type of
    its consumer): a Conv input keeps its per-position map ``(C, H, W)``, others are averaged
    over every axis but the last. The FP32 model runs in onnxruntime (exact mode) with those
    tensors as extra outputs."""
    from calibration.collect import augment
    from calibration.ort_session import make_session

    names = list(tensors)
    if not names:
        return {}
    inputs = {i.name for i in model.graph.input} - {i.name for i in model.graph.initializer}
    exposed = [n for n in names if n not in inputs]
    session = make_session(augment(model, exposed), threads=threads, what="bias correction's FP32 forward")
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    for batch in batches:
        feeds = dict(batch) if isinstance(batch, Mapping) else {next(iter(inputs)): batch}
        values = dict(zip(exposed, session.run(exposed, feeds)))
        values.update({n: feeds[n] for n in names if n in feeds})
        for name in names:
            v = np.asarray(values[name], dtype=np.float64)
            if tensors[name] == "Conv":
                part, n = v.sum(axis=0), v.shape[0]
            else:
                flat = v.reshape(-1, v.shape[-1])
                part, n = flat.sum(axis=0), flat.shape[0]
            if name in sums and sums[name].shape != part.shape:
                raise CalibrationError(f"bias correction: tensor {name!r} changes shape between calibration batches "
                                       f"({sums[name].shape} then {part.shape}); turn calibration.bias_correction off")
            sums[name] = sums[name] + part if name in sums else part
            counts[name] = counts.get(name, 0) + n
    return {n: sums[n] / counts[n] for n in sums}


def _conv_mean_output(mean_in: np.ndarray, w: np.ndarray, node: Any) -> np.ndarray:
    """Mean over output positions of ``Conv(mean_in[None], w)`` (no bias), per output channel."""
    attrs = {a.name: a for a in node.attribute}
    spatial = w.ndim - 2
    strides = list(attrs["strides"].ints) if "strides" in attrs else [1] * spatial
    dil = list(attrs["dilations"].ints) if "dilations" in attrs else [1] * spatial
    pads = list(attrs["pads"].ints) if "pads" in attrs else [0] * (2 * spatial)
    group = attrs["group"].i if "group" in attrs else 1
    if "auto_pad" in attrs and attrs["auto_pad"].s.decode() == "VALID":
        pads = [0] * (2 * spatial)
    x = np.pad(mean_in, [(0, 0)] + [(pads[d], pads[d + spatial]) for d in range(spatial)])
    kshape = w.shape[2:]
    out_len = [(x.shape[1 + d] - dil[d] * (kshape[d] - 1) - 1) // strides[d] + 1 for d in range(spatial)]
    # A[c, k...] = mean over output positions of the input the kernel tap k sees.
    taps = np.empty((x.shape[0], *kshape))
    for k in np.ndindex(*kshape):
        sl = tuple(slice(k[d] * dil[d], k[d] * dil[d] + strides[d] * (out_len[d] - 1) + 1, strides[d])
                   for d in range(spatial))
        taps[(slice(None), *k)] = x[(slice(None), *sl)].reshape(x.shape[0], -1).mean(axis=1)
    o, cg = w.shape[0], w.shape[1]
    per_group = taps.reshape(group, cg, *kshape)[np.arange(o) // (o // group)]  # (O, Cg, k...)
    return (w.astype(np.float64) * per_group).reshape(o, -1).sum(axis=1)


def bias_corrections(model: Any, weights: Sequence[tuple[str, int, str, Optional[int]]],
                     means: Mapping[str, np.ndarray], per_channel: bool = True,
                     rounded: Optional[Mapping[tuple[str, Optional[int]], np.ndarray]] = None) -> dict[str, np.ndarray]:
    """``{node name: E[W_q x] - E[W x] per output channel}`` for the correctable nodes of
    ``weights`` whose input mean is in ``means`` (:func:`input_means`). ``W_q`` is what
    :func:`calibration.qdq_insert.quantize_weight` writes into the Q/DQ model (its scale with
    ``rounded``'s ``q`` where given, :mod:`calibration.rounding`)."""
    from onnx import numpy_helper

    from calibration.qdq_insert import quantize_weight

    inits = {i.name: i for i in model.graph.initializer}
    nodes = {n.name: n for n in model.graph.node}
    targets = correctable_nodes(model, weights)
    out: dict[str, np.ndarray] = {}
    for node_name, index, weight, axis in weights:
        if node_name not in targets or targets[node_name] not in means or weight not in inits:
            continue
        node = nodes[node_name]
        w = numpy_helper.to_array(inits[weight]).astype(np.float32)
        try:
            q, scale = quantize_weight(w, axis if per_channel else None)
        except ValueError:
            continue  # NaN/Inf in the weight: insert_qdq names it in one line
        if rounded is not None and (weight, axis if per_channel else None) in rounded:
            q = rounded[(weight, axis if per_channel else None)]
        shape = [1] * w.ndim
        if scale.ndim:
            shape[axis] = -1  # type: ignore[index]
        dw = q.astype(np.float64) * scale.astype(np.float64).reshape(shape) - w.astype(np.float64)
        m = means[targets[node_name]]
        if not np.all(np.isfinite(m)):
            continue  # an input carrying sentinels (masks): no meaningful mean
        if node.op_type == "Conv":
            corr = _conv_mean_output(m, dw, node)
        elif m.ndim > 1:
            m = m.reshape(-1, m.shape[-1]).mean(axis=0)
        if node.op_type == "Conv":
            pass
        elif node.op_type == "Gemm":
            attrs = {a.name: a for a in node.attribute}
            trans_b = attrs["transB"].i if "transB" in attrs else 0
            alpha = attrs["alpha"].f if "alpha" in attrs else 1.0
            corr = alpha * (m @ (dw.T if trans_b else dw))
        else:  # MatMul with a 2-D constant B
            if dw.ndim != 2:
                continue
            corr = m @ dw
        if np.all(np.isfinite(corr)):
            out[node_name] = corr
    return out


def apply_bias_corrections(model: Any, corrections: Mapping[str, np.ndarray]) -> dict[str, str]:
    """Subtract each correction from its node's bias, in place (a new initializer, so a bias
    shared with another node is not touched); add a bias where there is none. Returns
    ``{node name: the bias tensor it now reads}``."""
    from onnx import helper, numpy_helper

    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    fresh = fresh_names(model)
    written: dict[str, str] = {}
    position = {n.name: k for k, n in enumerate(graph.node)}
    adds: list[tuple[int, Any]] = []
    for node in graph.node:
        if node.name not in corrections:
            continue
        corr = np.asarray(corrections[node.name], dtype=np.float64)
        if node.op_type in ("Conv", "Gemm"):
            beta = next((a.f for a in node.attribute if a.name == "beta"), 1.0) if node.op_type == "Gemm" else 1.0
            if beta == 0.0:
                continue
            has_bias = len(node.input) > 2 and node.input[2]
            if has_bias and node.input[2] not in inits:
                continue  # a bias computed at run time: left as it is
            old = numpy_helper.to_array(inits[node.input[2]]).astype(np.float64) if has_bias else np.zeros(corr.size)
            if old.shape != corr.shape and old.size != 1:
                continue  # a Gemm C broadcast over rows: left as it is
            new = (old - corr / beta).astype(np.float32)
            name = fresh(f"{node.input[2] if has_bias else node.name + '_bias'}_corrected")
            graph.initializer.append(numpy_helper.from_array(new, name))
            if has_bias:
                node.input[2] = name
            else:
                node.input.append(name)
            written[node.name] = name
        else:  # MatMul: y = x @ W - corr via an Add after it
            out = node.output[0]
            pre = fresh(f"{out}_before_bias_correction")
            name = fresh(f"{node.name}_bias_correction")
            graph.initializer.append(numpy_helper.from_array((-corr).astype(np.float32), name))
            node.output[0] = pre
            adds.append((position[node.name], helper.make_node("Add", [pre, name], [out], name=fresh(f"{node.name}_bias_add"))))
            written[node.name] = name
    if adds:
        after = {k: n for k, n in adds}
        ordered = []
        for k, n in enumerate(list(graph.node)):
            ordered.append(n)
            if k in after:
                ordered.append(after[k])
        del graph.node[:]
        graph.node.extend(ordered)
    return written


# -- cross-layer equalization of Conv -> (ReLU6) -> depthwise Conv --------------------------
def depthwise_pairs(model: Any) -> list[tuple[Any, list[Any], Any]]:
    """``(producer Conv, [nodes between], depthwise Conv)`` for every depthwise Conv (group ==
    channels, one input channel per group) whose input comes from a Conv with a constant weight
    through only Relu, Clip with min 0, and zero Pad nodes, each read by nothing else: the
    pairs where scaling channel c of the producer by s and the depthwise weight by 1/s keeps
    the function (exactly for Relu; for a Clip while s * max stays within its bound)."""
    consts = _constants(model)
    inits = {i.name for i in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    readers: dict[str, int] = {}
    for n in model.graph.node:
        for i in n.input:
            readers[i] = readers.get(i, 0) + 1
    outputs = {o.name for o in model.graph.output}
    pairs = []
    for dw in model.graph.node:
        if dw.op_type != "Conv" or len(dw.input) < 2 or dw.input[1] not in inits:
            continue
        w = consts[dw.input[1]]
        group = next((a.i for a in dw.attribute if a.name == "group"), 1)
        if w.ndim != 4 or w.shape[1] != 1 or group != w.shape[0] or group == 1:
            continue
        chain, t, ok = [], dw.input[0], True
        while ok:
            node = producer.get(t)
            if node is None or readers.get(t, 0) != 1 or t in outputs:
                ok = False
            elif node.op_type == "Conv":
                break
            elif node.op_type == "Relu" or (node.op_type == "Clip" and len(node.input) > 2
                                             and _scalar(consts, node.input[1]) == 0.0
                                             and _scalar(consts, node.input[2]) is not None):
                chain.append(node)
            elif node.op_type == "Pad" and (len(node.input) < 3 or not node.input[2]
                                            or _scalar(consts, node.input[2]) == 0.0) \
                    and next((a.s.decode() for a in node.attribute if a.name == "mode"), "constant") == "constant":
                chain.append(node)
            else:
                ok = False
            if ok:
                t = node.input[0]
        if not ok or len(node.input) < 2 or node.input[1] not in inits or readers.get(node.input[1], 0) != 1 \
                or readers.get(dw.input[1], 0) != 1 or (len(node.input) > 2 and node.input[2]
                                                        and (node.input[2] not in inits or readers[node.input[2]] != 1)):
            continue
        if consts[node.input[1]].shape[0] != w.shape[0]:
            continue
        pairs.append((node, chain, dw))
    return pairs


def channel_max(model: Any, batches: Iterable[Mapping[str, np.ndarray]], tensors: Sequence[str],
                threads: Optional[int] = None) -> dict[str, np.ndarray]:
    """max|x| per channel (axis 1) of each tensor over the calibration batches (FP32 model)."""
    from calibration.collect import augment
    from calibration.ort_session import make_session

    names = list(dict.fromkeys(tensors))
    if not names:
        return {}
    session = make_session(augment(model, names), threads=threads, what="equalization's FP32 forward")
    out: dict[str, np.ndarray] = {}
    for batch in batches:
        for name, v in zip(names, session.run(names, dict(batch))):
            m = np.abs(np.asarray(v, dtype=np.float64)).max(axis=tuple(a for a in range(v.ndim) if a != 1))
            out[name] = np.maximum(out[name], m) if name in out else m
    return out


def equalize_depthwise(model: Any, cmax: Mapping[str, np.ndarray], margin: float = 0.7,
                       max_scale: float = 1000.0) -> dict[str, list[float]]:
    """Cross-layer equalization of :func:`depthwise_pairs`, in place: channel c of the
    producer's output is multiplied by ``s_c >= 1`` (its weight and bias) and the depthwise
    weight of channel c divided by it, so that every channel's max over the calibration data
    (``cmax``, of the depthwise input, :func:`channel_max`) reaches ``margin`` times the
    Clip's bound (the largest channel's max where only Relu lies between). Per-tensor INT8 of
    the depthwise input then resolves its small channels. Exact where only Relu lies between;
    with a Clip, exact as long as a channel stays below ``bound / s_c`` (the calibration data
    does, by ``margin``). Returns ``{depthwise node: scales}``."""
    from onnx import numpy_helper

    if not 0 < margin <= 1:
        raise CalibrationError(f"equalization margin must be within (0, 1], got {margin}")
    consts = _constants(model)
    inits = {i.name: i for i in model.graph.initializer}
    done: dict[str, list[float]] = {}
    for prod, chain, dw in depthwise_pairs(model):
        m = cmax.get(dw.input[0])
        if m is None or m.shape != (consts[dw.input[1]].shape[0],) or not np.all(np.isfinite(m)) or m.max() <= 0:
            continue
        clips = [_scalar(consts, n.input[2]) for n in chain if n.op_type == "Clip"]
        target = margin * min(clips) if clips else float(m.max())
        s = np.where(m > 0, np.clip(target / np.maximum(m, 1e-30), 1.0, max_scale), 1.0)
        if np.all(s == 1.0):
            continue

        def put(name: str, value: np.ndarray) -> None:
            inits[name].CopyFrom(numpy_helper.from_array(value.astype(np.float32), name))

        put(prod.input[1], consts[prod.input[1]].astype(np.float64) * s.reshape(-1, 1, 1, 1))
        if len(prod.input) > 2 and prod.input[2]:
            put(prod.input[2], consts[prod.input[2]].astype(np.float64) * s)
        put(dw.input[1], consts[dw.input[1]].astype(np.float64) / s.reshape(-1, 1, 1, 1))
        done[dw.name] = [float(v) for v in s]
    return done


__all__ = ["depthwise_pairs", "channel_max", "equalize_depthwise", "clip_bounds", "correction_inputs", "clip_amax_bounds", "apply_clip_bounds", "correctable_nodes", "input_means",
           "bias_corrections", "apply_bias_corrections", "CORRECTABLE_OPS"]
