"""validate: the exported ONNX in onnxruntime against PyTorch on real evaluation samples.

Per output: max abs diff and cosine; the stage fails (ToleranceError) when either
exceeds the config's tolerance, after writing its report so the numbers can be read.
Also writes the PyTorch outputs (reference.npz) that evaluate compares every variant to."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from ..config import Config
from ..errors import DataError, ToleranceError
from ..fileio import staging_dir, write_json
from ..metrics import agreement


def load_eval(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    if not Path(path).is_file():
        raise DataError(f"{path}: evaluation data not found; run the prepare stage first")
    with np.load(path) as z:
        return z["x"], (z["y"] if "y" in z.files else None)


def pytorch_outputs(cfg: Config, checkpoint: Path, x: np.ndarray, batch_size: int) -> list[np.ndarray]:
    import torch

    from ..models import build_model, load_checkpoint

    model = load_checkpoint(build_model(cfg.model), checkpoint).eval()
    outs: list[list[np.ndarray]] = []
    with torch.no_grad():
        for i in range(0, len(x), batch_size):
            res = model(torch.from_numpy(x[i : i + batch_size]))
            res = res if isinstance(res, (tuple, list)) else (res,)
            if not outs:
                outs = [[] for _ in res]
            for acc, r in zip(outs, res):
                acc.append(r.numpy())
    return [np.concatenate(a) for a in outs]


def run(cfg: Config, checkpoint: Path, onnx_path: Path, eval_data: Path, out_dir: Path) -> dict[str, Any]:
    from ..onnx_utils import load_onnx, ort_session, run_batched

    start = time.perf_counter()
    v = cfg.validate_
    load_onnx(onnx_path)
    x, _ = load_eval(eval_data)
    if len(x) < v.num_samples:
        raise DataError(
            f"{eval_data}: {len(x)} evaluation samples, validate.num_samples asks for at least {v.num_samples}; "
            "enlarge data.split.evaluation or lower validate.num_samples"
        )
    session = ort_session(onnx_path)
    ort_out = run_batched(session, x, v.batch_size)
    torch_out = pytorch_outputs(cfg, checkpoint, x, v.batch_size)
    names = [o.name for o in session.get_outputs()]
    per_output, failures = {}, []
    for name, got, ref in zip(names, ort_out, torch_out):
        a = agreement(got, ref)
        ok = a["max_abs_diff"] <= v.atol and a["cosine_min"] >= v.min_cosine
        per_output[name] = {**a, "passed": ok}
        if a["max_abs_diff"] > v.atol:
            failures.append(f"output '{name}': max abs diff {a['max_abs_diff']:.3g} > validate.atol {v.atol:g}")
        if a["cosine_min"] < v.min_cosine:
            failures.append(f"output '{name}': min cosine {a['cosine_min']:.6f} < validate.min_cosine {v.min_cosine}")
    report = {
        "samples": int(len(x)),
        "tolerance": {"atol": v.atol, "min_cosine": v.min_cosine},
        "outputs": per_output,
        "passed": not failures,
        "reference": "pytorch (cpu, fp32)",
        "seconds": round(time.perf_counter() - start, 3),
    }
    with staging_dir(out_dir) as tmp:
        np.savez(tmp / "reference.npz", **{n: o for n, o in zip(names, torch_out)})
        write_json(tmp / "validate.json", report)
    if failures:
        raise ToleranceError(f"{onnx_path}: ONNX disagrees with PyTorch on {len(x)} samples: " + "; ".join(failures))
    return report
