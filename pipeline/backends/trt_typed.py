"""Typed ONNX for strongly typed TensorRT builds (TensorRT >= 10): the types come from the
graph, not from builder flags. `plan_fp16` is the one place an fp16 variant is decided: which
nodes stay in FP32 and why (from the calibrate stage's max|x| of every tensor), and, on the
typed route, the FP16 ONNX every backend then builds as it is given.

FP16: FP16 initializers and activations with FP32 I/O, written by onnxruntime's copy of
onnxconverter-common's float16 converter (`convert_float_to_float16`, `keep_io_types=True`,
its default op block list, and `node_block_list` = the nodes `build.fp16` keeps in FP32,
which it leaves in FP32 with Cast nodes around them) — the same settings as the
onnxruntime backend's fp16 variant, so the CPU simulation runs the graph TensorRT builds."""

from __future__ import annotations

import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional

from ..errors import BackendError, ConfigError, ModelError
from ..fileio import MAXIMA_FILE, sha256_file

FP16_ONNX = "model.fp16.onnx"
INT8_ONNX = "model.int8.onnx"  # the Q/DQ ONNX with its float parts in FP16 (strongly typed INT8 builds)
CONVERTER = "onnxruntime.transformers.float16.convert_float_to_float16 (keep_io_types, default op block list)"


def collapse_round_trips(model: Any) -> int:
    """Remove FP32 -> FP16 -> FP32 Cast pairs (in place); returns how many reads were rewired.

    The float16 converter puts every kept node in FP32 between Casts, but two kept nodes in a
    row still pass their tensor through FP16 (Cast to FP16 after the first, Cast to FP32
    before the second): a tensor kept because it leaves FP16's range becomes inf there. Each
    Cast-to-FP32 that reads a Cast-to-FP16 of an FP32 tensor reads that FP32 tensor instead
    (an Identity where its output is a graph output); a Cast-to-FP16 no one reads any more goes."""
    import onnx

    graph = model.graph
    to = {n.name: next((a.i for a in n.attribute if a.name == "to"), None) for n in graph.node if n.op_type == "Cast"}
    producer = {o: n for n in graph.node for o in n.output}
    outputs = {o.name for o in graph.output}
    inputs = {i.name for i in graph.input}
    elem = {v.name: v.type.tensor_type.elem_type for v in list(graph.value_info) + list(graph.input) + list(graph.output)}
    rewired = 0
    alias: dict[str, str] = {}
    for n in graph.node:
        if n.op_type != "Cast" or to.get(n.name) != onnx.TensorProto.FLOAT:
            continue
        x = producer.get(n.input[0])
        if x is None or x.op_type != "Cast" or to.get(x.name) != onnx.TensorProto.FLOAT16:
            continue
        src = producer.get(x.input[0])  # a kept node's FP32 output, or an FP32 graph input
        if (src is None and x.input[0] not in inputs) or (src is not None and src.op_type == "Cast"):
            continue
        if elem.get(x.input[0]) != onnx.TensorProto.FLOAT:  # an integer (a mask's sum) or an unknown type: as written
            continue
        if n.output[0] in outputs:
            n.op_type = "Identity"
            del n.attribute[:]
            n.input[0] = x.input[0]
        else:
            alias[n.output[0]] = x.input[0]
        rewired += 1
    if alias:
        for n in graph.node:
            for i, name in enumerate(n.input):
                if name in alias:
                    n.input[i] = alias[name]
        keep = [n for n in graph.node if not (n.op_type == "Cast" and n.output[0] in alias)]
        del graph.node[:]
        graph.node.extend(keep)
    read = {i for n in graph.node for i in n.input} | outputs
    dead = [n for n in graph.node if n.op_type == "Cast" and to.get(n.name) == onnx.TensorProto.FLOAT16
            and n.output[0] not in read]
    if dead:
        gone = {n.output[0] for n in dead}
        keep = [n for n in graph.node if n not in dead]
        del graph.node[:]
        graph.node.extend(keep)
        vi = [v for v in graph.value_info if v.name not in gone and v.name not in alias]
        del graph.value_info[:]
        graph.value_info.extend(vi)
    return rewired


