"""The `tensorrt` backend: builds FP32 / FP16 / INT8 engines from the exported ONNX and
loads them as `TrtRunner`s.

INT8 has two routes (build.int8_route):
- implicit: BuilderFlag.INT8 + TensorRT's own calibrator (IInt8EntropyCalibrator2, or
  IInt8MinMaxCalibrator) fed the prepared calibration samples, or reading the
  calibrate stage's cache (build.calibration_source: cache) when its header matches.
  Deprecated in TensorRT 10, removed in 11: refused there with a pointer to explicit.
- explicit: the Q/DQ ONNX written by `calibrate` (calib_dir/model.qdq.onnx), strongly
  typed on TensorRT >= 10, with the INT8 flag on 8.x.

Side files written into the staging folder: model.engine, layers.json (the engine
inspector's layer information), calibration.cache (implicit INT8).
"""

from __future__ import annotations

import contextlib
import sys
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np

from ..config import PRECISIONS
from ..errors import BackendError, ConfigError, DataError, ModelError
from ..fileio import sha256_bytes, write_bytes, write_json
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
from .trt_profiles import calibration_shapes, onnx_inputs, profile_shapes

ENGINE_FILE = "model.engine"
LAYERS_FILE = "layers.json"
CACHE_FILE = "calibration.cache"
QDQ_FILE = "model.qdq.onnx"


def _log(msg: str) -> None:
    print(f"[trtpipe] {msg}", file=sys.stderr, flush=True)


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
        shapes = profile_shapes(onnx_inputs(onnx_path), cfg.profile, onnx_path)  # cheap checks before the GPU
        strongly_typed = explicit and major >= 10 and hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED")
        if strongly_typed and cfg.layer_precisions:
            raise ConfigError("build.layer_precisions cannot apply to a strongly typed (explicit Q/DQ) build: the types "
                              "come from the ONNX; remove it or use int8_route: implicit")
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
        if req.precision == "fp16":
            config.set_flag(trt.BuilderFlag.FP16)
        if not cfg.tf32 and hasattr(trt.BuilderFlag, "TF32"):
            config.clear_flag(trt.BuilderFlag.TF32)  # trtexec --noTF32: FP32 layers in true FP32
        if int8 and not strongly_typed:
            config.set_flag(trt.BuilderFlag.INT8)
        pins = self._pin_layers(trt, network, config, cfg.layer_precisions, req.precision)
        options = apply_builder_options(trt, config, cfg.builder_optimization_level, cfg.preview_features)

        profile = builder.create_optimization_profile()
        for name, s in shapes.items():
            profile.set_shape(name, s["min"], s["opt"], s["max"])
        config.add_optimization_profile(profile)

        calibrator = None
        try:
            if int8 and not explicit:
                calibrator, cal_shapes = self._calibrator(req, shapes, out_dir)
                config.int8_calibrator = calibrator
                cal_profile = builder.create_optimization_profile()
                for name, dims in cal_shapes.items():
                    cal_profile.set_shape(name, dims, dims, dims)
                config.set_calibration_profile(cal_profile)

            tcache = TimingCache(Path(cfg.timing_cache) if cfg.timing_cache else None)
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
            info: dict[str, Any] = {
                "backend": self.name,
                "tensorrt": trt.__version__,
                "precision": req.precision,
                "onnx": str(onnx_path),
                "int8_route": cfg.int8_route if int8 else None,
                "network_flags": net_flag_names,
                "flags": [n for n, f in trt.BuilderFlag.__members__.items() if config.get_flag(f)],
                "profile": {n: {k: s[k] for k in ("min", "opt", "max")} for n, s in shapes.items()},
                "workspace_mb": int(cfg.workspace_mb),
                **options,
                "build_seconds": round(build_seconds, 3),
                "total_seconds": round(time.monotonic() - t_start, 3),
                "engine": ENGINE_FILE,
                "engine_bytes": len(data),
                "sha256": sha256_bytes(data),
                "timing_cache": tcache.info,
                "layer_precisions": pins,
                "progress": progress_how,
                "warnings": len(cap.warnings()),
                "device": dev,
                "software": {"tensorrt": trt.__version__, "cuda_runtime": dev.get("cuda_runtime"),
                             "driver": dev.get("driver")},
                "hardware": {"gpu": dev["gpu"], "compute_capability": dev["compute_capability"]},
            }
            if calibrator is not None:
                info["calibration"] = self._calibration_info(calibrator, out_dir, cap)
            info.update(self._write_layers(trt, data, out_dir, {n: v["opt"] for n, v in shapes.items()}))
        finally:
            if calibrator is not None:
                calibrator.free()
            del parser
        _log(f"built {label}: {len(data) / 1e6:.1f} MB in {info['build_seconds']:.1f} s")
        return BuildResult(artifact=ENGINE_FILE, info=info)

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

    def _calibrator(self, req: BuildRequest, shapes: dict[str, dict[str, Any]], out_dir: Path) -> tuple[Any, dict]:
        from pipeline.backends.trt_calibrator import make_calibrator

        cfg = req.config.build
        if len(shapes) != 1:
            raise BackendError(f"implicit INT8 calibration feeds one input; this network has {len(shapes)} "
                               f"({', '.join(shapes)}): use build.int8_route: explicit")
        (name, shape), = shapes.items()
        read_from = None
        if cfg.calibration_source == "cache":
            if req.calib_dir is None:
                raise BackendError("build.calibration_source: cache reads calibrate's calibration.cache, but no "
                                   "calibration folder was given; run `trtpipe calibrate` first")
            read_from = Path(req.calib_dir) / CACHE_FILE
        batch = int(req.config.calibration.batch_size)
        if shape["static_batch"] and shape["opt"]:
            batch = int(shape["opt"][0])
        samples: Any = []
        if req.calib_data is not None:
            # The same samples, in the same order, as the calibrate stage's own calibration,
            # so TensorRT's cache and ours can be compared tensor by tensor.
            from pipeline.datasets import calibration_indices, load_calibration_samples

            c = req.config.calibration
            samples = load_calibration_samples(Path(req.calib_data), shape["opt"][1:])
            samples = samples[calibration_indices(int(samples.shape[0]), c.num_samples, c.seed)].astype(np.float32, copy=False)
            batch = min(batch, int(samples.shape[0]))
        elif read_from is None:
            raise DataError("implicit INT8 calibration needs the prepared calibration samples (calib.npy from "
                            "`trtpipe prepare`), or build.calibration_source: cache")
        cal = make_calibrator(cfg.int8_calibrator, samples, out_dir / CACHE_FILE, batch_size=batch,
                              read_cache_from=read_from, memory=self.memory, progress=self.progress, log=_log)
        return cal, calibration_shapes(shapes, cal.batch_size)

    @staticmethod
    def _calibration_info(cal: Any, out_dir: Path, cap: Any) -> dict[str, Any]:
        cache_file = out_dir / CACHE_FILE
        if not cache_file.is_file() and cal.cache_used and cal.read_cache_from is not None:
            write_bytes(cache_file, cal.read_cache_from.read_bytes())  # TensorRT does not rewrite a cache it read
        header, tensors = None, None
        if cache_file.is_file():
            lines = cache_file.read_text(errors="replace").splitlines()
            header = lines[0].strip() if lines else None
            tensors = sum(1 for line in lines[1:] if line.strip())
        used_cache = bool(cal.cache_used) and cal.get_batch_calls == 0
        return {
            "source": "cache" if used_cache else "dataset",
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
