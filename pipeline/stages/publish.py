"""publish: each variant as a versioned folder `<registry>/<model>/<version>/` holding the
artifact (engine or onnxruntime model), manifest.json, build.json, the variant's metrics
(eval.json), the calibration cache (int8) and, for TensorRT, the layer information
(layers.json). The version is derived from the variant's inputs (pipeline.manifest); the
folder is written once (pipeline.registry): publishing the same content again is a no-op,
different content under an existing version is an error.

Before anything is written, every variant is checked: its build is of this ONNX and
unchanged since, its evaluation measured that build, and an int8 calibration cache is
read and its header checked against the TensorRT the engine was built with (a truncated
cache, or one for another TensorRT, is never published).

Besides the registry (a DVC output with `persist: true`, so versions accumulate), publish
rewrites `<pointers>/<precision>/`, a copy of the version each variant is at now: the
stable paths that dvc.yaml's `artifacts:` block names, and `published.json` (also
persisted, so a failed publish leaves the last good one in place)."""

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
from ..fileio import CACHE_FILE, RANGES_FILE, project_path, sha256_file, sha256_model, write_json
from ..manifest import (
    ROLE_ARTIFACT,
    ROLE_BUILD,
    ROLE_CACHE,
    ROLE_LAYERS,
    ROLE_METRICS,
    build_environment,
    build_hardware_compatibility,
    make_manifest,
    read_manifest,
)
from ..registry import publish as publish_version
from ..registry import write_pointers
from ..reports import BuildReport, CalibrateReport, EvalReport, ExportReport, read_report

A = Path("artifacts")
LAYERS = "layers.json"

# Build settings that shape a TensorRT engine (timing_cache is a path: it changes how
# fast a build is, not what it means; backend is in the version string as resolved).
_TRT_BUILD_KEYS = ("workspace_mb", "profile", "profiles", "layer_precisions", "fp16")
_TRT_INT8_KEYS = ("int8_route", "int8_calibrator", "calibration_source", "int8_float_fallback")


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
    elif precision == "fp16":
        out["build"] = {"fp16": raw["build"]["fp16"]}
    if precision == "int8":
        out["calibration"] = raw["calibration"]
    return out


def _sha_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _software(build: BuildReport, export_info: Optional[ExportReport]) -> dict[str, Any]:
    import numpy
    import onnx

    sw: dict[str, Any] = {"trtpipe": __version__, "onnx": onnx.__version__, "numpy": numpy.__version__}
    if export_info is not None:
        sw["torch_export"] = export_info.torch_version
    env = build_environment(build.model_dump())
    if build.backend == "tensorrt":
        sw.update({"tensorrt": env.get("tensorrt"), "cuda_runtime": env.get("cuda_runtime"), "driver": env.get("driver")})
    else:
        sw["onnxruntime"] = build.backend_version
    return {k: v for k, v in sw.items() if v is not None}


def _settings(precision: str, build: BuildReport) -> dict[str, Any]:
    """What the backend says it did (build.json), hashed into the version."""
    return {"precision": precision, "flags": build.flags, "profiles": build.profiles, "workspace_mb": build.workspace_mb}


def _metrics(evaluation: EvalReport) -> dict[str, Any]:
    agree = [a.top1_agreement for a in evaluation.agreement_fp32.values() if a.top1_agreement is not None]
    return {
        "backend": evaluation.backend,
        "samples": evaluation.samples,
        "task": evaluation.metrics,
        "metric_outputs": evaluation.metric_outputs,
        "top1_agreement_fp32": min(agree) if agree else None,
        "agreement_fp32": {n: a.model_dump() for n, a in evaluation.agreement_fp32.items()},
        "agreement_pytorch": {n: a.model_dump() for n, a in evaluation.agreement_pytorch.items()},
        "latency": [r.model_dump() for r in evaluation.latency],
        "device": evaluation.device,
        "flags": evaluation.flags,
    }


def _check_consistent(precision: str, build_dir: Path, build: BuildReport, eval_path: Path, evaluation: EvalReport,
                      onnx_sha: str) -> Path:
    """The build, its evaluation and the ONNX given must belong together; returns the artifact path."""
    artifact = build_dir / build.artifact
    if not artifact.is_file():
        raise ArtifactError(f"{artifact}: built artifact missing; re-run build@{precision}")
    if build.precision != precision:
        raise ArtifactError(f"{build_dir}/build.json: is a {build.precision} build, expected {precision}; re-run build@{precision}")
    if sha256_file(artifact) != build.sha256:
        raise ArtifactError(f"{artifact}: does not match the sha256 its build.json records; the build folder was changed: re-run build@{precision}")
    if build.onnx_sha256 != onnx_sha:
        raise ArtifactError(
            f"{build_dir}/build.json: built from another ONNX (sha256 {build.onnx_sha256[:12]}…) than the one given "
            f"({onnx_sha[:12]}…); re-run build@{precision} (dvc repro)"
        )
    if evaluation.precision != precision or evaluation.sha256.get("artifact") != build.sha256:
        raise ArtifactError(
            f"{eval_path}: measures another build ({evaluation.precision}, {evaluation.backend}, artifact "
            f"{str(evaluation.sha256.get('artifact'))[:12]}…) than {build_dir} ({precision}, {build.backend}, "
            f"{build.sha256[:12]}…); re-run evaluate@{precision}"
        )
    return artifact


