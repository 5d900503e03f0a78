"""publish: each variant as a versioned folder `<registry>/<model>/<version>/` holding the
artifact (engine or onnxruntime model), manifest.json, build.json, the variant's metrics
(eval.json), the calibration cache (int8) and, for TensorRT, the layer information
(layers.json). The version is derived from the variant's inputs (pipeline.manifest); the
folder is written once (pipeline.registry): publishing the same content again is a no-op,
different content under an existing version is an error.

Besides the registry (a DVC output with `persist: true`, so versions accumulate), publish
rewrites `<pointers>/<precision>/`, a copy of the version each variant is at now: the
stable paths that dvc.yaml's `artifacts:` block names, and `published.json`."""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import tempfile
from pathlib import Path
from typing import Any, Optional

from .. import __version__
from ..config import Config
from ..errors import ArtifactError
from ..fileio import read_json, sha256_file, write_json
from ..manifest import (
    ROLE_ARTIFACT,
    ROLE_BUILD,
    ROLE_CACHE,
    ROLE_LAYERS,
    ROLE_METRICS,
    build_environment,
    make_manifest,
)
from ..registry import publish as publish_version
from ..registry import write_pointers

A = Path("artifacts")
CACHE = "calibration.cache"
LAYERS = "layers.json"

# Build settings that shape a TensorRT engine (timing_cache is a path: it changes how
# fast a build is, not what it means; backend is in the version string as resolved).
_TRT_BUILD_KEYS = ("workspace_mb", "profile", "layer_precisions")
_TRT_INT8_KEYS = ("int8_route", "int8_calibrator", "calibration_source")


def config_subset(cfg: Config, precision: str, backend: str) -> dict[str, Any]:
    """The config sections that shape this variant (hashed into its version): a
    calibration knob does not version fp32, a TensorRT knob does not version onnxruntime."""
    raw = cfg.raw()
    model = {k: v for k, v in raw["model"].items() if k != "checkpoint"}  # the checkpoint's content is hashed
    out: dict[str, Any] = {
        "model": model,
        "preprocess": raw["data"]["preprocess"],  # what the artifact expects as input
        "export": raw["export"],
    }
    if backend == "tensorrt":
        keys = _TRT_BUILD_KEYS + (_TRT_INT8_KEYS if precision == "int8" else ())
        out["build"] = {k: raw["build"][k] for k in keys}
    if precision == "int8":
        out["calibration"] = raw["calibration"]
    return out


def _sha_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _software(build: dict[str, Any], export_info: dict[str, Any]) -> dict[str, Any]:
    import numpy
    import onnx

    sw: dict[str, Any] = {"trtpipe": __version__, "onnx": onnx.__version__, "numpy": numpy.__version__}
    if export_info.get("torch_version"):
        sw["torch_export"] = export_info["torch_version"]
    env = build_environment(build)
    if build["backend"] == "tensorrt":
        sw.update({"tensorrt": env.get("tensorrt"), "cuda_runtime": env.get("cuda_runtime"), "driver": env.get("driver")})
    else:
        sw["onnxruntime"] = build.get("backend_version")
    return {k: v for k, v in sw.items() if v is not None}


def _settings(precision: str, build: dict[str, Any]) -> dict[str, Any]:
    """What the backend says it did (build.json), hashed into the version."""
    return {
        "precision": precision,
        "flags": build.get("flags"),
        "profile": build.get("profile"),
        "workspace_mb": build.get("workspace_mb"),
    }


def _metrics(evaluation: dict[str, Any]) -> dict[str, Any]:
    agreement = evaluation.get("agreement_fp32") or {}
    top1_agree = [v.get("top1_agreement") for v in agreement.values() if isinstance(v, dict) and v.get("top1_agreement") is not None]
    return {
        "backend": evaluation.get("backend"),
        "samples": evaluation.get("samples"),
        "task": evaluation.get("metrics"),
        "top1_agreement_fp32": min(top1_agree) if top1_agree else None,
        "agreement_fp32": evaluation.get("agreement_fp32"),
        "agreement_pytorch": evaluation.get("agreement_pytorch"),
        "latency": evaluation.get("latency"),
        "device": evaluation.get("device"),
    }


def _check_consistent(precision: str, build_dir: Path, build: dict[str, Any], eval_path: Path, evaluation: dict[str, Any], onnx_sha: str) -> Path:
    """The build, its evaluation and the ONNX given must belong together; returns the artifact path."""
    artifact = build_dir / build["artifact"]
    if not artifact.is_file():
        raise ArtifactError(f"{artifact}: built artifact missing; re-run build@{precision}")
    if build.get("precision") != precision:
        raise ArtifactError(f"{build_dir}/build.json: is a {build.get('precision')} build, expected {precision}; re-run build@{precision}")
    if build.get("sha256") and sha256_file(artifact) != build["sha256"]:
        raise ArtifactError(f"{artifact}: does not match the sha256 its build.json records; the build folder was changed: re-run build@{precision}")
    if build.get("onnx_sha256") and build["onnx_sha256"] != onnx_sha:
        raise ArtifactError(
            f"{build_dir}/build.json: built from another ONNX (sha256 {build['onnx_sha256'][:12]}…) than the one given "
            f"({onnx_sha[:12]}…); re-run build@{precision} (dvc repro)"
        )
    same = evaluation.get("precision") == precision and evaluation.get("backend") == build["backend"]
    if same and evaluation.get("engine_bytes") is not None and build.get("engine_bytes") is not None:
        same = evaluation["engine_bytes"] == build["engine_bytes"]
    if not same:
        raise ArtifactError(
            f"{eval_path}: measures another build ({evaluation.get('precision')}, {evaluation.get('backend')}, "
            f"{evaluation.get('engine_bytes')} bytes) than {build_dir} ({precision}, {build['backend']}, {build.get('engine_bytes')} bytes); "
            f"re-run evaluate@{precision}"
        )
    return artifact


