"""Completing the calibrate stage's cache against the TensorRT network it will build.

calibrate names the tensors of the ONNX graph. TensorRT's parser adds tensors the ONNX
does not name: constants (`(Unnamed Layer* 0) [Constant]_output`, initializers it turns
into layers), the MatMul it makes of a Gemm, the Shuffle that reshapes a bias. TensorRT's
own calibrator writes an entry for each of them; a cache without those entries makes
TensorRT warn "Missing scale and zero-point for tensor ..." once per tensor and run the
layers around them in higher precision. `complete_scales` adds them, by the rules
TensorRT's own caches show (shared/fixtures/trt86-resnet18-entropy2):

* a constant whose every consumer takes it as convolution weights: scale 0 (TensorRT
  quantizes weights itself, per channel, and writes 0 for them);
* any other constant: max|w| / 127 of its values (TensorRT's entry for the transposed
  Gemm weight is that range);
* a tensor of a layer that only moves data (Shuffle, Identity, Slice, Concatenation of
  scaled tensors ...): its input's scale (TensorRT's Shuffle of the bias has the bias's);
* anything else (the MatMul output inside a Gemm): the scale of the nearest consumer's
  output that has one (the Gemm's named output), else of its first scaled input. These
  are estimates and are counted as such in build.json.

Only called on the GPU side: takes the `tensorrt` module and a parsed network."""

from __future__ import annotations

from typing import Any, Mapping, Optional

import numpy as np

INT8_MAX = 127.0


def _weights_amax(layer: Any) -> Optional[float]:
    w = getattr(layer, "weights", None)
    if w is None:
        return None
    try:
        arr = w.numpy() if hasattr(w, "numpy") else np.asarray(w)
        arr = np.asarray(arr, dtype=np.float64)
    except Exception:
        return None
    if arr.size == 0 or not np.isfinite(arr).all():
        return None
    return float(np.abs(arr).max())


def complete_scales(trt: Any, network: Any, scales: Mapping[str, float]) -> tuple[dict[str, float], dict[str, list[str]]]:
    """(every network tensor's scale, {rule: tensors added by it}). `scales` (tensor -> scale,
    float) is what the calibrate stage wrote; its entries are kept as they are."""
    lt = trt.LayerType
    moving = {getattr(lt, n) for n in ("SHUFFLE", "IDENTITY", "SLICE", "CONCATENATION", "GATHER", "PADDING")
              if hasattr(lt, n)}
    conv = {getattr(lt, n) for n in ("CONVOLUTION", "DECONVOLUTION") if hasattr(lt, n)}
    layers = [network.get_layer(i) for i in range(network.num_layers)]
    consumers: dict[str, list[tuple[Any, int]]] = {}
    for layer in layers:
        for j in range(layer.num_inputs):
            t = layer.get_input(j)
            if t is not None:
                consumers.setdefault(t.name, []).append((layer, j))
    out = {k: float(v) for k, v in scales.items()}
    added: dict[str, list[str]] = {"weights (0)": [], "constant max|w|": [], "input's scale": [], "estimated": []}
    pending: list[Any] = []
    for layer in layers:
        for j in range(layer.num_outputs):
            t = layer.get_output(j)
            if t is None or t.name in out or not getattr(t, "is_execution_tensor", True):
                continue
            if t.dtype not in (trt.float32, trt.float16):
                continue  # integer and bool tensors are never quantized
            if layer.type == lt.CONSTANT:
                uses = consumers.get(t.name, [])
                if uses and all(c.type in conv and idx == 1 for c, idx in uses):
                    out[t.name] = 0.0
                    added["weights (0)"].append(t.name)
                else:
                    amax = _weights_amax(layer)
                    out[t.name] = (amax or 0.0) / INT8_MAX
                    added["constant max|w|"].append(t.name)
            else:
                pending.append((layer, t))
    for _ in range(3):  # a few passes: a rule may need a tensor another pass scales
        left = []
        for layer, t in pending:
            ins = [layer.get_input(k) for k in range(layer.num_inputs)]
            scaled_in = [x.name for x in ins if x is not None and x.name in out]
            if layer.type in moving and scaled_in:
                out[t.name] = out[scaled_in[0]]
                added["input's scale"].append(t.name)
                continue
            downstream = [c.get_output(k).name for c, _ in consumers.get(t.name, [])
                          for k in range(c.num_outputs) if c.get_output(k) is not None and c.get_output(k).name in out]
            if downstream:
                out[t.name] = out[downstream[0]]
                added["estimated"].append(t.name)
            elif scaled_in:
                out[t.name] = out[scaled_in[0]]
                added["estimated"].append(t.name)
            else:
                left.append((layer, t))
        pending = left
        if not pending:
            break
    return out, {k: v for k, v in added.items() if v}