def write_fp16_onnx(onnx_path: Path, keep: Mapping[str, str], out: Path, model: Any = None) -> dict[str, Any]:
    """Write the typed FP16 ONNX of `onnx_path` to `out`, keeping `keep`'s nodes in FP32;
    returns what build.json records about it (file, sha256, Cast nodes, FP16 initializers).
    The one FP16 writer: the onnxruntime backend's fp16 variant is this file too. `model`: the
    ONNX at `onnx_path` already loaded (it is converted in place)."""
    from onnxruntime.transformers import float16

    from ..onnx_utils import load_onnx
    from .fp16 import fold_identities

    model = fold_identities(model if model is not None else load_onnx(onnx_path))
    before = {n.name for n in model.graph.node}
    half, info = _to_fp16(model, list(float16.DEFAULT_OP_BLOCK_LIST), keep, out, f"{onnx_path}: the float16 converter "
                          "cannot convert the model")
    return {**info, "converter": CONVERTER,
            "added_casts": [n.name for n in half.graph.node if n.op_type == "Cast" and n.name not in before]}


def _to_fp16(model: Any, block: list[str], keep: Mapping[str, str], out: Path, fails: str) -> tuple[Any, dict[str, Any]]:
    """`model` through onnxruntime's float16 converter (keep_io_types, the op types `block` and the nodes `keep`
    left in FP32), FP32 -> FP16 -> FP32 round trips collapsed, saved to `out`; (the model, build.json's record)."""
    import onnx

    from calibration.onnx_io import save_model
    from onnxruntime.transformers import float16

    try:
        with warnings.catch_warnings(record=True) as caught:  # weights beyond fp16's range, clamped
            warnings.simplefilter("always")
            half = float16.convert_float_to_float16(model, keep_io_types=True, op_block_list=block,
                                                    node_block_list=list(keep))
    except Exception as e:
        raise ModelError(f"{fails} ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    round_trips = collapse_round_trips(half)
    save_model(half, out)
    to = Counter(a.i for n in half.graph.node if n.op_type == "Cast" for a in n.attribute if a.name == "to")
    clamped = [str(w.message) for w in caught if "truncated" in str(w.message)]
    return half, {
        "file": out.name,
        "sha256": sha256_file(out),
        "kept_fp32_nodes": len(keep),
        "casts_to_fp16": to.get(onnx.TensorProto.FLOAT16, 0),
        "casts_to_fp32": to.get(onnx.TensorProto.FLOAT, 0),
        "fp16_initializers": sum(1 for i in half.graph.initializer if i.data_type == onnx.TensorProto.FLOAT16),
        "fp32_fp16_fp32_round_trips_removed": round_trips,
        "weights_clamped_to_fp16_range": len(clamped),
        "examples": clamped[:3],
    }


def write_int8_typed_onnx(qdq_path: Path, keep: Mapping[str, str], out: Path) -> dict[str, Any]:
    """Write the typed INT8 ONNX of the Q/DQ ONNX at `qdq_path` to `out`: what a strongly typed
    TensorRT builds for `build.int8_float_fallback: fp16` (on 8.6 the FP16 flag does it). The
    float parts (every node that is not a QuantizeLinear/DequantizeLinear: the layers left out of
    INT8, tune's kept layers, Softmax, residual Adds...; all of them for tune's candidate that keeps
    every layer) in FP16 by the same converter as the typed FP16 ONNX, `keep`'s nodes in FP32 (they
    leave FP16's range, or tune kept them in FP32); the Q/DQ pairs keep their FP32 scales (opset < 19 has no FP16 scales) between Casts. Returns what
    build.json records (file, sha256, Casts, FP16 initializers, Q/DQ counts)."""
    from onnxruntime.transformers import float16

    from ..onnx_utils import load_onnx

    model = load_onnx(qdq_path)
    qdq = Counter(n.op_type for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear"))
    block = sorted(set(float16.DEFAULT_OP_BLOCK_LIST) | {"QuantizeLinear", "DequantizeLinear"})
    half, info = _to_fp16(model, block, keep, out, f"{qdq_path}: the float16 converter cannot convert the Q/DQ model")
    after = Counter(n.op_type for n in half.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear"))
    if after != qdq:
        raise ModelError(f"{qdq_path}: the float16 converter changed the Q/DQ nodes ({dict(qdq)} -> {dict(after)}); "
                         "build with build.int8_float_fallback: fp32")
    return {**info, "from": str(qdq_path), "converter": CONVERTER + ", QuantizeLinear/DequantizeLinear blocked (FP32 scales)",
            "quantize_linear": qdq.get("QuantizeLinear", 0), "dequantize_linear": qdq.get("DequantizeLinear", 0)}


def plan_int8_typed(onnx_path: Path, qdq_path: Path, cfg: Any, out_dir: Path, calib_dir: Optional[Path],
                    calib_data: Optional[Path] = None, keep_fp32: Optional[Mapping[str, str]] = None) -> dict[str, Any]:
    """The typed INT8 ONNX (`write_int8_typed_onnx`) of `qdq_path` in `out_dir`: the nodes of the FP32
    ONNX `onnx_path` that `build.fp16` keeps in FP32 (its ops and globs, and what leaves FP16's range by
    the calibrate stage's maxima.json in `calib_dir`), plus `keep_fp32` (node -> why: tune's layers kept
    in FP32), stay FP32. Returns build.json's `typed_onnx` (with `path`: where it was written)."""
    from ..onnx_utils import load_onnx
    from .fp16 import keep_fp32_nodes

    maxima, maxima_from = _maxima(Path(onnx_path), cfg, calib_dir, calib_data)
    model = load_onnx(onnx_path)
    keep = keep_fp32_nodes(Path(onnx_path), cfg.build.fp16, maxima, where=maxima_from, model=model)
    for node, why in (keep_fp32 or {}).items():
        keep.setdefault(node, why)
    pins = (typed_layer_pins([n.name for n in model.graph.node], cfg.build.layer_precisions, keep, "int8")
            if cfg.build.layer_precisions else None)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    out = Path(out_dir) / INT8_ONNX
    info = write_int8_typed_onnx(Path(qdq_path), keep, out)
    return {**info, "path": str(out), "maxima_from": maxima_from, "keep_fp32": dict(keep), "layer_precisions": pins}


FP16_ROUTES = ("typed", "flag")


@dataclass(frozen=True)
class Fp16Plan:
    """An fp16 variant as the build stage decided it, handed to the backend in the BuildRequest."""

    route: str  # "typed": build `onnx` (the FP16 ONNX); "flag": the FP32 ONNX with BuilderFlag.FP16 (TensorRT < 11)
    why: str
    keep: dict[str, str]  # ONNX node -> why it stays in FP32
    maxima_from: str  # where the range check's max|x| came from
    onnx: Optional[Path] = None  # the typed FP16 ONNX (route "typed")
    typed_onnx: Optional[dict[str, Any]] = None  # write_fp16_onnx's record of it
    pins: Optional[dict[str, Any]] = field(default=None)  # build.layer_precisions applied as FP32 Casts (route "typed")
    added_casts: tuple[str, ...] = ()  # the Cast nodes the converter added (never pinned on 8.6)

    def describe(self) -> dict[str, Any]:
        """build.json's `fp16` (its typed ONNX is build.json's `typed_onnx`)."""
        return {"route": self.route, "why": self.why, "maxima_from": self.maxima_from, "kept_fp32_nodes": len(self.keep)}


def read_maxima(calib_dir: Path, onnx_path: Path) -> tuple[dict[str, Optional[float]], str]:
    """(max|x| per tensor, where from) of the calibrate stage's maxima.json in `calib_dir`,
    refused when it was measured on another ONNX."""
    from ..provenance import ProvenanceError, sha256_of
    from ..reports import TensorMaxima, read_report

    path = Path(calib_dir) / MAXIMA_FILE
    rep = read_report(path, TensorMaxima, "tensor maxima (max|x| per tensor)", "calibrate", ProvenanceError)
    if rep.onnx_sha256 != sha256_of(onnx_path):
        raise ProvenanceError(f"{path}: measured on another ONNX than {onnx_path}; re-run calibrate (dvc repro calibrate)")
    return dict(rep.tensors), f"the calibrate stage's {MAXIMA_FILE} ({rep.samples} calibration samples)"


def _maxima(onnx_path: Path, cfg: Any, calib_dir: Optional[Path],
            calib_data: Optional[Path]) -> tuple[Optional[dict[str, Optional[float]]], str]:
    if not cfg.build.fp16.range_check:
        return None, "not checked (build.fp16.range_check: false)"
    if calib_dir is not None and ((Path(calib_dir) / MAXIMA_FILE).is_file() or calib_data is None):
        return read_maxima(Path(calib_dir), onnx_path)  # not there: "run the calibrate stage first"
    if calib_data is not None:  # the library API without a calibrate stage: measure here, once
        from ..data import load_samples
        from .fp16 import RANGE_CHECK_SAMPLES, range_check_batches, tensor_maxima

        samples = load_samples(calib_data, cfg.model.inputs, cfg.data.labels_key, "calibration data")
        return (tensor_maxima(onnx_path, range_check_batches(samples.x)),
                f"measured in the build on the first {RANGE_CHECK_SAMPLES} samples of {Path(calib_data).name} "
                f"(no {MAXIMA_FILE} from the calibrate stage given)")
    raise BackendError(f"build.fp16.range_check reads the max|x| the calibrate stage measured ({MAXIMA_FILE}): pass "
                       "--calib-dir (run `trtpipe calibrate` first), or set build.fp16.range_check: false")


def typed_layer_pins(nodes: list[str], patterns: Mapping[str, str], keep: dict[str, str],
                     variant: str = "fp16") -> dict[str, Any]:
    """build.layer_precisions on the typed route, over the ONNX's node names: the fp32 pins join
    `keep` (FP32 with Casts around them in the typed FP16 or INT8 ONNX); fp16 pins are FP16 already
    (an INT8 layer stays INT8: its Q/DQ decide). A pin to fp16 of a node the variant keeps in FP32 is
    refused."""
    from .trt_layers import match_layer_precisions

    assign, matched = match_layer_precisions(nodes, patterns)
    clash = [n for n, p in assign.items() if p == "fp16" and n in keep]
    if clash:
        raise ConfigError(f"build.layer_precisions pins {clash[0]!r} to fp16, but the {variant} variant keeps it in "
                          f"FP32 ({keep[clash[0]]}); remove that pin")
    for n, p in assign.items():
        if p == "fp32":
            keep.setdefault(n, "build.layer_precisions: fp32")
    return {"matched": matched, "pinned": assign, "skipped": [],
            "applied_as": f"typed ONNX: fp32 pins kept in FP32 with Casts; fp16 pins are FP16 in the typed {variant} ONNX"}


def plan_fp16(onnx_path: Path, cfg: Any, out_dir: Path, route: tuple[str, str], calib_dir: Optional[Path] = None,
              calib_data: Optional[Path] = None) -> Fp16Plan:
    """The fp16 variant of `onnx_path` for `route` = (typed | flag, why): the nodes kept in
    FP32 (build.fp16's ops and globs, and what leaves FP16's range by the calibrate stage's
    maxima.json in `calib_dir`), and on the typed route the FP16 ONNX written into `out_dir`."""
    from ..onnx_utils import load_onnx
    from .fp16 import keep_fp32_nodes

    kind, why = route
    if kind not in FP16_ROUTES:
        raise BackendError(f"fp16 route {kind!r} is not one of {', '.join(FP16_ROUTES)}")
    maxima, maxima_from = _maxima(Path(onnx_path), cfg, calib_dir, calib_data)
    model = load_onnx(onnx_path)  # once: the keep list, the pins and the conversion read it
    keep = keep_fp32_nodes(Path(onnx_path), cfg.build.fp16, maxima, where=maxima_from, model=model)
    if kind == "flag":
        return Fp16Plan(kind, why, keep, maxima_from)
    nodes = [n.name for n in model.graph.node]
    pins = typed_layer_pins(nodes, cfg.build.layer_precisions, keep) if cfg.build.layer_precisions else None
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    out = Path(out_dir) / FP16_ONNX
    info = write_fp16_onnx(Path(onnx_path), keep, out, model=model)
    casts = tuple(info.pop("added_casts"))
    return Fp16Plan(kind, why, keep, maxima_from, onnx=out, typed_onnx=info, pins=pins, added_casts=casts)
