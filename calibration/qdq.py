"""Q/DQ ONNX from calibrated ranges, written by onnxruntime's own QDQ quantizer.

What goes in (DESIGN.md sections 3 and 4):

* activations: per-tensor symmetric INT8, ``scale = amax / 127`` exactly as the
  TensorRT cache stores it (:func:`calibration.algorithms.amax_to_scale`), zero point 0.
  The scales are handed to onnxruntime as ``TensorQuantOverrides`` (scale + zero
  point), so no rounding of onnxruntime's own min/max arithmetic can shift them: the Q
  and DQ scales in the file equal our ranges bit for bit. A tensor whose amax is 0
  (never non-zero in the calibration data) gets scale 1.0: zero quantizes exactly with
  any scale, and a zero scale is not a valid QuantizeLinear.
* weights: per output channel, symmetric INT8, ``amax = max|w|`` of the channel
  (onnxruntime's per-channel symmetric weight quantization, range -127..127).
* biases: left in float (``QuantizeBias: False``): TensorRT's ONNX parser rejects
  quantized biases.

Placement (TensorRT's recommendations for explicit quantization): Q/DQ on every
activation and weight input of :data:`calibration.collect.QUANTIZABLE_OP_TYPES`
(Conv, ConvTranspose, Gemm, MatMul), none on their outputs. A tensor feeding several
consumers shares one Q/DQ pair, so a residual Add whose skip input also feeds a Conv
sees that input quantized, as TensorRT needs to fuse the Add into the Conv.
onnxruntime (CPU) runs the result, simulating INT8 numerics; TensorRT >= 10 builds it
as a strongly typed network. ``op_types`` widens or narrows the placement.

onnxruntime's quantization tool is used as it is (``QDQQuantizer`` with a
``TensorsData`` of our ranges): the same calls work on onnxruntime 1.20 (the GPU kit)
and 1.32. Nothing here imports torch.
"""

from __future__ import annotations

import contextlib
import io
import logging
from pathlib import Path
from typing import Any, Mapping, Sequence, Union

import numpy as np

from calibration.algorithms import amax_to_scale
from calibration.collect import QUANTIZABLE_OP_TYPES
from calibration.errors import CalibrationError

MIN_OPSET = 13  # per-channel DequantizeLinear (axis) needs opset 13


def activation_scale(amax: float) -> np.float32:
    """The Q/DQ scale of an activation: ``amax / 127`` as float32, or 1.0 when amax is 0."""
    scale = amax_to_scale(amax)
    return scale if scale > 0 else np.float32(1.0)


def _load(onnx_path: Path) -> Any:
    from calibration.onnx_io import load_model

    model = load_model(onnx_path)
    opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)
    if opset < MIN_OPSET:
        raise CalibrationError(f"{onnx_path}: opset {opset} is too old for per-channel Q/DQ (needs >= {MIN_OPSET}); "
                               f"export with export.opset >= {MIN_OPSET}")
    _fold_constants(model)
    return model


def _fold_constants(model: Any) -> None:
    """Turn ``Constant`` nodes and ``Identity`` nodes of initializers into initializers, so
    weights the exporter routed through them (shared weights, biases) are quantized as
    weights, not mistaken for activations. Values are unchanged."""
    from onnx import numpy_helper

    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    graph_outputs = {o.name for o in graph.output}
    keep = []
    for node in graph.node:
        out = node.output[0] if len(node.output) == 1 else None
        value = None
        if out and out not in graph_outputs and node.op_type == "Constant" and len(node.attribute) == 1 \
                and node.attribute[0].name == "value":
            value = numpy_helper.to_array(node.attribute[0].t)
        elif out and out not in graph_outputs and node.op_type == "Identity" and node.input[0] in inits:
            value = numpy_helper.to_array(inits[node.input[0]])
        if value is None:
            keep.append(node)
            continue
        tensor = numpy_helper.from_array(value, out)
        graph.initializer.append(tensor)
        inits[out] = tensor
    if len(keep) != len(graph.node):
        del graph.node[:]
        graph.node.extend(keep)


