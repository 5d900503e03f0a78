"""Which nodes an FP16 variant keeps in FP32, shared by both backends.

FP16's range ends at 65504. Attention masks (`(1 - mask) * finfo(float32).min`), their
adds and the reductions of softmax and layer normalization overflow there, and a model
that is exact in FP32 returns garbage in FP16 without a word. So an FP16 build keeps in
FP32:

* every node whose op type is in `build.fp16.keep_fp32_ops` (reductions by default);
* every node whose name matches a glob of `build.fp16.keep_fp32_nodes`;
* with `build.fp16.range_check` (default), every node that produces or consumes a float
  tensor whose values leave FP16's range when the FP32 model runs on the calibration
  samples: the max|x| the calibrate stage measured for every tensor (maxima.json), so
  the build measures nothing again.

Each kept node comes with its reason, which build.json records."""

from __future__ import annotations

import fnmatch
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional

import numpy as np

from ..config import FP16Config
from ..errors import ConfigError

FP16_MAX = 65504.0
RANGE_CHECK_SAMPLES = 64


def tensor_maxima(onnx_path: Path, batches: Iterable[Mapping[str, np.ndarray]]) -> dict[str, float]:
    """max |x| of every float tensor the graph computes on `batches` (inf where a value is not
    finite), by the calibrate stage's own collector: for a build called without that stage's
    maxima.json (the library API; the build stage always has it)."""
    from calibration.collect import collect_histograms

    return collect_histograms(onnx_path, batches, progress=False).maxima()


def keep_fp32_nodes(onnx_path: Path, cfg: FP16Config, maxima: Optional[Mapping[str, Optional[float]]] = None,
                    where: str = "the calibration samples", model: Any = None) -> dict[str, str]:
    """node name -> why it stays in FP32 (see the module docstring). `maxima`: max|x| per
    tensor on `where` (None: a value was not finite); no range check without it. `model`: the
    ONNX at `onnx_path` when the caller has it loaded already."""
    if model is None:
        from calibration.onnx_io import load_model

        model = load_model(onnx_path)
    nodes = list(model.graph.node)
    keep: dict[str, str] = {}
    ops = set(cfg.keep_fp32_ops)
    for n in nodes:
        if n.op_type in ops:
            keep.setdefault(n.name, f"op {n.op_type} (build.fp16.keep_fp32_ops)")
    for pattern in cfg.keep_fp32_nodes:
        hits = [n.name for n in nodes if fnmatch.fnmatchcase(n.name, pattern)]
        if not hits:
            examples = ", ".join(repr(n.name) for n in nodes[:6])
            raise ConfigError(f"build.fp16.keep_fp32_nodes: '{pattern}' matches no node of {onnx_path} "
                              f"(e.g. {examples}); node names are the ONNX node names")
        for h in hits:
            keep.setdefault(h, f"matches build.fp16.keep_fp32_nodes '{pattern}'")
    if cfg.range_check and maxima is not None:
        over = {t: m for t, m in maxima.items() if m is None or not m <= FP16_MAX}
        for n in nodes:
            for t in list(n.output) + list(n.input):
                if t in over:
                    side = "produces" if t in n.output else "consumes"
                    size = "values that are not finite" if over[t] is None or not np.isfinite(over[t]) \
                        else f"|x| up to {over[t]:.3g}"
                    keep.setdefault(n.name, f"{side} '{t}' with {size}, beyond fp16's {FP16_MAX:g} on {where}")
                    break
    return keep


def fold_identities(model: Any) -> Any:
    """Route the consumers of `Identity(initializer)` to the initializer itself and drop the
    Identity (the exporter makes them for shared weights). onnxconverter-common otherwise
    gives such an Identity a float16 output feeding a node kept in float32, which
    onnxruntime rejects. Values are unchanged."""
    graph = model.graph
    inits = {i.name for i in graph.initializer}
    outputs = {o.name for o in graph.output}
    alias = {n.output[0]: n.input[0] for n in graph.node
             if n.op_type == "Identity" and n.input[0] in inits and n.output[0] not in outputs}
    if not alias:
        return model
    keep = [n for n in graph.node if not (n.op_type == "Identity" and n.output and n.output[0] in alias)]
    for n in keep:
        for i, name in enumerate(n.input):
            if name in alias:
                n.input[i] = alias[name]
    del graph.node[:]
    graph.node.extend(keep)
    return model


def range_check_batches(samples: Mapping[str, np.ndarray], batch_size: int = 16) -> list[dict[str, np.ndarray]]:
    """The first RANGE_CHECK_SAMPLES samples in batches."""
    n = min(RANGE_CHECK_SAMPLES, len(next(iter(samples.values()))))
    return [{k: np.ascontiguousarray(v[i:i + batch_size]) for k, v in samples.items()} for i in range(0, n, batch_size)]


def describe(keep: Mapping[str, str]) -> list[str]:
    return [f"{name}: {why}" for name, why in keep.items()]


__all__ = ["keep_fp32_nodes", "tensor_maxima", "range_check_batches", "fold_identities", "describe", "FP16_MAX"]
