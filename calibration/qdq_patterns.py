"""Q/DQ patterns a TensorRT version is known to build wrong, found in a Q/DQ ONNX.

* `float_conv_activation_q`: a QuantizeLinear whose tensor comes from a Conv that runs in
  float (its input is not a DequantizeLinear output: a layer kept out of INT8) through its
  Clip/Relu activation, with or without a Pad after it. TensorRT 8.6.0 on an H100 built
  such graphs into wrong outputs (EfficientNet-Lite0 with tune's kept layers: 0% top-1
  agreement; a single such Q/DQ enough), while a QuantizeLinear straight after a float Conv
  built right (bench/explicit_probes.py, docs/results.md). Not known for TensorRT >= 10.
* Q/DQ on Gemm weights: TensorRT 8.6.0 stopped building the three-head detector's Q/DQ ONNX on
  an internal assertion (`chooseHigherPrecision ... dt1 == kFLOAT || dt1 == kHALF`); with the
  Gemm weights in float (`weights_in_float`, their inputs still through Q/DQ) it built,
  and the engine matched onnxruntime's simulation of that ONNX (cosine 1.0 on every output).
* Q/DQ on MatMul weights inside a transformer: TensorRT 8.6.0 stopped building a BERT-style
  encoder's Q/DQ ONNX on another internal assertion (`convertMyelinWeightsToFp32 ...
  params.weights.type() != DataType::kINT8`, H100); the build then retries with those MatMul
  weights in float (`weights_in_float(model, ("MatMul", "Gemm"))`); not yet run on a GPU.
"""

from __future__ import annotations

from typing import Any, Mapping

ACTIVATIONS = ("Clip", "Relu")
PASS_THROUGH = ACTIVATIONS + ("Pad",)


def float_conv_activation_q(model: Any) -> list[str]:
    """The tensors (in graph order) quantized right after a float Conv's activation (see above)."""
    g = model.graph
    producer = {o: n for n in g.node for o in n.output}
    found = []
    for q in g.node:
        if q.op_type != "QuantizeLinear":
            continue
        n, chain = producer.get(q.input[0]), []
        while n is not None and n.op_type in PASS_THROUGH:
            chain.append(n.op_type)
            n = producer.get(n.input[0])
        if n is None or n.op_type != "Conv" or not any(c in ACTIVATIONS for c in chain):
            continue
        src = producer.get(n.input[0])
        if src is None or src.op_type != "DequantizeLinear":
            found.append(q.input[0])
    return found


def quantize_before_activation(model: Any) -> list[str]:
    """Edit `model` in place: where a QuantizeLinear follows a float Conv's Clip/Relu (and Pad)
    (`float_conv_activation_q`), the Conv's output goes through a QuantizeLinear/DequantizeLinear with
    the same scale and zero point before the activation, so that the Conv ends in INT8 (the pattern
    TensorRT 8.6.0 built right) and the activation runs on INT8 values. With a zero point of 0 and a scale
    taken from the activated tensor (so 127 * scale <= the Clip's max), Q(Clip(x)) and Q(Clip(DQ(Q(x))))
    are the same integers: onnxruntime's outputs do not change. Returns the Conv outputs so edited;
    a site whose zero point is not 0 or not an initializer is left as it is."""
    import numpy as np
    from onnx import helper, numpy_helper

    g = model.graph
    at = {o: i for i, n in enumerate(g.node) for o in n.output}
    inits = {i.name: i for i in g.initializer}
    sites = set(float_conv_activation_q(model))
    edited: list[str] = []
    new_nodes: dict[int, list[Any]] = {}
    for q in g.node:
        if q.op_type != "QuantizeLinear" or q.input[0] not in sites:
            continue
        zp = q.input[2] if len(q.input) > 2 else ""
        if zp and (zp not in inits or np.any(numpy_helper.to_array(inits[zp]) != 0)):
            continue
        i = at[q.input[0]]
        while g.node[at[g.node[i].input[0]]].op_type != "Conv":
            i = at[g.node[i].input[0]]
        first = g.node[i]
        conv_out = first.input[0]
        if conv_out in edited:
            continue
        qn = helper.make_node("QuantizeLinear", [conv_out, *q.input[1:]], [f"{conv_out}_preact_q"],
                              name=f"{conv_out}_preact_QuantizeLinear")
        dq = helper.make_node("DequantizeLinear", [f"{conv_out}_preact_q", *q.input[1:]], [f"{conv_out}_preact_dq"],
                              name=f"{conv_out}_preact_DequantizeLinear")
        for a in q.attribute:
            if a.name == "axis":
                qn.attribute.append(a)
                dq.attribute.append(a)
        first.input[0] = f"{conv_out}_preact_dq"
        new_nodes[i] = [qn, dq]
        edited.append(conv_out)
    if new_nodes:
        ordered = []
        for i, n in enumerate(g.node):
            ordered.extend(new_nodes.get(i, []))
            ordered.append(n)
        del g.node[:]
        g.node.extend(ordered)
    return edited


