"""The layers precision tuning chooses among, named as in the ONNX (what Netron shows).

A *layer* is a weighted node the Q/DQ placement quantizes (`tune.op_types`: Conv,
ConvTranspose, Gemm, MatMul) together with the nodes TensorRT fuses into it: following its
output while each tensor has one reader, BatchNormalization / Relu / Clip / LeakyRelu, a
binary op with a constant (bias Add, scale Mul), x*Sigmoid(x) (swish), and the residual Add
whose fused input it feeds (calibration.qdq_placement rule 2). Keeping a layer out of INT8
means:

* Q/DQ route (onnxruntime, explicit TensorRT): `calibration.qdq.quantize_qdq(...,
  exclude_nodes=[the weighted node])`: no Q/DQ on its inputs, and none on the skip input of
  its residual Add (the placement drops it, the Add no longer being a Conv+Add fusion);
* implicit TensorRT route: `build.layer_precisions` pins every node of the group to the
  kept precision (`layer_precisions`), so the fused kernel runs in FP16 (or FP32).

MACs per sample come from the shapes of one real sample run through onnxruntime (exact for
any model, dynamic axes included): Conv `numel(out) * Cin/groups * kh * kw`,
ConvTranspose `numel(in) * Cout/groups * kh * kw`, Gemm and MatMul `numel(out) * K`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence

import numpy as np

from ..errors import ConfigError

EPILOGUE_OPS = ("BatchNormalization", "Relu", "Clip", "LeakyRelu")
CONST_EPILOGUE_OPS = ("Add", "Mul", "Sub", "Div")


@dataclass(frozen=True)
class Layer:
    name: str  # the weighted node
    op_type: str
    index: int  # position among the layers, graph (topological) order
    nodes: tuple[str, ...]  # the weighted node, then its fused epilogue
    macs: int
    forced_float: Optional[str] = None  # never INT8, and why
    out_elements: int = 0  # elements per sample of its output (what an INT8 <-> float boundary after it reformats)
    in_elements: int = 0  # elements per sample of its activation input
    weight_elements: int = 0  # elements of its weight (second input)

    def as_report(self) -> dict[str, Any]:
        return {"name": self.name, "op_type": self.op_type, "index": self.index, "nodes": list(self.nodes),
                "macs": int(self.macs), "forced_float": self.forced_float, "out_elements": int(self.out_elements),
                "in_elements": int(self.in_elements), "weight_elements": int(self.weight_elements)}


def glob_escape(name: str) -> str:
    """A node name as an fnmatch pattern that matches exactly that name."""
    return re.sub(r"([\[\]*?])", r"[\1]", name)


def layer_precisions(layers: Iterable[Layer], precision: str) -> dict[str, str]:
    """`build.layer_precisions` keeping `layers` (every node of each group) in `precision`."""
    out: dict[str, str] = {}
    for layer in layers:
        for node in layer.nodes:
            out[glob_escape(node)] = precision
    return out


def _named_model(onnx_path: Path) -> Any:
    import onnx

    from calibration.qdq_placement import name_nodes

    model = onnx.load(str(onnx_path))
    name_nodes(model)  # the names quantize_qdq gives unnamed nodes (torch exports name every node)
    return model


def _epilogue(index: Any, node: Any, fused_add_of: Mapping[str, str]) -> list[str]:
    """The nodes after `node` that TensorRT fuses into it (see the module docstring)."""
    nodes: list[str] = []
    t = node.output[0]
    for _ in range(16):
        if t in index.graph_outputs:
            break
        readers = index.consumers.get(t, [])
        nxt = None
        if len(readers) == 1:
            r, i = readers[0]
            if r.op_type in EPILOGUE_OPS and i == 0:
                nxt = [r]
            elif r.op_type in CONST_EPILOGUE_OPS and all(x == t or x in index.const for x in r.input if x):
                nxt = [r]
            elif r.op_type == "Add" and fused_add_of.get(r.name) == node.name:
                nxt = [r]
        elif len(readers) == 2:  # swish: x * Sigmoid(x)
            by_op = {r.op_type: r for r, _ in readers}
            sig, mul = by_op.get("Sigmoid"), by_op.get("Mul")
            if sig is not None and mul is not None and sig.output[0] in mul.input \
                    and index.only_consumer(sig.output[0]) is mul:
                nxt = [sig, mul]
        if nxt is None:
            break
        nodes += [n.name for n in nxt]
        t = nxt[-1].output[0]
    return nodes


def find_layers(onnx_path: Path, placement: Mapping[str, Any], op_types: Sequence[str],
                sample: Mapping[str, np.ndarray], forced_float: Mapping[str, str] = {}) -> list["Layer"]:
    """The quantizable layers of `onnx_path` in graph order. `placement` is the summary
    `quantize_qdq` returned for the fully quantized model (which nodes read a DQ, the
    residual Adds); `sample` one sample per input (batch 1) for the MACs; `forced_float`
    layer -> why it is never INT8 (the calibrate stage left an input without a range)."""
    from calibration.qdq_placement import GraphIndex

    model = _named_model(onnx_path)
    index = GraphIndex.build(model)
    quantized = placement.get("quantized_inputs", {})
    fused_add_of = {r["node"]: r["fused_conv"] for r in placement.get("residual_adds", [])}
    weighted = [n for n in index.nodes if n.op_type in op_types and (n.name in quantized or n.name in forced_float)]
    if not weighted:
        raise ConfigError(f"{onnx_path}: no {'/'.join(op_types)} node takes a quantized input; there is nothing to "
                          "tune (check tune.op_types)")
    sizes = _sizes(model, index, weighted, sample)
    return [Layer(n.name, n.op_type, i, (n.name, *_epilogue(index, n, fused_add_of)), forced_float=forced_float.get(n.name),
                  **sizes[n.name]) for i, n in enumerate(weighted)]


def _sizes(model: Any, index: Any, nodes: Sequence[Any], sample: Mapping[str, np.ndarray]) -> dict[str, dict[str, int]]:
    """{macs, out_elements, in_elements, weight_elements} per sample of each node (multiply-accumulates
    and tensor elements), from the shapes of one sample."""
    import onnx

    from calibration.ort_session import make_session

    inits = {i.name: list(i.dims) for i in model.graph.initializer}
    have = {o.name for o in model.graph.output}
    wanted: list[str] = []
    for n in nodes:
        for t in (*n.input[:2], n.output[0]):
            if t and t not in inits and t not in have and t not in wanted:
                wanted.append(t)
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    for t in wanted:
        probe.graph.output.append(onnx.helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None))
    sess = make_session(probe, level="disable", what="the model with its layers' tensors exposed")
    names = [o.name for o in sess.get_outputs()]
    feeds = {i.name: np.ascontiguousarray(sample[i.name][:1]) for i in sess.get_inputs()}
    shapes = {k: list(np.shape(v)) for k, v in zip(names, sess.run(None, feeds))}
    shapes.update(inits)
    out: dict[str, dict[str, int]] = {}
    for n in nodes:
        a, w, y = (shapes.get(n.input[0]) or []), (shapes.get(n.input[1]) or []), (shapes.get(n.output[0]) or [])
        numel = int(np.prod(y)) if y else 0
        attrs = {x.name: x for x in n.attribute}
        if n.op_type == "Conv":
            macs = numel * int(np.prod(w[1:]))
        elif n.op_type == "ConvTranspose":
            macs = int(np.prod(a)) * int(np.prod(w[1:]))
        elif n.op_type == "Gemm":
            trans_a = attrs["transA"].i if "transA" in attrs else 0
            macs = numel * int(a[0] if trans_a else a[-1])
        else:  # MatMul
            macs = numel * int(a[-1]) if a else 0
        out[n.name] = {"macs": int(macs), "out_elements": numel, "in_elements": int(np.prod(a)) if a else 0,
                       "weight_elements": int(np.prod(w)) if w else 0}
    return out
