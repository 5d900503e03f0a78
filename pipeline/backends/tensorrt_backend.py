"""The `tensorrt` backend: builds FP32 / FP16 / INT8 engines from the exported ONNX and
loads them as `TrtRunner`s.

Optimization profiles: one per entry of `build.profiles` (min/opt/max for every dynamic
axis of every input; pipeline.profiles), or the batch range of `build.profile`.

FP16: the FP16 flag, with the nodes pipeline.backends.fp16 names (reductions, and what
leaves fp16's range on calibration data) pinned to FP32 (precision constraints, TensorRT
< 11; on 11 the build says it cannot pin them).

INT8 has two routes (build.int8_route):
- implicit: BuilderFlag.INT8 with ranges from `build.calibration_source`:
  `cache` (the calibrate stage's cache, completed with the tensors TensorRT's parser adds:
  pipeline.backends.trt_cache), `tensorrt` (TensorRT's own IInt8EntropyCalibrator2 /
  IInt8MinMaxCalibrator fed the same calibration batches), or `auto` (the cache when its
  header names this TensorRT and calibrator, else TensorRT's calibrator, saying why).
  Deprecated in TensorRT 10, removed in 11: refused there with a pointer to explicit.
- explicit: the Q/DQ ONNX written by `calibrate` (calib_dir/model.qdq.onnx), strongly
  typed on TensorRT >= 10, with the INT8 flag (and FP16 for the float layers) on 8.x.

Side files written into the staging folder: model.engine, layers.json (the engine
inspector's layer information), calibration.cache (implicit INT8: the cache the engine
was built from).
"""

from __future__ import annotations

import contextlib
import fnmatch
import sys
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np

from ..config import PRECISIONS
from ..errors import BackendError, ConfigError, DataError, ModelError
from ..fileio import project_path, write_bytes, write_json
from ..profiles import config_profiles, onnx_inputs
from ..runtime.cuda_device import device_info
from ..runtime.trt_common import capture, get_logger, require_tensorrt, trt_version
from .base import Backend, BuildRequest, BuildResult, Runner
from .trt_build import (
    TimingCache,
    apply_builder_options,
    build_progress,
    engine_layers,
    layer_summary,
    network_flags,
    parse_onnx,
)
from .trt_layers import apply_layer_precisions

ENGINE_FILE = "model.engine"
LAYERS_FILE = "layers.json"
CACHE_FILE = "calibration.cache"
QDQ_FILE = "model.qdq.onnx"
ALGORITHMS = {"entropy2": "EntropyCalibration2", "minmax": "MinMaxCalibration"}


