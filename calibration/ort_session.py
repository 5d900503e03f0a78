"""The one place onnxruntime CPU sessions are made, so every Q/DQ model runs with the same
INT8 semantics on every CPU.

TensorRT runs a Q/DQ network with INT8 products accumulated in 32 bits. onnxruntime, left
to itself, fuses DequantizeLinear -> Conv/MatMul/Gemm -> QuantizeLinear into its own integer
kernels; on x86 CPUs without VNNI those kernels multiply u8 x s8 pairs with `vpmaddubsw`,
whose 16-bit pair sums saturate (255 * 127 * 2 > 32767), so the answer depends on the CPU
that ran it. Sessions here run in one of two modes:

- ``exact`` (the default): onnxruntime's Q/DQ transformers are off
  (``session.disable_quant_qdq = 1``): every QuantizeLinear/DequantizeLinear is computed as
  the ONNX operator says, and the float operator between them runs in float32. Constant
  DequantizeLinear nodes of weights are folded into float weights, whose values are exactly
  ``q * scale``. The result is the Q/DQ model's own arithmetic, the same on every CPU up to
  float32 rounding, which is what stands for TensorRT.
- ``fused``: onnxruntime's integer kernels; fast, exact only on CPUs whose kernels do not
  saturate (VNNI, AMX, ARM dot-product). Use it only where speed is the point and exactness
  is not claimed, and say so in the report (``describe(mode)``).

`cpu_features()` names the instruction-set features that decide this (recorded in every
report's device field)."""

from __future__ import annotations

import functools
import os
import platform
from pathlib import Path
from typing import Any, Mapping, Optional, Union

from .errors import CalibrationError

EXACT = "exact"
FUSED = "fused"
MODES = (EXACT, FUSED)

# ONNX ops that mean onnxruntime replaced float arithmetic by its integer kernels.
INTEGER_KERNELS = frozenset({
    "QLinearConv", "QLinearMatMul", "MatMulInteger", "ConvInteger", "QLinearAdd", "QLinearMul",
    "QLinearAveragePool", "QLinearGlobalAveragePool", "QLinearConcat", "QLinearSigmoid", "QLinearLeakyRelu",
    "QLinearSoftmax", "QGemm", "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "QLinearWhere", "QLinearReduceMean",
    "QLinearConvTranspose",
})

_LEVELS = {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED",
           "all": "ORT_ENABLE_ALL"}
_INLINE_LIMIT = 2_000_000_000  # protobuf's 2 GiB: larger models are loaded from a file

Model = Union[str, Path, bytes, Any]  # a path, serialized bytes, or an onnx.ModelProto


def describe(mode: str) -> str:
    """One line for reports: what the INT8 arithmetic of a session in `mode` is."""
    if mode == EXACT:
        return ("exact Q/DQ semantics: dequantize -> float32 op -> quantize (onnxruntime's QDQ fusion off, "
                "session.disable_quant_qdq=1); independent of the CPU's integer kernels")
    return ("onnxruntime's fused integer kernels (QDQ fusion on): fast, but saturates 16-bit pair sums on x86 "
            f"CPUs without VNNI; this CPU: {cpu_summary()}")


def session_options(
    *,
    mode: str = EXACT,
    threads: Optional[int] = None,
    level: str = "all",
    optimized_path: Union[str, Path, None] = None,
    config: Optional[Mapping[str, Any]] = None,
) -> Any:
    """onnxruntime SessionOptions for a CPU session (see the module docstring for `mode`).
    `config`: SessionOptions attributes, or session config entries (keys with a dot)."""
    import onnxruntime as ort

    if mode not in MODES:
        raise CalibrationError(f"unknown onnxruntime INT8 mode '{mode}'; choose one of {', '.join(MODES)}")
    if level not in _LEVELS:
        raise CalibrationError(f"unknown onnxruntime optimization level '{level}'; choose one of {', '.join(_LEVELS)}")
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, _LEVELS[level])
    so.add_session_config_entry("session.disable_quant_qdq", "1" if mode == EXACT else "0")
    if threads:
        so.intra_op_num_threads = int(threads)
    if optimized_path is not None:
        so.optimized_model_filepath = str(optimized_path)
    for key, value in (config or {}).items():
        if "." in key:
            if key == "session.disable_quant_qdq" and str(value) != ("1" if mode == EXACT else "0"):
                raise CalibrationError(f"session config {key}={value} contradicts mode '{mode}'; pass mode='fused' "
                                       "for onnxruntime's integer kernels")
            so.add_session_config_entry(key, str(value))
        else:
            setattr(so, key, value)
    return so


