"""The `tensorrt` backend: builds FP32 / FP16 / INT8 engines from the exported ONNX and
loads them as `TrtRunner`s.

Optimization profiles: one per entry of `build.profiles` (min/opt/max for every dynamic
axis of every input; pipeline.profiles), or the batch range of `build.profile`.

By TensorRT version (pipeline.backends.trt_build.trt_api detects what the API has; build.json
says what the build did: route, strongly_typed, flags, notes):
- 8.x: weakly typed, as before: FP16/INT8 flags, precision constraints, calibrators.
- 10: every typed ONNX (the FP32 export, the FP16 ONNX, the Q/DQ ONNX) strongly typed, no
  precision flags; implicit INT8 still builds (weakly typed), with a deprecation note.
- 11+: strongly typed only; implicit INT8 is refused in one line.

FP16: on 8.x the FP16 flag, with the nodes pipeline.backends.fp16 names (reductions, and what
leaves fp16's range on calibration data) pinned to FP32 (precision constraints); on >= 10
the typed FP16 ONNX (pipeline.backends.trt_typed: FP16 initializers, those nodes left in FP32
with Casts around them), model.fp16.onnx in the build folder, built strongly typed.

INT8 has two routes (build.int8_route; `auto`, the default, takes implicit where TensorRT
has it (8.6, 10) and explicit on 11, saying why):
- implicit: BuilderFlag.INT8 with ranges from `build.calibration_source`:
  `cache` (the calibrate stage's cache, completed with the tensors TensorRT's parser adds:
  pipeline.backends.trt_cache), `tensorrt` (TensorRT's own IInt8EntropyCalibrator2 /
  IInt8MinMaxCalibrator fed the same calibration batches), or `auto` (the cache when its
  header names this TensorRT and calibrator, else TensorRT's calibrator, saying why).
  Deprecated in TensorRT 10, removed in 11: refused there with a pointer to explicit.
- explicit: the Q/DQ ONNX written by `calibrate` (calib_dir/model.qdq.onnx), strongly
  typed on TensorRT >= 10, with the INT8 flag (and FP16 for the float layers) on 8.x.

build.layer_precisions: precision constraints on a weakly typed build; on a strongly typed
fp16 build its fp32 pins join the nodes the FP16 ONNX keeps in FP32 (a typed-ONNX edit);
any other strongly typed build refuses it in one line naming what to use.

Side files written into the staging folder: model.engine, layers.json (the engine
inspector's layer information), calibration.cache (implicit INT8: the cache the engine
was built from).
"""

from __future__ import annotations

import contextlib
import fnmatch
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np

from calibration.cache import CALIBRATOR_ALGORITHM

from ..config import PRECISIONS
from ..errors import BackendError, ConfigError, DataError, ModelError
from ..fileio import CACHE_FILE, QDQ_FILE, project_path, sha256_file, write_bytes, write_json
from ..profiles import config_profiles, onnx_inputs
from ..runtime.cuda_device import device_info
from ..runtime.trt_common import capture, get_logger, require_tensorrt
from .base import Backend, BuildRequest, BuildResult, Runner
from .trt_build import (
    TimingCache,
    TrtApi,
    apply_builder_options,
    build_progress,
    engine_layers,
    layer_summary,
    network_flags,
    parse_onnx,
    resolve_fp16_route,
    resolve_int8_route,
    trt_api,
)
from .trt_layers import apply_layer_precisions
from .trt_typed import FP16_ONNX, Fp16Plan, plan_fp16

ENGINE_FILE = "model.engine"
LAYERS_FILE = "layers.json"


def _log(msg: str, warning: bool = False) -> None:
    from ..log import get_logger as trtpipe_logger

    log = trtpipe_logger(__name__)
    (log.warning if warning else log.info)(msg)


def _tensor_names(messages: list[str]) -> list[str]:
    """The tensor each of TensorRT's "Missing scale and zero-point for tensor X, ..." names."""
    out = []
    for m in messages:
        head = m.split("for tensor ", 1)[-1]
        out.append(head.split(", expect", 1)[0].strip())
    return out


