"""Which rules turn activations into ranges: TensorRT 8.6 as measured, or the public reference.

``calibration.rules`` in the config picks one of two sets. They differ in three places:

============================  ==================================  ==============================
                              ``tensorrt`` (default)              ``reference``
============================  ==================================  ==============================
histogram grows               range doubles, 2048 bins kept       bins appended, width kept
entropy amax                  ``(i + 1/2) * width`` (bin centre)  ``i * width`` (bin edge)
MaxPool output                the range of its input              its own range
============================  ==================================  ==============================

``reference`` is EntropyCalibration2 as NVIDIA's public reference implementations
describe EntropyCalibration2. ``tensorrt`` is what TensorRT 8.6.0's own
IInt8EntropyCalibrator2 does, read off the caches it wrote on an H100 for the same ONNX
and the same batches we calibrate on (the shared ResNet-18 fixture, 50 tensors; a
torchvision ResNet-50, 123 tensors; the digits CNN, 12 tensors):

* With ``w = max|x| of the first batch / 2048``, TensorRT's ``amax / w`` is ``k + 1/2``
  for every tensor whose max never grew and an odd integer for every tensor whose max
  grew, in all three caches: the first width is ``w``, a grown histogram has width
  ``2w``, and amax sits half a bin above the chosen end bin ``i``.
* The divergence search itself (KL divergence over 128-bin quantizations) is unchanged: with these rules our
  scale equals TensorRT's (to float32 rounding) for 177 of the 185 tensors (ResNet-18
  49/50, ResNet-50 118/123, digits 10/12). Of the other 8, 7 are near ties (TensorRT's
  ``i`` has a divergence within 0.1% of our minimum) and one is a MaxPool output that
  inherits such a tie. TensorRT itself resolves such ties differently from run to run: a
  second calibration of the same ResNet-50 on the same batches changed one scale by 0.5%
  (``/layer3/layer3.1/relu_1``, where we had matched the first run), and the digits
  pipeline's own INT8 build matched us on all 12 tensors.
* A MaxPool output carries its input's range in all three caches (its own histogram
  gives a different amax, e.g. 3.6% off on ResNet-18 and 27% on ResNet-50).

Per-tensor amax against those caches, median / 90th percentile (``bench/results/
h100_fidelity/replay_*.json``): ``tensorrt`` 0.00% / 0.0001% (ResNet-18, ResNet-50) and
0.00% / 8.6% (digits); ``reference`` 0.24% / 2.2%, 0.25% / 3.1% and 3.3% / 7.6%. Only
TensorRT 8.6 was measured; the rules are applied as they are for other versions.

:func:`ranges_under` applies a rule set to collected histograms; the calibrate stage and
the fixture test both go through it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Optional, Sequence

from calibration.algorithms import compute_amax
from calibration.errors import CalibrationError

#: ONNX ops whose output TensorRT gives the range of their input.
RANGE_FROM_INPUT_OPS = ("MaxPool",)


@dataclass(frozen=True)
class CalibrationRules:
    name: str
    growth: str  # calibration.histogram.AbsHistogram growth: "double" | "append"
    amax_bin_offset: float  # entropy amax = (i + offset) * width
    range_from_input: bool  # MaxPool outputs take their input's amax

    def describe(self) -> dict[str, Any]:
        return {"rules": self.name, "histogram_growth": self.growth, "amax_bin_offset": self.amax_bin_offset,
                "range_from_input_ops": list(RANGE_FROM_INPUT_OPS) if self.range_from_input else []}


RULES: dict[str, CalibrationRules] = {
    "tensorrt": CalibrationRules("tensorrt", growth="double", amax_bin_offset=0.5, range_from_input=True),
    "reference": CalibrationRules("reference", growth="append", amax_bin_offset=0.0, range_from_input=False),
}


def get_rules(name: str) -> CalibrationRules:
    try:
        return RULES[name]
    except KeyError:
        raise CalibrationError(f"unknown calibration rules {name!r}; use one of {', '.join(RULES)}") from None


def range_sources(node_ops: Iterable[tuple[str, Sequence[str], Sequence[str]]]) -> dict[str, str]:
    """``{output: input}`` for every node of :data:`RANGE_FROM_INPUT_OPS`, in graph order;
    ``node_ops`` holds ``(op_type, inputs, outputs)`` per node (ActivationCollector.node_ops)."""
    return {outputs[0]: inputs[0] for op, inputs, outputs in node_ops
            if op in RANGE_FROM_INPUT_OPS and inputs and outputs}


def share_ranges(amax: dict[str, float], sources: Mapping[str, str]) -> dict[str, str]:
    """Give each output in ``sources`` (graph order) the amax of its input; a chain
    (MaxPool of a MaxPool) ends at the first tensor with a range of its own. Only pairs
    that both have an amax are touched. Updates ``amax`` in place; returns ``{output:
    the tensor whose range it took}``."""
    taken: dict[str, str] = {}
    for out, src in sources.items():
        if out in amax and src in amax:
            amax[out] = amax[src]
            taken[out] = taken.get(src, src)
    return taken


def ranges_under(rules: CalibrationRules, histograms: Mapping[str, Any], method: str,
                 node_ops: Iterable[tuple[str, Sequence[str], Sequence[str]]] = (),
                 percentile: float = 99.99, bounds: Optional[Mapping[str, float]] = None
                 ) -> tuple[dict[str, float], dict[str, str], list[float]]:
    """amax of every histogram by ``method`` under ``rules``: the entropy amax at the rules'
    bin offset, then MaxPool outputs given their input's range (found in ``node_ops``)
    where the rules say so. Returns ``(amax, range_from, search_ms)``: ``range_from`` as
    :func:`share_ranges` gives it, ``search_ms`` the time of each tensor's amax search.

    ``bounds`` (tensor -> largest amax, e.g. a ReLU6's 6 from
    :func:`calibration.ptq.clip_amax_bounds`) caps those tensors' amax; the ``mse``
    search caps its candidates before scoring them."""
    opts: dict[str, Any] = {}
    if method == "percentile":
        opts = {"percentile": percentile}
    elif method in ("entropy", "mse"):
        opts = {"bin_offset": rules.amax_bin_offset}
    bounds = bounds or {}

    def search(name: str, hist: Any) -> tuple[float, float]:
        t0 = time.perf_counter()
        extra = {"bound": bounds[name]} if method == "mse" and name in bounds else {}
        a = float(compute_amax(hist, method, **opts, **extra))
        if name in bounds:
            a = min(a, float(bounds[name]))
        return a, (time.perf_counter() - t0) * 1e3

    # Each tensor's search is independent and numpy's array work releases the GIL: one thread per
    # core (1.7x on 2 cores for ResNet-sized sets), the same answers in the same order.
    from calibration.collect import available_cores

    items = list(histograms.items())
    workers = min(available_cores(), len(items))
    if workers > 1:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="calib-search") as pool:
            found = list(pool.map(lambda item: search(*item), items))
    else:
        found = [search(name, hist) for name, hist in items]
    amax = {name: a for (name, _), (a, _) in zip(items, found)}
    search_ms = [ms for _, ms in found]
    range_from = share_ranges(amax, range_sources(node_ops)) if rules.range_from_input else {}
    return amax, range_from, search_ms
