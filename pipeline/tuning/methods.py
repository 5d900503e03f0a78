"""Calibration method per layer: a layer whose INT8 error comes from a clipped range can often
stay INT8 with another range for its inputs instead of being kept out of INT8.

The alternative here is *minmax*: amax = max|x| over the calibration data, which calibrate
records for every tensor (`max_abs` in ranges.json) whatever its method. EntropyCalibration2
clips activations whose tail it judges rare; a ReLU6 output clipped from 6 to 4 costs
EfficientNet-Lite0's last projection 18 dB of output SQNR, and minmax gives it back. Entropy
or percentile as alternatives would need the histograms, which calibrate does not keep, so
`tune.calibration_methods` takes `minmax` (and it is skipped when calibrate itself used
minmax).

A layer's *inputs* are the activation tensors it reads through a DequantizeLinear (the Q/DQ
placement's `quantized_inputs`); a tensor has one scale, so a tensor read by several layers
takes max|x| for all of them once one of them chooses minmax (as in TensorRT's cache).
The tuned ranges reach every route: the Q/DQ ONNX is written with them, and tune writes
calibrate's cache with those scales replaced (`calibration.cache`), which the implicit route
of build@int8 then reads.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional


def minmax_alternatives(placement: Mapping[str, Any], tensors: Mapping[str, Mapping[str, Any]],
                        layers: Iterable[str], rel_tol: float = 1e-6) -> dict[str, dict[str, float]]:
    """layer -> {input tensor: max|x|} for the layers where max|x| differs from the calibrated amax."""
    quantized = placement.get("quantized_inputs", {})
    out: dict[str, dict[str, float]] = {}
    for layer in layers:
        alt = {}
        for t in quantized.get(layer, []):
            r = tensors.get(t)
            if r is None:
                continue  # a weight
            if abs(float(r["max_abs"]) - float(r["amax"])) > rel_tol * max(abs(float(r["max_abs"])), 1e-30):
                alt[t] = float(r["max_abs"])
        if alt:
            out[layer] = alt
    return out


def tuned_amax(base: Mapping[str, float], alternatives: Mapping[str, Mapping[str, float]],
               minmax_layers: Iterable[str]) -> dict[str, float]:
    """The ranges with the inputs of `minmax_layers` at max|x|."""
    amax = dict(base)
    for layer in minmax_layers:
        amax.update(alternatives.get(layer, {}))
    return amax


@dataclass(frozen=True)
class WeightPTQ:
    """What calibrate did to the weights that a Q/DQ model written later must repeat:
    GPTQ's rounded weights (None: round to nearest) and bias correction per node (None: no
    correction); `note` says why it is not carried when it cannot be."""

    rounded: Optional[Mapping[tuple[str, Optional[int]], Any]] = None
    corrections: Optional[Mapping[str, Any]] = None
    note: Optional[str] = None

    def describe(self) -> dict[str, Any]:
        return {"weight_rounding": "nearest" if self.rounded is None else "gptq",
                "bias_correction": self.corrections is not None, "note": self.note}


def write_candidate_qdq(onnx_path: Path, path: Path, amax: Mapping[str, float],
                        alternatives: Mapping[str, Mapping[str, float]], kept: Iterable[str],
                        always_float: Iterable[str] = (), minmax: Iterable[str] = (),
                        ptq: Optional[WeightPTQ] = None) -> dict[str, Any]:
    """A candidate's Q/DQ ONNX at `path`: the calibrate stage's ranges (the inputs of the
    `minmax` layers at max|x|), the kept and always-float layers left float, and calibrate's
    weight-side PTQ (`ptq`: GPTQ's rounded weights, bias corrections) on the layers it
    quantizes; returns quantize_qdq's placement summary. The model every route of a candidate
    runs: onnxruntime's simulation, and TensorRT's explicit (typed) build."""
    from calibration.qdq import quantize_qdq

    ptq = ptq or WeightPTQ()
    return quantize_qdq(Path(onnx_path), Path(path), tuned_amax(amax, alternatives, minmax),
                        exclude_nodes=sorted(set(kept) | set(always_float)), rounded=ptq.rounded,
                        corrections=ptq.corrections)



def overrides(base: Mapping[str, float], alternatives: Mapping[str, Mapping[str, float]],
              minmax_layers: Iterable[str]) -> dict[str, dict[str, float]]:
    """tensor -> {calibrated amax, tuned amax} for every tensor the tuned methods change."""
    out = {}
    for t, a in tuned_amax(base, alternatives, minmax_layers).items():
        if a != base.get(t):
            out[t] = {"calibrated_amax": float(base[t]), "amax": float(a)}
    return out


def write_tuned_cache(source: Path, target: Path, amax: Mapping[str, float]) -> None:
    """calibrate's cache at `source` with the scales of the tensors in `amax` replaced."""
    from calibration.algorithms import amax_to_scale
    from calibration.cache import read_cache, write_cache

    cache = read_cache(source)
    scales = dict(cache.scales)
    for t, a in amax.items():
        scales[t] = amax_to_scale(a)
    write_cache(target, scales, cache.version, cache.algorithm)
