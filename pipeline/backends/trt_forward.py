"""The calibration forward on a GPU: TensorRT runs the FP32 model with every tensor to calibrate
marked as an output, and the calibrate stage bins what comes back.

`TrtForward(model)` takes the augmented ONNX the collector made (every fetched tensor a graph
output) and builds it, on the first batch, into an FP32 engine: no precision flag, TF32 off (true
FP32, as onnxruntime computes), builder optimization level 0 where the config has it (the engine
runs a few dozen batches once: building fast matters more than the last tactic), strongly typed
where TensorRT 11 allows nothing else, and one optimization profile fixed at the first batch's
shapes (calibration batches all have one shape). Engines are kept in ``$TRTPIPE_CACHE_DIR/calibration-engines`` (default
``$XDG_CACHE_HOME/trtpipe`` or ``~/.cache/trtpipe``), keyed by the model's bytes, the shapes, the
TensorRT version and the GPU, so calibrating the same model again (another method, more samples)
skips the build. With the collector's device binning (``binner``, calibration.device auto or cuda)
the outputs stay on the GPU and are binned there (:mod:`pipeline.runtime.cuda_binning`, the same
counts as the CPU kernels); otherwise they come back into pinned host buffers the engine reuses
(``reuses_buffers``). Either way the collector bins each batch before the next one runs.

`resolve_forward(choice)` turns ``calibration.forward`` into a factory for the collector (or None:
onnxruntime) and says why.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np

from ..errors import BackendError, ConfigError

FORWARDS = ("auto", "onnxruntime", "tensorrt")
#: The calibration engine's builder optimization level (TensorRT's default is 3).
OPTIMIZATION_LEVEL = 0
WORKSPACE_MB = 4096


def cache_dir() -> Path:
    from calibration.native import cache_home

    explicit = os.environ.get("TRTPIPE_CACHE_DIR")
    return (Path(explicit) if explicit else cache_home()) / "calibration-engines"


def _gpu() -> dict[str, Any]:
    from ..runtime.cuda_device import device_info

    return device_info(0)


def resolve_forward(choice: str, *, what: str = "calibration") -> tuple[Optional[Callable[[Any], Any]], str]:
    """(factory for ActivationCollector's ``forward``, or None for onnxruntime; why) for
    ``calibration.forward``. auto: onnxruntime (the scales any machine reproduces; the TensorRT
    forward is opt-in, see docs/results.md for what it gains and how its scales differ)."""
    if choice not in FORWARDS:
        raise ConfigError(f"calibration.forward: {choice!r} is not one of {', '.join(FORWARDS)}")
    if choice in ("auto", "onnxruntime"):
        return None, f"calibration.forward: {choice}: onnxruntime FP32 on the CPU"
    from ..runtime.trt_common import installed_version, tensorrt_usable

    ok, why = tensorrt_usable()
    if not ok:
        raise BackendError(f"calibration.forward: tensorrt needs TensorRT and an NVIDIA GPU ({why}); "
                           "set calibration.forward: onnxruntime (or auto) to calibrate on the CPU")
    return ((lambda model: TrtForward(model, what=what)),
            f"calibration.forward: tensorrt (TensorRT {installed_version()} FP32 on {_gpu().get('gpu', 'the GPU')})")


def _shape_key(feeds: Mapping[str, np.ndarray]) -> dict[str, list[int]]:
    return {k: [int(d) for d in v.shape] for k, v in sorted(feeds.items())}


class TrtForward:
    """An FP32 TensorRT engine of the augmented model, built on the first batch (see the module)."""

    name = "tensorrt"
    reuses_buffers = True

    def __init__(self, model: Any, *, what: str = "calibration", engine_cache: Optional[Path] = None,
                 optimization_level: int = OPTIMIZATION_LEVEL) -> None:
        self._model = model
        self._what = what
        self._cache = Path(engine_cache) if engine_cache is not None else cache_dir()
        self._level = int(optimization_level)
        self._runner: Any = None
        self._shapes: Optional[dict[str, list[int]]] = None
        self._on_device = False
        self.details: dict[str, Any] = {"device": "cuda"}

    # -- engine -------------------------------------------------------------------------------
    def _key(self, trt: Any, data: bytes, shapes: dict[str, list[int]]) -> str:
        gpu = _gpu()
        h = hashlib.sha256(data)
        h.update(repr((shapes, str(trt.__version__), gpu.get("gpu"), gpu.get("compute_capability"),
                       self._level)).encode())
        return h.hexdigest()[:32]

    def _build(self, trt: Any, onnx_file: Path, shapes: dict[str, list[int]]) -> bytes:
        from .trt_build import apply_builder_options, network_flags, parse_onnx, trt_api
        from ..runtime.trt_common import capture, get_logger

        api = trt_api(trt)
        builder = trt.Builder(get_logger())
        flags, _ = network_flags(trt, strongly_typed=api.typed_builds)  # 11: strongly typed only (FP32 stays FP32)
        network = builder.create_network(flags)
        parser = parse_onnx(trt, network, onnx_file)
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_MB << 20)
        if api.tf32_flag:
            config.clear_flag(trt.BuilderFlag.TF32)  # true FP32, the numbers onnxruntime computes
        options = apply_builder_options(trt, config, self._level if hasattr(config, "builder_optimization_level")
                                        else None, {})
        profile = builder.create_optimization_profile()
        for name, shape in shapes.items():
            profile.set_shape(name, shape, shape, shape)  # calibration batches all have one shape
        config.add_optimization_profile(profile)
        with capture(quiet=True) as cap:
            serialized = builder.build_serialized_network(network, config)
        del parser
        if serialized is None:
            msgs = cap.errors()[-3:] or ["no error message"]
            raise BackendError(f"{self._what}: TensorRT {trt.__version__} could not build the FP32 calibration engine "
                               f"(every calibrated tensor an output): {' | '.join(msgs)}; set calibration.forward: "
                               "onnxruntime to calibrate on the CPU")
        self.details["builder_optimization_level"] = options.get("builder_optimization_level")
        return bytes(serialized)

    def _start(self, feeds: Mapping[str, np.ndarray]) -> None:
        from google.protobuf.message import EncodeError

        from calibration.onnx_io import save_model

        from ..fileio import write_bytes
        from ..runtime.trt_common import require_tensorrt
        from ..runtime.trt_runner import TrtRunner

        trt = require_tensorrt()
        shapes = _shape_key(feeds)
        t0 = time.perf_counter()
        try:  # serialized once: the cache key, and the file TensorRT parses
            data: Optional[bytes] = self._model.SerializeToString()
        except (EncodeError, ValueError):  # past protobuf's 2 GiB: external data, not cached
            data = None
        key = self._key(trt, data, shapes) if data is not None else None
        engine = self._cache / f"{key}.engine" if key else None
        self.details.update({"tensorrt": str(trt.__version__), "shapes": shapes, "outputs": len(self._model.graph.output),
                             "tf32": False})
        if engine is not None and engine.is_file():
            self.details["engine"] = {"cached": True, "file": str(engine)}
        else:
            with tempfile.TemporaryDirectory(prefix="trtpipe-calib-") as tmp:
                onnx_file = Path(tmp) / "calibration.onnx"
                if data is not None:
                    onnx_file.write_bytes(data)
                else:
                    save_model(self._model, onnx_file)
                del data
                t_build = time.perf_counter()
                blob = self._build(trt, onnx_file, shapes)
                self.details["build_seconds"] = round(time.perf_counter() - t_build, 3)
                if engine is not None:
                    try:
                        write_bytes(engine, blob)
                    except OSError as e:  # a cache folder we cannot write: run uncached
                        self.details["engine_cache_note"] = f"not cached ({type(e).__name__}: {e}); set TRTPIPE_CACHE_DIR"
                        engine, key = None, None
                if engine is None:  # past 2 GiB, or no writable cache: run from the temporary file
                    engine = Path(tmp) / "calibration.engine"
                    write_bytes(engine, blob)
                    self._runner = TrtRunner(engine)
            self.details["engine"] = {"cached": False, "file": str(engine) if key else None, "bytes": len(blob)}
        if self._runner is None:
            try:
                self._runner = TrtRunner(engine)
            except Exception as e:  # a cached file another TensorRT wrote, or damaged: rebuild once
                if not self.details["engine"].get("cached"):
                    raise
                engine.unlink(missing_ok=True)
                self.details["engine"]["rebuilt"] = f"{type(e).__name__}: the cached engine did not load"
                self._start(feeds)
                return
        self._model = None  # the engine holds the weights now
        self._shapes = shapes
        self.details["start_seconds"] = round(time.perf_counter() - t0, 3)

    # -- the collector's interface ----------------------------------------------------------------
    def run(self, names: Sequence[str], feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        if self._runner is None:
            self._start(feeds)
        elif _shape_key(feeds) != self._shapes:
            raise BackendError(f"{self._what}: a batch of shapes {_shape_key(feeds)} after batches of {self._shapes}; "
                               "the TensorRT calibration forward takes batches of one shape (calibrate drops the "
                               "last, partial batch)")
        out = self._runner.infer_on_device(feeds) if self._on_device else self._runner.infer(feeds, copy=False)
        missing = [n for n in names if n not in out]
        if missing:
            raise BackendError(f"{self._what}: the calibration engine has no output {missing[:3]}")
        return [out[n] for n in names]

    def binner(self, cpu_kernel: Any, *, required: bool = False, threads: int = 1) -> "DeviceBinning":
        """The collector's binner for this forward: from now on `run` hands out the engine's
        device buffers and they are binned on the GPU (see the module)."""
        self._on_device = True
        return DeviceBinning(self, cpu_kernel, required=required, threads=threads)

    def describe(self) -> dict[str, Any]:
        return dict(self.details)

    def close(self) -> None:
        if self._runner is not None:
            self._runner.close()
        self._runner = None
        self._model = None


class DeviceBinning:
    """The binner `TrtForward.binner` gives the collector: a `cuda_binning.CudaBinner` on the
    engine's stream, made once the engine runs and checked against the CPU kernel on edge values
    (`CudaBinner.self_check`). Where its kernels do not load or the check fails, the values are
    copied to the host and binned there (``note`` says why), or, when ``required``
    (calibration.device: cuda), a BackendError."""

    def __init__(self, forward: TrtForward, cpu_kernel: Any, *, required: bool, threads: int) -> None:
        self._forward, self._cpu, self._required, self._threads = forward, cpu_kernel, required, threads
        from ..runtime.cuda_binning import CudaBinner

        self._binner: Any = None
        self._host: Any = None
        self.name, self.device = CudaBinner.name, "cuda"
        self.note = "tensorrt forward: binned on the GPU, where the engine leaves the activations"

    def _get(self) -> Any:
        if self._binner is None and self._host is None:
            try:
                self._binner = self._forward._runner.device_binner(self._cpu)
                problem = self._binner.self_check()
                if problem:
                    raise BackendError(f"its counts differ from the CPU kernel's ({problem})")
            except Exception as e:  # a driver that cannot JIT the PTX, cuda-python memory, a failed check
                if self._binner is not None:  # made, but its check did not run through
                    self._binner.close()
                    self._binner = None
                why = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
                if self._required:
                    raise BackendError(f"{self._forward._what}: calibration.device: cuda, but binning on the GPU is "
                                       f"unavailable ({why}); use calibration.device: auto or cpu") from None
                from calibration.binning import BatchBinner

                self._host = BatchBinner(self._cpu, self._threads)
                self.name, self.device = self._cpu.name, "cpu"
                self.note = f"tensorrt forward: binned on the CPU (binning on the GPU is unavailable: {why})"
        return self._binner

    def ranges(self, arrays: Sequence[Any]) -> list[tuple[float, float]]:
        from ..runtime.cuda_binning import host_values

        binner = self._get()
        if binner is not None:
            return binner.ranges(arrays)
        return self._host.ranges([host_values(a) for a in arrays])

    def counts(self, jobs: list[tuple[Any, Any, bool]]) -> list[np.ndarray]:
        from ..runtime.cuda_binning import host_values

        binner = self._get()
        if binner is not None:
            return binner.counts(jobs)
        host = [(host_values(x), plan, positive) for x, plan, positive in jobs]
        jobs.clear()
        return self._host.counts(host)

    def describe(self) -> tuple[str, str, str]:
        return self.name, self.device, self.note

    def close(self) -> None:
        for b in (self._binner, self._host):
            if b is not None:
                b.close()

    def __enter__(self) -> "DeviceBinning":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
