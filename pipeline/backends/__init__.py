"""Backends: `tensorrt` (NVIDIA GPU) and `onnxruntime` (any CPU). `auto` picks TensorRT
when it imports and sees a GPU, else onnxruntime; every report names the backend used."""

from __future__ import annotations

from ..errors import BackendError
from .base import Backend, BuildRequest, BuildResult, Runner

__all__ = ["Backend", "BuildRequest", "BuildResult", "Runner", "get_backend", "resolve_backend_name"]


def tensorrt_usable() -> tuple[bool, str]:
    """Whether TensorRT imports and a CUDA GPU is visible, and why not (runtime.trt_common)."""
    from ..runtime.trt_common import tensorrt_usable as usable

    return usable()


def resolve_backend_name(name: str) -> str:
    if name != "auto":
        return name
    ok, _ = tensorrt_usable()
    return "tensorrt" if ok else "onnxruntime"


def get_backend(name: str) -> Backend:
    name = resolve_backend_name(name)
    if name == "onnxruntime":
        from .onnxruntime_backend import OnnxRuntimeBackend

        return OnnxRuntimeBackend()
    if name == "tensorrt":
        ok, why = tensorrt_usable()
        if not ok:
            raise BackendError(
                f"build.backend is 'tensorrt' but {why}; install trtpipe[tensorrt] on a machine with an NVIDIA GPU, "
                "or set build.backend: onnxruntime (or auto)"
            )
        from .tensorrt_backend import TensorRTBackend

        return TensorRTBackend()
    raise BackendError(f"unknown backend '{name}'; choose auto, tensorrt or onnxruntime")
