"""Q/DQ ONNX from calibrated ranges, placed the way TensorRT builds fast INT8 engines.

What goes in (README, "Supported versions and what runs where", Q/DQ placement):

* activations: per-tensor symmetric INT8, ``scale = amax / 127`` exactly as the
  TensorRT cache stores it (:func:`calibration.algorithms.amax_to_scale`), zero point 0:
  the Q and DQ scales in the file are our ranges bit for bit. A tensor whose amax is 0
  (never non-zero in the calibration data) gets scale 1.0: zero quantizes exactly with
  any scale, and a zero scale is not a valid QuantizeLinear. The one exception is a
  Concat group (below), whose members share the scale of the group's largest amax.
* weights: per output channel, symmetric INT8, ``amax = max|w|`` of the channel (see
  :func:`calibration.qdq_insert.quantize_weight`; ConvTranspose per input channel, axis
  0, the only per-channel axis TensorRT's deconvolution kernels take).
* biases: left in float: TensorRT's ONNX parser rejects quantized biases.

Where Q/DQ goes (``placement``, :mod:`calibration.qdq_placement` has the rules and their
sources): ``"tensorrt"`` (default) follows TensorRT's "Q/DQ Layer-Placement
Recommendations": all inputs of Conv / ConvTranspose / Gemm / MatMul, none of their
outputs (so nothing between a Conv and the BN / Relu / Clip / Sigmoid*x TensorRT fuses
into it); the skip input of a residual Add whose other input is a Conv's (the Conv side
stays float, so Conv+Add fuses and writes INT8); the inputs of AveragePool /
GlobalAveragePool whose output is quantized; and one scale for a Concat's inputs and
output, the largest amax among the Concat's inputs (TensorRT then drops the
requantization at the Concat). MaxPool gets none: TensorRT moves Q/DQ across it.
``"inputs"`` is the earlier placement (Q/DQ on the inputs of ``op_types``, every reader
of such a tensor dequantized), kept for comparison.

``exclude_nodes`` (node names or fnmatch globs) leaves those nodes' inputs unquantized,
so they stay in float: the hook precision tuning uses. A pattern that matches no node is
an error.

The graph is written with onnx.helper (:mod:`calibration.qdq_insert`), not onnxruntime's
quantizer: the placement is per consumer input, which the quantizer cannot express, and
the same code then runs with onnxruntime 1.20 (the GPU kit) and 1.32. onnxruntime (CPU)
runs the result, simulating INT8 numerics; TensorRT builds it (strongly typed on >= 10).
Nothing here imports torch.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

import numpy as np

from calibration.algorithms import amax_to_scale
from calibration.collect import QUANTIZABLE_OP_TYPES
from calibration.errors import CalibrationError
from calibration.onnx_io import save_model
from calibration.ptq import apply_bias_corrections, bias_corrections, correctable_nodes
from calibration.qdq_insert import drop_unused_initializers, insert_qdq, quantize_weight
from calibration.qdq_placement import PLACEMENTS, GraphIndex, Placement, name_nodes, plan_placement

MIN_OPSET = 13  # per-channel DequantizeLinear (axis) needs opset 13


def activation_scale(amax: float, tensor: str = "") -> np.float32:
    """The Q/DQ scale of an activation: ``amax / 127`` as float32, or 1.0 when amax is 0."""
    if not math.isfinite(float(amax)) or float(amax) < 0:
        where = f" of {tensor!r}" if tensor else ""
        raise CalibrationError(f"amax{where} must be finite and >= 0, got {amax}; recalibrate that tensor")
    scale = amax_to_scale(amax)
    return scale if scale > 0 else np.float32(1.0)


def _load(onnx_path: Path) -> Any:
    from calibration.onnx_io import load_model

    model = load_model(onnx_path)
    opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)
    if opset < MIN_OPSET:
        raise CalibrationError(f"{onnx_path}: opset {opset} is too old for per-channel Q/DQ (needs >= {MIN_OPSET}); "
                               f"export with export.opset >= {MIN_OPSET}")
    if any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in model.graph.node):
        raise CalibrationError(f"{onnx_path}: the model already holds QuantizeLinear/DequantizeLinear nodes; "
                               "quantize the FP32 export, not a Q/DQ model")
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
                 placement: str = "tensorrt", exclude_nodes: Iterable[str] = (),
                 op_types: Sequence[str] = QUANTIZABLE_OP_TYPES, per_channel: bool = True,
                 dedicated_pairs: bool = False,
                 bias_means: Optional[Mapping[str, np.ndarray]] = None,
                 weight_moments: Optional[Mapping[str, np.ndarray]] = None,
                 rounded: Optional[Mapping[tuple[str, Optional[int]], np.ndarray]] = None,
                 corrections: Optional[Mapping[str, np.ndarray]] = None) -> dict[str, Any]:
    """Write the Q/DQ model of ``onnx_path`` to ``out_path`` with activation ranges ``amax``
    (tensor name -> amax). Returns the placement summary (see :func:`placement_summary`).

    ``bias_means``: the FP32 mean of the activation inputs of Conv / Gemm / MatMul over the
    calibration data (:func:`calibration.ptq.input_means` of :func:`bias_correction_inputs`);
    given, every such node with a quantized weight gets its bias corrected by the mean error
    its weight quantization causes (:mod:`calibration.ptq`); the summary's
    ``bias_corrected`` lists them.

    ``weight_moments``: ``{node: E[x x^T]}`` of the nodes' input patches
    (:func:`calibration.rounding.second_moments` of :func:`weight_rounding_inputs`); given,
    those nodes' weights are rounded by GPTQ instead of to nearest (same scales), before bias
    correction measures what error is left; the summary's ``weight_rounding`` says how many
    weights and elements it changed.

    Every activation the placement quantizes must have a range; missing ones raise
    CalibrationError naming them (calibrate with scope "all").
    """
    if placement not in PLACEMENTS:
        raise CalibrationError(f"unknown Q/DQ placement {placement!r}; use one of {', '.join(PLACEMENTS)}")
    onnx_path, out_path = Path(onnx_path), Path(out_path)
    model = _load(onnx_path)
    renamed = name_nodes(model)
    index = GraphIndex.build(model)
    plan = plan_placement(model, rules=placement, op_types=op_types, exclude_nodes=exclude_nodes, index=index)
    scales, groups = _scales(plan, amax, onnx_path, op_types)
    if weight_moments is not None:
        from calibration.rounding import round_weights

        rounded = round_weights(model, plan.weights, weight_moments, per_channel)
    planned = {(w, a if per_channel else None) for _, _, w, a in plan.weights}
    if rounded is not None:
        rounded = {k: v for k, v in rounded.items() if k in planned}
    if bias_means is not None:
        corrections = bias_corrections(model, plan.weights, bias_means, per_channel, rounded=rounded)
    elif corrections is not None:
        targets = correctable_nodes(model, plan.weights)
        corrections = {n: np.asarray(c, dtype=np.float64) for n, c in corrections.items() if n in targets}
    corrected = corrections is not None
    corrections = corrections or {}
    changed = _changed_elements(model, rounded) if rounded else 0
    counts = insert_qdq(model, plan.edges, scales, plan.weights, per_channel=per_channel,
                        dedicated_pairs=dedicated_pairs, rounded=rounded)
    if corrections:
        apply_bias_corrections(model, corrections)
        drop_unused_initializers(model)
    _check(model, onnx_path)
    save_model(model, out_path)
    summary = placement_summary(plan, index, scales, groups, op_types=op_types, per_channel=per_channel)
    summary.update(q_nodes=counts.q_nodes, dq_nodes=counts.dq_nodes, renamed_nodes=renamed)
    if rounded is not None:
        summary["weight_rounding"] = {"method": "gptq", "weights": len(rounded),
                                      "left_to_nearest": len(planned - set(rounded)), "elements_changed": changed}
    if corrected:
        summary["bias_corrected"] = {n: round(float(np.abs(c).max()), 8) if c.size else 0.0
                                     for n, c in corrections.items()}
    return summary


def _changed_elements(model: Any, rounded: Mapping[tuple[str, Optional[int]], np.ndarray]) -> int:
    """How many weight elements ``rounded`` sets to another ``q`` than round-to-nearest."""
    from onnx import numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    return sum(int((quantize_weight(numpy_helper.to_array(inits[w]), axis)[0] != q).sum())
               for (w, axis), q in rounded.items())


def _full_plan(onnx_path: Union[str, Path], placement: str, op_types: Sequence[str]) -> tuple[Any, Placement]:
    """The model (nodes named as :func:`quantize_qdq` names them) and its placement with nothing
    excluded: what the weight-side PTQ is computed on once for every later placement."""
    model = _load(Path(onnx_path))
    name_nodes(model)
    return model, plan_placement(model, rules=placement, op_types=op_types, index=GraphIndex.build(model))


def gptq_weights(onnx_path: Union[str, Path], moments: Mapping[str, np.ndarray], placement: str = "tensorrt",
                 op_types: Sequence[str] = QUANTIZABLE_OP_TYPES,
                 per_channel: bool = True) -> dict[tuple[str, Optional[int]], np.ndarray]:
    """GPTQ's ``{(initializer, axis): q}`` for every weight the full placement quantizes
    (:func:`calibration.rounding.round_weights`); what :func:`quantize_qdq`'s ``rounded``
    takes, for this model with any nodes excluded."""
    from calibration.rounding import round_weights

    model, plan = _full_plan(onnx_path, placement, op_types)
    return round_weights(model, plan.weights, moments, per_channel)


def bias_correction_table(onnx_path: Union[str, Path], means: Mapping[str, np.ndarray],
                          rounded: Optional[Mapping[tuple[str, Optional[int]], np.ndarray]] = None,
                          placement: str = "tensorrt", op_types: Sequence[str] = QUANTIZABLE_OP_TYPES,
                          per_channel: bool = True) -> dict[str, np.ndarray]:
    """Bias correction per node (``{node: E[W_q x] - E[W x]}``) for every weight the full
    placement quantizes, rounded as ``rounded`` says; what :func:`quantize_qdq`'s
    ``corrections`` takes (a node's correction does not depend on which others are quantized)."""
    model, plan = _full_plan(onnx_path, placement, op_types)
    return bias_corrections(model, plan.weights, means, per_channel, rounded=rounded)


def weight_rounding_inputs(onnx_path: Union[str, Path], placement: str = "tensorrt",
                           op_types: Sequence[str] = QUANTIZABLE_OP_TYPES) -> tuple[Any, dict[str, str]]:
    """The loaded model and ``{node: its activation input}`` of the weights the Q/DQ plan
    quantizes that GPTQ rounds (:func:`calibration.rounding.roundable`); what
    :func:`calibration.rounding.second_moments` needs."""
    from calibration.rounding import roundable

    model, plan = _full_plan(onnx_path, placement, op_types)
    return model, roundable(model, plan.weights)


def bias_correction_inputs(onnx_path: Union[str, Path]) -> dict[str, str]:
    """``{activation: consumer op}`` whose FP32 means bias correction needs: the activation
    input of every Conv / Gemm / MatMul with a constant weight (a superset of what any
    placement quantizes)."""
    from calibration.ptq import correction_inputs

    return correction_inputs(_load(Path(onnx_path)))


def _scales(plan: Placement, amax: Mapping[str, float], onnx_path: Path,
            op_types: Sequence[str]) -> tuple[dict[str, np.float32], list[dict[str, Any]]]:
    """The scale of every quantized activation: its own ``amax / 127``, or for a Concat
    group the scale of the largest amax among the group's Concat inputs (the first such
    input on a tie). Missing ranges are one error that lists them."""
    in_group = {t for g in plan.concat_groups for t in g["tensors"]}
    needed = [t for t in plan.edges if t not in in_group]
    needed += [t for g in plan.concat_groups for t in g["inputs"] if t not in needed]
    missing = [t for t in needed if t not in amax]
    if missing:
        raise CalibrationError(
            f"{onnx_path}: no calibrated range for activation(s) {missing[:5]} ({len(missing)} in all) that the "
            f"{plan.rules!r} Q/DQ placement quantizes (inputs of {'/'.join(op_types)}, residual skips, pooling and "
            f"Concat inputs); calibrate them first (collect with scope 'all')")
    scales = {t: activation_scale(float(amax[t]), t) for t in plan.edges if t not in in_group}
    groups = []
    for group in plan.concat_groups:
        source = max(group["inputs"], key=lambda t: float(amax[t]))  # max() keeps the first on a tie
        scale = activation_scale(float(amax[source]), source)
        for t in group["tensors"]:
            if t in plan.edges:
                scales[t] = scale
        groups.append({**group, "amax": float(amax[source]), "amax_from": source, "scale": float(scale)})
    return scales, groups


def placement_summary(plan: Placement, index: GraphIndex, scales: Mapping[str, np.float32],
                      groups: Sequence[Mapping[str, Any]], *, op_types: Sequence[str],
                      per_channel: bool) -> dict[str, Any]:
    """JSON-ready account of a placement:

    * ``activations``: tensor -> scale of every quantized activation (float);
    * ``weights``: initializer -> ``{"axis", "nodes"}`` (axis None: per tensor);
    * ``quantized_inputs``: node name -> the inputs it reads through a DQ (activations
      and weights, by their names in the FP32 model);
    * ``residual_adds``: ``{"node", "skip_input", "skip_index", "fused_input", "fused_conv"}``;
    * ``concat_groups``: ``{"concats", "tensors", "inputs", "amax", "amax_from", "scale"}``;
    * ``pools``: pooling nodes with a quantized input; ``excluded_nodes``;
    * ``expected_precision``: every node of the FP32 graph -> ``"int8"`` (some input is
      quantized) or ``"float"``, to check against the layer precisions of an engine;
    * ``float_constants``: weighted-op inputs computed from constants by nodes, left float.
    """
    weights: dict[str, dict[str, Any]] = {}
    for node, _, name, axis in plan.weights:
        entry = weights.setdefault(name, {"axis": axis if per_channel else None, "nodes": []})
        entry["nodes"].append(node)
    return {
        "placement": plan.rules,
        "op_types": list(op_types),
        "per_channel": per_channel,
        "activations": {t: float(scales[t]) for t in plan.edges if plan.edges[t]},
        "weights": weights,
        "quantized_inputs": plan.quantized_inputs(index),
        "residual_adds": [dict(r) for r in plan.residual_adds],
        "concat_groups": [dict(g) for g in groups],
        "pools": list(plan.pools),
        "excluded_nodes": list(plan.excluded),
        "expected_precision": plan.expected_precision(index),
        "float_constants": list(plan.float_constants),
    }


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


def read_qdq_scales(model_or_path: Any) -> dict[str, dict[str, Any]]:
    """Scales of the QuantizeLinear nodes of a Q/DQ model, keyed by the tensor quantized:
    ``{"scale": float32 array, "zero_point": array, "axis": int | None, "weight": bool}``.
    Weights (constant inputs) are quantized offline and appear as the
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


__all__ = ["quantize_qdq", "bias_correction_inputs", "placement_summary", "read_qdq_scales", "activation_scale", "MIN_OPSET", "PLACEMENTS"]
