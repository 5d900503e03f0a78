"""Can an engine run here? A TensorRT engine is tied to the TensorRT version and the GPU
architecture (compute capability) it was built for; loading checks both first and
refuses a mismatch with a message naming both sides.

`here` is a mapping measured on this machine (`probe_here()`), or given by a caller or a
test to simulate another machine:
    tensorrt            TensorRT version, or None when tensorrt does not import
    compute_capability  '9.0' of the GPU engines would run on, or None when no CUDA GPU is visible
    gpu, driver         names for messages
    onnxruntime         onnxruntime version, or None when it does not import
A key that is absent means "unknown" and is not checked; a key present with None means
"this machine has none", which is a finding."""

from __future__ import annotations

import functools
import os
import subprocess
from typing import Any, Mapping, Optional

from .errors import ArtifactError
from .manifest import normalize_cc


def _major_minor(version: str) -> tuple[int, ...]:
    parts = []
    for p in str(version).split(".")[:3]:
        digits = "".join(ch for ch in p if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def compat_findings(manifest: Mapping[str, Any], here: Mapping[str, Any]) -> list[str]:
    """Every reason the manifest's artifact cannot run on `here` (empty: it can)."""
    backend = manifest.get("backend")
    sw, hw = manifest.get("software", {}) or {}, manifest.get("hardware", {}) or {}
    out: list[str] = []
    if backend == "tensorrt":
        built_trt = sw.get("tensorrt") or manifest.get("backend_version")
        built_cc = normalize_cc(hw.get("compute_capability"))
        built_gpu = hw.get("gpu", "unknown GPU")
        if "tensorrt" in here and not here.get("tensorrt"):
            why = f" ({here['tensorrt_error']})" if here.get("tensorrt_error") else ""
            out.append(
                f"cannot run here: no TensorRT{why}; this engine needs TensorRT {built_trt} on a GPU of compute capability "
                f"{built_cc} ({built_gpu}): install trtpipe[tensorrt] on such a machine"
            )
        # TensorRT engines are only guaranteed to deserialize with the exact version that built them.
        elif built_trt and here.get("tensorrt") and _major_minor(built_trt) != _major_minor(here["tensorrt"]):
            out.append(
                f"engine was built with TensorRT {built_trt}, this machine has TensorRT {here['tensorrt']}; "
                f"rebuild the engine here (trtpipe build) or run it where TensorRT {built_trt} is installed"
            )
        if "compute_capability" in here and not here.get("compute_capability"):
            why = f" ({here['gpu_error']})" if here.get("gpu_error") else ""
            out.append(f"cannot run here: no CUDA GPU visible{why}; this engine needs compute capability {built_cc} ({built_gpu})")
        else:
            here_cc = normalize_cc(here.get("compute_capability"))
            if built_cc and here_cc and built_cc != here_cc:
                out.append(
                    f"engine was built for compute capability {built_cc} ({built_gpu}), "
                    f"this GPU is compute capability {here_cc} ({here.get('gpu') or 'unknown GPU'}); "
                    "engines do not move between GPU architectures: rebuild it on this GPU"
                )
    elif backend == "onnxruntime":
        if "onnxruntime" in here and not here.get("onnxruntime"):
            out.append("cannot run here: onnxruntime does not import; pip install onnxruntime")
    else:
        out.append(f"unknown backend '{backend}' in the manifest; this trtpipe runs tensorrt and onnxruntime artifacts")
    return out


def check_runs_here(manifest: Mapping[str, Any], here: Mapping[str, Any], where: str = "manifest") -> None:
    """Raise ArtifactError if `manifest` (its `backend`, `software`, `hardware` sections)
    names a TensorRT version or compute capability other than `here`'s (or `here` has
    no TensorRT / GPU at all, when it says so with None)."""
    findings = compat_findings(manifest, here)
    if findings:
        raise ArtifactError(f"{where}: " + "; ".join(findings))


def _gpu_cuda_python(index: int) -> Optional[dict[str, Any]]:
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
    except Exception:
        try:
            from cuda import cudart  # type: ignore[no-redef]
        except Exception:
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
    """pipeline.runtime.cuda_device: the CUDA driver through ctypes (no bindings needed)."""
    try:
        from .runtime.cuda_device import device_info, gpu_count
    except Exception:
        return None
    try:
        n = gpu_count()
    except Exception as e:  # no driver at all
        return {"compute_capability": None, "gpu": None, "gpu_error": str(e).split(";")[0]}
    if n <= index:
        return {"compute_capability": None, "gpu": None, "gpu_error": f"the CUDA driver sees {n} GPU(s)"}
    d = device_info(index)
    return {k: d.get(k) for k in ("compute_capability", "gpu", "driver", "cuda_runtime")}


@functools.lru_cache(maxsize=4)
def _probe(device_index: int) -> tuple[tuple[str, Any], ...]:
    here: dict[str, Any] = {}
    try:
        import onnxruntime

        here["onnxruntime"] = onnxruntime.__version__
    except Exception as e:
        here["onnxruntime"] = None
        here["onnxruntime_error"] = f"{type(e).__name__}: {e}"
    try:
        import tensorrt

        here["tensorrt"] = tensorrt.__version__
    except Exception as e:  # ImportError, or a broken install (missing libnvinfer)
        here["tensorrt"] = None
        here["tensorrt_error"] = f"{type(e).__name__}: {e}".splitlines()[0]
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
    here.update(gpu)
    return tuple(here.items())


def probe_here(device_index: int = 0) -> dict[str, Any]:
    """What this machine offers an artifact: TensorRT and onnxruntime versions, and the
    compute capability and name of CUDA device `device_index` (None where absent)."""
    return dict(_probe(device_index))
