"""One small interface over CUDA memory, streams, events and graphs, with two
implementations: pycuda and cuda-python (`cuda.bindings.runtime`, or `cuda.cudart` in
older releases). `open_memory("auto" | "pycuda" | "cuda-python")` picks one.

Both work on the device's PRIMARY context, the one the CUDA runtime API (TensorRT,
PyTorch, cuDNN) uses, so they share a process with those libraries. pycuda retains the
primary context and pushes/pops it around work (never `pycuda.autoinit`, which makes a
private context); cuda-python's runtime API binds the primary context by itself.

Usage: allocate, copy and launch inside ``with mem.activate():``; allocation calls
activate by themselves, the hot-path calls (copies, records, launches) do not.

CUDA graphs: pycuda (2026.1 and before) has no stream-capture API, so `PycudaMemory`
captures and replays graphs through cuda-python's runtime on the same primary context
and the same stream; graphs therefore need cuda-python installed in either case.
"""

from __future__ import annotations

import abc
import contextlib
import ctypes
import math
from typing import Any, Callable, Iterator, Optional

import numpy as np

from ..errors import BackendError

MEMORY_CHOICES = ("auto", "pycuda", "cuda-python")


# -- handles -----------------------------------------------------------------------------
class DeviceBuffer:
    """`nbytes` of device memory at `ptr`. Free it once with `free()` (idempotent)."""

    def __init__(self, ptr: int, nbytes: int, free: Callable[[], None]) -> None:
        self.ptr, self.nbytes, self._free = int(ptr), int(nbytes), free

    def __int__(self) -> int:
        return self.ptr

    def free(self) -> None:
        if self._free is not None:
            f, self._free = self._free, None
            f()


