"""Can an engine run here? A TensorRT engine is tied to the TensorRT version and the GPU
architecture (compute capability) it was built for, or, built with hardware compatibility
ampere_plus (manifest settings.hardware_compatibility), to any compute capability 8.0 and later;
loading checks both first and refuses a mismatch with a message naming both sides.

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
import json
from pathlib import Path
from typing import Any, Mapping, Optional, Union

from calibration.cache import trt_version_parts

from .errors import ArtifactError
from .manifest import (HARDWARE_COMPATIBILITY_AMPERE_PLUS, HARDWARE_COMPATIBILITY_NONE, hardware_compatibility,
                       normalize_cc)
from .runtime.cuda_device import probe_gpu

AMPERE_PLUS_MIN_CC = (8, 0)  # HardwareCompatibilityLevel.AMPERE_PLUS: "Ampere and newer GPUs"


def _cc_tuple(cc: Optional[str]) -> Optional[tuple[int, int]]:
    try:
        major, minor = str(cc).split(".")
        return int(major), int(minor)
    except ValueError:
        return None


def cc_fits(built_cc: Optional[str], here_cc: Optional[str], level: str = HARDWARE_COMPATIBILITY_NONE) -> bool:
    """Whether an engine built on compute capability `built_cc` with hardware compatibility `level`
    runs on a GPU of compute capability `here_cc`: none needs the same compute capability,
    ampere_plus any of 8.0 and later. Unknown on either side is not a mismatch."""
    built_cc, here_cc = normalize_cc(built_cc), normalize_cc(here_cc)
    if not built_cc or not here_cc:
        return True
    if level == HARDWARE_COMPATIBILITY_AMPERE_PLUS:
        here_t = _cc_tuple(here_cc)
        return here_t is not None and here_t >= AMPERE_PLUS_MIN_CC
    return built_cc == here_cc


def engine_needs(built_cc: Optional[str], level: str = HARDWARE_COMPATIBILITY_NONE) -> str:
    """'compute capability 9.0', or 'compute capability 8.0 or later (ampere_plus, built on 9.0)'."""
    if level == HARDWARE_COMPATIBILITY_AMPERE_PLUS:
        major, minor = AMPERE_PLUS_MIN_CC
        return f"compute capability {major}.{minor} or later (ampere_plus, built on {normalize_cc(built_cc)})"
    return f"compute capability {normalize_cc(built_cc)}"


def compat_findings(manifest: Mapping[str, Any], here: Mapping[str, Any]) -> list[str]:
    """Every reason the manifest's artifact cannot run on `here` (empty: it can)."""
    backend = manifest.get("backend")
    sw, hw = manifest.get("software", {}) or {}, manifest.get("hardware", {}) or {}
    out: list[str] = []
    if backend == "tensorrt":
        built_trt = sw.get("tensorrt") or manifest.get("backend_version")
        built_cc = normalize_cc(hw.get("compute_capability"))
        built_gpu = hw.get("gpu", "unknown GPU")
        level = hardware_compatibility(manifest)
        if level not in (HARDWARE_COMPATIBILITY_NONE, HARDWARE_COMPATIBILITY_AMPERE_PLUS):
            out.append(f"engine has hardware compatibility {level!r}, which this trtpipe does not know (it knows none "
                       "and ampere_plus); use the trtpipe that published it")
        if "tensorrt" in here and not here.get("tensorrt"):
            why = f" ({here['tensorrt_error']})" if here.get("tensorrt_error") else ""
            out.append(
                f"cannot run here: no TensorRT{why}; this engine needs TensorRT {built_trt} on a GPU of "
                f"{engine_needs(built_cc, level)} ({built_gpu}): install trtpipe[tensorrt] on such a machine"
            )
        # TensorRT engines are only guaranteed to deserialize with the exact version that built them.
        elif built_trt and here.get("tensorrt") and trt_version_parts(built_trt) != trt_version_parts(here["tensorrt"]):
            out.append(
                f"engine was built with TensorRT {built_trt}, this machine has TensorRT {here['tensorrt']}; "
                f"rebuild the engine here (trtpipe build) or run it where TensorRT {built_trt} is installed"
            )
        if "compute_capability" in here and not here.get("compute_capability"):
            why = f" ({here['gpu_error']})" if here.get("gpu_error") else ""
            out.append(f"cannot run here: no CUDA GPU visible{why}; this engine needs {engine_needs(built_cc, level)} "
                       f"({built_gpu})")
        else:
            here_cc = normalize_cc(here.get("compute_capability"))
            if level == HARDWARE_COMPATIBILITY_AMPERE_PLUS and not cc_fits(built_cc, here_cc, level):
                out.append(
                    f"engine was built hardware-compatible (ampere_plus) on compute capability {built_cc} ({built_gpu}) "
                    f"and runs on compute capability 8.0 and later; this GPU is compute capability {here_cc} "
                    f"({here.get('gpu') or 'unknown GPU'}): rebuild it on this GPU"
                )
            elif level != HARDWARE_COMPATIBILITY_AMPERE_PLUS and not cc_fits(built_cc, here_cc):
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
    here.update(probe_gpu(device_index))
    return tuple(here.items())


