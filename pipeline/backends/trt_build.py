"""TensorRT build helpers: what this TensorRT's API has (`trt_api`, the one place that
detects removed APIs), the INT8 route, network creation flags, builder options
(optimization level, preview features), ONNX parsing with errors that name the node, the
timing cache, build progress, and the engine inspector. Each takes the `tensorrt` module as
an argument, so nothing here imports it at module level."""

from __future__ import annotations

import contextlib
import json
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

from ..errors import BackendError, ConfigError
from ..fileio import write_bytes
from ..log import get_logger as trtpipe_logger
from ..runtime.trt_common import capture, get_logger, trt_version


# -- what this TensorRT has ------------------------------------------------------------------
@dataclass(frozen=True)
class TrtApi:
    """The parts of TensorRT's Python API that changed between 8.6, 10 and 11. Built once per
    build by `trt_api`; the build path asks this object, never the module, whether a removed
    API exists."""

    version: str
    major: int
    explicit_batch: bool  # NetworkDefinitionCreationFlag.EXPLICIT_BATCH (required on 8.x, ignored on 10, gone in 11)
    strongly_typed: bool  # NetworkDefinitionCreationFlag.STRONGLY_TYPED (TensorRT >= 10)
    precision_flags: bool  # BuilderFlag.FP16 / INT8 (gone in 11)
    precision_constraints: bool  # OBEY_PRECISION_CONSTRAINTS, ILayer.precision, set_output_type (gone in 11)
    implicit_int8: bool  # IInt8EntropyCalibrator2, config.int8_calibrator, set_calibration_profile, caches (gone in 11)
    tf32_flag: bool  # BuilderFlag.TF32
    preview_features: tuple[str, ...]  # the PreviewFeature enum's members

    @property
    def typed_builds(self) -> bool:
        """Every typed ONNX (the FP32 export, the FP16 ONNX, Q/DQ) builds as a strongly typed network (>= 10)."""
        return self.strongly_typed and self.major >= 10

    @property
    def implicit_deprecated(self) -> bool:
        return self.implicit_int8 and self.major >= 10

    def describe(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("explicit_batch", "strongly_typed", "precision_flags",
                                             "precision_constraints", "implicit_int8")}


def trt_api(trt: Any) -> TrtApi:
    """What `trt` (the tensorrt module) has, from its version and its enums' members."""
    major = trt_version(trt)[0]
    net = getattr(trt, "NetworkDefinitionCreationFlag", None)
    flag = getattr(trt, "BuilderFlag", None)
    preview = getattr(trt, "PreviewFeature", None)
    weak = major < 11  # TensorRT 11 removed weak typing whatever a module claims
    return TrtApi(
        version=str(trt.__version__),
        major=major,
        explicit_batch=hasattr(net, "EXPLICIT_BATCH"),
        strongly_typed=hasattr(net, "STRONGLY_TYPED"),
        precision_flags=weak and hasattr(flag, "FP16") and hasattr(flag, "INT8"),
        precision_constraints=weak and hasattr(flag, "OBEY_PRECISION_CONSTRAINTS"),
        implicit_int8=weak and hasattr(trt, "IInt8EntropyCalibrator2"),
        tf32_flag=hasattr(flag, "TF32"),
        preview_features=tuple(getattr(preview, "__members__", {}) if preview is not None else ()),
    )


class ImplicitInt8Unavailable(BackendError):
    """build.int8_route: implicit asked of a TensorRT without implicit INT8 (11 and later)."""


INT8_ROUTES = ("auto", "implicit", "explicit")


def resolve_int8_route(api: TrtApi, requested: str) -> tuple[str, str]:
    """("implicit" | "explicit", why) for `build.int8_route`. auto: the design card's route,
    TensorRT's IInt8EntropyCalibrator2 (or the calibrate stage's exact cache), where this
    TensorRT has it (8.6, 10); the calibrate stage's Q/DQ ONNX, strongly typed, where it does not (11)."""
    if requested not in INT8_ROUTES:
        raise ConfigError(f"build.int8_route: {requested!r} is not one of {', '.join(INT8_ROUTES)}")
    if requested == "explicit":
        return "explicit", "build.int8_route: explicit (the calibrate stage's Q/DQ ONNX)"
    if requested == "implicit":
        if not api.implicit_int8:
            raise ImplicitInt8Unavailable(
                f"build.int8_route: implicit needs BuilderFlag.INT8 and IInt8EntropyCalibrator2, which TensorRT "
                f"{api.version} removed; set build.int8_route: explicit (or auto) to build the calibrate stage's "
                "Q/DQ ONNX")
        return "implicit", "build.int8_route: implicit"
    if api.implicit_int8:
        return "implicit", (f"build.int8_route: auto: TensorRT {api.version} has IInt8EntropyCalibrator2, the route the "
                            "design card asks for (calibrator or the calibrate stage's exact cache)")
    return "explicit", (f"build.int8_route: auto: TensorRT {api.version} has no implicit INT8 (removed in 11); "
                        "building the calibrate stage's Q/DQ ONNX strongly typed")