def _check_hardware_compatibility(cfg: Config, precision: str, build_dir: Path, build: BuildReport) -> None:
    """A TensorRT engine must have been built with the build.hardware_compatibility the config asks for:
    the manifest says where the engine runs from what build.json records, never from the config."""
    if build.backend != "tensorrt":
        return
    asked, built = cfg.build.hardware_compatibility, build_hardware_compatibility(build.model_dump())
    if asked != built:
        raise ArtifactError(f"{build_dir}/build.json: the engine was built with hardware compatibility {built}, but "
                            f"build.hardware_compatibility is {asked}; re-run build@{precision}")


def _check_cache(path: Path, build: BuildReport, calib: Optional[CalibrateReport], network: Any = None) -> str:
    """Read the cache that would ship and check its header: the TensorRT the engine was built
    with (TensorRT builds), or the header the calibrate stage recorded; and its values: every
    scale finite and > 0 (0 for weights) and of a tensor of `network` (calibration.cache.
    check_scales). Returns the header."""
    from calibration.cache import check_scales, read_cache
    from calibration.errors import CalibrationError

    try:
        if build.backend == "tensorrt":
            algorithm = read_cache(path).algorithm
            cache = read_cache(path, expect_version=build.backend_version, expect_algorithm=algorithm)
        else:
            cache = read_cache(path)
            if calib is not None and cache.header != calib.cache.get("header"):
                raise CalibrationError(f"calibration cache {path} has header {cache.header!r}, but calibrate wrote "
                                       f"{calib.cache.get('header')!r}")
        check_scales(cache, path, network)
    except CalibrationError as e:
        raise ArtifactError(f"{path}: will not publish this calibration cache: {e}") from None
    if not cache.scales:
        raise ArtifactError(f"{path}: calibration cache holds no tensor scales (truncated?); re-run calibrate")
    return cache.header


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


