"""Typed ONNX for strongly typed TensorRT builds (TensorRT >= 10): the types come from the
graph, not from builder flags.

FP16: FP16 initializers and activations with FP32 I/O, written by onnxruntime's copy of
onnxconverter-common's float16 converter (`convert_float_to_float16`, `keep_io_types=True`,
its default op block list, and `node_block_list` = the nodes `build.fp16` keeps in FP32,
which it leaves in FP32 with Cast nodes around them) — the same settings as the
onnxruntime backend's fp16 variant, so the CPU simulation runs the graph TensorRT builds."""

from __future__ import annotations

import warnings
from collections import Counter
from pathlib import Path
from typing import Any, Mapping

from ..errors import ModelError
from ..fileio import sha256_file

FP16_ONNX = "model.fp16.onnx"
CONVERTER = "onnxruntime.transformers.float16.convert_float_to_float16 (keep_io_types, default op block list)"


def write_fp16_onnx(onnx_path: Path, keep: Mapping[str, str], out: Path) -> dict[str, Any]:
    """Write the typed FP16 ONNX of `onnx_path` to `out`, keeping `keep`'s nodes in FP32;
    returns what build.json records about it (file, sha256, Cast nodes, FP16 initializers).
    The one FP16 writer: the onnxruntime backend's fp16 variant is this file too."""
    import onnx
    from onnxruntime.transformers import float16

    from ..onnx_utils import load_onnx
    from .fp16 import fold_identities

    model = fold_identities(load_onnx(onnx_path))
    try:
        with warnings.catch_warnings(record=True) as caught:  # weights beyond fp16's range, clamped
            warnings.simplefilter("always")
            half = float16.convert_float_to_float16(
                model, keep_io_types=True, op_block_list=list(float16.DEFAULT_OP_BLOCK_LIST), node_block_list=list(keep))
    except Exception as e:
        raise ModelError(f"{onnx_path}: the float16 converter cannot convert the model "
                         f"({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    onnx.save(half, str(out))
    to = Counter(a.i for n in half.graph.node if n.op_type == "Cast" for a in n.attribute if a.name == "to")
    clamped = [str(w.message) for w in caught if "truncated" in str(w.message)]
    return {
        "file": out.name,
        "sha256": sha256_file(out),
        "converter": CONVERTER,
        "kept_fp32_nodes": len(keep),
        "casts_to_fp16": to.get(onnx.TensorProto.FLOAT16, 0),
        "casts_to_fp32": to.get(onnx.TensorProto.FLOAT, 0),
        "fp16_initializers": sum(1 for i in half.graph.initializer if i.data_type == onnx.TensorProto.FLOAT16),
        "weights_clamped_to_fp16_range": len(clamped),
        "examples": clamped[:3],
    }