class TensorRTBackend(Backend):
    name = "tensorrt"

    def __init__(self, memory: str = "auto", progress: bool = True, heartbeat_s: float = 15.0) -> None:
        self.memory = memory
        self.progress = progress
        self.heartbeat_s = heartbeat_s

    def version(self) -> str:
        return str(require_tensorrt().__version__)

    def environment(self) -> dict[str, Any]:
        from ..runtime.cuda_memory import available

        v = self.version()
        return {"backend": self.name, "version": v, "tensorrt": v, "device": device_info(0),
                "cuda_memory": available()}

    def load(self, artifact: Path, build_info: dict[str, Any]) -> Runner:
        from ..compat import manifest_from_build_info, trt_runner

        return trt_runner(artifact, manifest=manifest_from_build_info(build_info), memory=self.memory)

    def fp16_route(self, cfg: Any) -> tuple[str, str]:
        """("typed" | "flag", why) of an fp16 build on this TensorRT (build.fp16.source)."""
        return resolve_fp16_route(trt_api(require_tensorrt()), cfg.build.fp16.source)

    def int8_typed(self, cfg: Any) -> Optional[str]:
        """A strongly typed explicit INT8 build with build.int8_float_fallback: fp16 builds the typed INT8 ONNX
        (no FP16 flag there: the float parts' FP16 comes from the ONNX); None elsewhere."""
        api = trt_api(require_tensorrt())
        if not api.typed_builds or cfg.build.int8_float_fallback != "fp16":
            return None
        if resolve_int8_route(api, cfg.build.int8_route)[0] != "explicit":
            return None
        return (f"build.int8_float_fallback: fp16 on a strongly typed TensorRT {api.version} build: the Q/DQ ONNX's "
                "float parts in FP16 as the ONNX's own types (the FP16 flag does this on 8.6)")

    # -- build ---------------------------------------------------------------------------------
    def build(self, req: BuildRequest) -> BuildResult:
        try:
            return self._build_once(req)
        except BackendError as e:
            retry = self._weights_float_retry(req, e)
            if retry is None:
                raise
            req2, key, note = retry
            _log(note, warning=True)
            res = self._build_once(req2)
            res.details["notes"].append(note)
            res.details["qdq_edit"][key] = {"note": note, "onnx": str(req2.qdq_onnx),
                                            "sha256": sha256_file(Path(req2.qdq_onnx))}
            return res

    # TensorRT 8.x internal assertions on Q/DQ weights (calibration/qdq_patterns.py), and what is rebuilt in float
    WEIGHT_ASSERTIONS = {"chooseHigherPrecision": ("Gemm",), "convertMyelinWeightsToFp32": ("MatMul", "Gemm")}

    def _weights_float_retry(self, req: BuildRequest, error: Exception) -> Optional[tuple[BuildRequest, str, str]]:
        """An explicit INT8 build that weakly typed TensorRT (8.x) stopped on one of WEIGHT_ASSERTIONS, with
        Q/DQ on those nodes' weights: the same Q/DQ ONNX with those weights in float (calibration.qdq_patterns),
        written beside the engine; (request, build.json qdq_edit key, note), else None."""
        from dataclasses import replace

        hit = next((k for k in self.WEIGHT_ASSERTIONS if k in str(error)), None)
        if req.precision != "int8" or req.qdq_onnx is not None or hit is None:
            return None
        trt = require_tensorrt()
        api = trt_api(trt)
        if api.typed_builds or resolve_int8_route(api, req.config.build.int8_route)[0] != "explicit":
            return None
        from calibration.qdq_patterns import weights_in_float

        from ..onnx_utils import load_onnx

        src = self._onnx_for(req, True)
        model = load_onnx(src, check=False)
        ops = self.WEIGHT_ASSERTIONS[hit]
        nodes = weights_in_float(model, ops)
        if not nodes:
            return None
        from calibration.onnx_io import save_model

        kind = ops[0].lower()
        out = Path(req.out_dir) / f"{src.stem}.{kind}_float.onnx"
        save_model(model, out)  # makes the folder
        note = (f"TensorRT {trt.__version__} could not build the Q/DQ on the weights of {len(nodes)} "
                f"{'/'.join(ops)} node(s) ({hit} assertion); built {out.name} instead: the same Q/DQ ONNX with those "
                f"weights in float, their inputs still INT8 ({', '.join(nodes[:3])}{' ...' if len(nodes) > 3 else ''})")
        return replace(req, qdq_onnx=out), f"{kind}_weights_in_float", note

    def _build_once(self, req: BuildRequest) -> BuildResult:
        trt = require_tensorrt()
        api = trt_api(trt)
        cfg = req.config.build
        if req.precision not in PRECISIONS:
            raise ConfigError(f"unknown precision {req.precision!r}; choose one of {', '.join(PRECISIONS)}")
        int8 = req.precision == "int8"
        route, route_why = resolve_int8_route(api, cfg.int8_route) if int8 else (None, None)
        explicit = route == "explicit"
        notes: list[str] = []
        if int8 and not explicit and api.implicit_deprecated:
            notes.append(f"TensorRT {trt.__version__} deprecates implicit INT8 (since 10.1) and TensorRT 11 removed it; "
                         "build.int8_route: explicit is the route that keeps working on TensorRT 11")
            _log(notes[-1])
        out_dir = Path(req.out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        fp16: Optional[Fp16Plan] = None
        if req.precision == "fp16":  # the build stage plans it (req.fp16); the library API gets the same plan here
            fp16 = req.fp16 or plan_fp16(req.onnx_path, req.config, out_dir, resolve_fp16_route(api, cfg.fp16.source),
                                         req.calib_dir, req.calib_data)
        # Strongly typed: every typed ONNX on TensorRT >= 10; implicit INT8 and the FP16 flag (10 only) stay weakly typed.
        strongly_typed = api.typed_builds and not (int8 and not explicit) and not (fp16 and fp16.route == "flag")
        onnx_path = fp16.onnx if fp16 and fp16.route == "typed" else self._onnx_for(req, explicit)
        profiles = config_profiles(onnx_inputs(onnx_path), cfg, onnx_path)  # cheap checks before the GPU
        qdq_edit: dict[str, Any] = {}
        if explicit and not strongly_typed:
            onnx_path, qdq_edit = self._avoid_bad_patterns(trt, onnx_path, out_dir)
            notes += [e["note"] for e in qdq_edit.values()]
        keep = dict(fp16.keep) if fp16 else {}
        typed_pins = self._typed_layer_precisions(api, req, fp16) if strongly_typed and cfg.layer_precisions else None
        typed_onnx = fp16.typed_onnx if fp16 else req.typed_onnx
        if fp16 is not None:
            notes.append(f"fp16: {fp16.why}")
            if fp16.route == "typed":
                how = (f"built strongly typed: TensorRT {trt.__version__} takes precision from the ONNX" if strongly_typed
                       else f"built with the FP16 flag, its {len(keep)} FP32 node(s) pinned to FP32 (TensorRT "
                            f"{trt.__version__} has no strongly typed networks)")
                notes.append(f"fp16: the typed FP16 ONNX ({FP16_ONNX}: FP16 initializers, {len(keep)} node(s) kept in "
                             f"FP32 with Casts) {how}")
        dev = device_info(0)
        t_start = time.monotonic()

        builder = trt.Builder(get_logger())
        network, parser, net_flag_names = self._network(trt, builder, onnx_path, strongly_typed)
        config, flags_set = self._config(trt, api, builder, req, strongly_typed)
        pins, kept = self._precisions(trt, api, network, config, req, strongly_typed, keep, typed_pins,
                                      skip=fp16.added_casts if fp16 else ())
        options = apply_builder_options(trt, config, cfg.builder_optimization_level, cfg.preview_features,
                                        cfg.hardware_compatibility)
        notes += options.pop("notes", [])

        self._add_profiles(builder, config, profiles)

        calibrator = None
        calibration: Optional[dict[str, Any]] = None
        try:
            if int8 and not explicit:
                calibrator, cal_shapes, calibration = self._calibrator(trt, req, network, out_dir)
                self._attach_calibrator(builder, config, calibrator, cal_shapes)
            elif explicit:
                calibration = self._explicit_calibration(trt, api, strongly_typed)
            if calibration is not None:
                calibration["route_why"] = route_why  # "why" stays the calibration source's own reason

            tcache = TimingCache(project_path(cfg.timing_cache, "build.timing_cache") if cfg.timing_cache else None)
            tcache.attach(trt, config)
            label = f"{req.config.model.name} {req.precision} engine"
            _log(f"building {label} from {onnx_path} (TensorRT {trt.__version__}, {dev['gpu']})")
            data, build_seconds, progress_how, cap = self._build_engine(trt, builder, network, config, calibrator, label,
                                                                        f"{onnx_path}", req.precision)
            tcache.save(config)
            tcache.info["messages"] = cap.matching("timing cache")[:5]
            write_bytes(out_dir / ENGINE_FILE, data)
            if calibrator is not None and calibration is not None:
                calibration.update(self._calibration_info(calibrator, out_dir, cap))
            details: dict[str, Any] = {
                "tensorrt": trt.__version__,
                "onnx": str(onnx_path),
                "int8_route": route,
                "int8_route_requested": cfg.int8_route if int8 else None,
                "int8_route_why": route_why,
                "strongly_typed": strongly_typed,
                "network_flags": net_flag_names,
                "precision_flags_set": flags_set,
                "typed_onnx": typed_onnx,
                "fp16": fp16.describe() if fp16 else None,
                "tensorrt_api": api.describe(),
                "notes": notes,
                "qdq_edit": qdq_edit,
                **options,
                "builder_seconds": round(build_seconds, 3),
                "total_seconds": round(time.monotonic() - t_start, 3),
                "timing_cache": tcache.info,
                "layer_precisions": pins,
                "progress": progress_how,
                "warnings": len(cap.warnings()),
                "missing_scale_warnings": len(cap.matching("missing scale")),
                "missing_scale_tensors": _tensor_names(cap.matching("missing scale"))[:20],
            }
            details.update(self._write_layers(trt, data, out_dir, {n: v["opt"] for n, v in profiles[0].items()}))
        finally:
            if calibrator is not None:
                calibrator.free()
            del parser
        _log(f"built {label}: {len(data) / 1e6:.1f} MB in {build_seconds:.1f} s")
        return BuildResult(
            artifact=ENGINE_FILE,
            flags=[n for n, f in trt.BuilderFlag.__members__.items() if config.get_flag(f)],
            profiles=[{n: {k: list(s[k]) for k in ("min", "opt", "max")} for n, s in p.items()} for p in profiles],
            workspace_mb=int(cfg.workspace_mb),
            calibration=calibration,
            kept_fp32=[f"{n}: {why}" for n, why in kept.items()],
            details=details,
        )

    # -- pieces ----------------------------------------------------------------------------------
    # -- the steps of build, in order: network, config, profiles, calibration, build, inspect (_write_layers) ---------
    @staticmethod
    def _network(trt: Any, builder: Any, onnx_path: Path, strongly_typed: bool) -> tuple[Any, Any, list[str]]:
        """(network, parser, network flag names): the ONNX parsed into a network of the right typing."""
        flags, net_flag_names = network_flags(trt, strongly_typed)
        network = builder.create_network(flags)
        parser = parse_onnx(trt, network, onnx_path)
        return network, parser, net_flag_names

    @staticmethod
    def _config(trt: Any, api: TrtApi, builder: Any, req: BuildRequest, strongly_typed: bool) -> tuple[Any, list[str]]:
        """(builder config, precision flags set): workspace, detailed profiling, and on a weakly typed build the
        FP16/INT8 flags that pick the precisions; TF32 off when build.tf32 is false."""
        cfg = req.config.build
        int8 = req.precision == "int8"
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(cfg.workspace_mb) << 20)
        config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
        flags_set: list[str] = []
        if not strongly_typed:  # weakly typed (8.x; implicit INT8 on 10): the builder flags pick the precisions
            if req.precision == "fp16" or (int8 and cfg.int8_float_fallback == "fp16"):
                config.set_flag(trt.BuilderFlag.FP16)  # int8: layers without int8 kernels run in fp16, not fp32
                flags_set.append("FP16")
            if int8:
                config.set_flag(trt.BuilderFlag.INT8)
                flags_set.append("INT8")
        if not cfg.tf32 and api.tf32_flag:
            config.clear_flag(trt.BuilderFlag.TF32)  # trtexec --noTF32: FP32 layers in true FP32
        return config, flags_set

    def _precisions(self, trt: Any, api: TrtApi, network: Any, config: Any, req: BuildRequest, strongly_typed: bool,
                    keep: dict[str, str], typed_pins: Optional[dict[str, Any]],
                    skip: Any = ()) -> tuple[Optional[dict], dict[str, str]]:
        """(layer pins, nodes kept in FP32): a typed build has them in its ONNX already; a weakly typed one pins
        build.layer_precisions and the FP16 keep-list on the network's layers (never the Casts of a typed FP16
        ONNX, `skip`: their output types are the types the ONNX asks for)."""
        if strongly_typed:
            return typed_pins, dict(keep)
        pins = self._pin_layers(trt, network, config, req.config.build.layer_precisions, req.precision)
        kept = self._pin_fp32(trt, api, network, config, keep, frozenset(skip)) if keep else {}
        return pins, kept

    @staticmethod
    def _add_profiles(builder: Any, config: Any, profiles: list[dict[str, dict[str, Any]]]) -> None:
        """One TensorRT optimization profile per entry of build.profiles."""
        for shapes in profiles:
            profile = builder.create_optimization_profile()
            for name, s in shapes.items():
                profile.set_shape(name, s["min"], s["opt"], s["max"])
            config.add_optimization_profile(profile)

    @staticmethod
    def _attach_calibrator(builder: Any, config: Any, calibrator: Any, cal_shapes: dict[str, Any]) -> None:
        """Implicit INT8: the calibrator, and a calibration profile fixed at the calibration data's shapes."""
        config.int8_calibrator = calibrator
        cal_profile = builder.create_optimization_profile()
        for name, dims in cal_shapes.items():
            cal_profile.set_shape(name, dims, dims, dims)
        config.set_calibration_profile(cal_profile)

    @staticmethod
    def _explicit_calibration(trt: Any, api: TrtApi, strongly_typed: bool) -> dict[str, Any]:
        """Explicit INT8: the ranges come from the Q/DQ ONNX (build.json's calibration section says so)."""
        calibration = {"source": "calibrate stage Q/DQ ONNX", "route": "explicit", "onnx": QDQ_FILE,
                       "strongly_typed": strongly_typed}
        if not api.implicit_int8:
            calibration["calibration_cache"] = (f"not read: the calibrate stage's {CACHE_FILE} is for TensorRT "
                                                f"< 11 (implicit INT8); TensorRT {trt.__version__} takes the "
                                                "ranges from the Q/DQ ONNX")
        return calibration

    def _build_engine(self, trt: Any, builder: Any, network: Any, config: Any, calibrator: Any, label: str,
                      onnx_name: str, precision: str) -> tuple[bytes, float, Any, Any]:
        """(engine bytes, builder seconds, how progress was shown, captured TensorRT messages); a failed build is
        a BackendError with TensorRT's last errors."""
        activate = calibrator._mem.activate() if calibrator is not None else contextlib.nullcontext()
        with build_progress(trt, config, label, self.heartbeat_s) as progress_how, activate, capture() as cap:
            t0 = time.monotonic()
            serialized = builder.build_serialized_network(network, config)
            build_seconds = time.monotonic() - t0
        if calibrator is not None:
            calibrator.raise_if_failed()
        if serialized is None:
            msgs = cap.errors()[-5:] or ["no error message"]
            raise BackendError(f"{onnx_name}: TensorRT {trt.__version__} failed to build the {precision} engine: "
                               + " | ".join(msgs))
        data = bytes(serialized)
        del serialized
        return data, build_seconds, progress_how, cap

    @staticmethod
    def _avoid_bad_patterns(trt: Any, onnx_path: Path, out_dir: Path) -> tuple[Path, dict[str, Any]]:
        """Weakly typed TensorRT (8.x) and a Q/DQ right after a float Conv's Clip/Relu, a pattern 8.6.0 built into
        wrong outputs here: the same Q/DQ ONNX with a Q/DQ of the same scale before the activation too
        (calibration.qdq_patterns.quantize_before_activation: the same integers in onnxruntime, and a float Conv
        ending in INT8, which 8.6.0 built right), written beside the engine; (the ONNX to build, {edit: record})."""
        from calibration.qdq_patterns import float_conv_activation_q, quantize_before_activation

        from ..onnx_utils import load_onnx

        model = load_onnx(onnx_path, check=False)
        found = float_conv_activation_q(model)
        if not found:
            return onnx_path, {}
        edited = quantize_before_activation(model)
        if not edited:
            msg = (f"{onnx_path.name} quantizes {len(found)} tensor(s) right after a float Conv's Clip/Relu (first: "
                   f"{found[0]}) with a zero point other than 0, which trtpipe cannot move; TensorRT 8.6.0 built that "
                   f"pattern into wrong outputs in trtpipe's measurements (docs/results.md): check evaluate's agreement, "
                   "or build INT8 with build.int8_route: auto (implicit on this TensorRT)")
            _log(msg, warning=True)
            return onnx_path, {"warning": {"note": f"warning: {msg}"}}
        from calibration.onnx_io import save_model

        out = Path(out_dir) / f"{onnx_path.stem}.preact_q.onnx"
        save_model(model, out)
        msg = (f"{onnx_path.name} quantizes {len(found)} tensor(s) right after a float Conv's Clip/Relu (first: "
               f"{found[0]}), a pattern TensorRT 8.6.0 built into wrong outputs (docs/results.md); built {out.name} "
               f"instead: the same Q/DQ with a Q/DQ of the same scale before the activation of {len(edited)} Conv(s), "
               f"the same integers in onnxruntime (TensorRT {trt.__version__})")
        _log(msg, warning=True)
        return out, {"quantize_before_activation": {"note": msg, "onnx": str(out), "sha256": sha256_file(out),
                                                    "conv_outputs": edited}}

    @staticmethod
    def _onnx_for(req: BuildRequest, explicit: bool) -> Path:
        if not explicit:
            return Path(req.onnx_path)
        if req.qdq_onnx is not None:
            return Path(req.qdq_onnx)
        if req.calib_dir is None:
            raise BackendError("build.int8_route: explicit builds the Q/DQ ONNX from `trtpipe calibrate`, "
                               "but no calibration folder was given; run the calibrate stage first")
        path = Path(req.calib_dir) / QDQ_FILE
        if not path.is_file():
            raise ModelError(f"{path}: Q/DQ ONNX not found; build.int8_route: explicit needs it: run `trtpipe calibrate`")
        return path

    @staticmethod
    def _typed_layer_precisions(api: TrtApi, req: BuildRequest, fp16: Optional[Fp16Plan]) -> Optional[dict[str, Any]]:
        """build.layer_precisions on a strongly typed build: on fp16, the FP32 Casts the fp16 plan wrote
        (trt_typed.typed_layer_pins); on any other precision a one-line refusal naming what to use."""
        if fp16 is not None:
            return fp16.pins
        if req.typed_onnx is not None and req.typed_onnx.get("layer_precisions") is not None:
            return req.typed_onnx["layer_precisions"]  # the typed INT8 ONNX: fp32 pins kept in FP32 with Casts
        raise ConfigError(
            f"build.layer_precisions cannot pin layers of a strongly typed TensorRT {api.version} {req.precision} "
            "build: the types come from the ONNX; for int8 they apply to the typed INT8 ONNX of "
            "build.int8_float_fallback: fp16 (the default), else use tune's result (build.int8_from_tune: true, Q/DQ "
            "removed on the kept layers) or calibration.exclude; for fp32 remove it (pin fp32 nodes in the fp16 "
            "variant)")

    @staticmethod
    def _pin_fp32(trt: Any, api: TrtApi, network: Any, config: Any, keep: dict[str, str],
                  skip: frozenset[str] = frozenset()) -> dict[str, str]:
        """Pin the layers named after `keep`'s ONNX nodes to FP32 (not the layers in `skip`); returns those pinned."""
        if not api.precision_constraints:
            _log(f"TensorRT {trt.__version__} has no layer precision constraints: {len(keep)} node(s) that overflow "
                 "in fp16 cannot be pinned to fp32; use the explicit route with Cast nodes")
            return {}
        floats = (trt.float32, trt.float16)
        pinned = {}
        for i in range(network.num_layers):
            layer = network.get_layer(i)
            if layer.name in skip:
                continue
            node = next((n for n in keep if layer.name == n or fnmatch.fnmatchcase(layer.name, f"{n}_*")), None)
            if node is None:
                continue
            outs = [j for j in range(layer.num_outputs) if layer.get_output(j).dtype in floats]
            if not outs:
                continue
            layer.precision = trt.float32
            for j in outs:
                layer.set_output_type(j, trt.float32)
            pinned[layer.name] = keep[node]
        if pinned:
            config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
            _log(f"fp16: {len(pinned)} layer(s) kept in fp32 (build.fp16): " + ", ".join(list(pinned)[:6]))
        return pinned

    @staticmethod
    def _pin_layers(trt: Any, network: Any, config: Any, patterns: dict[str, str], precision: str) -> Optional[dict]:
        if not patterns:
            return None
        pins = apply_layer_precisions(trt, network, patterns)
        wants_fp16 = any(p == "fp16" for p in pins["pinned"].values())
        if wants_fp16 and not config.get_flag(trt.BuilderFlag.FP16):
            if precision == "fp32":
                raise ConfigError("build.layer_precisions pins layers to fp16 in an fp32 build; TensorRT only runs fp16 "
                                  "kernels with the FP16 flag, which would let every layer use fp16: pin them in the "
                                  "fp16 or int8 build instead")
            config.set_flag(trt.BuilderFlag.FP16)
            pins["fp16_flag_added"] = True
        config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
        _log(f"layer precisions: {len(pins['pinned'])} layer(s) pinned: "
             + ", ".join(f"{k}={v}" for k, v in list(pins["pinned"].items())[:10]))
        return pins

    def _stage_cache(self, trt: Any, req: BuildRequest, network: Any, algorithm: str) -> tuple[Optional[Path], dict]:
        """The calibrate stage's cache, when `build.calibration_source` lets it be used: checked
        against this TensorRT and calibrator, completed against the network, written into the
        build folder. (None, why) when TensorRT's calibrator has to run."""
        from calibration.cache import read_cache, write_cache
        from calibration.errors import CacheMismatchError, CalibrationError

        source = req.config.build.calibration_source
        if source == "tensorrt":
            return None, {"why": "build.calibration_source: tensorrt"}
        if req.calib_dir is None or not (Path(req.calib_dir) / CACHE_FILE).is_file():
            if source == "cache":
                raise BackendError("build.calibration_source: cache needs the calibrate stage's calibration.cache "
                                   f"(--calib-dir, here {req.calib_dir}); run `trtpipe calibrate` first")
            _log("calibration: no calibrate stage cache given; TensorRT's own calibrator runs")
            return None, {"why": "no calibrate stage cache given"}
        stage_cache = Path(req.calib_dir) / CACHE_FILE
        try:
            cache = read_cache(stage_cache, expect_version=trt.__version__, expect_algorithm=algorithm)
        except CacheMismatchError as e:
            if source == "cache":
                raise CalibrationError(f"{e} (build.calibration_source: cache). Set calibration.tensorrt_version: "
                                       f"{trt.__version__} and re-run calibrate (dvc repro calibrate)") from None
            _log(f"calibration: the calibrate stage's cache is not for this TensorRT/calibrator; TensorRT's own "
                 f"calibrator runs instead ({e})")
            return None, {"why": f"stage cache not usable here: {e}"}
        from calibration.cache import check_scales, network_names

        check_scales(cache, stage_cache, network_names(req.onnx_path))  # NaN, Inf, <= 0, tensors the ONNX lacks
        scales = {k: float(v) for k, v in cache.scales.items()}
        from .trt_cache import complete_scales

        full, added = complete_scales(trt, network, scales)
        out = Path(req.out_dir) / CACHE_FILE
        write_cache(out, {k: np.float32(v) for k, v in full.items()}, trt.__version__, algorithm)
        return out, {"stage_cache": str(stage_cache), "stage_tensors": len(scales),
                     "added_for_network": {k: len(v) for k, v in added.items()},
                     "estimated": added.get("estimated", [])[:20]}

    def _calibrator(self, trt: Any, req: BuildRequest, network: Any, out_dir: Path) -> tuple[Any, dict, dict]:
        from ..data import calibration_batches, calibration_indices, load_samples
        from .trt_calibrator import make_calibrator

        cfg = req.config
        algorithm = CALIBRATOR_ALGORITHM[cfg.build.int8_calibrator]
        read_from, why = self._stage_cache(trt, req, network, algorithm)
        inputs = [network.get_input(i) for i in range(network.num_inputs)]
        dtypes = {t.name: np.dtype(trt.nptype(t.dtype)) for t in inputs}
        c = cfg.calibration
        batches: Any = []
        num_batches = 0
        if req.calib_data is not None and (read_from is None or Path(req.calib_data).is_file()):
            # The same samples, in the same batches, as the calibrate stage's own calibration (not read where
            # TensorRT takes the calibrate stage's cache and they are not there: it would not calibrate).
            samples = load_samples(req.calib_data, cfg.model.inputs, cfg.data.labels_key, "calibration data")
            indices = calibration_indices(len(samples), c.num_samples, c.seed)
            num_batches = len(indices) // c.batch_size
            batches = list(calibration_batches(samples.x, indices, c.batch_size, str(req.calib_data)))
            shapes = {t.name: [c.batch_size, *samples.x[t.name].shape[1:]] for t in inputs}
        elif read_from is None:
            raise DataError("implicit INT8 calibration with TensorRT's calibrator needs the prepared calibration "
                            "samples (calib.npz from `trtpipe prepare`): pass --calib-data")
        else:
            shapes = {t.name: [c.batch_size, *[int(d) for d in t.shape[1:]]] for t in inputs}
            if any(d < 0 for s in shapes.values() for d in s):
                # TensorRT reads the cache and does not calibrate: the calibration profile needs valid shapes only,
                # the build profile's opt shapes (batch: calibration.batch_size within the profile)
                first = config_profiles(onnx_inputs(req.onnx_path), cfg.build, req.onnx_path)[0]
                if any(t.name not in first for t in inputs):
                    raise DataError("the calibration profile needs the calibration samples to fix the dynamic axes: "
                                    "pass --calib-data")
                shapes = {t.name: [min(max(c.batch_size, first[t.name]["min"][0]), first[t.name]["max"][0]),
                                   *first[t.name]["opt"][1:]] for t in inputs}
        cal = make_calibrator(cfg.build.int8_calibrator, batches, out_dir / CACHE_FILE, batch_size=c.batch_size,
                              read_cache_from=read_from, memory=self.memory, progress=self.progress, log=_log,
                              dtypes=dtypes, num_batches=num_batches)
        info = {"route": "implicit", "requested": cfg.build.calibration_source, "algorithm": algorithm,
                "calibration_shapes": shapes, **why}
        return cal, shapes, info

    @staticmethod
    def _calibration_info(cal: Any, out_dir: Path, cap: Any) -> dict[str, Any]:
        cache_file = out_dir / CACHE_FILE
        header, tensors = None, None
        if cache_file.is_file():
            lines = cache_file.read_text(errors="replace").splitlines()
            header = lines[0].strip() if lines else None
            tensors = sum(1 for line in lines[1:] if line.strip())
        used_cache = bool(cal.cache_used) and cal.batches_fed == 0
        return {
            "source": "calibrate stage cache" if used_cache else "TensorRT calibrator on the calibration data",
            **cal.info(),
            "cache_file": CACHE_FILE if cache_file.is_file() else None,
            "cache_header": header,
            "cache_tensors": tensors,
            "tensors_without_scale": len(cap.matching("missing scale")),
        }

    @staticmethod
    def _write_layers(trt: Any, data: bytes, out_dir: Path, opt_shapes: dict[str, list[int]]) -> dict[str, Any]:
        try:
            layers = engine_layers(trt, data, opt_shapes)
        except Exception as e:  # the engine is fine; only the report is missing
            _log(f"could not write {LAYERS_FILE}: {e}")
            return {"layers_file": None, "layers_error": str(e)}
        write_json(out_dir / LAYERS_FILE, layers)
        return {"layers_file": LAYERS_FILE, **layer_summary(layers)}