FP16_SOURCES = ("auto", "typed_onnx", "flag")


def resolve_fp16_route(api: TrtApi, source: str) -> tuple[str, str]:
    """("typed" | "flag", why) for `build.fp16.source`. typed: the FP16 ONNX (FP16 initializers,
    Casts around the nodes kept in FP32), built strongly typed on >= 10 and with the FP16 flag
    and FP32 pins on 8.6; flag: BuilderFlag.FP16 on the FP32 ONNX (gone in 11); auto: typed
    where builds are strongly typed, the flag on 8.6."""
    if source not in FP16_SOURCES:
        raise ConfigError(f"build.fp16.source: {source!r} is not one of {', '.join(FP16_SOURCES)}")
    if source == "flag":
        if not api.precision_flags:
            raise ConfigError(f"build.fp16.source: flag needs BuilderFlag.FP16, which TensorRT {api.version} removed "
                              "(strongly typed only); set build.fp16.source: typed_onnx (or auto)")
        return "flag", ("build.fp16.source: flag (BuilderFlag.FP16 on the FP32 ONNX" +
                        ("; deprecated since TensorRT 10, removed in 11)" if api.major >= 10 else ")"))
    if source == "typed_onnx":
        return "typed", "build.fp16.source: typed_onnx"
    if api.typed_builds:
        return "typed", (f"build.fp16.source: auto: TensorRT {api.version} builds the typed FP16 ONNX strongly typed")
    return "flag", (f"build.fp16.source: auto: TensorRT {api.version} has no strongly typed networks: BuilderFlag.FP16 "
                    "on the FP32 ONNX (build.fp16.source: typed_onnx builds the FP16 ONNX with the flag and FP32 pins)")


# -- network ------------------------------------------------------------------------------
def network_flags(trt: Any, strongly_typed: bool = False) -> tuple[int, list[str]]:
    """EXPLICIT_BATCH only where the enum still has it (required on 8.x, ignored on 10,
    absent on 11); STRONGLY_TYPED when asked and present (TensorRT >= 10)."""
    api = trt_api(trt)
    enum = trt.NetworkDefinitionCreationFlag
    flags, names = 0, []
    if api.explicit_batch:
        flags |= 1 << int(enum.EXPLICIT_BATCH)
        names.append("EXPLICIT_BATCH")
    if strongly_typed:
        if not api.strongly_typed:
            raise BackendError(f"TensorRT {trt.__version__} has no strongly typed networks (needs TensorRT >= 10)")
        flags |= 1 << int(enum.STRONGLY_TYPED)
        names.append("STRONGLY_TYPED")
    return flags, names


# -- builder options ------------------------------------------------------------------------
def _feature_key(name: str) -> str:
    """'faster_dynamic_shapes_0805', 'FASTER_DYNAMIC_SHAPES_0805' and trtexec's
    'fasterDynamicShapes0805' all name the same preview feature."""
    return "".join(ch for ch in name.lower() if ch.isalnum())


# Preview features of one TensorRT version that a later one dropped (tests/backends/trt_names.py).
RETIRED_PREVIEW_FEATURES = {
    "fasterdynamicshapes0805": "dropped in TensorRT 10.0, where its behaviour is the default",
    "disableexternaltacticsourcesforcore0805": "dropped in TensorRT 10.0",
    "profilesharing0806": "dropped in TensorRT 11, where its behaviour is the default",
    "multideviceruntime1016": "only in TensorRT 10.16",
}


HARDWARE_COMPATIBILITY = ("none", "ampere_plus")  # build.hardware_compatibility


