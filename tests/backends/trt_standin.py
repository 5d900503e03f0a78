"""A stand-in `tensorrt` module per TensorRT version, for CPU tests of the build path.

`make_trt("11.1.0")` returns a module object whose top-level names, enum members and
class attributes are exactly those the real bindings of that version export
(tests/backends/trt_names.py, read from NVIDIA/TensorRT's python/src sources at v8.6.1,
v10.16 and v11.1 — v11.1 is the newest 11.x tag in the snapshot read): anything else raises
AttributeError, as the real module does, and touching a missing attribute of a builder,
config, network, layer, tensor or parser is also recorded (`trt._rec.missing`), so a test
sees it even where the code catches the error.

Builder, BuilderConfig, Network, OnnxParser and the optimization profiles record what the
code asked for (`trt._rec`: network creation flags, builder flags set/cleared, profiles,
calibration profile and calibrator, layer precisions and output types, preview features, the
hardware compatibility level, the parsed ONNX's Cast / Q/DQ nodes and FP16 initializers).
`build_serialized_network` enforces the rules TensorRT documents for strongly typed networks (no precision flags, no
layer precisions or output types, no calibrator: an error and None, as TensorRT does),
runs an attached INT8 calibrator the way TensorRT does (read_calibration_cache, else
get_batch until None, then write_calibration_cache), and returns bytes the stand-in
Runtime turns into an engine whose inspector prints the version's layer JSON (8.6/10:
"Format/Datatype"; 11: separate "Format" and "Datatype", as the issue describes and the
v11.1 trt-perf-analysis skill's reader (.agents/skills/trt-perf-analysis/scripts/trt_perf/data.py)
accepts — not read from a real TensorRT 11 engine).

Install with `monkeypatch.setitem(sys.modules, "tensorrt", make_trt("10.16.0"))`."""

from __future__ import annotations

import enum
import json
import types
from collections import Counter
from typing import Any, Optional

import numpy as np

from tests.backends.trt_names import NAMES

_NP = {"FLOAT": np.float32, "HALF": np.float16, "INT8": np.int8, "INT32": np.int32, "INT64": np.int64,
       "BOOL": np.bool_, "UINT8": np.uint8}
_ONNX_DT = {1: "FLOAT", 10: "HALF", 3: "INT8", 2: "UINT8", 6: "INT32", 7: "INT64", 9: "BOOL"}
_PRECISION_FLAGS = ("FP16", "INT8", "BF16", "FP8", "INT4", "FP4")


class Recorder:
    def __init__(self, version: str) -> None:
        self.version = version
        self.calls: list[str] = []
        self.missing: list[str] = []  # "IBuilderConfig.int8_calibrator": absent in this version, touched anyway
        self.network_flags: list[str] = []
        self.flags_set: list[str] = []
        self.flags_cleared: list[str] = []
        self.profiles: list[dict[str, tuple[list[int], list[int], list[int]]]] = []
        self.calibration_profile: Optional[dict[str, Any]] = None
        self.calibrator: Optional[str] = None
        self.layer_precision: dict[str, str] = {}
        self.output_types: dict[str, list[str]] = {}
        self.preview: dict[str, bool] = {}
        self.memory_pools: dict[str, int] = {}
        self.parsed: dict[str, Any] = {}
        self.build_errors: list[str] = []
        self.calibration: dict[str, Any] = {}
        self.hardware_compatibility: Optional[str] = None  # the level set on the builder config, if any
        # a test's stand-in for a build TensorRT refuses: called with the parsed ONNX's path, returns the error or None
        self.fail_build: Optional[Any] = None


def _bound(cls_name: str, names: list[str], rec: Recorder) -> type:
    """A base class that lets only `names` (the binding's public attributes) be read or set."""
    allowed = frozenset(names)

    class Bound:
        _binding = cls_name

        def __getattribute__(self, name: str) -> Any:
            if not name.startswith("_") and name not in allowed:
                rec.missing.append(f"{cls_name}.{name}")
                raise AttributeError(f"'tensorrt.{cls_name}' object has no attribute '{name}' (TensorRT {rec.version})")
            return object.__getattribute__(self, name)

        def __setattr__(self, name: str, value: Any) -> None:
            if not name.startswith("_") and name not in allowed:
                rec.missing.append(f"{cls_name}.{name}")
                raise AttributeError(f"'tensorrt.{cls_name}' object has no attribute '{name}' (TensorRT {rec.version})")
            object.__setattr__(self, name, value)

    Bound.__name__ = f"_{cls_name}Base"
    return Bound


