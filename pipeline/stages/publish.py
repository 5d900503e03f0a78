"""publish: each variant as a versioned folder `<registry>/<model>/<version>/` holding the
artifact, manifest.json, build.json, the variant's metrics and (for int8) the
calibration cache. A version is written once: publishing the same content again is a
no-op, different content under an existing version is an error, and a folder is
renamed into place only when complete."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Optional

from .. import __version__
from ..config import Config
from ..errors import ArtifactError
from ..fileio import read_json, sha256_file, staging_dir, write_json
from ..manifest import make_manifest

A = Path("artifacts")


def _software(build: dict[str, Any]) -> dict[str, Any]:
    import numpy
    import onnx

    sw = {"trtpipe": __version__, "onnx": onnx.__version__, "numpy": numpy.__version__}
    env = build.get("environment", {})
    if build["backend"] == "tensorrt":
        sw.update({"tensorrt": build.get("backend_version"), "cuda_runtime": env.get("cuda_runtime"), "driver": env.get("driver")})
    else:
        sw["onnxruntime"] = build.get("backend_version")
    return sw


def _inputs(cfg: Config, precision: str, build: dict[str, Any], prepare_dir: Path, calib_dir: Path, onnx_path: Path) -> dict[str, Any]:
    import hashlib

    # Only the sections that shape this variant: a calibration knob does not version fp32.
    sections = ["model", "data", "export", "build"] + (["calibration"] if precision == "int8" else [])
    config_blob = json.dumps({k: cfg.raw()[k] for k in sections}, sort_keys=True).encode()

    inputs: dict[str, Any] = {
        "checkpoint": sha256_file(prepare_dir / "model.pt"),
        "onnx": sha256_file(onnx_path),
        "config": hashlib.sha256(config_blob).hexdigest(),
    }
    if precision == "int8":
        inputs["calibration_data"] = sha256_file(prepare_dir / "calib.npy")
        cache = calib_dir / "calibration.cache"
        inputs["calibration_cache"] = sha256_file(cache) if cache.is_file() else None
    return inputs


def _settings(cfg: Config, precision: str, build: dict[str, Any]) -> dict[str, Any]:
    s: dict[str, Any] = {"precision": precision, "backend": build["backend"], "backend_version": build.get("backend_version")}
    if build["backend"] == "tensorrt":
        s.update(cfg.build.model_dump(mode="json", exclude={"backend", "timing_cache"}))
        s["compute_capability"] = build.get("environment", {}).get("compute_capability")
    if precision == "int8":
        s["calibration"] = cfg.calibration.model_dump(mode="json")
    return s


def _same_content(existing: Path, files: dict[str, dict[str, Any]]) -> bool:
    return all((existing / name).is_file() and sha256_file(existing / name) == meta["sha256"] for name, meta in files.items())


def publish_variant(
    cfg: Config, precision: str, build_dir: Path, eval_path: Path, registry: Path, prepare_dir: Path, calib_dir: Path, onnx_path: Path
) -> dict[str, Any]:
    build = read_json(build_dir / "build.json", "build report")
    evaluation = read_json(eval_path, "evaluation report")
    payload = [build["artifact"], "build.json"] + [n for n in ("layers.json", "calibration.cache") if (build_dir / n).is_file()]
    if precision == "int8" and "calibration.cache" not in payload and (calib_dir / "calibration.cache").is_file():
        payload.append(str(calib_dir / "calibration.cache"))
    sources = {Path(p).name: (Path(p) if "/" in p else build_dir / p) for p in payload}
    files = {name: {"sha256": sha256_file(src), "bytes": src.stat().st_size} for name, src in sources.items()}
    metrics = {"metrics": evaluation.get("metrics"), "agreement_fp32": evaluation.get("agreement_fp32"), "latency": evaluation.get("latency")}
    manifest = make_manifest(
        cfg.model.name, precision, build,
        inputs=_inputs(cfg, precision, build, prepare_dir, calib_dir, onnx_path),
        settings=_settings(cfg, precision, build),
        metrics=metrics, files=files, software=_software(build),
    )
    dest = registry / cfg.model.name / manifest["version"]
    if dest.exists():
        if _same_content(dest, files):
            return {"version": manifest["version"], "path": str(dest), "status": "unchanged"}
        raise ArtifactError(
            f"{dest}: version {manifest['version']} is already published with different content; published artifacts are never "
            "overwritten: remove that folder deliberately or change an input to get a new version"
        )
    with staging_dir(dest) as tmp:
        for name, src in sources.items():
            shutil.copyfile(src, tmp / name)
        write_json(tmp / "eval.json", evaluation)
        write_json(tmp / "manifest.json", manifest)
    return {"version": manifest["version"], "path": str(dest), "status": "published"}


def run(
    cfg: Config,
    build_root: Path,
    eval_dir: Path,
    registry: Optional[Path],
    out: Path,
    prepare_dir: Path = A / "prepare",
    calib_dir: Path = A / "calibrate",
    onnx_path: Path = A / "export" / "model.onnx",
) -> dict[str, Any]:
    registry = Path(registry or cfg.publish.registry)
    published = []
    for p in cfg.publish.precisions:
        if not (Path(build_root) / p / "build.json").is_file():
            raise ArtifactError(f"{build_root}/{p}/build.json: variant not built; run build@{p} or drop it from publish.precisions")
        published.append(
            publish_variant(cfg, p, Path(build_root) / p, Path(eval_dir) / f"{p}.json", registry, Path(prepare_dir), Path(calib_dir), Path(onnx_path))
        )
    report = {"registry": str(registry), "published": published}
    write_json(out, report)
    return report