def probe_here(device_index: int = 0) -> dict[str, Any]:
    """What this machine offers an artifact: TensorRT and onnxruntime versions, and the
    compute capability and name of CUDA device `device_index` (None where absent)."""
    return dict(_probe(device_index))


# -- a TensorRT runner whose engine is checked against this machine first ---------------------------------------------
ManifestArg = Union[None, str, Path, Mapping[str, Any]]


def manifest_from_build_info(build_info: Mapping[str, Any]) -> Optional[dict[str, Any]]:
    """The parts of a build.json (or a manifest) that `check_runs_here` reads, in manifest form."""
    from .manifest import build_environment, build_hardware_compatibility

    if not build_info:
        return None
    if isinstance(build_info.get("manifest"), Mapping):
        build_info = build_info["manifest"]
    if "software" in build_info and "hardware" in build_info:
        return {"backend": build_info.get("backend", "tensorrt"), "software": build_info["software"],
                "hardware": build_info["hardware"], "settings": _level_setting(hardware_compatibility(build_info))}
    env = build_environment(build_info)
    return {
        "backend": build_info.get("backend", "tensorrt"),
        "software": {"tensorrt": env.get("tensorrt")},
        "hardware": {"compute_capability": env.get("compute_capability"), "gpu": env.get("gpu")},
        "settings": _level_setting(build_hardware_compatibility({"backend": "tensorrt", **build_info})),
    }


def _level_setting(level: str) -> dict[str, Any]:
    return {} if level == HARDWARE_COMPATIBILITY_NONE else {"hardware_compatibility": level}


def _load_manifest(manifest: ManifestArg, engine_path: Path) -> tuple[Optional[Mapping[str, Any]], str]:
    if isinstance(manifest, Mapping):
        return manifest, f"manifest of {engine_path}"
    path = Path(manifest) if manifest is not None else engine_path.parent / "manifest.json"
    if manifest is None and not path.is_file():
        return None, ""
    if not path.is_file():
        raise ArtifactError(f"{path}: manifest not found (given for engine {engine_path})")
    try:
        return json.loads(path.read_text()), str(path)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{path}: manifest is not valid JSON ({e}); republish the engine") from None


def trt_runner(engine_path: Union[str, Path], manifest: ManifestArg = None, **kwargs: Any) -> Any:
    """`TrtRunner(engine_path, **kwargs)` that first checks the engine's manifest against this machine.

    `manifest`: a dict, a path, or None to use manifest.json beside the engine when there is one (no check
    without one). The check runs inside the runner, once it knows this machine's TensorRT and GPU, before
    the engine is deserialized."""
    from .runtime.trt_runner import TrtRunner

    engine_path = Path(engine_path)

    def check(here: Mapping[str, Any]) -> None:
        man, where = _load_manifest(manifest, engine_path)
        if man is not None:
            check_runs_here(man, here, where=where)

    return TrtRunner(engine_path, check_here=check, **kwargs)
