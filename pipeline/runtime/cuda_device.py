"""Which NVIDIA GPUs this machine has, straight from the CUDA driver (libcuda) through
ctypes: no PyTorch, pycuda or cuda-python needed, so `backend: auto` can decide
cheaply and manifests can record the hardware.

`device_info(i)` returns the facts an engine depends on: GPU name, compute capability
("9.0"), driver version, CUDA runtime version (when a runtime binding is installed)
and memory size.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path
from typing import Any, Optional

from ..errors import BackendError

_CUDA_ERROR_NO_DEVICE = 100
_ATTR_CC_MAJOR = 75  # CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR
_ATTR_CC_MINOR = 76  # CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR
_ATTR_SM_COUNT = 16  # CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT


@functools.lru_cache(maxsize=1)
def _libcuda() -> ctypes.CDLL:
    first: Optional[OSError] = None
    for name in ("libcuda.so.1", "libcuda.so", "nvcuda.dll"):
        try:
            return ctypes.CDLL(name)
        except OSError as e:  # not this name
            first = first or e
    raise BackendError(
        f"the NVIDIA driver library libcuda is not loadable ({first}); this machine has no NVIDIA driver: "
        "use build.backend: onnxruntime (or auto) here, or run on a machine with an NVIDIA GPU"
    )


def _call(fn_name: str, *args: Any) -> int:
    lib = _libcuda()
    fn = getattr(lib, fn_name)
    return int(fn(*args))


def _check(fn_name: str, *args: Any) -> None:
    rc = _call(fn_name, *args)
    if rc != 0:
        raise BackendError(f"CUDA driver call {fn_name} failed with CUresult {rc}")


@functools.lru_cache(maxsize=1)
def _init() -> int:
    """cuInit(0) once; returns its CUresult (0 ok, 100 no device)."""
    return _call("cuInit", ctypes.c_uint(0))


def gpu_count() -> int:
    """Number of CUDA GPUs visible to this process (honours CUDA_VISIBLE_DEVICES).

    0 when the driver is present but sees no GPU; raises BackendError when there is no
    driver at all or it fails to initialize."""
    rc = _init()
    if rc == _CUDA_ERROR_NO_DEVICE:
        return 0
    if rc != 0:
        raise BackendError(f"the CUDA driver failed to initialize (cuInit returned CUresult {rc})")
    n = ctypes.c_int(0)
    _check("cuDeviceGetCount", ctypes.byref(n))
    return int(n.value)


def _device(i: int) -> ctypes.c_int:
    count = gpu_count()
    if not 0 <= i < count:
        raise BackendError(f"CUDA device {i} does not exist: this machine sees {count} GPU(s)")
    dev = ctypes.c_int(0)
    _check("cuDeviceGet", ctypes.byref(dev), ctypes.c_int(i))
    return dev


def _attribute(dev: ctypes.c_int, attr: int) -> int:
    v = ctypes.c_int(0)
    _check("cuDeviceGetAttribute", ctypes.byref(v), ctypes.c_int(attr), dev)
    return int(v.value)


def compute_capability(i: int = 0) -> str:
    dev = _device(i)
    return f"{_attribute(dev, _ATTR_CC_MAJOR)}.{_attribute(dev, _ATTR_CC_MINOR)}"


def _driver_release() -> Optional[str]:
    """The driver's release string (e.g. 580.159.04), from NVML or /proc."""
    try:
        nvml = ctypes.CDLL("libnvidia-ml.so.1")
        if nvml.nvmlInit_v2() == 0:
            buf = ctypes.create_string_buffer(96)
            try:
                if nvml.nvmlSystemGetDriverVersion(buf, ctypes.c_uint(96)) == 0:
                    return buf.value.decode()
            finally:
                nvml.nvmlShutdown()
    except (OSError, AttributeError):
        pass
    proc = Path("/proc/driver/nvidia/version")
    if proc.is_file():
        for word in proc.read_text().split():
            parts = word.split(".")
            if len(parts) >= 2 and all(p.isdigit() for p in parts):
                return word
    return None


def _version_str(v: int) -> str:
    return f"{v // 1000}.{(v % 1000) // 10}"


def cuda_runtime_version() -> Optional[str]:
    """Version of the CUDA runtime binding in this process (cuda-python), else pycuda's
    build-time CUDA version, else None."""
    try:
        try:
            from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
        except ImportError:
            from cuda import cudart  # type: ignore[no-redef]  # older cuda-python
        err, v = cudart.cudaRuntimeGetVersion()
        if int(err) == 0:
            return _version_str(int(v))
    except Exception:  # not installed or broken: fall through
        pass
    try:
        import pycuda.driver as pd

        return ".".join(str(x) for x in pd.get_version()[:2])
    except Exception:
        return None


def device_info(i: int = 0) -> dict[str, Any]:
    """{gpu, compute_capability ("9.0"), driver, driver_cuda, cuda_runtime, memory_bytes, multiprocessors}."""
    dev = _device(i)
    name = ctypes.create_string_buffer(256)
    _check("cuDeviceGetName", name, ctypes.c_int(256), dev)
    mem = ctypes.c_size_t(0)
    _check("cuDeviceTotalMem_v2", ctypes.byref(mem), dev)
    drv = ctypes.c_int(0)
    _check("cuDriverGetVersion", ctypes.byref(drv))
    return {
        "index": i,
        "gpu": name.value.decode(errors="replace"),
        "compute_capability": f"{_attribute(dev, _ATTR_CC_MAJOR)}.{_attribute(dev, _ATTR_CC_MINOR)}",
        "multiprocessors": _attribute(dev, _ATTR_SM_COUNT),
        "memory_bytes": int(mem.value),
        "driver": _driver_release(),
        "driver_cuda": _version_str(int(drv.value)),
        "cuda_runtime": cuda_runtime_version(),
    }