def dequantized(dq: Any, inits: Mapping[str, Any]) -> Any:
    """The float32 values of a DequantizeLinear of initializers, ``(q - zero_point) * scale`` (per tensor, or
    per channel along its `axis`), what onnxruntime's DequantizeLinear gives."""
    import numpy as np
    from onnx import numpy_helper

    q = numpy_helper.to_array(inits[dq.input[0]]).astype(np.float32)
    scale = numpy_helper.to_array(inits[dq.input[1]]).astype(np.float32)
    zero = (numpy_helper.to_array(inits[dq.input[2]]).astype(np.float32)
            if len(dq.input) > 2 and dq.input[2] in inits else np.zeros_like(scale))
    if scale.ndim == 1 and scale.size > 1:
        shape = [1] * q.ndim
        shape[next((a.i for a in dq.attribute if a.name == "axis"), 1)] = -1
        scale, zero = scale.reshape(shape), zero.reshape(shape)
    return ((q - zero) * scale).astype(np.float32)


def weights_in_float(model: Any, op_types: tuple[str, ...] = ("Gemm",)) -> list[str]:
    """Edit `model` in place: every `op_types` node (Gemm: its weight input; MatMul: either input) that reads a
    DequantizeLinear of an int8 initializer reads the dequantized float weight instead (the same values
    onnxruntime's DequantizeLinear gives); returns those nodes' names."""
    from onnx import numpy_helper

    g = model.graph
    producer = {o: n for n in g.node for o in n.output}
    inits = {i.name: i for i in g.initializer}
    readers: dict[str, int] = {}
    for n in g.node:
        for t in n.input:
            readers[t] = readers.get(t, 0) + 1
    changed, drop = [], set()
    for n in g.node:
        if n.op_type not in op_types:
            continue
        slots = [1] if n.op_type == "Gemm" else list(range(len(n.input)))
        for k in slots:
            d = producer.get(n.input[k]) if k < len(n.input) else None
            if d is None or d.op_type != "DequantizeLinear" or d.input[0] not in inits:
                continue
            name = f"{n.name}_input{k}_float"
            g.initializer.append(numpy_helper.from_array(dequantized(d, inits), name))
            n.input[k] = name
            if n.name not in changed:
                changed.append(n.name)
            readers[d.output[0]] -= 1
            if readers[d.output[0]] == 0:
                drop.add(d.name)
    if drop:
        from calibration.qdq_insert import drop_unused_initializers

        kept = [n for n in g.node if n.name not in drop]
        del g.node[:]
        g.node.extend(kept)
        drop_unused_initializers(model)  # the int8 weights and scales only the dropped DequantizeLinears read
    return changed


__all__ = ["float_conv_activation_q", "quantize_before_activation", "dequantized", "weights_in_float"]
