"""Q/DQ patterns a TensorRT version is known to build wrong, found in a Q/DQ ONNX.

* `float_conv_activation_q`: a QuantizeLinear whose tensor comes from a Conv that runs in
  float (its input is not a DequantizeLinear output: a layer kept out of INT8) through its
  Clip/Relu activation, with or without a Pad after it. TensorRT 8.6.0 on an H100 built
  such graphs into wrong outputs (EfficientNet-Lite0 with tune's kept layers: 0% top-1
  agreement; a single such Q/DQ enough), while a QuantizeLinear straight after a float Conv
  built right (bench/explicit_probes.py, docs/results.md). Not known for TensorRT >= 10.
"""

from __future__ import annotations

from typing import Any

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


__all__ = ["float_conv_activation_q"]
