"""Loading ONNX files and onnxruntime sessions with errors a user can act on."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .errors import ModelError


def load_onnx(path: str | Path, check: bool = True) -> Any:
    import onnx

    path = Path(path)
    from .fileio import not_a_folder

    not_a_folder(path, "an ONNX model", ModelError)
    if not path.is_file():
        raise ModelError(f"{path}: ONNX file not found; run the export stage (dvc repro export) first")
    try:
        model = onnx.load(str(path))
    except Exception as e:
        raise ModelError(f"{path}: not a readable ONNX model ({type(e).__name__}: {str(e).splitlines()[0][:200]}); re-run export") from None
    if check:
        try:
            onnx.checker.check_model(model)
        except Exception as e:
            raise ModelError(f"{path}: ONNX checker rejects the model ({str(e).splitlines()[0][:200]})") from None
    return model


def ort_session(path: str | Path, threads: int | None = None, optimized_path: str | Path | None = None,
                mode: str = "exact") -> Any:
    """A CPU onnxruntime session (calibration.ort_session: one helper for every session).
    `mode` "exact" (the default) runs a Q/DQ model with its own dequantize -> float op ->
    quantize arithmetic on every CPU; "fused" uses onnxruntime's integer kernels.
    `optimized_path` saves the graph onnxruntime optimized (extended level)."""
    from calibration.ort_session import make_session

    level = "extended" if optimized_path is not None else "all"
    return make_session(path, mode=mode, threads=threads, level=level, optimized_path=optimized_path,
                        error=ModelError)


def run_batched(session: Any, x: Any, batch_size: int) -> dict[str, Any]:
    """Run `x` (a dict input name -> array, or one array for a one-input model) through
    `session` in batches; returns one concatenated array per output, by name."""
    import numpy as np

    names = [i.name for i in session.get_inputs()]
    if not isinstance(x, dict):
        x = {names[0]: x}
    out_names = [o.name for o in session.get_outputs()]
    n = len(next(iter(x.values())))
    parts: dict[str, list[Any]] = {k: [] for k in out_names}
    for i in range(0, n, batch_size):
        res = session.run(None, {k: v[i : i + batch_size] for k, v in x.items()})
        for k, r in zip(out_names, res):
            parts[k].append(r)
    return {k: np.concatenate(v) for k, v in parts.items()}
