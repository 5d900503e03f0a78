"""manifest.json: what a published engine is, what it was made from, and where it runs.

Version string: `<model>-<precision>-<backend><version>-<device>-<hash8>`, where hash8 is
the start of `inputs_digest`, a sha256 over the variant's identity: model, precision,
backend and its version, device (sm<cc> or cpu), the hashes of every input (checkpoint,
ONNX, calibration data and cache, the config sections that shape the variant) and the
build settings (among them `settings.hardware_compatibility: ampere_plus` for a TensorRT engine
built to run on every GPU of compute capability 8.0 and later; absent: the building GPU's
compute capability only). The same inputs always give the same version; the version can be
recomputed from the manifest alone, so an edited manifest is caught by `verify`.

What is *not* in the digest is descriptive: timings, metrics, dates, file hashes of the
outputs. `files` lists every file of the version folder except manifest.json itself, with
sha256, size and role; the roles in IDENTITY_ROLES are the published content proper (a
republish with other bytes under those roles is refused), the others are records of how
it was made and measured (build.json, eval.json).

The whole content is covered too: `content_digest` is a sha256 over one digest per
section (identity, software, hardware, build, config, io, metrics, files, notes), and the
registry's ledger keeps those section digests outside the manifest (pipeline.registry), so
an edited manifest is caught even when its own `content_digest` was recomputed, and
`verify` names the sections that changed. With TRTPIPE_MANIFEST_KEY set at publish,
`signature` is an HMAC-SHA256 of the content digest under that key, and each ledger line
carries an HMAC of its own: then not even an edit of manifest and ledger together goes
unnoticed by a verify holding the key, and with the key set an unsigned manifest or ledger
line is refused (keyed mode is strict). Without a key, the digests and the ledger detect
accidental corruption and edits by someone who does not also rewrite the ledger; they
cannot stop a writer who rewrites both."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
from pathlib import Path
from typing import Any, Mapping, Optional

from pydantic import BaseModel, ConfigDict, ValidationError

from .errors import ArtifactError
from .runtime.cuda_device import normalize_cc

SCHEMA_VERSION = 2
KEY_ENV = "TRTPIPE_MANIFEST_KEY"
KIND = "trtpipe.manifest"
MANIFEST = "manifest.json"

# Roles of the files in a version folder.
ROLE_ARTIFACT = "artifact"  # the engine (TensorRT) or model (onnxruntime)
ROLE_CACHE = "calibration_cache"
ROLE_LAYERS = "layers"  # TensorRT engine inspector output
ROLE_BUILD = "build_report"  # build.json
ROLE_METRICS = "metrics"  # eval.json
IDENTITY_ROLES = (ROLE_ARTIFACT, ROLE_CACHE, ROLE_LAYERS)


_ENV_KEYS = ("tensorrt", "gpu", "compute_capability", "driver", "driver_cuda", "cuda_runtime", "cpu", "cores")


def build_environment(build: Mapping[str, Any]) -> dict[str, Any]:
    """The software and hardware facts of a build.json, flat: tensorrt, gpu,
    compute_capability, driver, cuda_runtime (TensorRT) or device, cpu (onnxruntime).

    Read from, in rising precedence: build['device'] and environment['device'] when they
    are dicts (the TensorRT backend's device_info), environment's own keys, and
    build['software'] / build['hardware']."""
    env = build.get("environment") or {}
    layers: list[Mapping[str, Any]] = []
    for d in (build.get("device"), env.get("device")):
        if isinstance(d, Mapping):
            layers.append(d)
    layers += [env, build.get("software") or {}, build.get("hardware") or {}]
    flat: dict[str, Any] = {}
    for src in layers:
        for k in _ENV_KEYS:
            if src.get(k) is not None:
                flat[k] = src[k]
    if isinstance(env.get("device"), str):
        flat["device"] = env["device"]
    if flat.get("compute_capability") is not None:
        flat["compute_capability"] = normalize_cc(flat["compute_capability"])
    if build.get("backend") == "tensorrt" and not flat.get("tensorrt") and build.get("backend_version"):
        flat["tensorrt"] = build["backend_version"]
    return flat


def device_tag(backend: str, environment: Mapping[str, Any]) -> str:
    """`sm90` for a TensorRT engine built on a compute capability 9.0 GPU, `cpu` for onnxruntime."""
    if backend == "tensorrt":
        cc = normalize_cc(environment.get("compute_capability"))
        return f"sm{cc.replace('.', '')}" if cc else "gpu"
    return str(environment.get("device") or "cpu")


HARDWARE_COMPATIBILITY_NONE = "none"
HARDWARE_COMPATIBILITY_AMPERE_PLUS = "ampere_plus"  # one engine for every compute capability >= 8.0


def hardware_compatibility(m: Mapping[str, Any]) -> str:
    """The hardware compatibility of a manifest's engine: 'ampere_plus' (runs on compute capability
    8.0 and later) or 'none' (the building GPU's compute capability only). Recorded in `settings`, so
    the version and every digest cover it; absent means none (manifests from before the field, and
    every engine built without it, which keeps those versions' identity unchanged)."""
    return str((m.get("settings") or {}).get("hardware_compatibility") or HARDWARE_COMPATIBILITY_NONE)


def build_hardware_compatibility(build: Mapping[str, Any]) -> str:
    """What a build.json says its TensorRT builder config held (details.hardware_compatibility);
    'none' where it says nothing (onnxruntime, or a TensorRT without the setting)."""
    if build.get("backend") != "tensorrt":
        return HARDWARE_COMPATIBILITY_NONE
    return str((build.get("details") or {}).get("hardware_compatibility") or HARDWARE_COMPATIBILITY_NONE)


def identity(manifest: Mapping[str, Any]) -> dict[str, Any]:
    """The part of a manifest the version is derived from."""
    return {k: manifest.get(k) for k in ("model", "precision", "backend", "backend_version", "device", "inputs", "settings")}


def digest_of(ident: Mapping[str, Any]) -> str:
    blob = json.dumps(ident, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()


def version_string(model: str, precision: str, backend: str, backend_version: Any, device: str, digest: str) -> str:
    raw = f"{model}-{precision}-{backend}{backend_version or ''}-{device}-{digest[:8]}"
    return re.sub(r"[^A-Za-z0-9_.-]", "_", raw)


class FileEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    sha256: str
    bytes: int
    role: str


class Manifest(BaseModel):
    """manifest.json, as publish writes it and every reader checks it."""

    model_config = ConfigDict(extra="forbid", ser_json_inf_nan="strings", protected_namespaces=())

    schema_version: int
    kind: str
    version: str
    model: str
    precision: str
    backend: str
    backend_version: str
    device: str
    artifact: str
    inputs: dict[str, Optional[str]]
    settings: dict[str, Any]
    inputs_digest: str
    software: dict[str, Any]
    hardware: dict[str, Any]
    build: dict[str, Any]
    config: dict[str, Any]
    io: dict[str, Any]
    metrics: dict[str, Any]
    files: dict[str, FileEntry]
    published_at: Optional[str] = None
    notes: list[str] = []
    content_digest: str
    signature: Optional[str] = None


SECTIONS = ("identity", "software", "hardware", "build", "config", "io", "metrics", "files", "notes")


def _sha_json(obj: Any) -> str:
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str, allow_nan=True).encode()
    return hashlib.sha256(blob).hexdigest()


def section_digests(m: Mapping[str, Any]) -> dict[str, str]:
    """One sha256 per section of the manifest's content (the identity includes the version,
    the artifact name and the publication date)."""
    ident = {**identity(m), "kind": m.get("kind"), "schema_version": m.get("schema_version"), "version": m.get("version"),
             "artifact": m.get("artifact"), "inputs_digest": m.get("inputs_digest"), "published_at": m.get("published_at")}
    parts = {"identity": ident, **{k: m.get(k) for k in SECTIONS if k != "identity"}}
    return {k: _sha_json(v) for k, v in parts.items()}


def content_digest(m: Mapping[str, Any]) -> str:
    return _sha_json(section_digests(m))


def sign(digest: str, key: Optional[str] = None) -> Optional[str]:
    """HMAC-SHA256 of a content digest under `key` (default: $TRTPIPE_MANIFEST_KEY; None without one)."""
    key = key if key is not None else os.environ.get(KEY_ENV)
    if not key:
        return None
    return hmac.new(key.encode(), digest.encode(), hashlib.sha256).hexdigest()


def signing_key() -> Optional[str]:
    """$TRTPIPE_MANIFEST_KEY, or None when unset or empty (then signatures are not checked)."""
    return os.environ.get(KEY_ENV) or None


def sign_entry(entry: Mapping[str, Any], key: Optional[str] = None) -> Optional[str]:
    """HMAC-SHA256 of a ledger line (every field but `signature`, canonical JSON) under `key`
    (default: $TRTPIPE_MANIFEST_KEY; None without one)."""
    key = key if key is not None else signing_key()
    if not key:
        return None
    blob = json.dumps({k: v for k, v in entry.items() if k != "signature"}, sort_keys=True, separators=(",", ":"),
                      default=str)
    return hmac.new(key.encode(), blob.encode(), hashlib.sha256).hexdigest()


def make_manifest(
    model: str,
    precision: str,
    build: Mapping[str, Any],
    inputs: Mapping[str, Any],
    settings: Mapping[str, Any],
    metrics: Mapping[str, Any],
    files: Mapping[str, Mapping[str, Any]],
    software: Mapping[str, Any],
    config: Optional[Mapping[str, Any]] = None,
    io: Optional[Mapping[str, Any]] = None,
    published_at: Optional[str] = None,
    notes: Optional[list[str]] = None,
) -> dict[str, Any]:
    env = build_environment(build)
    backend = build["backend"]
    m: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "kind": KIND,
        "version": "",
        "model": model,
        "precision": precision,
        "backend": backend,
        "backend_version": str(build.get("backend_version") or ""),
        "device": device_tag(backend, env),
        "artifact": build["artifact"],
        "inputs": dict(inputs),
        "settings": dict(settings),
    }
    if build_hardware_compatibility(build) != HARDWARE_COMPATIBILITY_NONE:  # part of the version (see hardware_compatibility)
        m["settings"]["hardware_compatibility"] = build_hardware_compatibility(build)
    m["inputs_digest"] = digest_of(identity(m))
    m["version"] = version_string(model, precision, backend, m["backend_version"], m["device"], m["inputs_digest"])
    hardware = {k: env.get(k) for k in ("gpu", "compute_capability", "driver", "cuda_runtime", "device", "cpu") if env.get(k) is not None}
    m.update(
        {
            "software": dict(software),
            "hardware": hardware,
            "build": {
                k: build.get(k)
                for k in ("flags", "profile", "workspace_mb", "calibration", "build_seconds", "engine_bytes", "built_at", "backend_requested")
                if k in build
            },
            "config": dict(config or {}),
            "io": dict(io or {}),
            "metrics": dict(metrics),
            "files": {name: dict(v) for name, v in sorted(files.items())},
            "published_at": published_at,
            "notes": list(notes or []),
        }
    )
    from .fileio import finite_json

    m = json.loads(json.dumps(finite_json(m), default=str))  # strict JSON types, as read back from the file
    m["content_digest"] = content_digest(m)
    m["signature"] = sign(m["content_digest"])
    return m


def read_manifest(folder: str | Path) -> dict[str, Any]:
    """The manifest of a version folder, checked for form (not yet for content: see registry.verify)."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise ArtifactError(f"{path}: no manifest; this folder is not a published trtpipe version (or was half-copied)")
    try:
        m = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{path}: manifest is not valid JSON ({e}); the version folder is damaged: restore it (dvc checkout) or republish") from None
    if not isinstance(m, dict) or m.get("kind") != KIND:
        raise ArtifactError(f"{path}: not a trtpipe manifest (kind {m.get('kind') if isinstance(m, dict) else type(m).__name__!r})")
    sv = m.get("schema_version")
    if sv != SCHEMA_VERSION:
        raise ArtifactError(
            f"{path}: manifest schema_version {sv}, this trtpipe reads {SCHEMA_VERSION}; use the trtpipe that published it"
        )
    try:
        Manifest.model_validate(m)
    except ValidationError as e:
        first = e.errors()[0]
        loc = ".".join(str(p) for p in first["loc"]) or "(top level)"
        what = "lacks" if first["type"] == "missing" else f"has a bad value at"
        raise ArtifactError(f"{path}: manifest {what} {loc} ({first['msg']}); the version folder is damaged: restore it "
                            "(dvc checkout) or republish") from None
    return m


def consistency_findings(m: Mapping[str, Any]) -> list[str]:
    """Whether the manifest still derives its own version: catches an edited identity
    (inputs, settings, backend version, device) or a renamed version."""
    out = []
    digest = digest_of(identity(m))
    if digest != m.get("inputs_digest"):
        out.append(
            f"inputs_digest {str(m.get('inputs_digest'))[:12]}… does not match the manifest's own inputs and settings "
            f"({digest[:12]}…): the manifest was edited after publishing"
        )
    expect = version_string(m["model"], m["precision"], m["backend"], m.get("backend_version"), m.get("device", ""), digest)
    if expect != m.get("version"):
        out.append(f"version {m.get('version')} does not follow from the manifest's contents (expected {expect})")
    if m.get("artifact") not in m.get("files", {}):
        out.append(f"artifact {m.get('artifact')} is not listed in files")
    if content_digest(m) != m.get("content_digest"):
        out.append("content_digest does not match the manifest's content: the manifest was edited after publishing")
    key = os.environ.get(KEY_ENV)
    if key and not m.get("signature"):
        out.append(f"manifest is not signed, but ${KEY_ENV} is set and then every version must be: it was published "
                   "without the key or its signature was removed; republish it with the key set (remove the folder "
                   f"first), or unset ${KEY_ENV} to check digests and ledger only")
    elif key and not hmac.compare_digest(str(sign(str(m.get("content_digest")), key)), str(m.get("signature"))):
        out.append(f"signature does not match the content under ${KEY_ENV}: the manifest was edited (or signed with "
                   "another key)")
    if m.get("backend") == "tensorrt":
        cc = normalize_cc((m.get("hardware") or {}).get("compute_capability"))
        if cc and m.get("device") != f"sm{cc.replace('.', '')}":
            out.append(f"hardware.compute_capability {cc} does not match device {m.get('device')} in the version")
        trt = (m.get("software") or {}).get("tensorrt")
        if trt and str(trt) != str(m.get("backend_version")):
            out.append(f"software.tensorrt {trt} does not match backend_version {m.get('backend_version')} in the version")
    return out
