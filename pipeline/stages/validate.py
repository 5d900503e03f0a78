"""validate: the exported ONNX, run by onnxruntime, against PyTorch on the evaluation data.

Every output is compared by name (max |onnxruntime - PyTorch| and cosine per sample), with
`validate.atol` / `validate.min_cosine`, or the output's own entry in `validate.outputs`.
The stage fails (ToleranceError) when any output exceeds its tolerance, and a NaN or Inf
in an output always fails, after writing validate.json so the numbers can be read. Also
writes the PyTorch outputs (reference.npz) that evaluate compares every variant to.
Inputs are checked first: the ONNX is export's, exported from this checkpoint, and the
evaluation data is prepare's."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from ..config import Config
from ..data import Samples, load_samples
from ..errors import ConfigError, DataError, ToleranceError
from ..fileio import claim_dir, sha256_file, staging_dir
from ..metrics import agreement
from ..reports import OutputCheck, ValidateReport, write_report
from .common import torch_inputs


def pytorch_outputs(cfg: Config, checkpoint: Path, samples: Samples, batch_size: int) -> list[np.ndarray]:
    """The checkpoint's flattened outputs on `samples`, in export's output order."""
    import torch

    from ..models import build_model, load_checkpoint, run_flat

    model = load_checkpoint(build_model(cfg.model), checkpoint).eval()
    outs: list[list[np.ndarray]] = []
    n = len(samples)
    with torch.no_grad():
        for i in range(0, n, batch_size):
            res = run_flat(model, torch_inputs(cfg.model.inputs, {k: v[i:i + batch_size] for k, v in samples.x.items()}))
            if not outs:
                outs = [[] for _ in res]
            for acc, r in zip(outs, res):
                acc.append(r.numpy())
    return [np.concatenate(a) for a in outs]


def _tolerance(cfg: Config, name: str) -> tuple[float, float]:
    v = cfg.validate_
    own = v.outputs.get(name)
    atol = own.atol if own is not None and own.atol is not None else v.atol
    cos = own.min_cosine if own is not None and own.min_cosine is not None else v.min_cosine
    return atol, cos


def check_output(name: str, got: np.ndarray, ref: np.ndarray, atol: float, min_cosine: float) -> OutputCheck:
    a = agreement(got, ref, name)
    failures = []
    if a["nonfinite"]:
        failures.append(f"output '{name}': {a['nonfinite']} NaN/Inf values in onnxruntime's outputs")
    # `not (x <= limit)` so that a NaN statistic fails too.
    if not a["max_abs_diff"] <= atol:
        failures.append(f"output '{name}': max abs diff {a['max_abs_diff']:.3g} > atol {atol:g}")
    if not a["cosine_min"] >= min_cosine:
        failures.append(f"output '{name}': min cosine {a['cosine_min']:.6f} < min_cosine {min_cosine}")
    return OutputCheck(**a, atol=atol, min_cosine=min_cosine, passed=not failures, failures=failures)


def run(cfg: Config, checkpoint: Path, onnx_path: Path, eval_data: Path, out_dir: Path) -> ValidateReport:
    claim_dir(out_dir, "validate", inputs=(checkpoint, onnx_path, eval_data))  # only into an output it owns (fileio.claim_dir)
    from ..onnx_utils import load_onnx, ort_session, run_batched
    from ..provenance import ProvenanceError, exported, prepared, sha256_of

    start = time.perf_counter()
    v = cfg.validate_
    onnx_path, checkpoint, eval_data = Path(onnx_path), Path(checkpoint), Path(eval_data)
    load_onnx(onnx_path)
    export = exported(onnx_path)
    if sha256_of(checkpoint) != export.sha256.get("checkpoint"):
        raise ProvenanceError(f"{onnx_path}: was exported from another checkpoint than {checkpoint} (sha256 "
                              f"{str(export.sha256.get('checkpoint'))[:12]}… vs {sha256_of(checkpoint)[:12]}…); "
                              "re-run export (dvc repro export)")
    if (eval_data.parent / "prepare.json").is_file():
        prepared(eval_data, "eval.npz")
    samples = load_samples(eval_data, cfg.model.inputs, cfg.data.labels_key, "evaluation data")
    if len(samples) < v.num_samples:
        raise DataError(
            f"{eval_data}: {len(samples)} evaluation samples, validate.num_samples asks for at least {v.num_samples}; "
            "enlarge data.split.evaluation or lower validate.num_samples"
        )
    names = [o.name for o in export.outputs]
    unknown = [k for k in v.outputs if k not in names]
    if unknown:
        raise ConfigError(f"validate.outputs names '{unknown[0]}', which is not an output of the ONNX ({', '.join(names)})")
    session = ort_session(onnx_path)
    ort_out = run_batched(session, samples.x, v.batch_size)
    torch_out = pytorch_outputs(cfg, checkpoint, samples, v.batch_size)
    if len(torch_out) != len(names):
        raise ProvenanceError(f"{onnx_path}: has {len(names)} outputs, the model returns {len(torch_out)}; re-run export")
    per_output: dict[str, Any] = {}
    for name, ref in zip(names, torch_out):
        per_output[name] = check_output(name, ort_out[name], ref, *_tolerance(cfg, name))
    failures = [f for o in per_output.values() for f in o.failures]
    with staging_dir(out_dir) as tmp:
        np.savez(tmp / "reference.npz", **{n: o for n, o in zip(names, torch_out)})
        report = ValidateReport(
            samples=len(samples), outputs=per_output, passed=not failures, reference="pytorch (cpu, fp32)",
            seconds=round(time.perf_counter() - start, 3),
            sha256={"onnx": sha256_of(onnx_path), "checkpoint": sha256_of(checkpoint), "eval_data": sha256_of(eval_data),
                    "reference.npz": sha256_file(tmp / "reference.npz")},
        )
        write_report(tmp / "validate.json", report)
    if failures:
        raise ToleranceError(f"{onnx_path}: ONNX disagrees with PyTorch on {len(samples)} samples: " + "; ".join(failures)
                             + " (validate.atol / validate.min_cosine, or validate.outputs.<name>)")
    return report
