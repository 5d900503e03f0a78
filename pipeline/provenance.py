"""Provenance checks: a stage uses an input only when the stage before produced (or
validated) exactly those bytes, and otherwise says which stage to re-run.

Every report records the sha256 of what its stage read and wrote. A file changed after
its stage ran (a bit flip, a hand edit, a file copied in from another run) no longer
matches, and the stage reading it stops with a message naming the file, both hashes and
the stage to re-run; nothing is built or calibrated from it."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Union

from .errors import PipelineError
from .fileio import CALIBRATE_REPORT, not_a_folder, onnx_external_files, sha256_file, sha256_model
from .reports import CalibrateReport, ExportReport, PrepareReport, ValidateReport, read_report


class ProvenanceError(PipelineError):
    """An input that its producing stage did not write or validate (stale or changed)."""


_CACHE: dict[tuple, str] = {}


def sha256_of(path: Union[str, Path]) -> str:
    """sha256 of an input file (an ONNX model's with its external-data files: fileio.sha256_model),
    remembered per (path, size, mtime) of the file and of those it loads, so a stage hashes each input once."""
    p = Path(path)
    not_a_folder(p, "this input", ProvenanceError)
    try:
        st = p.stat()
    except OSError:
        return sha256_file(p)  # raises the not-found error
    key: tuple = (str(p.resolve()), st.st_size, st.st_mtime_ns)
    if p.suffix.lower() == ".onnx":
        for loc in onnx_external_files(p):
            try:
                est = (p.parent / loc).stat()
                key += (loc, est.st_size, est.st_mtime_ns)
            except OSError:
                return sha256_model(p)  # raises the missing-file error
    if key not in _CACHE:
        _CACHE[key] = sha256_model(p)
    return _CACHE[key]


def require_hash(path: Union[str, Path], expected: Optional[str], what: str, report: Union[str, Path], stage: str) -> str:
    """The file's sha256, which must be `expected` (what `report` of `stage` recorded)."""
    got = sha256_of(path)
    if expected is None:
        raise ProvenanceError(f"{report}: records no sha256 for {what} ({path}); re-run {stage} (dvc repro {stage})")
    if got != expected:
        ext = onnx_external_files(path) if Path(path).suffix.lower() == ".onnx" else []
        if ext:
            what = f"{what} (with its external data {', '.join(ext)})"
        raise ProvenanceError(
            f"{path}: {what} is not the file {stage} wrote or checked (sha256 {got[:12]}…, {report} records "
            f"{expected[:12]}…): it changed after {stage} ran; re-run {stage} (dvc repro {stage})")
    return got


def _beside(path: Union[str, Path], name: str) -> Path:
    return Path(path).parent / name


def prepared(path: Union[str, Path], key: str, report: Optional[Union[str, Path]] = None) -> PrepareReport:
    """`path` (model.pt, calib.npz or eval.npz) as prepare wrote it; prepare.json beside it by default."""
    report = Path(report) if report else _beside(path, "prepare.json")
    rep = read_report(report, PrepareReport, "prepare report", "prepare", ProvenanceError)
    require_hash(path, rep.sha256.get(key), key, report, "prepare")
    return rep


def exported(onnx_path: Union[str, Path], report: Optional[Union[str, Path]] = None) -> ExportReport:
    """The ONNX as export wrote it (export.json beside it by default)."""
    report = Path(report) if report else _beside(onnx_path, "export.json")
    rep = read_report(report, ExportReport, "export report", "export", ProvenanceError)
    require_hash(onnx_path, rep.sha256.get("onnx"), "the ONNX model", report, "export")
    return rep


def validated(onnx_path: Union[str, Path], validation: Union[str, Path]) -> ValidateReport:
    """The ONNX must be the one validate compared against PyTorch, and validation must have passed."""
    rep = read_report(validation, ValidateReport, "validation report", "validate", ProvenanceError)
    require_hash(onnx_path, rep.sha256.get("onnx"), "the ONNX model", validation, "validate")
    if not rep.passed:
        failed = [n for n, o in rep.outputs.items() if not o.passed]
        raise ProvenanceError(f"{validation}: the ONNX failed validation (outputs {', '.join(failed) or '?'} beyond "
                              "tolerance); fix the export or the tolerances and re-run validate")
    return rep


def calibrated(calib_dir: Union[str, Path], onnx_sha: str, files: tuple[str, ...]) -> CalibrateReport:
    """calibrate's outputs in `calib_dir`, made from the ONNX with sha256 `onnx_sha`, unchanged since."""
    calib_dir = Path(calib_dir)
    report = calib_dir / CALIBRATE_REPORT
    rep = read_report(report, CalibrateReport, "calibration report", "calibrate", ProvenanceError)
    if rep.sha256.get("onnx") != onnx_sha:
        raise ProvenanceError(
            f"{report}: calibrated another ONNX (sha256 {str(rep.sha256.get('onnx'))[:12]}…) than the one being built "
            f"({onnx_sha[:12]}…); its cache and Q/DQ model do not fit this network: re-run calibrate (dvc repro calibrate)")
    for name in files:
        require_hash(calib_dir / name, rep.sha256.get(name), name, report, "calibrate")
    return rep


def same_file(a: Union[str, Path], b: Union[str, Path]) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False
