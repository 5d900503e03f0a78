"""`trtpipe artifacts export --triton DIR`: a Triton Inference Server model repository
from published versions.

Layout: DIR/<model>-<precision>/config.pbtxt and DIR/<model>-<precision>/1/<files>.
TensorRT versions give `platform: "tensorrt_plan"`, one engine per compute capability
(model.sm90.plan ...) listed in `cc_model_filenames`; a hardware-compatible engine
(`build.hardware_compatibility: ampere_plus`, model.ampere_plus.plan) is the
`default_model_filename`, for every other GPU from compute capability 8.0; without one,
`default_model_filename` only when exactly one architecture is exported; onnxruntime versions give
`platform: "onnxruntime_onnx"` with model.onnx. Every version's files are checked against
its manifest (registry.integrity_findings) before they are copied; the repository is
written in a staging folder and moved into place, and only over a folder this tool wrote
(it holds MARKER)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from .errors import ArtifactError
from .fileio import sha256_file, staging_dir, write_json
from .manifest import HARDWARE_COMPATIBILITY_AMPERE_PLUS as AMPERE_PLUS, hardware_compatibility, read_manifest
from .registry import integrity_findings, publish_order, resolve, version_dirs

MARKER = ".trtpipe-triton.json"
MARKER_KIND = "trtpipe.triton_export"

TRITON_DTYPES = {
    "float32": "TYPE_FP32", "float16": "TYPE_FP16", "bfloat16": "TYPE_BF16", "float64": "TYPE_FP64",
    "int64": "TYPE_INT64", "int32": "TYPE_INT32", "int16": "TYPE_INT16", "int8": "TYPE_INT8",
    "uint8": "TYPE_UINT8", "uint16": "TYPE_UINT16", "uint32": "TYPE_UINT32", "uint64": "TYPE_UINT64",
    "bool": "TYPE_BOOL", "string": "TYPE_STRING",
}
PLATFORMS = {"tensorrt": "tensorrt_plan", "onnxruntime": "onnxruntime_onnx"}


def _arch(m: Mapping[str, Any]) -> str:
    """The architecture a version is for: its compute capability ("9.0"), AMPERE_PLUS for a
    hardware-compatible engine (any compute capability from 8.0), or its device (cpu)."""
    if m.get("backend") == "tensorrt":
        cc = (m.get("hardware") or {}).get("compute_capability")
        if not cc:
            raise ArtifactError(f"{m.get('version')}: its manifest has no hardware.compute_capability; republish it")
        if hardware_compatibility(m) == AMPERE_PLUS:
            return AMPERE_PLUS
        return str(cc)
    return str(m.get("device") or "cpu")


def select(registry: str | Path, versions: Optional[Sequence[str]] = None) -> dict[tuple[str, str], list[tuple[Path, dict]]]:
    """(model, precision) -> [(version folder, manifest)], one per architecture.
    Default: the latest published version per architecture; TensorRT versions when a
    (model, precision) has any, else its onnxruntime ones."""
    registry = Path(registry)
    if versions:
        picked = [resolve(v, registry) for v in versions]
    else:
        picked = version_dirs(registry)
    if not picked:
        raise ArtifactError(f"no published versions in {registry}; run trtpipe publish first")
    groups: dict[tuple[str, str], list[tuple[Path, dict]]] = {}
    for d in picked:
        m = read_manifest(d)
        groups.setdefault((str(m["model"]), str(m["precision"])), []).append((d, m))
    out: dict[tuple[str, str], list[tuple[Path, dict]]] = {}
    for key, items in sorted(groups.items()):
        if not versions and any(m["backend"] == "tensorrt" for _, m in items):
            items = [(d, m) for d, m in items if m["backend"] == "tensorrt"]
        per_arch: dict[str, tuple[Path, dict]] = {}
        for d, m in sorted(items, key=lambda dm: publish_order(registry, dm[1])):
            arch = _arch(m)
            if versions and arch in per_arch:
                raise ArtifactError(f"--version {per_arch[arch][1]['version']} and {m['version']} are both for {arch} "
                                    f"under one Triton model {key[0]}-{key[1]}; give one per architecture")
            per_arch[arch] = (d, m)  # the later wins
        chosen = list(per_arch.values())
        _check_same_model(key, chosen)
        out[key] = chosen
    return out


def _check_same_model(key: tuple[str, str], chosen: list[tuple[Path, dict]]) -> None:
    first = chosen[0][1]
    for _, m in chosen[1:]:
        for what, a, b in (("backend", first.get("backend"), m.get("backend")),
                           ("backend version (one Triton server has one TensorRT)", first.get("backend_version"), m.get("backend_version")),
                           ("ONNX digest", (first.get("inputs") or {}).get("onnx"), (m.get("inputs") or {}).get("onnx")),
                           ("inputs/outputs", json.dumps(first.get("io"), sort_keys=True), json.dumps(m.get("io"), sort_keys=True))):
            if a != b:
                raise ArtifactError(
                    f"{first['version']} and {m['version']} differ in {what} and cannot be one Triton model "
                    f"{key[0]}-{key[1]}; pick versions built from the same ONNX with --version")


def _dims(shape: Sequence[Any]) -> list[int]:
    return [d if isinstance(d, int) and d >= 0 else -1 for d in shape]


def _max_batch(chosen: list[tuple[Path, dict]], first_input: str) -> Optional[int]:
    """The smallest max batch of the optimization profiles over the versions (every engine
    must accept it), or None when a version has no profile for the first input's batch axis."""
    best: Optional[int] = None
    for _, m in chosen:
        profiles = (m.get("settings") or {}).get("profiles") or []
        got = [p[first_input]["max"][0] for p in profiles if isinstance(p, dict) and first_input in p
               and isinstance(p[first_input], dict) and p[first_input].get("max")]
        if not got:
            return None
        best = max(got) if best is None else min(best, max(got))
    return best