def _layers_from_engine(engine: Path) -> Optional[str]:
    """TensorRT's engine inspector as JSON (needs TensorRT here); None when unavailable."""
    try:
        import tensorrt as trt

        runtime = trt.Runtime(trt.Logger(trt.Logger.ERROR))
        eng = runtime.deserialize_cuda_engine(engine.read_bytes())
        if eng is None:
            return None
        inspector = eng.create_engine_inspector()
        return inspector.get_engine_information(trt.LayerInformationFormat.JSON)
    except Exception:
        return None


def publish_variant(
    cfg: Config,
    precision: str,
    build_dir: Path,
    eval_path: Path,
    registry: Path,
    prepare_dir: Path,
    calib_dir: Path,
    onnx_path: Path,
    published_at: Optional[str] = None,
) -> dict[str, Any]:
    # scratch holds a temporary folder when layers.json must be regenerated from the engine
    with contextlib.ExitStack() as scratch:
        build = read_json(build_dir / "build.json", "build report")
        evaluation = read_json(eval_path, "evaluation report")
        onnx_sha = sha256_file(onnx_path)
        artifact = _check_consistent(precision, build_dir, build, eval_path, evaluation, onnx_sha)
        backend = build["backend"]
        notes: list[str] = []

        # Files of the version folder: name -> (source, role).
        sources: dict[str, tuple[Path, str]] = {
            build["artifact"]: (artifact, ROLE_ARTIFACT),
            "build.json": (build_dir / "build.json", ROLE_BUILD),
            "eval.json": (Path(eval_path), ROLE_METRICS),
        }
        inputs: dict[str, Any] = {"checkpoint": sha256_file(prepare_dir / "model.pt"), "onnx": onnx_sha}
        config = config_subset(cfg, precision, backend)
        inputs["config"] = _sha_json(config)
        if precision == "int8":
            inputs["calibration_data"] = sha256_file(prepare_dir / "calib.npy")
            # The cache the calibrate stage wrote is an input; the one a build used (its own
            # folder's, e.g. TensorRT's calibrator output) is what ships with the engine.
            stage_cache = calib_dir / CACHE
            inputs["calibration_cache"] = sha256_file(stage_cache) if stage_cache.is_file() else None
            ranges = calib_dir / "ranges.json"
            if ranges.is_file():
                inputs["calibration_ranges"] = sha256_file(ranges)
            ship = build_dir / CACHE if (build_dir / CACHE).is_file() else stage_cache
            if ship.is_file():
                sources[CACHE] = (ship, ROLE_CACHE)
            else:
                notes.append("no calibration cache: neither the build nor the calibrate stage wrote calibration.cache")
        if backend == "tensorrt":
            layers = build_dir / LAYERS
            if not layers.is_file():
                info = _layers_from_engine(artifact)
                if info is not None:
                    layers = Path(scratch.enter_context(tempfile.TemporaryDirectory())) / LAYERS
                    layers.write_text(info)
            if layers.is_file():
                sources[LAYERS] = (layers, ROLE_LAYERS)
            else:
                notes.append("no layer information: the build wrote no layers.json and TensorRT is not available here to inspect the engine")

        export_json = Path(onnx_path).parent / "export.json"
        export_info = read_json(export_json, "export report") if export_json.is_file() else {}
        files = {name: {"sha256": sha256_file(src), "bytes": src.stat().st_size, "role": role} for name, (src, role) in sources.items()}
        manifest = make_manifest(
            cfg.model.name,
            precision,
            build,
            inputs=inputs,
            settings=_settings(precision, build),
            metrics=_metrics(evaluation),
            files=files,
            software=_software(build, export_info),
            config=config,
            io={k: export_info[k] for k in ("inputs", "outputs", "opset") if k in export_info},
            published_at=published_at or dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            notes=notes,
        )
        status, dest = publish_version(registry, manifest, {n: s for n, (s, _) in sources.items()})
        return {"precision": precision, "version": manifest["version"], "path": str(dest), "status": status, "notes": notes}


def run(
    cfg: Config,
    build_root: Path,
    eval_dir: Path,
    registry: Optional[Path],
    out: Path,
    prepare_dir: Path = A / "prepare",
    calib_dir: Path = A / "calibrate",
    onnx_path: Path = A / "export" / "model.onnx",
    pointers: Optional[Path] = None,
) -> dict[str, Any]:
    """Publish every variant in publish.precisions, then point `pointers/<precision>/`
    (default: `current/` beside `out`) at the versions they are at now."""
    registry = Path(registry or cfg.publish.registry)
    pointers = Path(pointers) if pointers is not None else Path(out).parent / "current"
    for p in cfg.publish.precisions:  # all or nothing: check every variant exists first
        if not (Path(build_root) / p / "build.json").is_file():
            raise ArtifactError(f"{build_root}/{p}/build.json: variant not built; run build@{p} or drop it from publish.precisions")
    published = [
        publish_variant(cfg, p, Path(build_root) / p, Path(eval_dir) / f"{p}.json", registry, Path(prepare_dir), Path(calib_dir), Path(onnx_path))
        for p in cfg.publish.precisions
    ]
    where = write_pointers(pointers, {v["precision"]: Path(v["path"]) for v in published})
    for v in published:
        v["pointer"] = where[v["precision"]]
    report = {"registry": str(registry), "pointers": str(pointers), "published": published}
    # The file DVC tracks is the same on a no-op re-run: the status is printed, not recorded.
    write_json(out, {**report, "published": [{k: v for k, v in p.items() if k != "status"} for p in published]})
    return report
