"""The CPU stand-in for latency: an *estimate*, never a measurement.

A candidate's cost is the sum over the quantizable layers of MACs x the relative cost of a
MAC in that layer's precision, in FP16-equivalent GMAC per sample. The relative costs are
the dense tensor-core peak ratios of the GPUs this project targets (H100 / H200 SXM:
INT8 1979 TOPS, FP16 989.5 TFLOPS, TF32 494.7 TFLOPS): an INT8 MAC costs 0.5 of an FP16
MAC, a TF32/FP32 one 2.0. Each INT8 <-> float boundary along the graph order adds the reformat
of the activation there (REFORMAT_MAC_COST per element: memory-bound, so one element costs
about as much as ~440 FP16 MACs): a kept set scattered over the network pays for it, which is
what made tuned EfficientNet-Lite0 engines slower than FP16 on an H200. What this leaves out,
and why a GPU measures instead: the layers' own memory traffic (depthwise convolutions and
small layers are bandwidth-bound, so INT8 gains less there), the non-weighted layers, and
kernel choice. On a GPU, `tune.backend: tensorrt` times an engine per candidate.
"""

from __future__ import annotations

from typing import Any, Iterable

from .layers import Layer

RELATIVE_MAC_COST = {"int8": 0.5, "fp16": 1.0, "fp32": 2.0}
#: An INT8 <-> FP16 reformat of one activation element, in FP16 MACs: it reads one byte and writes two (or
#: the reverse), 3 bytes at HBM3's 3.35 TB/s, in the time the FP16 tensor cores do 989.5 / 2 TMAC/s.
REFORMAT_MAC_COST = round(3 / 3.35e12 * 989.5e12 / 2)
UNIT = "FP16-equivalent GMAC per sample (estimate: MACs x relative cost, plus reformats; not a measurement)"


def _is_float(layer: Layer, kept: set[str]) -> bool:
    return layer.name in kept or layer.forced_float is not None


def boundaries(layers: Iterable[Layer], kept: Iterable[str]) -> list[Layer]:
    """The layers after which the precision changes (INT8 <-> float) along the graph order: each such
    boundary is a reformat of that layer's output (one per boundary on a chain; an approximation on
    branching graphs)."""
    kept = set(kept)
    seq = sorted(layers, key=lambda x: x.index)
    return [a for a, b in zip(seq, seq[1:]) if _is_float(a, kept) != _is_float(b, kept)]


def estimated_cost(layers: Iterable[Layer], kept: Iterable[str], keep_precision: str) -> float:
    layers = list(layers)
    kept = set(kept)
    total = 0.0
    for layer in layers:
        total += layer.macs * RELATIVE_MAC_COST[keep_precision if _is_float(layer, kept) else "int8"]
    total += sum(b.out_elements for b in boundaries(layers, kept)) * REFORMAT_MAC_COST
    return round(total / 1e9, 6)


def model_description(keep_precision: str) -> dict[str, Any]:
    return {"kind": "estimate", "unit": UNIT, "relative_mac_cost": dict(RELATIVE_MAC_COST),
            "reformat_mac_cost_per_element": REFORMAT_MAC_COST,
            "kept_layers_run_in": keep_precision,
            "source": "H100/H200 SXM dense tensor-core peaks: INT8 1979 TOPS, FP16 989.5 TFLOPS, TF32 494.7 TFLOPS; "
                      "a reformat: 3 bytes per element at HBM3's 3.35 TB/s",
            "ignores": "memory traffic of the layers themselves, non-weighted layers, kernel choice"}