def prepare_variant(cfg: Config, precision: str, build_dir: Path, eval_path: Path, prepare_dir: Path,
                    calib_dir: Path, onnx_path: Path, scratch: contextlib.ExitStack,
                    published_at: Optional[str] = None) -> tuple[dict[str, Any], dict[str, Path], list[str]]:
    """Check one variant and make its manifest: (manifest, files to publish, notes)."""
    from ..provenance import ProvenanceError, calibrated, prepared

    build = read_report(build_dir / "build.json", BuildReport, "build report", f"build@{precision}")
    evaluation = read_report(eval_path, EvalReport, "evaluation report", f"evaluate@{precision}")
    onnx_sha = sha256_model(onnx_path)  # with its external data, as provenance hashes it
    artifact = _check_consistent(precision, build_dir, build, eval_path, evaluation, onnx_sha)
    _check_hardware_compatibility(cfg, precision, build_dir, build)
    notes: list[str] = []
    sources: dict[str, tuple[Path, str]] = {
        build.artifact: (artifact, ROLE_ARTIFACT),
        "build.json": (build_dir / "build.json", ROLE_BUILD),
        "eval.json": (Path(eval_path), ROLE_METRICS),
    }
    model_pt = prepare_dir / "model.pt"
    prepared(model_pt, "model.pt")
    inputs: dict[str, Any] = {"checkpoint": sha256_file(model_pt), "onnx": onnx_sha}
    config = config_subset(cfg, precision, build.backend)
    inputs["config"] = _sha_json(config)
    # What the build itself decided (the ranges and tune result it applied, the nodes it kept in
    # float) and, where the artifact is a deterministic model (onnxruntime), the model itself:
    # a tuned int8 build never takes the version of the untuned one.
    inputs["build"] = _sha_json({"calibration": build.calibration, "kept_fp32": build.kept_fp32, "tune": build.tune})
    if build.backend != "tensorrt":
        inputs["artifact"] = build.sha256
    if precision == "int8":
        calib_data = prepare_dir / "calib.npz"
        prepared(calib_data, "calib.npz")
        calib = calibrated(calib_dir, onnx_sha, (CACHE_FILE, RANGES_FILE))
        if calib.sha256.get("calib_data") != sha256_file(calib_data):
            raise ProvenanceError(f"{calib_dir}/calibrate.json: calibrated other samples than {calib_data}; re-run calibrate")
        inputs["calibration_data"] = sha256_file(calib_data)
        # The cache the calibrate stage wrote is an input; the one the build used (its own
        # folder's: completed for the network, or TensorRT's calibrator output) ships with the engine.
        inputs["calibration_cache"] = calib.sha256[CACHE_FILE]
        inputs["calibration_ranges"] = calib.sha256[RANGES_FILE]
        # Values a checksum cannot vet: the ranges and caches match calibrate.json's hashes,
        # but their scales must also be numbers TensorRT can use, of this network's tensors.
        from calibration.cache import check_ranges, check_scales, network_names, read_cache
        from calibration.errors import CalibrationError

        ship = build_dir / CACHE_FILE if (build_dir / CACHE_FILE).is_file() else calib_dir / CACHE_FILE
        try:
            network = network_names(onnx_path)
            check_ranges(calib_dir / RANGES_FILE, network)
            if ship != calib_dir / CACHE_FILE:  # the calibrate stage's cache, an input of the build
                check_scales(read_cache(calib_dir / CACHE_FILE), calib_dir / CACHE_FILE, network)
        except CalibrationError as e:
            raise ArtifactError(f"will not publish int8: {e}") from None
        _check_cache(ship, build, calib, network)
        sources[CACHE_FILE] = (ship, ROLE_CACHE)
    if build.backend == "tensorrt":
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
    export_info = read_report(export_json, ExportReport, "export report", "export") if export_json.is_file() else None
    files = {name: {"sha256": sha256_file(src), "bytes": src.stat().st_size, "role": role} for name, (src, role) in sources.items()}
    manifest = make_manifest(
        cfg.model.name,
        precision,
        build.model_dump(),
        inputs=inputs,
        settings=_settings(precision, build),
        metrics=_metrics(evaluation),
        files=files,
        software=_software(build, export_info),
        config=config,
        io={"inputs": [t.model_dump() for t in export_info.inputs], "outputs": [t.model_dump() for t in export_info.outputs],
            "opset": export_info.opset} if export_info else {},
        published_at=published_at or dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        notes=notes,
    )
    return manifest, {n: s for n, (s, _) in sources.items()}, notes


def publish_variant(cfg: Config, precision: str, build_dir: Path, eval_path: Path, registry: Path, prepare_dir: Path,
                    calib_dir: Path, onnx_path: Path, published_at: Optional[str] = None) -> dict[str, Any]:
    with contextlib.ExitStack() as scratch:
        manifest, files, notes = prepare_variant(cfg, precision, build_dir, eval_path, prepare_dir, calib_dir, onnx_path,
                                                 scratch, published_at)
        status, dest = publish_version(registry, manifest, files)
        return {"precision": precision, "version": manifest["version"], "path": str(dest), "status": status,
                "notes": notes}


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
    (default: `current/` beside `out`) at the versions they are at now. Every variant is
    checked before the first one is published."""
    registry = project_path(registry if registry is not None else cfg.publish.registry,
                            "--registry" if registry is not None else "publish.registry")
    out = project_path(out, "--out")
    pointers = project_path(pointers, "pointers") if pointers is not None else Path(out).parent / "current"
    for p in cfg.publish.precisions:  # all or nothing: check every variant exists first
        if not (Path(build_root) / p / "build.json").is_file():
            raise ArtifactError(f"{build_root}/{p}/build.json: variant not built; run build@{p} or drop it from publish.precisions")
    stamp = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    with contextlib.ExitStack() as scratch:
        prepared = [(p, *prepare_variant(cfg, p, Path(build_root) / p, Path(eval_dir) / f"{p}.json", Path(prepare_dir),
                                          Path(calib_dir), Path(onnx_path), scratch, stamp))
                    for p in cfg.publish.precisions]
        published = []
        for p, manifest, files, notes in prepared:
            status, dest = publish_version(registry, manifest, files)
            published.append({"precision": p, "version": manifest["version"], "path": str(dest), "status": status,
                              "notes": notes, "content_digest": read_manifest(dest)["content_digest"]})
    where = write_pointers(pointers, {v["precision"]: Path(v["path"]) for v in published})
    for v in published:
        v["pointer"] = where[v["precision"]]
    report = {"registry": str(registry), "pointers": str(pointers), "published": published}
    # The file DVC tracks is the same on a no-op re-run: the status is printed, not recorded.
    write_json(out, {**report, "published": [{k: v for k, v in p.items() if k != "status"} for p in published]})
    return report
