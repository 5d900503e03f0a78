"""Weight rounding by the output error it causes (GPTQ; Frantar et al., "GPTQ: Accurate
Post-Training Quantization for Generative Pre-trained Transformers", 2022, after Optimal Brain
Quantization): ``calibration.weight_rounding: gptq``.

Round to nearest treats every weight of an output channel alone. On a depthwise 3x3 kernel
whose taps nearly cancel (an edge detector after batch-norm folding: large taps, a small sum),
independent rounding errors do not cancel and the channel's output moves by many times its
size; on EfficientNet-Lite1 the first depthwise layer's rounding alone costs more top-1
agreement than every activation together (``docs/results.md``). GPTQ rounds the weights of a
row one at a time and moves the row's not-yet-rounded weights to undo, on the calibration
inputs, the error each rounding made: it minimizes ``(q*s - w) H (q*s - w)^T`` with
``H = E[x x^T]`` over the node's input patches.

What stays as TensorRT needs it: the scale of every channel is the one round-to-nearest uses
(``max|w| / 127``, :func:`calibration.qdq_insert.quantize_weight`), every ``q`` is in
[-127, 127], and the element that defines the scale keeps its ``±127`` (it is never moved),
so the Q/DQ ONNX's weights are ``q * scale`` on the same grid. Only the Q/DQ ONNX (explicit
and strongly typed routes) carries the rounding; an implicit engine quantizes the FP32 ONNX's
weights itself.

* :func:`second_moments`: ``H`` per node from the FP32 model's inputs to it (onnxruntime,
  exact mode), float64 sums; a Conv's patches on a grid of at most ``MAX_POSITIONS`` output
  positions per sample (every ``r``-th row and column), groups (depthwise) their own ``H``.
* :func:`gptq_rows`: the rounding of rows that share ``H`` (or have one each).
* :func:`round_weights`: ``{(initializer, axis): q int8}`` for a Q/DQ plan's weights.

Only onnx and numpy (onnxruntime through :func:`calibration.ort_session.make_session`).
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Mapping, Optional, Sequence

import numpy as np

from calibration.errors import CalibrationError

#: Output positions per sample (and per Conv) whose patches enter ``H``; a grid, not a draw.
MAX_POSITIONS = 64
#: GPTQ's damping: this fraction of ``H``'s mean diagonal added to its diagonal.
DAMP = 0.01
INT8_MAX = 127
#: Columns rounded one by one before the rest of the row is updated with one matrix product.
BLOCK = 128
#: The widest row GPTQ rounds (its H is D x D float64: 8192 -> 512 MiB); wider ones keep nearest.
MAX_DIM = 8192


def _attrs(node: Any) -> dict[str, Any]:
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def roundable(model: Any, weights: Sequence[tuple[str, int, str, Optional[int]]]) -> dict[str, str]:
    """``{node name: its activation input}`` for the plan's weights GPTQ rounds: Conv (weight
    at 1, no auto_pad SAME), Gemm (B at 1, transA 0), MatMul (a 2-D B at 1). Others (and
    ConvTranspose) keep round-to-nearest."""
    nodes = {n.name: n for n in model.graph.node}
    inits = {i.name: i for i in model.graph.initializer}
    out = {}
    for node_name, index, weight, _ in weights:
        node = nodes.get(node_name)
        if node is None or index != 1 or weight not in inits or node.op_type not in ("Conv", "Gemm", "MatMul"):
            continue
        a = _attrs(node)
        if node.op_type == "Conv" and a.get("auto_pad", b"NOTSET") not in (b"NOTSET", b"VALID"):
            continue
        if node.op_type == "Gemm" and a.get("transA", 0):
            continue
        if node.op_type == "MatMul" and len(inits[weight].dims) != 2:
            continue
        dims = list(inits[weight].dims)
        row = math.prod(dims[1:]) if node.op_type == "Conv" else (
            dims[1] if node.op_type == "Gemm" and a.get("transB", 0) else dims[0])
        if row > MAX_DIM:
            continue  # too wide a row for a D x D matrix: round to nearest
        out[node_name] = node.input[0]
    return out


def _conv_patches(x: np.ndarray, node: Any, kshape: Sequence[int], max_positions: int) -> np.ndarray:
    """``(N, groups, Cg * prod(k), P)`` input patches of a Conv on a grid of output positions, in
    the weight's ``(Cg, k...)`` order."""
    a = _attrs(node)
    spatial = len(kshape)
    strides = list(a.get("strides", [1] * spatial))
    dil = list(a.get("dilations", [1] * spatial))
    pads = list(a.get("pads", [0] * (2 * spatial)))
    if a.get("auto_pad", b"NOTSET") == b"VALID":
        pads = [0] * (2 * spatial)
    group = int(a.get("group", 1))
    xp = np.pad(x, [(0, 0), (0, 0)] + [(pads[d], pads[d + spatial]) for d in range(spatial)]) if any(pads) else x
    out_len = [(xp.shape[2 + d] - dil[d] * (kshape[d] - 1) - 1) // strides[d] + 1 for d in range(spatial)]
    if min(out_len) < 1:
        raise CalibrationError(f"weight rounding: Conv {node.name!r} has no output position for input {x.shape}")
    # every r-th output position along each axis, r chosen so that at most max_positions remain
    r = max(1, math.ceil((math.prod(out_len) / max_positions) ** (1.0 / spatial)))
    taps = []
    for k in np.ndindex(*kshape):
        sl = tuple(slice(k[d] * dil[d], k[d] * dil[d] + strides[d] * (out_len[d] - 1) + 1, strides[d] * r)
                   for d in range(spatial))
        taps.append(xp[(slice(None), slice(None), *sl)])
    t = np.stack(taps, axis=2).astype(np.float64)  # (N, C, K, *O)
    n, c, kk = t.shape[:3]
    return t.reshape(n, group, (c // group) * kk, -1)  # (N, G, Cg*K, P), no copy


def _patches(x: np.ndarray, node: Any, weight_shape: Sequence[int], max_positions: int) -> np.ndarray:
    if node.op_type == "Conv":
        return _conv_patches(x, node, weight_shape[2:], max_positions)
    flat = x.reshape(-1, x.shape[-1]).astype(np.float64)  # Gemm (N, K); MatMul (..., K)
    return flat.T[None, None]


def second_moments(model: Any, batches: Iterable[Mapping[str, np.ndarray]], nodes: Mapping[str, str], *,
                   threads: Optional[int] = None, max_positions: int = MAX_POSITIONS) -> dict[str, np.ndarray]:
    """``{node: E[x x^T]}`` (``(groups, D, D)``, float64) of each node's input patches over the
    calibration batches; ``nodes`` is :func:`roundable`'s map. The FP32 model runs in
    onnxruntime (exact mode) with the inputs as extra outputs. A node whose input holds NaN or
    Inf on some batch (sentinels) gets none: its weight keeps round-to-nearest."""
    from calibration.collect import augment
    from calibration.ort_session import make_session

    if not nodes:
        return {}
    by_name = {n.name: n for n in model.graph.node}
    inits = {i.name: tuple(i.dims) for i in model.graph.initializer}
    graph_inputs = {i.name for i in model.graph.input} - set(inits)
    tensors = sorted(set(nodes.values()))
    exposed = [t for t in tensors if t not in graph_inputs]
    session = make_session(augment(model, exposed), threads=threads, what="weight rounding's FP32 forward")
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    unseen: set[str] = set()
    for batch in batches:
        values = dict(zip(exposed, session.run(exposed, dict(batch)) if exposed else []))
        values.update({t: batch[t] for t in tensors if t in batch})
        for name, tensor in nodes.items():
            node = by_name[name]
            if name in unseen:
                continue
            x = np.asarray(values[tensor])
            if not np.isfinite(x).all():  # sentinels (masks) or an overflow: this weight keeps round-to-nearest
                unseen.add(name)
                continue
            p = _patches(x, node, inits[node.input[1]], max_positions)
            h = np.matmul(p, p.swapaxes(-1, -2)).sum(axis=0)  # (G, D, D)
            if name in sums and sums[name].shape != h.shape:
                raise CalibrationError(f"weight rounding: the input of {name!r} changes its patch size between "
                                       f"batches ({sums[name].shape} then {h.shape})")
            sums[name] = sums[name] + h if name in sums else h
            counts[name] = counts.get(name, 0) + p.shape[0] * p.shape[3]
    return {n: sums[n] / counts[n] for n in sums if n not in unseen}


def gptq_rows(w: np.ndarray, h: np.ndarray, scale: np.ndarray, damp: float = DAMP) -> np.ndarray:
    """Round the rows of ``w`` (``(R, D)``) to ``q`` (int8, ``|q| <= 127``) on the grid
    ``scale`` (``(R,)``), GPTQ with ``h`` (``(1, D, D)`` shared, or ``(R, D, D)`` one per row).
    Columns go in decreasing order of ``h``'s diagonal; an input that is always zero
    (diagonal 0) is rounded to nearest; an element at ``±127 * scale`` stays there."""
    w = np.asarray(w, dtype=np.float64).copy()
    rows, dim = w.shape
    s = np.asarray(scale, dtype=np.float64).reshape(rows)
    hb = np.array(h, dtype=np.float64, copy=True)
    diag = np.diagonal(hb, axis1=1, axis2=2).copy()
    idx = np.arange(dim)
    hb[:, idx, idx] = np.where(diag > 0, diag, 1.0)
    mean_diag = np.diagonal(hb, axis1=1, axis2=2).mean(axis=1)
    hb[:, idx, idx] += damp * mean_diag[:, None]
    order = np.argsort(-np.diagonal(hb, axis1=1, axis2=2).mean(axis=0), kind="stable")
    hb = hb[:, order][:, :, order]
    w = w[:, order]
    upper = np.linalg.cholesky(np.linalg.inv(hb)).transpose(0, 2, 1)  # H^-1 = U^T U
    shared = upper.shape[0] == 1
    if shared:
        upper_rows = np.broadcast_to(upper, (rows, dim, dim))
    else:
        upper_rows = upper
    fixed = np.abs(w) >= INT8_MAX * s[:, None] * (1 - 1e-6)
    kept = w[fixed]
    q = np.zeros((rows, dim))
    if not (np.all(np.isfinite(upper)) and np.all(np.isfinite(w))):
        raise np.linalg.LinAlgError("H is not positive definite to float64 precision")
    for b0 in range(0, dim, BLOCK):  # GPTQ's lazy batch updates: a block column by column, then the rest at once
        b1 = min(b0 + BLOCK, dim)
        errs = np.zeros((rows, b1 - b0))
        for i in range(b0, b1):
            qi = np.clip(np.rint(w[:, i] / s), -INT8_MAX, INT8_MAX)
            q[:, i] = qi
            err = (w[:, i] - qi * s) / upper_rows[:, i, i]
            w[:, i:b1] -= err[:, None] * upper_rows[:, i, i:b1]
            errs[:, i - b0] = err
            w[fixed] = kept
        if b1 < dim:
            if shared:
                w[:, b1:] -= errs @ upper[0, b0:b1, b1:]
            else:
                w[:, b1:] -= np.einsum("rb,rbc->rc", errs, upper[:, b0:b1, b1:])
            w[fixed] = kept
    if not np.all(np.isfinite(q)):
        raise np.linalg.LinAlgError("the rounding left the grid")
    out = np.empty_like(q)
    out[:, order] = q
    return out.astype(np.int8)


def _rows(w: np.ndarray, node: Any) -> tuple[np.ndarray, Any]:
    """The weight as ``(R, D)`` rows (one per output channel) and how to put rows back."""
    if node.op_type == "Conv":
        return w.reshape(w.shape[0], -1), lambda q: q.reshape(w.shape)
    trans = node.op_type == "Gemm" and _attrs(node).get("transB", 0)
    if trans:  # (O, K)
        return w, lambda q: q
    return w.T, lambda q: np.ascontiguousarray(q.T)  # (K, O): rows are its columns


def round_weights(model: Any, weights: Sequence[tuple[str, int, str, Optional[int]]],
                  moments: Mapping[str, np.ndarray], per_channel: bool = True,
                  damp: float = DAMP) -> dict[tuple[str, Optional[int]], np.ndarray]:
    """``{(initializer, axis): q}`` for each weight of the plan whose node has ``moments``
    (:func:`second_moments`); the scale is :func:`calibration.qdq_insert.quantize_weight`'s.
    A weight read by several nodes sums their ``H``."""
    from onnx import numpy_helper

    from calibration.qdq_insert import quantize_weight

    inits = {i.name: i for i in model.graph.initializer}
    nodes = {n.name: n for n in model.graph.node}
    summed: dict[tuple[str, Optional[int]], tuple[Any, np.ndarray]] = {}
    for node_name, index, weight, axis in weights:
        if node_name not in moments or index != 1:
            continue
        axis = axis if per_channel else None
        h = moments[node_name]
        key = (weight, axis)
        if key in summed:
            first, h0 = summed[key]
            if h0.shape != h.shape:
                continue
            summed[key] = (first, h0 + h)
        else:
            summed[key] = (nodes[node_name], h)
    out: dict[tuple[str, Optional[int]], np.ndarray] = {}
    for (weight, axis), (node, h) in summed.items():
        w = numpy_helper.to_array(inits[weight]).astype(np.float32)
        try:
            q_near, scale = quantize_weight(w, axis)
        except ValueError:
            continue  # NaN/Inf in the weight: quantize_qdq names it in one line
        if not np.all(np.isfinite(h)):
            continue
        rows, back = _rows(w, node)
        if node.op_type == "Conv" and h.shape[0] > 1:
            h = np.repeat(h, rows.shape[0] // h.shape[0], axis=0)  # a group's rows share its H
        if h.shape[-1] != rows.shape[1]:
            continue
        s = np.broadcast_to(np.asarray(scale, dtype=np.float32), (rows.shape[0],)) if scale.ndim == 0 else scale
        try:
            q = back(gptq_rows(rows, h, s, damp))
        except np.linalg.LinAlgError:
            continue  # H too ill-conditioned to invert: this weight keeps round-to-nearest
        assert q.shape == q_near.shape
        out[(weight, axis)] = q
    return out


__all__ = ["MAX_POSITIONS", "DAMP", "roundable", "second_moments", "gptq_rows", "round_weights"]
