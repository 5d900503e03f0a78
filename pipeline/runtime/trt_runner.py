"""Run a serialized TensorRT engine: `TrtRunner(engine_path)`.

Importable without torch (and without tensorrt: it is imported when a runner is made),
so a user's server can use it as is::

    with TrtRunner("model.engine") as r:
        out = r.infer({"input": batch})            # any batch inside the engine's profile

Loading runs the caller's `check_here` first, with this machine's TensorRT version and GPU
(`pipeline.compat.trt_runner` passes the manifest's check, so the runtime never imports the
registry or compat layers), then deserializes; a file that is not an engine, or comes from
another TensorRT, is an ArtifactError naming the file.

Only the name-based tensor API is used (num_io_tensors, get_tensor_name,
get_tensor_mode, set_input_shape, set_tensor_address, execute_async_v3). Inputs are
copied into pinned host buffers and moved with async copies on one stream; device
buffers grow when a larger batch arrives. `use_cuda_graph=True` captures the
enqueue once per input shape and replays it (needs cuda-python, see cuda_memory); `time`
measures either mode (`mode="plain"` or `"cuda_graph"`). An engine with several
optimization profiles runs each request on the first profile that fits its shapes.
A runner is not thread-safe: use one per thread.
"""

from __future__ import annotations

import math
import time as _time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Union

import numpy as np

from .runner import CUDA_GRAPH, PLAIN, Runner
from ..errors import ArtifactError, BackendError, DataError
from .cuda_device import device_info
from .cuda_memory import CudaGraph, DeviceBuffer, HostBuffer, graphs_available, open_memory
from .trt_common import capture, get_logger, require_tensorrt

HereCheck = Callable[[Mapping[str, Any]], None]  # raises when the engine cannot run on this machine


Profile = tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]  # min, opt, max


@dataclass
class TensorSpec:
    name: str
    is_input: bool
    dtype: np.dtype
    shape: tuple[int, ...]  # as the engine declares it; -1 on dynamic axes
    profiles: Optional[list[Profile]] = None  # inputs: one (min, opt, max) per optimization profile


def _deserialize_error(path: Path, errors: list[str], version: str) -> ArtifactError:
    text = " | ".join(errors) or "no message from TensorRT"
    low = text.lower()
    if "magic tag" in low:
        what = "is not a TensorRT engine (its header has no engine magic tag)"
    elif "version tag" in low or ("version" in low and "serializ" in low):
        what = f"was built by another TensorRT version than this machine's TensorRT {version}"
    else:
        what = f"could not be deserialized by TensorRT {version} (truncated, not an engine, or from another TensorRT)"
    return ArtifactError(f"{path}: {what}; TensorRT said: {text}. Rebuild the engine here with `trtpipe build`")