class HostBuffer:
    """`nbytes` of pinned (page-locked) host memory; `view(shape, dtype)` gives a numpy
    array over its start, which async copies can use."""

    def __init__(self, array: np.ndarray, free: Callable[[], None]) -> None:
        self.array = array  # 1-D uint8 over the whole allocation
        self.nbytes = int(array.nbytes)
        self.ptr = int(array.ctypes.data)
        self._free = free

    def view(self, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        dtype = np.dtype(dtype)
        count = int(math.prod(shape))
        need = count * dtype.itemsize
        if need > self.nbytes:
            raise BackendError(f"pinned buffer of {self.nbytes} bytes is too small for {shape} {dtype} ({need} bytes)")
        return self.array[:need].view(dtype).reshape(shape)

    def free(self) -> None:
        if self._free is not None:
            f, self._free = self._free, None
            self.array = np.empty(0, np.uint8)
            f()


class Stream:
    def __init__(self, obj: Any, handle: int) -> None:
        self.obj, self.handle = obj, int(handle)


class Event:
    def __init__(self, obj: Any) -> None:
        self.obj = obj


class Kernels:
    """Launchers of a loaded module's kernels: ``launch(name, grid, stream, args, shared_bytes)``
    (a 1-D grid of ``block`` threads)."""

    def __init__(self, launch: Callable[..., None], names: list[str]) -> None:
        self._launch, self.names = launch, names

    def launch(self, name: str, grid: int, block: int, stream: Stream, args: tuple, shared_bytes: int = 0) -> None:
        self._launch(name, grid, block, stream, args, shared_bytes)


class CudaGraph:
    """An instantiated CUDA graph: `launch(stream)` replays it; `close()` frees it."""

    def __init__(self, launch: Callable[[Stream], None], close: Callable[[], None]) -> None:
        self._launch, self._close = launch, close

    def launch(self, stream: Stream) -> None:
        self._launch(stream)

    def close(self) -> None:
        if self._close is not None:
            f, self._close = self._close, None
            f()


# -- the interface -------------------------------------------------------------------------
class CudaMemory(abc.ABC):
    name: str = ""

    def __init__(self, device: int = 0) -> None:
        self.device = int(device)

    @abc.abstractmethod
    def activate(self) -> contextlib.AbstractContextManager[None]:
        """Make the device's primary context current on this thread for the block."""

    @abc.abstractmethod
    def alloc_device(self, nbytes: int) -> DeviceBuffer: ...

    @abc.abstractmethod
    def alloc_host(self, nbytes: int) -> HostBuffer: ...

    @abc.abstractmethod
    def create_stream(self) -> Stream: ...

    @abc.abstractmethod
    def create_event(self) -> Event: ...

    @abc.abstractmethod
    def htod_async(self, dst: int, src: np.ndarray, stream: Stream) -> None:
        """Copy the (pinned, contiguous) host array `src` to device address `dst`."""

    @abc.abstractmethod
    def dtoh_async(self, dst: np.ndarray, src: int, stream: Stream) -> None:
        """Copy `dst.nbytes` from device address `src` into the pinned host array `dst`."""

    @abc.abstractmethod
    def htod(self, dst: int, src: np.ndarray) -> None:
        """Synchronous copy (any host memory)."""

    @abc.abstractmethod
    def dtoh(self, dst: np.ndarray, src: int) -> None: ...

    @abc.abstractmethod
    def record(self, event: Event, stream: Stream) -> None: ...

    @abc.abstractmethod
    def elapsed_ms(self, start: Event, end: Event) -> float:
        """Milliseconds between two recorded events (waits for `end`)."""

    @abc.abstractmethod
    def synchronize(self, stream: Stream) -> None: ...

    def begin_capture(self, stream: Stream) -> None:
        _graphs().begin_capture(stream.handle)

    def end_capture(self, stream: Stream) -> CudaGraph:
        return _graphs().end_capture(stream.handle)

    def load_kernels(self, ptx: bytes, signatures: dict[str, str]) -> "Kernels":
        """The kernels of a PTX module (JIT-compiled by the driver), by name: `signatures` maps each
        name to its argument types in struct format ("P" pointer, "Q" uint64, "i" int32)."""
        raise BackendError(f"{self.name}: launching CUDA kernels is implemented with pycuda only")

    def memset_async(self, ptr: int, nbytes: int, stream: Stream) -> None:
        """Zero `nbytes` of device memory at `ptr`, in stream order."""
        raise BackendError(f"{self.name}: memset is implemented with pycuda only")

    def abort_capture(self, stream: Stream) -> None:
        """End a capture that failed half-way, discarding what it recorded."""
        try:
            self.end_capture(stream).close()
        except Exception:
            pass

    def close(self) -> None:
        pass

    def __enter__(self) -> "CudaMemory":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- cuda-python ------------------------------------------------------------------------------
def _import_cudart() -> Any:
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.6

        return cudart
    except ImportError:
        pass
    try:
        from cuda import cudart  # type: ignore[no-redef]

        return cudart
    except ImportError as e:
        raise BackendError(
            f"cuda-python is not installed ({e}); pip install 'trtpipe[cuda-python]' (cuda-python >= 12), "
            "or choose memory='pycuda'"
        ) from None


class _Cudart:
    """Thin checked wrapper over cuda-python's runtime module."""

    def __init__(self) -> None:
        self.rt = _import_cudart()

    def __call__(self, fn: str, *args: Any) -> Any:
        result = getattr(self.rt, fn)(*args)
        err = result[0] if isinstance(result, tuple) else result
        if int(err) != 0:
            try:
                msg = self.rt.cudaGetErrorString(err)[1].decode()
            except Exception:
                msg = str(err)
            raise BackendError(f"CUDA runtime call {fn} failed: {msg} ({int(err)})")
        if isinstance(result, tuple):
            rest = result[1:]
            return rest[0] if len(rest) == 1 else (rest or None)
        return None

    def begin_capture(self, stream_handle: int) -> None:
        mode = self.rt.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
        self("cudaStreamBeginCapture", stream_handle, mode)

    def end_capture(self, stream_handle: int) -> CudaGraph:
        graph = self("cudaStreamEndCapture", stream_handle)
        try:
            gexec = self("cudaGraphInstantiate", graph, 0)
        except BackendError:
            self("cudaGraphDestroy", graph)
            raise

        def close() -> None:
            self("cudaGraphExecDestroy", gexec)
            self("cudaGraphDestroy", graph)

        return CudaGraph(lambda s: self("cudaGraphLaunch", gexec, s.handle), close)


_GRAPHS: Optional[_Cudart] = None


def _graphs() -> _Cudart:
    global _GRAPHS
    if _GRAPHS is None:
        try:
            _GRAPHS = _Cudart()
        except BackendError as e:
            raise BackendError(
                f"CUDA graphs go through cuda-python's runtime API (pycuda has no stream capture): {e}; "
                "install cuda-python or run without use_cuda_graph"
            ) from None
    return _GRAPHS


def graphs_available() -> bool:
    """Whether CUDA graphs can be captured here (they go through cuda-python's runtime)."""
    try:
        _graphs()
    except BackendError:
        return False
    return True


class CudaPythonMemory(CudaMemory):
    name = "cuda-python"

    def __init__(self, device: int = 0) -> None:
        super().__init__(device)
        self._rt = _Cudart()
        self._rt("cudaSetDevice", self.device)  # initializes and binds the primary context (CUDA >= 12)
        self._h2d = self._rt.rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        self._d2h = self._rt.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost

    @contextlib.contextmanager
    def activate(self) -> Iterator[None]:
        prev = self._rt("cudaGetDevice")
        if prev != self.device:
            self._rt("cudaSetDevice", self.device)
        try:
            yield
        finally:
            if prev != self.device:
                self._rt("cudaSetDevice", prev)

    def alloc_device(self, nbytes: int) -> DeviceBuffer:
        with self.activate():
            ptr = self._rt("cudaMalloc", max(int(nbytes), 1))
        return DeviceBuffer(int(ptr), nbytes, lambda: self._rt("cudaFree", ptr))

    def alloc_host(self, nbytes: int) -> HostBuffer:
        n = max(int(nbytes), 1)
        with self.activate():
            ptr = int(self._rt("cudaMallocHost", n))
        array = np.ctypeslib.as_array((ctypes.c_uint8 * n).from_address(ptr))
        return HostBuffer(array, lambda: self._rt("cudaFreeHost", ptr))

    def create_stream(self) -> Stream:
        with self.activate():  # non-blocking: no implicit sync with the legacy default stream (graph capture)
            s = self._rt("cudaStreamCreateWithFlags", self._rt.rt.cudaStreamNonBlocking)
        return Stream(s, int(s))

    def create_event(self) -> Event:
        with self.activate():
            return Event(self._rt("cudaEventCreate"))

    def htod_async(self, dst: int, src: np.ndarray, stream: Stream) -> None:
        self._rt("cudaMemcpyAsync", int(dst), src.ctypes.data, src.nbytes, self._h2d, stream.handle)

    def dtoh_async(self, dst: np.ndarray, src: int, stream: Stream) -> None:
        self._rt("cudaMemcpyAsync", dst.ctypes.data, int(src), dst.nbytes, self._d2h, stream.handle)

    def htod(self, dst: int, src: np.ndarray) -> None:
        src = np.ascontiguousarray(src)
        self._rt("cudaMemcpy", int(dst), src.ctypes.data, src.nbytes, self._h2d)

    def dtoh(self, dst: np.ndarray, src: int) -> None:
        self._rt("cudaMemcpy", dst.ctypes.data, int(src), dst.nbytes, self._d2h)

    def record(self, event: Event, stream: Stream) -> None:
        self._rt("cudaEventRecord", event.obj, stream.handle)

    def elapsed_ms(self, start: Event, end: Event) -> float:
        self._rt("cudaEventSynchronize", end.obj)
        return float(self._rt("cudaEventElapsedTime", start.obj, end.obj))

    def synchronize(self, stream: Stream) -> None:
        self._rt("cudaStreamSynchronize", stream.handle)

    def begin_capture(self, stream: Stream) -> None:
        self._rt.begin_capture(stream.handle)

    def end_capture(self, stream: Stream) -> CudaGraph:
        return self._rt.end_capture(stream.handle)

    def destroy(self, obj: Any) -> None:
        """Free a stream or event made here (buffers free themselves)."""
        if isinstance(obj, Stream):
            self._rt("cudaStreamDestroy", obj.obj)
        elif isinstance(obj, Event):
            self._rt("cudaEventDestroy", obj.obj)


# -- pycuda -----------------------------------------------------------------------------------
class PycudaMemory(CudaMemory):
    name = "pycuda"

    def __init__(self, device: int = 0) -> None:
        super().__init__(device)
        try:
            import pycuda.driver as cuda
        except ImportError as e:
            raise BackendError(
                f"pycuda is not installed ({e}); pip install 'trtpipe[tensorrt]' (pycuda), or choose memory='cuda-python'"
            ) from None
        cuda.init()
        self._cuda = cuda
        # The primary context, shared with the CUDA runtime (TensorRT, PyTorch); never pycuda.autoinit.
        self._ctx = cuda.Device(self.device).retain_primary_context()

    @contextlib.contextmanager
    def activate(self) -> Iterator[None]:
        self._ctx.push()
        try:
            yield
        finally:
            self._cuda.Context.pop()

    def alloc_device(self, nbytes: int) -> DeviceBuffer:
        with self.activate():
            alloc = self._cuda.mem_alloc(max(int(nbytes), 1))
        return DeviceBuffer(int(alloc), nbytes, alloc.free)

    def alloc_host(self, nbytes: int) -> HostBuffer:
        with self.activate():
            array = self._cuda.pagelocked_empty(max(int(nbytes), 1), np.uint8)
        return HostBuffer(array, array.base.free)

    def create_stream(self) -> Stream:
        with self.activate():  # CU_STREAM_NON_BLOCKING: no implicit sync with the legacy default stream
            s = self._cuda.Stream(flags=1)
        return Stream(s, s.handle)

    def create_event(self) -> Event:
        with self.activate():
            return Event(self._cuda.Event())

    def htod_async(self, dst: int, src: np.ndarray, stream: Stream) -> None:
        self._cuda.memcpy_htod_async(int(dst), src, stream.obj)

    def dtoh_async(self, dst: np.ndarray, src: int, stream: Stream) -> None:
        self._cuda.memcpy_dtoh_async(dst, int(src), stream.obj)

    def htod(self, dst: int, src: np.ndarray) -> None:
        self._cuda.memcpy_htod(int(dst), np.ascontiguousarray(src))

    def dtoh(self, dst: np.ndarray, src: int) -> None:
        self._cuda.memcpy_dtoh(dst, int(src))

    def record(self, event: Event, stream: Stream) -> None:
        event.obj.record(stream.obj)

    def elapsed_ms(self, start: Event, end: Event) -> float:
        end.obj.synchronize()
        return float(end.obj.time_since(start.obj))

    def synchronize(self, stream: Stream) -> None:
        stream.obj.synchronize()

    def destroy(self, obj: Any) -> None:
        """pycuda frees streams and events when they are collected."""

    def load_kernels(self, ptx: bytes, signatures: dict[str, str]) -> Kernels:
        with self.activate():
            module = self._cuda.module_from_buffer(ptx)
            functions = {}
            for name, fmt in signatures.items():
                f = module.get_function(name)
                f.prepare(fmt)
                functions[name] = f

        def launch(name: str, grid: int, block: int, stream: Stream, args: tuple, shared_bytes: int) -> None:
            functions[name].prepared_async_call((int(grid), 1), (int(block), 1, 1), stream.obj, *args,
                                                shared_size=int(shared_bytes))

        kernels = Kernels(launch, list(functions))
        kernels.module = module  # type: ignore[attr-defined]  # kept alive with its functions
        return kernels

    def memset_async(self, ptr: int, nbytes: int, stream: Stream) -> None:
        self._cuda.memset_d8_async(int(ptr), 0, int(nbytes), stream.obj)

    def close(self) -> None:
        ctx, self._ctx = getattr(self, "_ctx", None), None
        if ctx is not None:
            try:
                ctx.detach()  # releases our reference on the primary context
            except Exception:
                pass


# -- choosing ---------------------------------------------------------------------------------
def _importable(module: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def available() -> list[str]:
    """Memory implementations whose package is installed (importable)."""
    out = []
    if _importable("pycuda"):
        out.append("pycuda")
    if _importable("cuda.bindings") or _importable("cuda.cudart"):
        out.append("cuda-python")
    return out


def open_memory(kind: str = "auto", device: int = 0) -> CudaMemory:
    """A `CudaMemory` on `device`: "pycuda", "cuda-python", or "auto" (pycuda if installed,
    else cuda-python)."""
    if kind not in MEMORY_CHOICES:
        raise BackendError(f"memory={kind!r} is not one of {', '.join(MEMORY_CHOICES)}")
    if kind == "auto":
        have = available()
        if not have:
            raise BackendError(
                "neither pycuda nor cuda-python is installed, and TensorRT needs one of them for device memory: "
                "pip install 'trtpipe[tensorrt]' (pycuda) or 'trtpipe[cuda-python]'"
            )
        kind = have[0]
    return PycudaMemory(device) if kind == "pycuda" else CudaPythonMemory(device)