def make_session(
    model: Model,
    *,
    mode: str = EXACT,
    threads: Optional[int] = None,
    level: str = "all",
    optimized_path: Union[str, Path, None] = None,
    config: Optional[Mapping[str, Any]] = None,
    what: Optional[str] = None,
    error: type = CalibrationError,
    failure: str = "onnxruntime cannot load it",
) -> Any:
    """A CPU InferenceSession of `model`; a model onnxruntime cannot load raises `error`:
    one line, `what` (default: the path), `failure`, and onnxruntime's reason."""
    import onnxruntime as ort

    so = session_options(mode=mode, threads=threads, level=level, optimized_path=optimized_path, config=config)
    if isinstance(model, (str, Path)):
        source: Any = str(model)
        label = what or str(model)
        if not Path(model).is_file():
            raise error(f"{label}: ONNX file not found")
    elif isinstance(model, bytes):
        source, label = model, what or "the model"
    else:
        label = what or "the model"
        # Serialized once (protobuf's ByteSize() serializes too: 0.05 s of a ResNet-18's
        # session); past protobuf's 2 GiB it raises, and the model goes through a file.
        from google.protobuf.message import EncodeError

        try:
            source = model.SerializeToString()
        except (EncodeError, ValueError):
            source = None
        if source is None or len(source) >= _INLINE_LIMIT:
            del source
            return _session_from_file(model, so, f"{label}: {failure}", error)
    try:
        return ort.InferenceSession(source, sess_options=so, providers=["CPUExecutionProvider"])
    except Exception as e:
        msg = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise error(f"{label}: {failure} ({msg})") from None


def _session_from_file(model: Any, so: Any, what: str, error: type) -> Any:
    import tempfile

    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory(prefix="trtpipe-ort-") as tmp:  # > 2 GiB: external data
        path = Path(tmp) / "model.onnx"
        onnx.save_model(model, str(path), save_as_external_data=True, location="model.onnx.data")
        try:
            return ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])
        except Exception as e:
            msg = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
            raise error(f"{what} ({msg})") from None


# --------------------------------------------------------------------------- the CPU


_X86_FLAGS = ("avx2", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8", "amx_tile")
_ARM_FLAGS = ("asimddp", "i8mm", "sve")


@functools.lru_cache(maxsize=1)
def cpu_features() -> dict[str, Any]:
    """The CPU's model and the instruction-set features that decide onnxruntime's integer
    kernels: {'model', 'machine', 'flags': [...], 'int8_dot': bool}. `int8_dot` is whether
    the CPU has an int8 dot-product instruction that accumulates in 32 bits (VNNI, AMX,
    ARM dot-product): without it onnxruntime's fused u8 x s8 kernels saturate."""
    machine = platform.machine()
    model, flags = "", set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip().lower()
                if key in ("model name", "cpu model", "hardware") and not model:
                    model = value.strip()
                elif key in ("flags", "features") and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    if not model:
        model = platform.processor() or machine
    wanted = _ARM_FLAGS if machine.lower() in ("aarch64", "arm64") else _X86_FLAGS
    have = [f for f in wanted if f in flags]
    if machine.lower() in ("arm64",) and not flags:  # macOS: no /proc/cpuinfo; Apple cores have dotprod
        have = ["asimddp"]
    int8_dot = any(f in have for f in ("avx512_vnni", "avx_vnni", "amx_int8", "asimddp"))
    return {"model": model, "machine": machine, "cores": os.cpu_count(), "flags": have, "int8_dot": int8_dot}


def cpu_summary() -> str:
    """One line: the CPU model and its int8-relevant flags."""
    c = cpu_features()
    flags = " ".join(c["flags"]) or "none of " + " ".join(_X86_FLAGS if "86" in c["machine"] else _ARM_FLAGS)
    return f"{c['model']} ({c['machine']}, {c['cores']} cores; {flags}; int8 dot-product: {'yes' if c['int8_dot'] else 'no'})"
