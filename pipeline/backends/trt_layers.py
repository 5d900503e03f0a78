"""`build.layer_precisions`: layer-name globs pinned to fp32/fp16 in a TensorRT build.

Matching is pure Python (`match_layer_precisions`); `apply_layer_precisions` sets each
matched layer's precision and float output types on a TensorRT network. Layer names
are the ONNX node names (TensorRT's parser keeps them). A pattern that matches no
layer is an error: it is almost always a typo, and silently building without the pin
would hide it."""

from __future__ import annotations

import fnmatch
from typing import Any, Mapping, Sequence

from ..errors import ConfigError

LAYER_PRECISIONS = ("fp32", "fp16")  # what build.layer_precisions may pin a layer to (not the build variants)


def match_layer_precisions(layer_names: Sequence[str], patterns: Mapping[str, str]) -> tuple[dict[str, str], dict[str, list[str]]]:
    """(layer -> precision, pattern -> matched layers). The first pattern (in the
    mapping's order) that matches a layer decides its precision."""
    for pat, prec in patterns.items():
        if prec not in LAYER_PRECISIONS:
            raise ConfigError(f"build.layer_precisions['{pat}']: precision must be one of {', '.join(LAYER_PRECISIONS)}, got {prec!r}")
    assign: dict[str, str] = {}
    matched: dict[str, list[str]] = {p: [] for p in patterns}
    for name in layer_names:
        for pat, prec in patterns.items():
            if fnmatch.fnmatchcase(name, pat):
                matched[pat].append(name)
                assign.setdefault(name, prec)
                break
    unmatched = [p for p, names in matched.items() if not names]
    if unmatched:
        examples = ", ".join(repr(n) for n in list(layer_names)[:8])
        raise ConfigError(
            f"build.layer_precisions: pattern(s) {', '.join(repr(p) for p in unmatched)} match no layer of the network "
            f"({len(layer_names)} layers, e.g. {examples}); layer names are the ONNX node names "
            "(see layers.json of an earlier build), and globs use fnmatch syntax (*, ?, [..])"
        )
    return assign, matched


def apply_layer_precisions(trt: Any, network: Any, patterns: Mapping[str, str]) -> dict[str, Any]:
    """Pin the matched layers of `network`; returns {matched: {pattern: [layers]},
    pinned: {layer: precision}, skipped: [layers without float outputs]}."""
    layers = [network.get_layer(i) for i in range(network.num_layers)]
    assign, matched = match_layer_precisions([layer.name for layer in layers], patterns)
    floats = (trt.float32, trt.float16)
    pinned, skipped = {}, []
    for layer in layers:
        prec = assign.get(layer.name)
        if prec is None:
            continue
        outs = [j for j in range(layer.num_outputs) if layer.get_output(j).dtype in floats]
        if not outs:
            skipped.append(layer.name)
            continue
        dt = trt.float32 if prec == "fp32" else trt.float16
        layer.precision = dt
        for j in outs:
            layer.set_output_type(j, dt)
        pinned[layer.name] = prec
    return {"matched": matched, "pinned": pinned, "skipped": skipped}
