"""Write a Q/DQ plan (:mod:`calibration.qdq_placement`) into an ONNX graph with onnx.helper.

What the result holds, in the layout onnxruntime's QDQQuantizer writes (so
:func:`calibration.qdq.read_qdq_scales` and TensorRT's ONNX parser read either):

* an activation ``t``: initializers ``t_scale`` (float32 scalar) and ``t_zero_point``
  (int8 0), ``t_QuantizeLinear`` -> ``t_QuantizeLinear_Output`` -> ``t_DequantizeLinear``
  -> ``t_DequantizeLinear_Output``, placed right after ``t``'s producer; only the planned
  consumer inputs are rewired to the DQ output (one pair per tensor, or one per consumer
  input with ``dedicated_pairs``);
* a weight ``W``: ``W_quantized`` (int8), ``W_scale`` / ``W_zero_point`` (per channel along
  the planned axis, or scalars) and ``W_DequantizeLinear`` -> ``W_DequantizeLinear_Output``
  at the top of the graph. Symmetric: ``scale = max|w| / 127`` of the channel, computed in
  float64 and stored as float32 (1.0 for an all-zero channel), ``q = round_half_even(w /
  scale)`` in float32, clipped to [-127, 127]: the arithmetic of onnxruntime's quantizer;
* float initializers no node reads any more are dropped.

Only onnx and numpy: the same code runs with onnxruntime 1.20 and 1.32.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Optional, Sequence

import numpy as np

from calibration.errors import CalibrationError

INT8_MAX = 127


def quantize_weight(w: np.ndarray, axis: Optional[int]) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric INT8 of a weight: ``(q int8, scale float32)``; per channel along ``axis``
    (scale shape ``(w.shape[axis],)``) or per tensor (``axis=None``, scalar scale)."""
    w32 = np.asarray(w, dtype=np.float32)
    if not np.all(np.isfinite(w32)):
        raise ValueError("weight holds NaN or Inf")
    if axis is None:
        amax = np.abs(w32).max() if w32.size else np.float32(0)
        scale = np.array(np.float64(amax) / INT8_MAX, dtype=np.float32)
        scale = np.where(scale > 0, scale, np.float32(1.0)).astype(np.float32)
        shaped = scale
    else:
        channels = w32.shape[axis]
        amax = np.abs(np.moveaxis(w32, axis, 0)).reshape(channels, -1).max(axis=1)
        scale = (amax.astype(np.float64) / INT8_MAX).astype(np.float32)
        scale[scale == 0] = np.float32(1.0)
        shape = [1] * w32.ndim
        shape[axis] = channels
        shaped = scale.reshape(shape)
    q = np.clip(np.rint(w32 / shaped), -INT8_MAX, INT8_MAX).astype(np.int8)
    return q, scale


@dataclass
class InsertCounts:
    q_nodes: int = 0
    dq_nodes: int = 0
    weights: int = 0


class _Names:
    """Fresh tensor / node names that collide with nothing in the graph."""

    def __init__(self, model: Any) -> None:
        g = model.graph
        self.used = {n.name for n in g.node} | {o for n in g.node for o in [*n.input, *n.output]}
        self.used |= {i.name for i in g.initializer} | {i.name for i in g.input} | {o.name for o in g.output}

    def fresh(self, base: str) -> str:
        name, k = base, 1
        while name in self.used:
            name, k = f"{base}_{k}", k + 1
        self.used.add(name)
        return name


