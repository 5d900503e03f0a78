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
import os
import re
import subprocess
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
        cudart = import_cudart()
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


def normalize_cc(cc: Any) -> Optional[str]:
    """Compute capability as 'major.minor' from '9.0', 'sm_90', 'sm90', '90', 9.0 or (9, 0)."""
    if cc is None or cc == "":
        return None
    if isinstance(cc, (tuple, list)) and len(cc) == 2:
        return f"{int(cc[0])}.{int(cc[1])}"
    s = str(cc).strip().lower().removeprefix("sm_").removeprefix("sm")
    if re.fullmatch(r"\d+\.\d+", s):
        major, minor = s.split(".")
        return f"{int(major)}.{int(minor)}"
    if re.fullmatch(r"\d{2,3}", s):
        return f"{int(s[:-1])}.{int(s[-1])}"
    return str(cc)


# -- one probe for "which GPU is here", by every means there is ------------------------------------------------------
def import_cudart() -> Any:
    """cuda-python's runtime module (``cuda.bindings.runtime`` from 12.6, ``cuda.cudart`` before), or None."""
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
    except Exception:
        try:
            from cuda import cudart  # type: ignore[no-redef]  # older cuda-python
        except Exception:
            return None
    return cudart


def _gpu_cuda_python(index: int) -> Optional[dict[str, Any]]:
    cudart = import_cudart()
    if cudart is None:
        return None
    err, n = cudart.cudaGetDeviceCount()
    if int(err) != 0 or n <= index:
        return {"compute_capability": None, "gpu": None, "gpu_error": f"cudaGetDeviceCount: {err}, {n} devices"}
    err, prop = cudart.cudaGetDeviceProperties(index)
    if int(err) != 0:
        return None
    name = prop.name.decode(errors="replace") if isinstance(prop.name, bytes) else str(prop.name)
    err, drv = cudart.cudaDriverGetVersion()
    info = {"compute_capability": f"{prop.major}.{prop.minor}", "gpu": name.rstrip("\x00")}
    if int(err) == 0:
        info["cuda_driver_api"] = f"{drv // 1000}.{(drv % 1000) // 10}"
    return info


def _gpu_pycuda(index: int) -> Optional[dict[str, Any]]:
    try:
        import pycuda.driver as cuda  # never pycuda.autoinit: no context is needed to query a device
    except Exception:
        return None
    try:
        cuda.init()
        if cuda.Device.count() <= index:
            return {"compute_capability": None, "gpu": None, "gpu_error": f"{cuda.Device.count()} CUDA devices"}
        d = cuda.Device(index)
        major, minor = d.compute_capability()
        return {"compute_capability": f"{major}.{minor}", "gpu": d.name()}
    except Exception as e:
        return {"compute_capability": None, "gpu": None, "gpu_error": f"pycuda: {e}"}


def _gpu_nvidia_smi(index: int) -> Optional[dict[str, Any]]:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        ids = [v.strip() for v in visible.split(",") if v.strip()]
        if not ids or ids[0] == "-1" or len(ids) <= index:
            return {"compute_capability": None, "gpu": None, "gpu_error": f"CUDA_VISIBLE_DEVICES={visible!r}"}
        target = ids[index]
    else:
        target = str(index)
    try:
        r = subprocess.run(
            ["nvidia-smi", f"--id={target}", "--query-gpu=name,compute_cap,driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=20,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if r.returncode != 0 or not r.stdout.strip():
        return None
    name, cc, driver = [p.strip() for p in r.stdout.strip().splitlines()[0].split(",")][:3]
    return {"compute_capability": normalize_cc(cc), "gpu": name, "driver": driver}


def _gpu_libcuda(index: int) -> Optional[dict[str, Any]]:
    """The CUDA driver through ctypes (no bindings needed)."""
    try:
        n = gpu_count()
    except Exception as e:  # no driver at all
        return {"compute_capability": None, "gpu": None, "gpu_error": str(e).split(";")[0]}
    if n <= index:
        return {"compute_capability": None, "gpu": None, "gpu_error": f"the CUDA driver sees {n} GPU(s)"}
    d = device_info(index)
    return {k: d.get(k) for k in ("compute_capability", "gpu", "driver", "cuda_runtime")}


def probe_gpu(device_index: int = 0) -> dict[str, Any]:
    """{compute_capability, gpu, ...} of CUDA device `device_index` from the first of libcuda, cuda-python,
    pycuda and nvidia-smi that finds it; else None values and `gpu_error`, the first reason there is no GPU."""
    gpu: Optional[dict[str, Any]] = None
    for probe in (_gpu_libcuda, _gpu_cuda_python, _gpu_pycuda, _gpu_nvidia_smi):
        try:
            found = probe(device_index)
        except Exception as e:
            found = {"compute_capability": None, "gpu": None, "gpu_error": f"{probe.__name__[5:]}: {e}"}
        if found is not None and found.get("compute_capability"):
            gpu = found
            break
        gpu = gpu or found  # keep the first reason there is no GPU
    if gpu is None:
        gpu = {"compute_capability": None, "gpu": None, "gpu_error": "no CUDA driver, cuda-python, pycuda or nvidia-smi found"}
    return gpu
