"""build@<precision>: one engine (TensorRT) or optimized model (onnxruntime) per precision.

Output folder (replaced atomically): the artifact and build.json (backend + version,
flags, profile, workspace, build seconds, bytes, sha256, calibration source)."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any, Optional

from ..backends import BuildRequest, get_backend
from ..config import PRECISIONS, Config
from ..errors import UsageError
from ..fileio import sha256_file, staging_dir, write_json

SCHEMA_VERSION = 1


def run(
    cfg: Config,
    precision: str,
    onnx_path: Path,
    out_dir: Path,
    calib_dir: Optional[Path] = None,
    calib_data: Optional[Path] = None,
) -> dict[str, Any]:
    if precision not in PRECISIONS:
        raise UsageError(f"--precision '{precision}' is not one of {', '.join(PRECISIONS)}")
    from ..onnx_utils import load_onnx

    load_onnx(onnx_path)
    backend = get_backend(cfg.build.backend)
    with staging_dir(out_dir) as tmp:
        req = BuildRequest(precision, Path(onnx_path), tmp, cfg, calib_dir=calib_dir, calib_data=calib_data)
        result = backend.build(req)
        report = {
            "schema_version": SCHEMA_VERSION,
            "model": cfg.model.name,
            "precision": precision,
            "backend": backend.name,
            "backend_version": backend.version(),
            "backend_requested": cfg.build.backend,
            "artifact": result.artifact,
            "onnx_sha256": sha256_file(onnx_path),
            "environment": backend.environment(),
            "built_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            **result.info,
        }
        write_json(tmp / "build.json", report)
    return report