def quantize_qdq(onnx_path: Union[str, Path], out_path: Union[str, Path], amax: Mapping[str, float], *,
                 op_types: Sequence[str] = QUANTIZABLE_OP_TYPES, per_channel: bool = True,
                 dedicated_pairs: bool = False) -> dict[str, Any]:
    """Write the Q/DQ model of ``onnx_path`` to ``out_path`` with activation ranges ``amax``
    (tensor name -> amax). Returns a summary: the activations quantized and their scales.

    Every activation input of a quantized op must have a range; a missing one raises
    CalibrationError naming it (collect with scope "all" or "quantizable").
    """
    from onnxruntime.quantization import QuantType
    from onnxruntime.quantization.calibrate import CalibrationMethod, TensorData, TensorsData
    from onnxruntime.quantization.qdq_quantizer import QDQQuantizer

    onnx_path, out_path = Path(onnx_path), Path(out_path)
    model = _load(onnx_path)
    needed = _activation_inputs(model, op_types)
    missing = [n for n in needed if n not in amax]
    if missing:
        raise CalibrationError(f"{onnx_path}: no calibrated range for activation(s) {missing[:5]} "
                               f"({len(missing)} in all) that feed {'/'.join(op_types)} ops; calibrate them first")
    scales = {name: activation_scale(float(amax[name])) for name in needed}
    # The ranges only satisfy the quantizer's bookkeeping; the overrides fix the scales.
    ranges = {name: TensorData(lowest=np.array(-float(s) * 127, np.float32),
                               highest=np.array(float(s) * 127, np.float32)) for name, s in scales.items()}
    overrides = {name: [{"scale": np.array(s, np.float32), "zero_point": np.array(0, np.int8)}]
                 for name, s in scales.items()}
    extra = {
        "ActivationSymmetric": True,
        "WeightSymmetric": True,
        "QuantizeBias": False,
        "TensorQuantOverrides": overrides,
        "OpTypesToExcludeOutputQuantization": list(op_types),
        "DedicatedQDQPair": bool(dedicated_pairs),
    }
    try:
        with _quiet():
            quantizer = QDQQuantizer(model, per_channel, False, QuantType.QInt8, QuantType.QInt8,
                                     TensorsData(CalibrationMethod.MinMax, ranges), [], [], list(op_types), extra)
            quantizer.quantize_model()
    except (ValueError, TypeError, AssertionError, KeyError) as e:
        raise CalibrationError(f"{onnx_path}: onnxruntime's QDQ quantizer failed ({type(e).__name__}: "
                               f"{str(e).splitlines()[0][:300] if str(e) else ''})") from None
    quantizer.model.topological_sort()  # the quantizer appends Q/DQ nodes at the end
    qmodel = quantizer.model.model
    _check(qmodel, onnx_path)
    _save(qmodel, out_path)
    quantized = {name: float(s) for name, s in scales.items()}
    return {"activations": quantized, "op_types": list(op_types), "per_channel": per_channel,
            "q_nodes": sum(1 for n in qmodel.graph.node if n.op_type == "QuantizeLinear"),
            "dq_nodes": sum(1 for n in qmodel.graph.node if n.op_type == "DequantizeLinear")}


def _activation_inputs(model: Any, op_types: Sequence[str]) -> list[str]:
    """Non-constant float inputs of the ops to quantize (biases excluded), in graph order."""
    from calibration.collect import _constant_tensors, _element_types

    types = _element_types(model)
    const = _constant_tensors(model)
    names: list[str] = []
    for node in model.graph.node:
        if node.op_type not in op_types:
            continue
        inputs = node.input[:2] if node.op_type in QUANTIZABLE_OP_TYPES else node.input
        for name in inputs:
            if name and name not in const and types.get(name, 1) in (1, 10, 16) and name not in names:
                names.append(name)
    return names


def _check(model: Any, onnx_path: Path) -> None:
    """onnx's checker on the result: TensorRT's parser needs a valid, sorted graph too."""
    import onnx

    if model.ByteSize() >= 1_800_000_000:
        return  # the in-memory checker cannot take > 2 GiB; onnxruntime still loads the file
    try:
        onnx.checker.check_model(model)
    except Exception as e:
        raise CalibrationError(f"{onnx_path}: the Q/DQ model fails onnx's checker "
                               f"({str(e).splitlines()[0][:300]})") from None


def _save(model: Any, out_path: Path) -> None:
    import onnx

    out_path.parent.mkdir(parents=True, exist_ok=True)
    if model.ByteSize() < 1_800_000_000:
        onnx.save_model(model, str(out_path))
    else:  # > 2 GiB protobuf limit: weights beside the model
        onnx.save_model(model, str(out_path), save_as_external_data=True, location=out_path.name + ".data")


@contextlib.contextmanager
def _quiet():
    """onnxruntime's quantizer logs warnings (pre-processing advice) on the root logger."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        root.setLevel(level)


def read_qdq_scales(model_or_path: Any) -> dict[str, dict[str, Any]]:
    """Scales of the QuantizeLinear nodes of a Q/DQ model, keyed by the tensor quantized:
    ``{"scale": float32 array, "zero_point": array, "axis": int | None, "weight": bool}``.
    Weights (constant inputs) are quantized offline by onnxruntime and appear as the
    DequantizeLinear of an int8 initializer; those are listed too with ``weight: True``."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(model_or_path)) if isinstance(model_or_path, (str, Path)) else model_or_path
    inits = {i.name: i for i in model.graph.initializer}
    out: dict[str, dict[str, Any]] = {}
    for node in model.graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        axis = next((a.i for a in node.attribute if a.name == "axis"), None)
        src = node.input[0]
        is_weight = node.op_type == "DequantizeLinear" and src in inits
        if node.op_type == "DequantizeLinear" and not is_weight:
            continue
        key = src[: -len("_quantized")] if is_weight and src.endswith("_quantized") else src
        scale = numpy_helper.to_array(inits[node.input[1]]) if node.input[1] in inits else None
        zp = numpy_helper.to_array(inits[node.input[2]]) if len(node.input) > 2 and node.input[2] in inits else None
        out[key] = {"scale": scale, "zero_point": zp, "axis": axis, "weight": is_weight}
    return out


__all__ = ["quantize_qdq", "read_qdq_scales", "activation_scale", "MIN_OPSET"]
