"""Can an engine run here? A TensorRT engine is tied to the TensorRT version and the GPU
architecture (compute capability) it was built for; loading checks both first and
refuses a mismatch with a message naming both sides."""

from __future__ import annotations

from typing import Any, Mapping

from .errors import ArtifactError


def _major_minor(version: str) -> tuple[int, ...]:
    parts = []
    for p in str(version).split(".")[:3]:
        digits = "".join(ch for ch in p if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def check_runs_here(manifest: Mapping[str, Any], here: Mapping[str, Any], where: str = "manifest") -> None:
    """Raise ArtifactError if `manifest` (its `backend`, `software`, `hardware` sections)
    names a TensorRT version or compute capability other than `here`'s.

    `here` holds the same keys measured on this machine: tensorrt, compute_capability, gpu."""
    if manifest.get("backend") != "tensorrt":
        return
    sw, hw = manifest.get("software", {}), manifest.get("hardware", {})
    built_trt, here_trt = sw.get("tensorrt"), here.get("tensorrt")
    # TensorRT engines are only guaranteed to deserialize with the exact version that built them.
    if built_trt and here_trt and _major_minor(built_trt) != _major_minor(here_trt):
        raise ArtifactError(
            f"{where}: engine was built with TensorRT {built_trt}, this machine has TensorRT {here_trt}; "
            f"rebuild the engine here (trtpipe build) or run it where TensorRT {built_trt} is installed"
        )
    built_cc, here_cc = hw.get("compute_capability"), here.get("compute_capability")
    if built_cc and here_cc and str(built_cc) != str(here_cc):
        raise ArtifactError(
            f"{where}: engine was built for compute capability {built_cc} ({hw.get('gpu', 'unknown GPU')}), "
            f"this GPU is compute capability {here_cc} ({here.get('gpu', 'unknown GPU')}); "
            "engines do not move between GPU architectures: rebuild it on this GPU"
        )