def apply_hardware_compatibility(trt: Any, config: Any, level: Optional[str]) -> dict[str, Any]:
    """``build.hardware_compatibility``: ampere_plus sets ``HardwareCompatibilityLevel.AMPERE_PLUS``
    (an engine that runs on every GPU of compute capability 8.0 and later, with the same TensorRT);
    none (or None) leaves TensorRT's default, an engine for the building GPU's compute capability.
    Returns {"hardware_compatibility": the level the config holds afterwards, lower case} where this
    TensorRT has the setting (8.6 and later), else {}; ampere_plus asked of a TensorRT without it is a
    ConfigError naming the version."""
    if level is not None and level not in HARDWARE_COMPATIBILITY:
        raise ConfigError(f"build.hardware_compatibility: {level!r} is not one of {', '.join(HARDWARE_COMPATIBILITY)}")
    enum = getattr(trt, "HardwareCompatibilityLevel", None)
    members = dict(getattr(enum, "__members__", {})) if enum is not None else {}
    has = "AMPERE_PLUS" in members and hasattr(config, "hardware_compatibility_level")
    if level == "ampere_plus":
        if not has:
            raise ConfigError(f"build.hardware_compatibility: ampere_plus needs trt.HardwareCompatibilityLevel "
                              f"(TensorRT >= 8.6), which TensorRT {trt.__version__} does not have; set it to none "
                              "(an engine for this GPU only) or build with TensorRT >= 8.6")
        config.hardware_compatibility_level = members["AMPERE_PLUS"]
    if not has:
        return {}
    held = config.hardware_compatibility_level
    return {"hardware_compatibility": str(getattr(held, "name", held)).lower()}


def apply_builder_options(trt: Any, config: Any, optimization_level: Optional[int],
                          preview_features: dict[str, bool],
                          hardware_compatibility: Optional[str] = None) -> dict[str, Any]:
    """Set ``builder_optimization_level``, preview features and the hardware compatibility level
    (`apply_hardware_compatibility`) on ``config``; returns what the config holds afterwards
    (every preview feature this TensorRT knows, on or off; the hardware compatibility level)."""
    out: dict[str, Any] = apply_hardware_compatibility(trt, config, hardware_compatibility)
    if optimization_level is not None:
        if not hasattr(config, "builder_optimization_level"):
            raise ConfigError(f"build.builder_optimization_level needs TensorRT >= 8.6 (this is {trt.__version__}); "
                              "remove it")
        config.builder_optimization_level = int(optimization_level)
    if hasattr(config, "builder_optimization_level"):
        out["builder_optimization_level"] = int(config.builder_optimization_level)
    enum = getattr(trt, "PreviewFeature", None)
    members = dict(getattr(enum, "__members__", {})) if enum is not None else {}
    known = {_feature_key(n): n for n in members}
    notes = []
    for name, on in preview_features.items():
        member = known.get(_feature_key(name))
        if member is None and _feature_key(name) in RETIRED_PREVIEW_FEATURES:
            notes.append(f"build.preview_features: {name} is not a preview feature of TensorRT {trt.__version__} "
                         f"({RETIRED_PREVIEW_FEATURES[_feature_key(name)]}); not set")
            continue
        if member is None:
            raise ConfigError(f"build.preview_features: TensorRT {trt.__version__} has no preview feature {name!r}; "
                              f"it has {', '.join(sorted(n.lower() for n in members)) or 'none'}")
        config.set_preview_feature(members[member], bool(on))
    if notes:
        out["notes"] = notes
    if members:
        out["preview_features"] = {n.lower(): bool(config.get_preview_feature(f)) for n, f in members.items()}
    return out


def _onnx_nodes(onnx_path: Path) -> list[tuple[str, str]]:
    try:
        import onnx

        model = onnx.load(str(onnx_path), load_external_data=False)
        return [(n.name, n.op_type) for n in model.graph.node]
    except Exception:
        return []


def parser_error_message(trt: Any, parser: Any, onnx_path: Path, logged: list[str]) -> str:
    nodes: Optional[list[tuple[str, str]]] = None
    parts = []
    for i in range(parser.num_errors):
        err = parser.get_error(i)
        idx = int(err.node())
        name = err.node_name() if hasattr(err, "node_name") else ""  # TensorRT >= 10
        op = err.node_operator() if hasattr(err, "node_operator") else ""
        if idx >= 0 and (not name or not op):
            nodes = nodes if nodes is not None else _onnx_nodes(onnx_path)
            if idx < len(nodes):
                name, op = name or nodes[idx][0], op or nodes[idx][1]
        where = f"node {idx} '{name or '<unnamed>'}' (op {op or '?'})" if idx >= 0 else "the model"
        desc = str(err.desc())
        if "misaligns with the input kernel shape" in desc:
            desc += (" (TensorRT's parser reads the kernel size from the Conv's kernel_shape attribute when the "
                     "weights come through DequantizeLinear: add kernel_shape to the node)")
        parts.append(f"{where}: {desc}")
    if not parts:
        parts = logged[-3:] or ["no error message from the parser"]
    return (
        f"{onnx_path}: TensorRT {trt.__version__}'s ONNX parser rejected {'; '.join(parts)}. "
        "Change that part of the model (another op or opset at export), or give TensorRT a plugin for the op"
    )


