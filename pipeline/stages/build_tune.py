"""build@int8 with `build.int8_from_tune: true`: the layers `trtpipe tune` chose stay out of INT8.

* implicit TensorRT route: tune's `layer_precisions` (every node of each kept layer, exact
  ONNX names) are added after the user's own `build.layer_precisions` (the user's patterns
  are matched first), pinning the kept layers to `tune.keep_precision`;
* when tune chose max|x| ranges for some layers' inputs (pipeline.tuning.methods), the
  implicit route reads tune's `calibration.cache` (calibrate's, with those scales replaced);
* explicit TensorRT route and the onnxruntime int8 variant: tune's Q/DQ ONNX (no Q/DQ on
  the kept layers, the tuned ranges) replaces calibrate's. TensorRT 8.x runs those float layers in FP16 (the
  FP16 flag of `int8_float_fallback: fp16`); a strongly typed network (TensorRT >= 10) runs
  them in the ONNX's FP32.

Tune's outputs must be made from this ONNX and from the calibrate outputs being built with
(sha256 recorded in tune.json), unchanged since, and must have met their budget.
build.json's `tune` says what was applied."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..config import Config
from ..errors import ArtifactError
from ..fileio import CACHE_FILE, CALIBRATE_REPORT, QDQ_FILE
from ..reports import TuneReport, read_report


def apply_tune(cfg: Config, route: str, tune_dir: Path, calib_dir: Path, onnx_sha: str) -> tuple[Config, Path, dict[str, Any]]:
    """(the config to build with, the folder the Q/DQ model is read from, build.json's `tune`)."""
    from ..provenance import ProvenanceError, require_hash, sha256_of

    report_path = tune_dir / "tune.json"
    rep = read_report(report_path, TuneReport, "tune report", "tune", ProvenanceError)
    if rep.sha256.get("onnx") != onnx_sha:
        raise ProvenanceError(f"{report_path}: tuned another ONNX (sha256 {str(rep.sha256.get('onnx'))[:12]}…) than the "
                              f"one being built ({onnx_sha[:12]}…); re-run tune (dvc repro tune)")
    cal_sha = sha256_of(calib_dir / CALIBRATE_REPORT)
    if rep.sha256.get(CALIBRATE_REPORT) != cal_sha:
        raise ProvenanceError(f"{report_path}: tuned with other calibrate outputs than {calib_dir} (calibrate.json "
                              f"sha256 {cal_sha[:12]}…); re-run tune (dvc repro tune)")
    if not rep.met:
        raise ArtifactError(f"{report_path}: tune did not meet its budget ({rep.budget.get('text')}); loosen "
                            "tune.budget and re-run tune, or set build.int8_from_tune: false")
    kept = [k["layer"] for k in rep.kept]
    info: dict[str, Any] = {"applied": True, "route": route, "tune_json_sha256": sha256_of(report_path),
                            "budget": rep.budget.get("text"), "kept": kept, "keep_precision": rep.keep_precision,
                            "kept_nodes": [n for k in rep.kept for n in k.get("nodes", [k["layer"]])],
                            "tune_backend": rep.backend,
                            "metric_full": rep.reference_points.get("chosen", {}).get("metric_full")}
    if route == "implicit":
        require_hash(tune_dir / "layer_precisions.json", rep.sha256.get("layer_precisions.json"),
                     "layer_precisions.json", report_path, "tune")
        pins = dict(cfg.build.layer_precisions)
        for pattern, precision in rep.layer_precisions.items():
            pins.setdefault(pattern, precision)
        info["layer_precisions"] = dict(rep.layer_precisions)
        build = cfg.build.model_copy(update={"layer_precisions": pins})
        if rep.methods.get("tensors"):  # tuned ranges: tune's copy of calibrate's cache carries them
            require_hash(tune_dir / CACHE_FILE, rep.sha256.get(CACHE_FILE), CACHE_FILE,
                         report_path, "tune")
            info["ranges"] = {"cache": str(tune_dir / CACHE_FILE), "minmax_layers": list(rep.methods["layers"]),
                              "tensors": len(rep.methods["tensors"])}
            calib_dir = tune_dir
        return cfg.model_copy(update={"build": build}), calib_dir, info
    require_hash(tune_dir / QDQ_FILE, rep.sha256.get(QDQ_FILE), "the tuned Q/DQ model", report_path,
                 "tune")
    info["qdq_onnx"] = str(tune_dir / QDQ_FILE)
    info["qdq_sha256"] = rep.sha256.get(QDQ_FILE)
    return cfg, tune_dir, info
