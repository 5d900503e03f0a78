"""The CPU stand-in for latency: an *estimate*, never a measurement.

A candidate's cost is the sum over the quantizable layers of MACs x the relative cost of a
MAC in that layer's precision, in FP16-equivalent GMAC per sample. The relative costs are
the dense tensor-core peak ratios of the GPUs this project targets (H100 / H200 SXM:
INT8 1979 TOPS, FP16 989.5 TFLOPS, TF32 494.7 TFLOPS): an INT8 MAC costs 0.5 of an FP16
MAC, a TF32/FP32 one 2.0. What this leaves out, and why a GPU measures instead: memory
traffic (depthwise convolutions and small layers are bandwidth-bound, so INT8 gains less
there), the non-weighted layers, reformatting between INT8 and float layers, and kernel
choice. On a GPU, `tune.backend: tensorrt` times an engine per candidate.
"""

from __future__ import annotations

from typing import Any, Iterable

from .layers import Layer

RELATIVE_MAC_COST = {"int8": 0.5, "fp16": 1.0, "fp32": 2.0}
UNIT = "FP16-equivalent GMAC per sample (estimate: MACs x relative cost; not a measurement)"


def estimated_cost(layers: Iterable[Layer], kept: Iterable[str], keep_precision: str) -> float:
    kept = set(kept)
    total = 0.0
    for layer in layers:
        float_layer = layer.name in kept or layer.forced_float is not None
        total += layer.macs * RELATIVE_MAC_COST[keep_precision if float_layer else "int8"]
    return round(total / 1e9, 6)


def model_description(keep_precision: str) -> dict[str, Any]:
    return {"kind": "estimate", "unit": UNIT, "relative_mac_cost": dict(RELATIVE_MAC_COST),
            "kept_layers_run_in": keep_precision,
            "source": "H100/H200 SXM dense tensor-core peaks: INT8 1979 TOPS, FP16 989.5 TFLOPS, TF32 494.7 TFLOPS",
            "ignores": "memory traffic, non-weighted layers, INT8<->float reformats, kernel choice"}