def _tensor(t: Mapping[str, Any], batched: bool, where: str) -> str:
    dtype = str(t.get("dtype"))
    if dtype not in TRITON_DTYPES:
        raise ArtifactError(f"{where}: tensor {t.get('name')} has dtype {dtype}, which has no Triton data type")
    dims = _dims(t.get("shape") or [])
    if batched:
        dims = dims[1:]
    return (f"  {{\n    name: \"{t['name']}\"\n    data_type: {TRITON_DTYPES[dtype]}\n"
            f"    dims: [ {', '.join(map(str, dims))} ]\n  }}")


def config_pbtxt(name: str, chosen: list[tuple[Path, dict]], files: Mapping[str, str]) -> str:
    """config.pbtxt text for one Triton model; `files`: architecture -> file name in 1/."""
    m = chosen[0][1]
    io = m.get("io") or {}
    ins, outs = io.get("inputs") or [], io.get("outputs") or []
    if not ins or not outs:
        raise ArtifactError(f"{m['version']}: its manifest lists no io inputs/outputs; republish it")
    all_t = list(ins) + list(outs)
    batch_dynamic = all(t.get("shape") and not isinstance(t["shape"][0], int) for t in all_t)
    max_batch = _max_batch(chosen, ins[0]["name"]) if batch_dynamic else None
    batched = max_batch is not None
    lines = [f"# written by trtpipe artifacts export --triton from {', '.join(c[1]['version'] for c in chosen)}",
             f"# {m['backend']} {m.get('backend_version')}: the server's must match",
             f"name: \"{name}\"", f"platform: \"{PLATFORMS[m['backend']]}\""]
    if not batched:
        lines.append("# no optimization profile with a dynamic batch axis: max_batch_size 0, dims in full")
    lines.append(f"max_batch_size: {max_batch if batched else 0}")
    lines.append("input [\n" + ",\n".join(_tensor(t, batched, m["version"]) for t in ins) + "\n]")
    lines.append("output [\n" + ",\n".join(_tensor(t, batched, m["version"]) for t in outs) + "\n]")
    if m["backend"] == "tensorrt":
        exact = {cc: f for cc, f in files.items() if cc != AMPERE_PLUS}
        if exact:
            lines.append("cc_model_filenames [\n" + ",\n".join(
                f"  {{\n    key: \"{cc}\"\n    value: \"{f}\"\n  }}" for cc, f in sorted(exact.items())) + "\n]")
        if AMPERE_PLUS in files:
            lines.append("# default_model_filename: the hardware-compatible (ampere_plus) engine, for a GPU of compute "
                         "capability 8.0 or later without an engine of its own above (an older GPU cannot load it)")
            lines.append(f"default_model_filename: \"{files[AMPERE_PLUS]}\"")
        elif len(files) == 1:
            lines.append(f"default_model_filename: \"{next(iter(files.values()))}\"")
        else:
            lines.append(f"# no default_model_filename: {len(files)} architectures ({', '.join(sorted(files))}); "
                         "a GPU of another compute capability has no engine here (publish an ampere_plus engine "
                         "for one)")
    else:
        lines.append(f"default_model_filename: \"{next(iter(files.values()))}\"")
    return "\n".join(lines) + "\n"


def _file_name(m: Mapping[str, Any], arch: str) -> str:
    if m["backend"] == "tensorrt":
        return f"model.{AMPERE_PLUS}.plan" if arch == AMPERE_PLUS else f"model.sm{arch.replace('.', '')}.plan"
    return "model.onnx"


def _check_out(out: Path) -> None:
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise ArtifactError(f"{out}: not a folder; give --triton a new folder or a previous export")
    if out.is_dir() and any(out.iterdir()) and not (out / MARKER).is_file():
        raise ArtifactError(f"{out}: exists and is not a Triton export of trtpipe (no {MARKER}); "
                            "give --triton a new folder, or remove it")


def export(registry: str | Path, out: str | Path, versions: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """Write the Triton model repository `out`; returns what was written per model."""
    registry, out = Path(registry), Path(out)
    _check_out(out)
    groups = select(registry, versions)
    for _, chosen in groups.items():
        for d, m in chosen:
            problems = integrity_findings(d, m)
            if problems:
                raise ArtifactError(f"{d}: refusing to export {m['version']}: " + "; ".join(map(str, problems))
                                    + "; restore the folder (dvc checkout) or republish it")
    summary: dict[str, Any] = {}
    with staging_dir(out) as tmp:
        for (model, precision), chosen in groups.items():
            name = f"{model}-{precision}"
            files: dict[str, str] = {}
            for d, m in chosen:
                arch = _arch(m)
                fname = _file_name(m, arch)
                dst = tmp / name / "1" / fname
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(d / m["artifact"], dst)
                if sha256_file(dst) != m["files"][m["artifact"]]["sha256"]:
                    raise ArtifactError(f"{d / m['artifact']}: changed while being copied; run the export again")
                files[arch] = fname
            (tmp / name / "config.pbtxt").write_text(config_pbtxt(name, chosen, files))
            summary[name] = {"versions": [m["version"] for _, m in chosen], "files": files}
        write_json(tmp / MARKER, {"kind": MARKER_KIND, "registry": str(registry), "models": summary})
    return summary