class TrtRunner(Runner):
    backend = "tensorrt"

    def __init__(
        self,
        engine_path: Union[str, Path],
        memory: str = "auto",
        use_cuda_graph: bool = False,
        device: int = 0,
        check_here: Optional[HereCheck] = None,
    ) -> None:
        """`memory`: "auto" | "pycuda" | "cuda-python". `check_here`: called with this machine's
        TensorRT version, compute capability and GPU name before the engine is deserialized; it
        raises when the engine cannot run here (`pipeline.compat.trt_runner` passes the
        manifest's check)."""
        self._closed = True
        self.engine_path = Path(engine_path)
        if not self.engine_path.is_file():
            raise ArtifactError(f"{self.engine_path}: engine file not found; build it with `trtpipe build`")
        data = self.engine_path.read_bytes()
        if not data:
            raise ArtifactError(f"{self.engine_path}: empty file, not a TensorRT engine; rebuild it with `trtpipe build`")
        trt = require_tensorrt()
        self._trt = trt
        self._device_info = device_info(device)
        here = {"tensorrt": trt.__version__, "compute_capability": self._device_info["compute_capability"],
                "gpu": self._device_info["gpu"]}
        if check_here is not None:
            check_here(here)

        self.use_cuda_graph = bool(use_cuda_graph)
        self._mem = open_memory(memory, device)
        self._engine = self._context = self._runtime = None
        self._graphs: dict[tuple, CudaGraph] = {}
        self._dev: dict[str, DeviceBuffer] = {}
        self._host: dict[str, HostBuffer] = {}
        self._views: dict[str, np.ndarray] = {}
        self._shapes: dict[str, tuple[tuple[int, ...], np.dtype]] = {}
        self._shape_key: Optional[tuple] = None
        self._profile_index = 0
        try:
            with self._mem.activate():
                self._runtime = trt.Runtime(get_logger())
                with capture(quiet=True) as cap:
                    engine = self._runtime.deserialize_cuda_engine(data)
                if engine is None:
                    raise _deserialize_error(self.engine_path, cap.errors(), trt.__version__)
                self._engine = engine
                self.specs = self._read_specs(engine)
                self._context = engine.create_execution_context()
                if self._context is None:
                    raise BackendError(f"{self.engine_path}: TensorRT could not create an execution context "
                                       "(out of GPU memory?)")
                self._stream = self._mem.create_stream()
                self._events = (self._mem.create_event(), self._mem.create_event())
        except BaseException:
            self._context = self._engine = self._runtime = None
            self._mem.close()
            raise
        self.input_names = [s.name for s in self.specs if s.is_input]
        self.output_names = [s.name for s in self.specs if not s.is_input]
        self.profiles = [{s.name: {"min": list(s.profiles[k][0]), "opt": list(s.profiles[k][1]),
                                   "max": list(s.profiles[k][2])} for s in self.specs if s.is_input and s.profiles}
                         for k in range(self._engine.num_optimization_profiles)]
        self.time_modes = (PLAIN, CUDA_GRAPH) if graphs_available() else (PLAIN,)
        self._closed = False

    # -- engine description --------------------------------------------------------------
    def _read_specs(self, engine: Any) -> list[TensorSpec]:
        trt = self._trt
        specs = []
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            is_input = engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
            if is_input and engine.is_shape_inference_io(name):
                raise BackendError(f"{self.engine_path}: input '{name}' is a shape tensor; TrtRunner supports data inputs only")
            spec = TensorSpec(name, is_input, np.dtype(trt.nptype(engine.get_tensor_dtype(name))),
                              tuple(int(d) for d in engine.get_tensor_shape(name)))
            if is_input:
                spec.profiles = []
                for k in range(engine.num_optimization_profiles):
                    mn, opt, mx = engine.get_tensor_profile_shape(name, k)
                    spec.profiles.append((tuple(mn), tuple(opt), tuple(mx)))
            specs.append(spec)
        return specs

    @property
    def profile(self) -> dict[str, dict[str, list[int]]]:
        """The first optimization profile (see `profiles` for all of them)."""
        return self.profiles[0] if self.profiles else {}

    def device(self) -> dict[str, Any]:
        return {**self._device_info, "tensorrt": self._trt.__version__, "memory": self._mem.name}

    # -- preparing a batch ---------------------------------------------------------------
    def _check_input(self, spec: TensorSpec, shape: tuple[int, ...]) -> None:
        if len(shape) != len(spec.shape):
            raise DataError(f"input '{spec.name}' has shape {shape}; the engine expects rank {len(spec.shape)} {spec.shape}")
        for axis, (got, want) in enumerate(zip(shape, spec.shape)):
            if want >= 0 and got != want:
                raise DataError(f"input '{spec.name}' has shape {shape}; axis {axis} must be {want} (engine shape {spec.shape})")

    def _pick_profile(self, shapes: dict[str, tuple[int, ...]]) -> int:
        for k in range(len(self.profiles)):
            if all(all(lo <= g <= hi for g, lo, hi in zip(shapes[s.name], s.profiles[k][0], s.profiles[k][2]))
                   for s in self.specs if s.is_input):
                return k
        ranges = "; ".join(f"#{k} " + ", ".join(f"{n} {v['min']}..{v['max']}" for n, v in p.items())
                           for k, p in enumerate(self.profiles))
        raise DataError(f"input shapes {shapes} fit none of the engine's optimization profiles ({ranges}); split the "
                        "batch, or rebuild with wider build.profiles")

    def _ensure(self, spec: TensorSpec, shape: tuple[int, ...]) -> bool:
        """A device buffer for `shape` (True when a new one was allocated). Inputs get their pinned
        host buffer here; an output's is made by `_view` (in `_prepare`, or on first read after
        `infer_on_device`): a forward whose outputs stay on the GPU never pins host memory for them."""
        nbytes = int(math.prod(shape)) * spec.dtype.itemsize
        dev = self._dev.get(spec.name)
        if dev is not None and dev.nbytes >= nbytes:
            return False
        if dev is not None:
            dev.free()
        host = self._host.pop(spec.name, None)
        if host is not None:
            host.free()
        self._dev[spec.name] = self._mem.alloc_device(nbytes)
        if spec.is_input:
            self._host[spec.name] = self._mem.alloc_host(nbytes)
        return True

    def _view(self, name: str) -> np.ndarray:
        """The pinned host view of tensor `name` at the current shapes (an output's buffer is
        allocated here, once per device buffer)."""
        view = self._views.get(name)
        if view is None:
            if name not in self._host:
                self._host[name] = self._mem.alloc_host(self._dev[name].nbytes)
            shape, dtype = self._shapes[name]
            view = self._views[name] = self._host[name].view(shape, dtype)
        return view

    def _prepare(self, feeds: Mapping[str, np.ndarray], host_outputs: bool = True) -> tuple:
        """Shapes, buffers and the inputs copied into their pinned views; the outputs' pinned buffers
        too unless `host_outputs` is off (the device path), so that no timed run allocates."""
        missing = [n for n in self.input_names if n not in feeds]
        extra = [n for n in feeds if n not in self.input_names]
        if missing or extra:
            raise DataError(f"feeds must name exactly the engine inputs {self.input_names}; "
                            f"missing {missing}, unknown {extra}")
        arrays = {}
        for spec in self.specs:
            if spec.is_input:
                a = np.asarray(feeds[spec.name])
                self._check_input(spec, tuple(a.shape))
                arrays[spec.name] = a
        profile = self._pick_profile({k: tuple(a.shape) for k, a in arrays.items()})
        key = (profile, *(tuple(a.shape) for a in arrays.values()))
        if key != self._shape_key:
            self._shape_key = None
            ctx = self._context
            if profile != self._profile_index:
                if not ctx.set_optimization_profile_async(profile, self._stream.handle):
                    raise BackendError(f"TensorRT refused optimization profile {profile}")
                self._mem.synchronize(self._stream)
                self._profile_index = profile
                self._drop_graphs()
            for name, a in arrays.items():
                if not ctx.set_input_shape(name, tuple(a.shape)):
                    raise BackendError(f"TensorRT refused input shape {a.shape} for '{name}'")
            grown = False
            shapes = {}
            for spec in self.specs:
                shape = tuple(arrays[spec.name].shape) if spec.is_input else tuple(ctx.get_tensor_shape(spec.name))
                if any(d < 0 for d in shape):
                    raise BackendError(f"output '{spec.name}' has a data-dependent shape {shape}; TrtRunner does not support it")
                shapes[spec.name] = shape
                grown |= self._ensure(spec, shape)
            self._views.clear()
            self._shapes = {spec.name: (shapes[spec.name], spec.dtype) for spec in self.specs}
            for spec in self.specs:
                ctx.set_tensor_address(spec.name, self._dev[spec.name].ptr)
            if grown:
                self._drop_graphs()
            self._shape_key = key
        for name, a in arrays.items():
            view = self._view(name)
            try:
                np.copyto(view, a, casting="same_kind")
            except TypeError:
                raise DataError(f"input '{name}' has dtype {a.dtype}; the engine takes {view.dtype}") from None
        if host_outputs:
            for name in self.output_names:
                self._view(name)
        return key

    # -- running ---------------------------------------------------------------------------
    def _enqueue(self) -> None:
        if not self._context.execute_async_v3(self._stream.handle):
            raise BackendError(f"{self.engine_path}: execute_async_v3 failed; see TensorRT's messages above")

    def _graph(self, key: tuple) -> CudaGraph:
        graph = self._graphs.get(key)
        if graph is None:
            mem, s = self._mem, self._stream
            self._enqueue()  # TensorRT needs one plain enqueue after a shape change before capture
            mem.synchronize(s)
            mem.begin_capture(s)
            try:
                self._enqueue()
            except BaseException:
                mem.abort_capture(s)
                raise
            try:
                graph = mem.end_capture(s)
            except BackendError as e:
                raise BackendError(f"{self.engine_path}: CUDA graph capture of the engine failed ({e}); "
                                   "run it without use_cuda_graph") from None
            self._graphs[key] = graph
        return graph

    def _run(self, key: tuple, timed: bool, graph: Optional[bool] = None, to_host: bool = True) -> None:
        """Inputs to the device, the engine, and (``to_host``) the outputs back and a wait for them;
        without ``to_host`` the work is only enqueued on the runner's stream."""
        mem, s = self._mem, self._stream
        for spec in self.specs:
            if spec.is_input:
                mem.htod_async(self._dev[spec.name].ptr, self._view(spec.name), s)
        if self.use_cuda_graph if graph is None else graph:
            graph = self._graph(key)
            if timed:
                mem.record(self._events[0], s)
            graph.launch(s)
        else:
            if timed:
                mem.record(self._events[0], s)
            self._enqueue()
        if timed:
            mem.record(self._events[1], s)
        if not to_host:
            return
        for spec in self.specs:
            if not spec.is_input:
                mem.dtoh_async(self._view(spec.name), self._dev[spec.name].ptr, s)
        mem.synchronize(s)

    def infer(self, feeds: Mapping[str, np.ndarray], copy: bool = True) -> dict[str, np.ndarray]:
        """The outputs for `feeds`; `copy=False` returns views of the pinned host buffers, which
        the next call overwrites (no copy of every output: what the calibration forward wants)."""
        self._check_open()
        with self._mem.activate():
            key = self._prepare(feeds)
            self._run(key, timed=False)
            return {n: (self._view(n).copy() if copy else self._view(n)) for n in self.output_names}

    def infer_on_device(self, feeds: Mapping[str, np.ndarray]) -> dict[str, Any]:
        """The outputs for `feeds` left on the GPU: a `cuda_binning.DeviceTensor` per output over
        the runner's device buffer (valid until the next call), its `host()` a copy into the
        pinned view on demand. The engine is enqueued, not waited for: work launched on
        `device_binner`'s stream runs after it."""
        from .cuda_binning import DeviceTensor

        self._check_open()
        with self._mem.activate():
            self._mem.synchronize(self._stream)  # the pinned input views are rewritten next
            self._run(self._prepare(feeds, host_outputs=False), timed=False, graph=False, to_host=False)
        out = {}
        for spec in self.specs:
            if not spec.is_input:
                shape, dtype = self._shapes[spec.name]
                out[spec.name] = DeviceTensor(self._dev[spec.name].ptr, shape, dtype, self._host_copy(spec.name))
        return out

    def _host_copy(self, name: str) -> Callable[[], np.ndarray]:
        def copy() -> np.ndarray:
            with self._mem.activate():
                view = self._view(name)
                self._mem.dtoh_async(view, self._dev[name].ptr, self._stream)
                self._mem.synchronize(self._stream)
            return view
        return copy

    def device_binner(self, cpu_kernel: Any) -> Any:
        """A `cuda_binning.CudaBinner` on this runner's stream (BackendError when its kernels do not load)."""
        from .cuda_binning import CudaBinner

        self._check_open()
        return CudaBinner(self._mem, self._stream, cpu_kernel)

    def time(self, feeds: Mapping[str, np.ndarray], warmup: int, iterations: int,
             mode: Optional[str] = None) -> dict[str, Any]:
        """`gpu_times_ms`: CUDA events around the enqueue (or graph launch) alone;
        `times_ms`: host clock around H2D + execute + D2H + stream sync. `mode`: "plain" or
        "cuda_graph" (default: the runner's use_cuda_graph)."""
        self._check_open()
        if iterations < 1:
            raise DataError(f"iterations must be >= 1, got {iterations}")
        if mode not in (None, PLAIN, CUDA_GRAPH):
            raise DataError(f"latency mode must be '{PLAIN}' or '{CUDA_GRAPH}', got {mode!r}")
        graph = self.use_cuda_graph if mode is None else mode == CUDA_GRAPH
        times, gpu = [], []
        with self._mem.activate():
            key = self._prepare(feeds)
            for _ in range(max(0, warmup)):
                self._run(key, timed=False, graph=graph)
            for _ in range(iterations):
                t0 = _time.perf_counter()
                self._run(key, timed=True, graph=graph)
                times.append((_time.perf_counter() - t0) * 1e3)
                gpu.append(self._mem.elapsed_ms(*self._events))
        batch = int(key[1][0]) if len(key) > 1 and key[1] else 1
        how = "CUDA graph replay of execute_async_v3" if graph else "execute_async_v3"
        return {
            "times_ms": times,
            "gpu_times_ms": gpu,
            "batch_size": batch,
            "warmup": int(warmup),
            "iterations": int(iterations),
            "cuda_graph": graph,
            "memory": self._mem.name,
            "method": (
                f"tensorrt {self._trt.__version__} {how} on one CUDA stream ({self._mem.name}); "
                "gpu_times_ms = CUDA events around the enqueue; times_ms = host clock around "
                "H2D + execute + D2H + stream sync from pinned host buffers"
            ),
        }

    # -- lifetime ----------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise BackendError(f"{self.engine_path}: runner is closed")

    def _drop_graphs(self) -> None:
        for g in self._graphs.values():
            g.close()
        self._graphs.clear()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with self._mem.activate():
            self._mem.synchronize(self._stream)
            self._drop_graphs()
            self._context = None
            self._engine = None
            self._runtime = None
            for buf in list(self._dev.values()) + list(self._host.values()):
                buf.free()
            self._dev.clear()
            self._host.clear()
            self._views.clear()
            destroy = getattr(self._mem, "destroy", None)
            if destroy is not None:
                for obj in (*self._events, self._stream):
                    destroy(obj)
        self._mem.close()