def make_trt(version: str) -> types.ModuleType:
    """The stand-in module for `version` ("8.6.1", "10.16.0", "11.1.0": names of the nearest
    generated version with the same major)."""
    key = next(k for k in NAMES if k.split(".")[0] == version.split(".")[0])
    names = NAMES[key]
    exported = set(names["__module__"])
    rec = Recorder(version)
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version
    trt._rec = rec
    trt._names_from = key

    def enum_of(name: str) -> type:
        return enum.IntEnum(name, {m: i for i, m in enumerate(names.get(name, []))})

    for e in ("BuilderFlag", "NetworkDefinitionCreationFlag", "PreviewFeature", "MemoryPoolType", "ProfilingVerbosity",
              "LayerInformationFormat", "DataType", "LayerType"):
        setattr(trt, e, enum_of(e))
    if "HardwareCompatibilityLevel" in exported:  # 8.6 and later (NONE, AMPERE_PLUS; SAME_COMPUTE_CAPABILITY from 10)
        trt.HardwareCompatibilityLevel = enum_of("HardwareCompatibilityLevel")
    DT = trt.DataType
    for alias, member in (("float32", "FLOAT"), ("float16", "HALF"), ("int8", "INT8"), ("int32", "INT32"),
                          ("int64", "INT64"), ("bool", "BOOL"), ("uint8", "UINT8"), ("bfloat16", "BF16")):
        if member in DT.__members__ and alias in exported:
            setattr(trt, alias, DT[member])

    def nptype(dt: Any) -> Any:
        return _NP[dt.name]

    trt.nptype = nptype
    severity = enum.IntEnum("Severity", {"INTERNAL_ERROR": 0, "ERROR": 1, "WARNING": 2, "INFO": 3, "VERBOSE": 4})

    class ILogger:
        Severity = severity

        def __init__(self) -> None:
            pass

        def log(self, sev: Any, msg: str) -> None:
            pass

    for sev in severity:
        setattr(ILogger, sev.name, sev)
    trt.ILogger = ILogger

    class IProgressMonitor:
        def __init__(self) -> None:
            pass

    if "IProgressMonitor" in exported:
        trt.IProgressMonitor = IProgressMonitor

    for cal in ("IInt8Calibrator", "IInt8EntropyCalibrator2", "IInt8MinMaxCalibrator"):
        if cal in exported:
            setattr(trt, cal, type(cal, (), {"__init__": lambda self: None}))

    # -- network -------------------------------------------------------------------------------
    class ITensor(_bound("ITensor", names["ITensor"], rec)):
        def __init__(self, name: str, dtype: Any, shape: list[int]) -> None:
            object.__setattr__(self, "_name", name)
            object.__setattr__(self, "_dtype", dtype)
            object.__setattr__(self, "_shape", shape)

        name = property(lambda self: self._name)
        dtype = property(lambda self: self._dtype)
        shape = property(lambda self: self._shape)
        is_execution_tensor = property(lambda self: True)

    class ILayer(_bound("ILayer", names["ILayer"], rec)):
        def __init__(self, name: str, op: str, inputs: list[Any], outputs: list[Any]) -> None:
            object.__setattr__(self, "_name", name)
            object.__setattr__(self, "_op", op)
            object.__setattr__(self, "_inputs", inputs)
            object.__setattr__(self, "_outputs", outputs)
            object.__setattr__(self, "_precision", None)
            object.__setattr__(self, "_out_types", {})

        name = property(lambda self: self._name)
        num_inputs = property(lambda self: len(self._inputs))
        num_outputs = property(lambda self: len(self._outputs))

        @property
        def type(self) -> Any:
            lt = trt.LayerType
            kind = {"Conv": "CONVOLUTION", "Constant": "CONSTANT", "Reshape": "SHUFFLE", "Flatten": "SHUFFLE",
                    "Identity": "IDENTITY", "Cast": "CAST", "QuantizeLinear": "QUANTIZE",
                    "DequantizeLinear": "DEQUANTIZE", "Relu": "ACTIVATION", "Softmax": "SOFTMAX"}.get(self._op, "ELEMENTWISE")
            return lt[kind] if kind in lt.__members__ else lt(0)

        def get_input(self, j: int) -> Any:
            return self._inputs[j]

        def get_output(self, j: int) -> Any:
            return self._outputs[j]

        @property
        def precision(self) -> Any:
            return self._precision

        @precision.setter
        def precision(self, dt: Any) -> None:
            object.__setattr__(self, "_precision", dt)
            rec.layer_precision[self._name] = dt.name

        def set_output_type(self, j: int, dt: Any) -> None:
            self._out_types[j] = dt
            rec.output_types.setdefault(self._name, []).append(dt.name)

    class INetworkDefinition(_bound("INetworkDefinition", names["INetworkDefinition"], rec)):
        def __init__(self, flags: int) -> None:
            object.__setattr__(self, "_flags", flags)
            object.__setattr__(self, "_layers", [])
            object.__setattr__(self, "_inputs", [])
            object.__setattr__(self, "_outputs", [])

        num_layers = property(lambda self: len(self._layers))
        num_inputs = property(lambda self: len(self._inputs))
        num_outputs = property(lambda self: len(self._outputs))

        def get_layer(self, i: int) -> Any:
            return self._layers[i]

        def get_input(self, i: int) -> Any:
            return self._inputs[i]

        def get_output(self, i: int) -> Any:
            return self._outputs[i]

        def _strongly_typed(self) -> bool:
            enum_ = trt.NetworkDefinitionCreationFlag
            return "STRONGLY_TYPED" in enum_.__members__ and bool(self._flags & (1 << int(enum_.STRONGLY_TYPED)))

    class ParserError(_bound("ParserError", names["ParserError"], rec)):
        pass

    class OnnxParser(_bound("OnnxParser", names["OnnxParser"], rec)):
        def __init__(self, network: Any, logger: Any) -> None:
            object.__setattr__(self, "_network", network)
            rec.calls.append("OnnxParser")

        num_errors = property(lambda self: 0)

        def parse_from_file(self, path: str) -> bool:
            import onnx

            model = onnx.shape_inference.infer_shapes(onnx.load(path))
            g = model.graph
            types_ = {v.name: v.type.tensor_type for v in list(g.input) + list(g.output) + list(g.value_info)}
            inits = {i.name: i for i in g.initializer}
            tensors: dict[str, Any] = {}

            def tensor(name: str) -> Any:
                if name not in tensors:
                    if name in inits:
                        dt, shape = _ONNX_DT.get(inits[name].data_type, "FLOAT"), list(inits[name].dims)
                    else:
                        t = types_.get(name)
                        dt = _ONNX_DT.get(t.elem_type, "FLOAT") if t is not None else "FLOAT"
                        shape = [d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim] if t else []
                    tensors[name] = ITensor(name, DT[dt], shape)
                return tensors[name]

            net = self._network
            for i in g.input:
                if i.name not in inits:
                    net._inputs.append(tensor(i.name))
            for n in g.node:
                net._layers.append(ILayer(n.name, n.op_type, [tensor(x) for x in n.input if x],
                                          [tensor(x) for x in n.output]))
            for o in g.output:
                net._outputs.append(tensor(o.name))
            ops = Counter(n.op_type for n in g.node)
            cast_to = Counter(_ONNX_DT.get(a.i, str(a.i)) for n in g.node if n.op_type == "Cast"
                              for a in n.attribute if a.name == "to")
            rec.parsed = {"path": path, "ops": dict(ops), "casts": ops.get("Cast", 0), "cast_to": dict(cast_to),
                          "quantize": ops.get("QuantizeLinear", 0), "dequantize": ops.get("DequantizeLinear", 0),
                          "fp16_initializers": sum(1 for i in g.initializer if i.data_type == 10),
                          "fp32_initializers": sum(1 for i in g.initializer if i.data_type == 1),
                          "input_dtypes": {i.name: _ONNX_DT.get(i.type.tensor_type.elem_type) for i in g.input
                                           if i.name not in inits},
                          "output_dtypes": {o.name: _ONNX_DT.get(o.type.tensor_type.elem_type) for o in g.output}}
            rec.calls.append("OnnxParser.parse_from_file")
            return True

    # -- builder ---------------------------------------------------------------------------------
    class IOptimizationProfile(_bound("IOptimizationProfile", names["IOptimizationProfile"], rec)):
        def __init__(self) -> None:
            object.__setattr__(self, "_shapes", {})

        def set_shape(self, name: str, mn: Any, opt: Any, mx: Any) -> None:
            self._shapes[name] = (list(mn), list(opt), list(mx))

    class ITimingCache(_bound("ITimingCache", names["ITimingCache"], rec)):
        def serialize(self) -> bytes:
            return b"standin-timing-cache"

        def combine(self, other: Any, ignore_mismatch: bool) -> bool:
            return True

    class IBuilderConfig(_bound("IBuilderConfig", names["IBuilderConfig"], rec)):
        def __init__(self) -> None:
            object.__setattr__(self, "_flags", {"TF32"} if "TF32" in trt.BuilderFlag.__members__ else set())
            object.__setattr__(self, "_preview", {})
            object.__setattr__(self, "_profiles", [])
            object.__setattr__(self, "_cal_profile", None)
            object.__setattr__(self, "_calibrator", None)
            object.__setattr__(self, "_cache", None)
            object.__setattr__(self, "_opt_level", 3)
            object.__setattr__(self, "_hw_level", getattr(trt, "HardwareCompatibilityLevel", {"NONE": None})["NONE"])

        def set_memory_pool_limit(self, pool: Any, size: int) -> None:
            rec.memory_pools[pool.name] = int(size)

        def set_flag(self, flag: Any) -> None:
            self._flags.add(flag.name)
            rec.flags_set.append(flag.name)

        def clear_flag(self, flag: Any) -> None:
            self._flags.discard(flag.name)
            rec.flags_cleared.append(flag.name)

        def get_flag(self, flag: Any) -> bool:
            return flag.name in self._flags

        def add_optimization_profile(self, profile: Any) -> int:
            self._profiles.append(profile)
            rec.profiles.append(dict(profile._shapes))
            return len(self._profiles) - 1

        def set_calibration_profile(self, profile: Any) -> bool:
            object.__setattr__(self, "_cal_profile", profile)
            rec.calibration_profile = dict(profile._shapes)
            return True

        @property
        def int8_calibrator(self) -> Any:
            return self._calibrator

        @int8_calibrator.setter
        def int8_calibrator(self, cal: Any) -> None:
            object.__setattr__(self, "_calibrator", cal)
            rec.calibrator = type(cal).__name__

        def create_timing_cache(self, data: bytes) -> Any:
            return ITimingCache()

        def set_timing_cache(self, cache: Any, ignore_mismatch: bool) -> bool:
            object.__setattr__(self, "_cache", cache)
            return True

        def get_timing_cache(self) -> Any:
            return self._cache

        def set_preview_feature(self, feature: Any, on: bool) -> None:
            self._preview[feature.name] = bool(on)
            rec.preview[feature.name] = bool(on)

        def get_preview_feature(self, feature: Any) -> bool:
            return self._preview.get(feature.name, False)

        @property
        def builder_optimization_level(self) -> int:
            return self._opt_level

        @builder_optimization_level.setter
        def builder_optimization_level(self, level: int) -> None:
            object.__setattr__(self, "_opt_level", int(level))

        @property
        def hardware_compatibility_level(self) -> Any:
            return self._hw_level

        @hardware_compatibility_level.setter
        def hardware_compatibility_level(self, level: Any) -> None:
            if not isinstance(level, trt.HardwareCompatibilityLevel):
                raise TypeError(f"hardware_compatibility_level takes a tensorrt.HardwareCompatibilityLevel, not {level!r}")
            object.__setattr__(self, "_hw_level", level)
            rec.hardware_compatibility = level.name

    class Builder(_bound("Builder", names["Builder"], rec)):
        def __init__(self, logger: Any) -> None:
            object.__setattr__(self, "_logger", logger)

        def create_network(self, flags: int = 0) -> Any:
            enum_ = trt.NetworkDefinitionCreationFlag
            rec.network_flags = [m for m, v in enum_.__members__.items() if flags & (1 << int(v))]
            rec.calls.append("Builder.create_network")
            return INetworkDefinition(flags)

        def create_builder_config(self) -> Any:
            return IBuilderConfig()

        def create_optimization_profile(self) -> Any:
            return IOptimizationProfile()

        def _error(self, msg: str) -> None:
            rec.build_errors.append(msg)
            self._logger.log(severity.ERROR, msg)

        def build_serialized_network(self, network: Any, config: Any) -> Optional[bytes]:
            rec.calls.append("Builder.build_serialized_network")
            typed = network._strongly_typed()
            set_precision = [f for f in _PRECISION_FLAGS if f in config._flags]
            pinned = [ly.name for ly in network._layers if ly._precision is not None or ly._out_types]
            if typed and set_precision:
                self._error(f"IBuilderConfig::validate: precision flags {set_precision} are not allowed with a "
                            "strongly typed network")
                return None
            if typed and pinned:
                self._error(f"layer precisions/output types set on a strongly typed network ({pinned[:3]})")
                return None
            if typed and config._calibrator is not None:
                self._error("INT8 calibrator set on a strongly typed network")
                return None
            if config._calibrator is not None and "INT8" not in config._flags:
                self._error("calibrator given without BuilderFlag.INT8")
                return None
            refused = rec.fail_build(rec.parsed.get("path")) if rec.fail_build is not None else None
            if refused:
                self._error(refused)
                return None
            if config._calibrator is not None:
                self._calibrate(network, config._calibrator)
            layers = []
            for ly in network._layers:
                out = ly._outputs[0] if ly._outputs else None
                dt = out.dtype.name if out is not None else "FLOAT"
                if not typed and dt == "FLOAT":
                    if ly._precision is not None:
                        dt = ly._precision.name
                    elif "INT8" in config._flags and ly._op in ("Conv", "Gemm", "MatMul"):
                        dt = "INT8"
                    elif "FP16" in config._flags:
                        dt = "HALF"
                layers.append({"name": ly.name, "op": ly._op, "dtype": dt})
            return json.dumps({"version": version, "strongly_typed": typed, "layers": layers}).encode()

        def _calibrate(self, network: Any, cal: Any) -> None:
            cache = cal.read_calibration_cache()
            fed = 0
            if not cache:
                in_names = [t.name for t in network._inputs]
                while cal.get_batch(in_names) is not None:
                    fed += 1
                lines = [f"TRT-{''.join(version.split('.')[:3])}-{getattr(cal, 'algorithm', 'EntropyCalibration2')}"]
                lines += [f"{t.name}: 3c010a14" for t in network._inputs]
                cal.write_calibration_cache("\n".join(lines).encode() + b"\n")
            rec.calibration = {"cache_read": bool(cache), "batches_fed": fed}

    class IExecutionContext(_bound("IExecutionContext", names.get("IExecutionContext", []), rec)):
        def set_input_shape(self, name: str, dims: Any) -> bool:
            return True

    class EngineInspector(_bound("EngineInspector", names["EngineInspector"], rec)):
        def __init__(self, engine: dict[str, Any]) -> None:
            object.__setattr__(self, "_engine", engine)

        def get_engine_information(self, fmt: Any) -> str:
            words = {"FLOAT": "Float", "HALF": "Half", "INT8": "Int8", "INT32": "Int32", "INT64": "Int64", "BOOL": "Bool"}
            out = []
            for ly in self._engine["layers"]:
                dt = words.get(ly["dtype"], ly["dtype"])
                if version.split(".")[0] == "11" or int(version.split(".")[0]) > 11:
                    tensor = {"Name": ly["name"] + "_out", "Format": "Row major linear", "Datatype": dt}
                else:
                    tensor = {"Name": ly["name"] + "_out", "Format/Datatype": f"Row major linear {dt}"}
                out.append({"Name": ly["name"], "LayerType": ly["op"], "Outputs": [tensor]})
            return json.dumps({"Layers": out, "Bindings": []})

    class ICudaEngine(_bound("ICudaEngine", names["ICudaEngine"], rec)):
        def __init__(self, data: dict[str, Any]) -> None:
            object.__setattr__(self, "_data", data)

        def create_engine_inspector(self) -> Any:
            return EngineInspector(self._data)

        def create_execution_context(self) -> Any:
            return IExecutionContext()

    class Runtime(_bound("Runtime", names["Runtime"], rec)):
        def __init__(self, logger: Any) -> None:
            pass

        def deserialize_cuda_engine(self, data: bytes) -> Any:
            return ICudaEngine(json.loads(bytes(data)))

    for cls in (Builder, IBuilderConfig, INetworkDefinition, ILayer, ITensor, OnnxParser, ParserError,
                IOptimizationProfile, ITimingCache, Runtime, ICudaEngine, EngineInspector, IExecutionContext):
        public = cls._binding
        if public in exported:
            setattr(trt, public, cls)
    return trt


def install(monkeypatch: Any, version: str) -> types.ModuleType:
    """Put the stand-in for `version` in sys.modules['tensorrt'] for one test, with a fresh
    process-wide logger and calibrator classes (both are made from the tensorrt module)."""
    import sys

    from pipeline.backends import trt_calibrator
    from pipeline.runtime import trt_common

    trt = make_trt(version)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setattr(trt_common, "_LOGGER", None)
    monkeypatch.setattr(trt_calibrator, "_CLASSES", {})
    return trt


__all__ = ["make_trt", "install", "Recorder"]
