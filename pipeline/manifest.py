"""manifest.json: what a published engine is, what it was made from, and where it runs.

Version string: `<model>-<precision>-<backend><version>-<device>-<hash8>`, where hash8
is taken over the hashes of every input (checkpoint, ONNX, calibration data, cache,
resolved config) and the build settings, so the same inputs always give the same
version."""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any, Mapping

SCHEMA_VERSION = 1


def device_tag(build: Mapping[str, Any]) -> str:
    env = build.get("environment", {})
    if build.get("backend") == "tensorrt":
        cc = str(env.get("compute_capability", "")).replace(".", "")
        return f"sm{cc}" if cc else "gpu"
    return "cpu"


def inputs_digest(inputs: Mapping[str, Any], settings: Mapping[str, Any]) -> str:
    blob = json.dumps({"inputs": inputs, "settings": settings}, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()


def version_string(model: str, precision: str, build: Mapping[str, Any], digest: str) -> str:
    backend = f"{build['backend']}{build.get('backend_version', '')}"
    raw = f"{model}-{precision}-{backend}-{device_tag(build)}-{digest[:8]}"
    return re.sub(r"[^A-Za-z0-9_.-]", "_", raw)


def make_manifest(
    model: str,
    precision: str,
    build: Mapping[str, Any],
    inputs: Mapping[str, Any],
    settings: Mapping[str, Any],
    metrics: Mapping[str, Any],
    files: Mapping[str, Mapping[str, Any]],
    software: Mapping[str, Any],
) -> dict[str, Any]:
    digest = inputs_digest(inputs, settings)
    env = build.get("environment", {})
    return {
        "schema_version": SCHEMA_VERSION,
        "version": version_string(model, precision, build, digest),
        "model": model,
        "precision": precision,
        "backend": build["backend"],
        "artifact": build["artifact"],
        "inputs": dict(inputs),
        "inputs_digest": digest,
        "software": dict(software),
        "hardware": {
            k: env.get(k) for k in ("gpu", "compute_capability", "driver", "cuda_runtime", "device", "cpu") if env.get(k) is not None
        },
        "build": {k: build.get(k) for k in ("flags", "profile", "workspace_mb", "build_seconds", "engine_bytes", "calibration", "backend_version")},
        "settings": dict(settings),
        "metrics": dict(metrics),
        "files": {name: dict(v) for name, v in files.items()},
    }
