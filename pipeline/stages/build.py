"""build@<precision>: one engine (TensorRT) or optimized model (onnxruntime) per precision.

Inputs are checked first: the ONNX must be the one validate passed; int8 needs calibrate's
outputs made from that same ONNX and unchanged since; the calibration samples must be
prepare's. Output folder (replaced atomically): the artifact and build.json (a
BuildReport: backend + version, flags, optimization profiles, workspace, build seconds,
bytes, sha256, how int8 ranges came to be, the nodes an fp16 variant keeps in fp32).
fp16 is planned here once (backends.trt_typed.plan_fp16): the nodes kept in FP32 from the
calibrate stage's max|x| of every tensor (maxima.json), and the typed FP16 ONNX
(model.fp16.onnx, its sha256 in build.json) that the backend builds as it is given.
With `build.int8_from_tune`, int8 keeps the layers `trtpipe tune` chose (--tune-dir;
pipeline/stages/build_tune.py) and build.json's `tune` says so."""

from __future__ import annotations

import datetime as dt
import time
from pathlib import Path
from typing import Optional

from ..backends import BuildRequest, get_backend
from ..config import PRECISIONS, Config
from ..errors import UsageError
from ..fileio import CACHE_FILE, QDQ_FILE, claim_dir, named_as, sha256_model, staging_dir
from ..reports import BuildReport, write_report

# The calibrate outputs each route reads.
INT8_FILES = {"onnxruntime": (QDQ_FILE,), "explicit": (QDQ_FILE,),
              "implicit": (CACHE_FILE,)}


def _trt_int8_route(requested: str) -> str:
    """implicit / explicit for this TensorRT (`build.int8_route: auto` resolved; implicit on
    TensorRT 11 refused in one line), before any calibrate output is read."""
    from ..backends.trt_build import resolve_int8_route, trt_api
    from ..runtime.trt_common import require_tensorrt

    return resolve_int8_route(trt_api(require_tensorrt()), requested)[0]


def run(
    cfg: Config,
    precision: str,
    onnx_path: Path,
    out_dir: Path,
    calib_dir: Optional[Path] = None,
    calib_data: Optional[Path] = None,
    validation: Optional[Path] = None,
    tune_dir: Optional[Path] = None,
) -> BuildReport:
    from ..onnx_utils import load_onnx
    from ..provenance import calibrated, prepared, sha256_of, validated

    if precision not in PRECISIONS:
        raise UsageError(f"--precision '{precision}' is not one of {', '.join(PRECISIONS)}")
    claim_dir(out_dir, "build", inputs=(onnx_path, calib_dir, calib_data, validation, tune_dir),
              identity={"precision": precision})  # only into an output it owns (fileio.claim_dir)
    onnx_path = Path(onnx_path)
    load_onnx(onnx_path)
    validated(onnx_path, validation or Path("artifacts", "validate", "validate.json"))
    onnx_sha = sha256_of(onnx_path)
    backend = get_backend(cfg.build.backend)
    if precision == "int8":
        if calib_dir is None:
            raise UsageError("build --precision int8 needs --calib-dir (the calibrate stage's folder)")
        route = "onnxruntime" if backend.name == "onnxruntime" else _trt_int8_route(cfg.build.int8_route)
        calibrated(calib_dir, onnx_sha, INT8_FILES[route])
    if precision == "fp16" and cfg.build.fp16.range_check:  # which nodes stay in FP32: calibrate's max|x| per tensor
        if calib_dir is None:
            raise UsageError("build --precision fp16 reads the max|x| the calibrate stage measured (build.fp16.range_check):"
                             " pass --calib-dir (the calibrate stage's folder), or set build.fp16.range_check: false")
        # maxima.json is checked where it is read (trt_typed.read_maxima: made from this ONNX); calibrate.json is
        # not read, so an edit of calibration.method (which leaves maxima.json as it is) rebuilds no fp16 variant
    applied = None
    calibrate_dir = calib_dir  # calibrate's folder (maxima.json), also where tune's result is applied
    if precision == "int8" and cfg.build.int8_from_tune:
        from .build_tune import apply_tune

        cfg, calib_dir, applied = apply_tune(cfg, route, Path(tune_dir or Path("artifacts", "tune")), Path(calib_dir),
                                             onnx_sha)
    if calib_data is not None and Path(calib_data).is_file() and (Path(calib_data).parent / "prepare.json").is_file():
        prepared(calib_data, "calib.npz")
    start = time.perf_counter()
    with staging_dir(out_dir) as tmp:
        fp16 = None
        if precision == "fp16":  # planned here, once: the backend builds the typed FP16 ONNX it is given
            from ..backends.trt_typed import plan_fp16

            fp16 = plan_fp16(onnx_path, cfg, tmp, backend.fp16_route(cfg), calib_dir=Path(calib_dir) if calib_dir else None)
        req = BuildRequest(precision, onnx_path, tmp, cfg, calib_dir=Path(calib_dir) if calib_dir else None,
                           calib_data=Path(calib_data) if calib_data else None, fp16=fp16)
        typed_why = backend.int8_typed(cfg) if precision == "int8" else None
        if typed_why:  # strongly typed INT8: the Q/DQ ONNX with its float parts in FP16, planned here, once
            from dataclasses import replace

            from ..backends.trt_typed import plan_int8_typed

            fp32_nodes = ({n: f"tune kept its layer in {applied['keep_precision']}" for n in applied["kept_nodes"]}
                          if applied and applied.get("keep_precision") == "fp32" else {})
            info = plan_int8_typed(onnx_path, Path(calib_dir) / QDQ_FILE, cfg, tmp, Path(calibrate_dir),
                                   Path(calib_data) if calib_data else None, fp32_nodes)
            req = replace(req, qdq_onnx=Path(info.pop("path")), typed_onnx={**info, "why": typed_why})
        result = backend.build(req)
        artifact = tmp / result.artifact
        report = BuildReport(
            model=cfg.model.name,
            precision=precision,
            backend=backend.name,
            backend_version=backend.version(),
            backend_requested=cfg.build.backend,
            artifact=result.artifact,
            onnx_sha256=onnx_sha,
            sha256=sha256_model(artifact),
            engine_bytes=artifact.stat().st_size,
            build_seconds=round(time.perf_counter() - start, 3),
            built_at=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            environment=backend.environment(),
            flags=result.flags,
            profiles=result.profiles,
            workspace_mb=result.workspace_mb,
            calibration=result.calibration,
            kept_fp32=result.kept_fp32,
            details=named_as(result.details, tmp, out_dir),  # files the build wrote beside the engine
            tune=applied,
        )
        write_report(tmp / "build.json", report)
    return report