def insert_qdq(model: Any, edges: Mapping[str, Sequence[tuple[str, int]]], scales: Mapping[str, np.floating],
               weights: Sequence[tuple[str, int, str, Optional[int]]], *, per_channel: bool = True,
               dedicated_pairs: bool = False,
               rounded: Optional[Mapping[tuple[str, Optional[int]], np.ndarray]] = None) -> InsertCounts:
    """Insert the Q/DQ pairs of ``edges`` (tensor -> ``[(node name, input index)]``) with
    ``scales`` (tensor -> float32 scale) and quantize ``weights`` (``(node, input index,
    initializer, axis)``), in place. The graph stays topologically sorted. ``rounded``:
    ``{(initializer, axis): q}`` to write instead of round-to-nearest's ``q`` (same scale;
    :mod:`calibration.rounding`)."""
    from onnx import helper, numpy_helper

    graph = model.graph
    names = _Names(model)
    nodes = {n.name: n for n in graph.node}
    position = {id(n): k for k, n in enumerate(graph.node)}
    producer_pos = {o: position[id(n)] for n in graph.node for o in n.output if o}
    after: dict[int, list[Any]] = {}  # node position -> Q/DQ nodes to place after it (-1: graph top)
    inits: list[Any] = []
    counts = InsertCounts()

    for tensor, uses in edges.items():
        if not uses:
            continue
        scale = np.asarray(scales[tensor], dtype=np.float32)
        scale_name, zp_name = names.fresh(f"{tensor}_scale"), names.fresh(f"{tensor}_zero_point")
        inits += [numpy_helper.from_array(scale.reshape(()), scale_name),
                  numpy_helper.from_array(np.array(0, np.int8), zp_name)]
        for pair in _pairs(uses, dedicated_pairs):
            q_out, dq_out = names.fresh(f"{tensor}_QuantizeLinear_Output"), names.fresh(f"{tensor}_DequantizeLinear_Output")
            q = helper.make_node("QuantizeLinear", [tensor, scale_name, zp_name], [q_out],
                                 name=names.fresh(f"{tensor}_QuantizeLinear"))
            dq = helper.make_node("DequantizeLinear", [q_out, scale_name, zp_name], [dq_out],
                                  name=names.fresh(f"{tensor}_DequantizeLinear"))
            after.setdefault(producer_pos.get(tensor, -1), []).extend([q, dq])
            counts.q_nodes += 1
            counts.dq_nodes += 1
            for node_name, i in pair:
                _rewire(nodes, node_name, i, tensor, dq_out)

    initializer_arrays = {i.name: i for i in graph.initializer}
    dq_of: dict[tuple[str, Optional[int]], str] = {}
    for node_name, i, weight, axis in weights:
        axis = axis if per_channel else None
        key = (weight, axis)
        if key not in dq_of:
            try:
                q, scale = quantize_weight(numpy_helper.to_array(initializer_arrays[weight]), axis)
            except ValueError as e:
                raise CalibrationError(f"weight {weight!r} of node {node_name!r}: {e}; fix the checkpoint") from None
            if rounded is not None and key in rounded:
                q = np.asarray(rounded[key], dtype=np.int8).reshape(q.shape)
            q_name, scale_name = names.fresh(f"{weight}_quantized"), names.fresh(f"{weight}_scale")
            zp_name, dq_out = names.fresh(f"{weight}_zero_point"), names.fresh(f"{weight}_DequantizeLinear_Output")
            inits += [numpy_helper.from_array(q, q_name), numpy_helper.from_array(scale, scale_name),
                      numpy_helper.from_array(np.zeros(scale.shape, np.int8), zp_name)]
            attrs = {} if axis is None else {"axis": axis}
            after.setdefault(-1, []).insert(counts.weights, helper.make_node(
                "DequantizeLinear", [q_name, scale_name, zp_name], [dq_out],
                name=names.fresh(f"{weight}_DequantizeLinear"), **attrs))
            dq_of[key] = dq_out
            counts.weights += 1
            counts.dq_nodes += 1
        _rewire(nodes, node_name, i, weight, dq_of[key])

    ordered = list(after.get(-1, []))
    for k, node in enumerate(graph.node):
        ordered.append(node)
        ordered.extend(after.get(k, []))
    del graph.node[:]
    graph.node.extend(ordered)
    graph.initializer.extend(inits)
    drop_unused_initializers(model)
    return counts


def _pairs(uses: Sequence[tuple[str, int]], dedicated: bool) -> Iterator[list[tuple[str, int]]]:
    if dedicated:
        for use in uses:
            yield [use]
    else:
        yield list(uses)


def _rewire(nodes: Mapping[str, Any], node_name: str, index: int, expected: str, new: str) -> None:
    node = nodes[node_name]
    if node.input[index] != expected:  # a plan for another graph: a bug, not bad input
        raise AssertionError(f"{node_name} input {index} is {node.input[index]!r}, planned {expected!r}")
    node.input[index] = new


def drop_unused_initializers(model: Any) -> None:
    """Remove initializers (and their graph-input entries) that no node and no graph output reads."""
    graph = model.graph
    read = _names_read(graph) | {o.name for o in graph.output}
    keep = [i for i in graph.initializer if i.name in read]
    if len(keep) != len(graph.initializer):
        dropped = {i.name for i in graph.initializer} - {i.name for i in keep}
        del graph.initializer[:]
        graph.initializer.extend(keep)
        inputs = [i for i in graph.input if i.name not in dropped]
        del graph.input[:]
        graph.input.extend(inputs)


def _names_read(graph: Any) -> set[str]:
    """Every tensor name a node of ``graph`` or of its subgraphs (If, Loop, Scan bodies) reads."""
    read: set[str] = set()
    for node in graph.node:
        read.update(node.input)
        for attr in node.attribute:
            for sub in ([attr.g] if attr.type == 5 else list(attr.graphs) if attr.type == 10 else []):
                read |= _names_read(sub)
    return read


__all__ = ["insert_qdq", "quantize_weight", "drop_unused_initializers", "InsertCounts"]
