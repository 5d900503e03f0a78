"""The CPU stand-in for latency: an *estimate*, never a measurement.

A roofline per layer at the peaks of the GPUs this project targets (H100 / H200 SXM: dense tensor
cores INT8 1979 TOPS, FP16 989.5 TFLOPS, TF32 494.7 TFLOPS; HBM3 3.35 TB/s): a layer takes the
longer of its MACs at its precision's peak and its bytes (activation in, activation out, weight;
1 byte an element in INT8, 2 in FP16, 4 in FP32) at the memory bandwidth. Each INT8 <-> float
boundary along the graph order adds the reformat of the activation there (read in one precision,
written in the other). In nanoseconds per sample.

Depthwise convolutions and small layers are memory-bound here, as on the GPU, so INT8 halves
their bytes rather than their MACs, and a kept set scattered over the network pays a reformat
at every boundary: what made tuned EfficientNet-Lite0 engines slower than FP16 on an H200. What
this leaves out, and why a GPU measures instead: fusions (an epilogue's own traffic, the residual
Add's second input), caches, the non-weighted layers and kernel choice. On a GPU, `tune.backend:
tensorrt` times an engine per candidate.
"""

from __future__ import annotations

from typing import Any, Iterable

from .layers import Layer

#: MACs per second at the dense tensor-core peak (H100/H200 SXM: TOPS / 2).
PEAK_MACS = {"int8": 1979e12 / 2, "fp16": 989.5e12 / 2, "fp32": 494.7e12 / 2}
BYTES = {"int8": 1, "fp16": 2, "fp32": 4}
BANDWIDTH = 3.35e12  # bytes per second, HBM3
UNIT = "ns per sample (estimate: a roofline at H100/H200 peaks, plus reformats; not a measurement)"


def _is_float(layer: Layer, kept: set[str]) -> bool:
    return layer.name in kept or layer.forced_float is not None


def layer_seconds(layer: Layer, precision: str) -> float:
    traffic = (layer.in_elements + layer.out_elements + layer.weight_elements) * BYTES[precision]
    return max(layer.macs / PEAK_MACS[precision], traffic / BANDWIDTH)


def boundaries(layers: Iterable[Layer], kept: Iterable[str]) -> list[Layer]:
    """The layers after which the precision changes (INT8 <-> float) along the graph order: each such
    boundary is a reformat of that layer's output (one per boundary on a chain; an approximation on
    branching graphs)."""
    kept = set(kept)
    seq = sorted(layers, key=lambda x: x.index)
    floaty = [_is_float(x, kept) for x in seq]
    return [a for a, fa, fb in zip(seq, floaty, floaty[1:]) if fa != fb]


def reformat_seconds(layer: Layer, keep_precision: str) -> float:
    return layer.out_elements * (BYTES["int8"] + BYTES[keep_precision]) / BANDWIDTH


def estimated_cost(layers: Iterable[Layer], kept: Iterable[str], keep_precision: str) -> float:
    layers = list(layers)
    kept = set(kept)
    total = sum(layer_seconds(x, keep_precision if _is_float(x, kept) else "int8") for x in layers)
    total += sum(reformat_seconds(b, keep_precision) for b in boundaries(layers, kept))
    return round(total * 1e9, 6)


def model_description(keep_precision: str) -> dict[str, Any]:
    return {"kind": "estimate", "unit": UNIT, "peak_macs_per_s": dict(PEAK_MACS), "bytes_per_element": dict(BYTES),
            "bandwidth_bytes_per_s": BANDWIDTH, "kept_layers_run_in": keep_precision,
            "source": "H100/H200 SXM dense tensor-core peaks (INT8 1979 TOPS, FP16 989.5 TFLOPS, TF32 494.7 TFLOPS) "
                      "and HBM3 bandwidth (3.35 TB/s); per layer the longer of compute and memory time, plus a "
                      "reformat (read + write) at every INT8 <-> float boundary",
            "ignores": "fusions, caches, non-weighted layers, kernel choice"}