def parse_onnx(trt: Any, network: Any, onnx_path: Path) -> Any:
    """Parse `onnx_path` into `network`; returns the parser (keep it alive until the
    build is done: it owns the weights). Errors become BackendError naming the node."""
    parser = trt.OnnxParser(network, get_logger())
    with capture(quiet=True) as cap:
        ok = parser.parse_from_file(str(onnx_path))
    if not ok:
        raise BackendError(parser_error_message(trt, parser, onnx_path, cap.errors()))
    return parser


# -- timing cache -------------------------------------------------------------------------------
class TimingCache:
    """The build's timing cache: loaded from `path` if it exists, saved back (merged with
    whatever another build wrote meanwhile) atomically after the build."""

    def __init__(self, path: Optional[Path]) -> None:
        self.path = Path(path) if path else None
        self.info: dict[str, Any] = {"path": str(self.path) if self.path else None, "loaded_bytes": 0}

    def attach(self, trt: Any, config: Any) -> None:
        data = b""
        if self.path is not None and self.path.is_file():
            data = self.path.read_bytes()
        # TensorRT 8.6 logs "Myelin error from unknown graph ... The timing cache will not be used!" while
        # reading the Myelin part of a cache it wrote itself, yet keeps using the rest (a warm FP32 ResNet-50
        # rebuild took 17 s instead of 43 s, adding no entries): record those messages instead of printing them.
        # Myelin takes those layers because of preview feature faster_dynamic_shapes_0805; with it off
        # (build.preview_features) the FP32 rebuild took 10.7 s (bench/results/timing_cache_speedup_fp32.json).
        with capture(quiet=True) as cap:
            cache = config.create_timing_cache(data) if data else None
            ok = cache is not None and config.set_timing_cache(cache, False)
        if cap.errors():
            self.info["load_messages"] = cap.errors()[:4]
        if data and not ok:
            self.info["rejected"] = "cache from another TensorRT version or GPU; starting an empty one"
        if not ok:
            cache = config.create_timing_cache(b"")
            config.set_timing_cache(cache, False)
            data = b""
        self.info["loaded_bytes"] = len(data)
        self.info["warm"] = bool(data)
        self.info["keys_before"] = _num_keys(cache)

    def save(self, config: Any) -> None:
        cache = config.get_timing_cache()
        if cache is None:
            return
        self.info["keys_after"] = _num_keys(cache)
        if self.path is None:
            return
        if self.path.is_file():  # another build may have added entries since we loaded
            with capture(quiet=True):
                other = config.create_timing_cache(self.path.read_bytes())
                if other is not None:
                    cache.combine(other, True)
        data = bytes(cache.serialize())
        write_bytes(self.path, data)
        self.info["saved_bytes"] = len(data)
        self.info["new_bytes"] = len(data) - self.info["loaded_bytes"]


def _num_keys(cache: Any) -> Optional[int]:
    query = getattr(cache, "queryKeys", None)  # TensorRT >= 10 (the binding's name; there is no query_keys)
    if cache is None or query is None:
        return None
    try:
        return len(query())
    except Exception:
        return None


# -- progress --------------------------------------------------------------------------------
def _tqdm_monitor(trt: Any) -> Any:
    from ..log import progress_bar

    class _Monitor(trt.IProgressMonitor):  # type: ignore[misc, valid-type]
        def __init__(self) -> None:
            trt.IProgressMonitor.__init__(self)
            self.bars: dict[str, Any] = {}

        def phase_start(self, phase_name: str, parent_phase: Optional[str], num_steps: int) -> None:
            depth = 0
            p = parent_phase
            while p and p in self.bars:
                depth += 1
                p = getattr(self.bars[p], "_parent", None)
            bar = progress_bar(total=num_steps, desc=phase_name, position=depth)
            bar._parent = parent_phase
            self.bars[phase_name] = bar

        def step_complete(self, phase_name: str, step: int) -> bool:
            bar = self.bars.get(phase_name)
            if bar is not None:
                bar.update(step + 1 - bar.n)
            return True  # False would cancel the build

        def phase_finish(self, phase_name: str) -> None:
            bar = self.bars.pop(phase_name, None)
            if bar is not None:
                bar.close()

    return _Monitor()