def _log(msg: str) -> None:
    print(f"[trtpipe] {msg}", file=sys.stderr, flush=True)


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
        from ..runtime.trt_runner import TrtRunner, manifest_from_build_info

        return TrtRunner(artifact, memory=self.memory, manifest=manifest_from_build_info(build_info))

    # -- build ---------------------------------------------------------------------------------
    def build(self, req: BuildRequest) -> BuildResult:
        trt = require_tensorrt()
        major = trt_version(trt)[0]
        cfg = req.config.build
        if req.precision not in PRECISIONS:
            raise ConfigError(f"unknown precision {req.precision!r}; choose one of {', '.join(PRECISIONS)}")
        int8 = req.precision == "int8"
        explicit = int8 and cfg.int8_route == "explicit"
        if int8 and not explicit and major >= 11:
            raise BackendError(
                f"TensorRT {trt.__version__} removed implicit INT8 (BuilderFlag.INT8 with IInt8EntropyCalibrator2); "
                "set build.int8_route: explicit to build the Q/DQ ONNX written by `trtpipe calibrate`"
            )
        if int8 and not explicit and major >= 10:
            _log(f"TensorRT {trt.__version__} deprecates implicit INT8 calibration; build.int8_route: explicit is the "
                 "route that keeps working on TensorRT 11")
        onnx_path = self._onnx_for(req, explicit)
        profiles = config_profiles(onnx_inputs(onnx_path), cfg, onnx_path)  # cheap checks before the GPU
        strongly_typed = explicit and major >= 10 and hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED")
        if strongly_typed and cfg.layer_precisions:
            raise ConfigError("build.layer_precisions cannot apply to a strongly typed (explicit Q/DQ) build: the types "
                              "come from the ONNX; remove it or use int8_route: implicit")
        keep = self._fp16_keep(req) if req.precision == "fp16" else {}
        out_dir = Path(req.out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        dev = device_info(0)
        t_start = time.monotonic()

        builder = trt.Builder(get_logger())
        flags, net_flag_names = network_flags(trt, strongly_typed)
        network = builder.create_network(flags)
        parser = parse_onnx(trt, network, onnx_path)
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(cfg.workspace_mb) << 20)
        config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
        if req.precision == "fp16" or (int8 and not strongly_typed and cfg.int8_float_fallback == "fp16"):
            config.set_flag(trt.BuilderFlag.FP16)  # int8: layers without int8 kernels run in fp16, not fp32
        if not cfg.tf32 and hasattr(trt.BuilderFlag, "TF32"):
            config.clear_flag(trt.BuilderFlag.TF32)  # trtexec --noTF32: FP32 layers in true FP32
        if int8 and not strongly_typed:
            config.set_flag(trt.BuilderFlag.INT8)
        pins = self._pin_layers(trt, network, config, cfg.layer_precisions, req.precision)
        kept = self._pin_fp32(trt, network, config, keep) if keep else {}
        options = apply_builder_options(trt, config, cfg.builder_optimization_level, cfg.preview_features)

        for shapes in profiles:
            profile = builder.create_optimization_profile()
            for name, s in shapes.items():
                profile.set_shape(name, s["min"], s["opt"], s["max"])
            config.add_optimization_profile(profile)

        calibrator = None
        calibration: Optional[dict[str, Any]] = None
        try:
            if int8 and not explicit:
                calibrator, cal_shapes, calibration = self._calibrator(trt, req, network, out_dir)
                config.int8_calibrator = calibrator
                cal_profile = builder.create_optimization_profile()
                for name, dims in cal_shapes.items():
                    cal_profile.set_shape(name, dims, dims, dims)
                config.set_calibration_profile(cal_profile)
            elif explicit:
                calibration = {"source": "calibrate stage Q/DQ ONNX", "route": "explicit", "onnx": QDQ_FILE,
                               "strongly_typed": strongly_typed}

            tcache = TimingCache(project_path(cfg.timing_cache, "build.timing_cache") if cfg.timing_cache else None)
            tcache.attach(trt, config)
            label = f"{req.config.model.name} {req.precision} engine"
            _log(f"building {label} from {onnx_path} (TensorRT {trt.__version__}, {dev['gpu']})")
            activate = calibrator._mem.activate() if calibrator is not None else contextlib.nullcontext()
            with build_progress(trt, config, label, self.heartbeat_s) as progress_how, activate, capture() as cap:
                t0 = time.monotonic()
                serialized = builder.build_serialized_network(network, config)
                build_seconds = time.monotonic() - t0
            if calibrator is not None:
                calibrator.raise_if_failed()
            if serialized is None:
                msgs = cap.errors()[-5:] or ["no error message"]
                raise BackendError(f"{onnx_path}: TensorRT {trt.__version__} failed to build the {req.precision} engine: "
                                   + " | ".join(msgs))
            data = bytes(serialized)
            del serialized
            tcache.save(config)
            tcache.info["messages"] = cap.matching("timing cache")[:5]
            write_bytes(out_dir / ENGINE_FILE, data)
            if calibrator is not None and calibration is not None:
                calibration.update(self._calibration_info(calibrator, out_dir, cap))
            details: dict[str, Any] = {
                "tensorrt": trt.__version__,
                "onnx": str(onnx_path),
                "int8_route": cfg.int8_route if int8 else None,
                "network_flags": net_flag_names,
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
    @staticmethod
    def _onnx_for(req: BuildRequest, explicit: bool) -> Path:
        if not explicit:
            return Path(req.onnx_path)
        if req.calib_dir is None:
            raise BackendError("build.int8_route: explicit builds the Q/DQ ONNX from `trtpipe calibrate`, "
                               "but no calibration folder was given; run the calibrate stage first")
        path = Path(req.calib_dir) / QDQ_FILE
        if not path.is_file():
            raise ModelError(f"{path}: Q/DQ ONNX not found; build.int8_route: explicit needs it: run `trtpipe calibrate`")
        return path

    @staticmethod
    def _fp16_keep(req: BuildRequest) -> dict[str, str]:
        from ..data import load_samples
        from .fp16 import keep_fp32_nodes, range_check_batches

        cfg = req.config
        batches = None
        if cfg.build.fp16.range_check and req.calib_data is not None:
            samples = load_samples(req.calib_data, cfg.model.inputs, cfg.data.labels_key, "calibration data")
            batches = range_check_batches(samples.x)
        return keep_fp32_nodes(req.onnx_path, cfg.build.fp16, batches)

    @staticmethod
    def _pin_fp32(trt: Any, network: Any, config: Any, keep: dict[str, str]) -> dict[str, str]:
        """Pin the layers named after `keep`'s ONNX nodes to FP32; returns those pinned."""
        if not hasattr(trt.BuilderFlag, "OBEY_PRECISION_CONSTRAINTS"):
            _log(f"TensorRT {trt.__version__} has no layer precision constraints: {len(keep)} node(s) that overflow "
                 "in fp16 cannot be pinned to fp32; use the explicit route with Cast nodes")
            return {}
        floats = (trt.float32, trt.float16)
        pinned = {}
        for i in range(network.num_layers):
            layer = network.get_layer(i)
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
        algorithm = ALGORITHMS[cfg.build.int8_calibrator]
        read_from, why = self._stage_cache(trt, req, network, algorithm)
        inputs = [network.get_input(i) for i in range(network.num_inputs)]
        dtypes = {t.name: np.dtype(trt.nptype(t.dtype)) for t in inputs}
        c = cfg.calibration
        batches: Any = []
        num_batches = 0
        if req.calib_data is not None:
            # The same samples, in the same batches, as the calibrate stage's own calibration.
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
                raise DataError("the calibration profile needs the calibration samples to fix the dynamic axes: "
                                "pass --calib-data")
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