@contextlib.contextmanager
def build_progress(trt: Any, config: Any, label: str, interval_s: float = 15.0) -> Iterator[str]:
    """Progress while building: TensorRT's IProgressMonitor with tqdm bars where it
    exists (TensorRT >= 10), else a heartbeat line with the elapsed seconds."""
    if hasattr(trt, "IProgressMonitor") and hasattr(config, "progress_monitor"):
        monitor = _tqdm_monitor(trt)
        config.progress_monitor = monitor
        try:
            yield "IProgressMonitor (tqdm)"
        finally:
            for bar in list(monitor.bars.values()):
                bar.close()
        return
    stop = threading.Event()
    t0 = time.monotonic()

    def beat() -> None:
        while not stop.wait(interval_s):
            trtpipe_logger(__name__).info(f"building {label}: {time.monotonic() - t0:.0f} s elapsed")

    thread = threading.Thread(target=beat, name="trt-build-heartbeat", daemon=True)
    thread.start()
    try:
        yield f"heartbeat every {interval_s:g} s"
    finally:
        stop.set()
        thread.join()


# -- inspector ---------------------------------------------------------------------------------
def engine_layers(trt: Any, serialized: bytes, opt_shapes: Optional[dict[str, list[int]]] = None) -> dict[str, Any]:
    """The engine inspector's layer information (ProfilingVerbosity.DETAILED at build) as JSON data.
    With `opt_shapes` the inspector is given a context at those input shapes, so that each tensor's
    "Format/Datatype" is filled in (with dynamic shapes TensorRT prints "N/A due to dynamic shapes")."""
    runtime = trt.Runtime(get_logger())
    engine = runtime.deserialize_cuda_engine(serialized)
    if engine is None:
        raise BackendError("the engine just built does not deserialize; cannot inspect its layers")
    inspector = engine.create_engine_inspector()
    context = None
    if opt_shapes:
        context = engine.create_execution_context()
        if context is not None and all(context.set_input_shape(n, d) for n, d in opt_shapes.items()):
            inspector.execution_context = context
    text = inspector.get_engine_information(trt.LayerInformationFormat.JSON)
    data = json.loads(text, strict=False)  # TensorRT 8.6 leaves raw control characters inside strings
    del inspector, context, engine, runtime
    return data


_KINDS = (("FP32", "FP32"), ("FP16", "FP16"), ("INT8", "INT8"), ("Int8", "INT8"), ("Int32", "INT32"),
          ("Bool", "BOOL"), ("FP8", "FP8"), ("Float", "FP32"), ("Half", "FP16"))


_TACTIC_KINDS = (("i8i8", "INT8"), ("i8f32", "INT8"), ("f16f16", "FP16"), ("h16", "FP16"), ("f32f32", "FP32"))


def layer_precision(layer: dict[str, Any]) -> str:
    """FP32 / FP16 / INT8 / ... of an engine layer: its first output's format when TensorRT
    printed one (not with dynamic shapes on 8.6), else its weights' type, else the data types
    in its kernel (tactic) name, else "other"."""
    outs = layer.get("Outputs") or []
    out0 = outs[0] if outs and isinstance(outs[0], dict) else {}
    # 8.6/10 print one "Format/Datatype" text; 11 splits it into "Format" and "Datatype"
    fmt = str(out0.get("Format/Datatype") or out0.get("Datatype") or "")
    weights = layer.get("Weights", {}).get("Type", "") if isinstance(layer.get("Weights"), dict) else ""
    for text in (fmt, weights):
        for needle, kind in _KINDS:
            if needle in text:
                return kind
    tactic = str(layer.get("TacticName", "")).lower()
    return next((kind for needle, kind in _TACTIC_KINDS if needle in tactic), "other")


def layer_summary(layers: Any) -> dict[str, Any]:
    """Count engine layers by precision (see `layer_precision`)."""
    counts: dict[str, int] = {}
    listed = layers if isinstance(layers, list) else layers.get("Layers", [])  # a bare list of layers, or {"Layers": ...}
    entries = [ly for ly in listed if isinstance(ly, dict)]
    for layer in entries:
        kind = layer_precision(layer)
        counts[kind] = counts.get(kind, 0) + 1
    return {"engine_layers": len(entries), "by_output_type": counts}
