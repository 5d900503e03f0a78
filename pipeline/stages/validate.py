"""validate: the exported ONNX, run by onnxruntime, against PyTorch on the evaluation data.

Every output is compared by name (max |onnxruntime - PyTorch| and cosine per sample), with
`validate.atol` / `validate.min_cosine`, or the output's own entry in `validate.outputs`.
The stage fails (ToleranceError) when any output exceeds its tolerance, and a NaN or Inf
in an output always fails, after writing validate.json so the numbers can be read. Also
writes the PyTorch outputs (reference.npz) that evaluate compares every variant to. Both run
batch by batch (`validate.batch_size`): the agreement statistics accumulate and PyTorch's rows
are appended to reference.npz as they come, so memory does not grow with the evaluation set.
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
from ..metrics import AgreementSum, agreement
from ..reports import OutputCheck, ValidateReport, write_report
from .common import torch_inputs


def pytorch_model(cfg: Config, checkpoint: Path) -> Any:
    from ..models import build_model, load_checkpoint

    return load_checkpoint(build_model(cfg.model), checkpoint).eval()


def pytorch_batch(cfg: Config, model: Any, batch: dict[str, np.ndarray]) -> list[np.ndarray]:
    """The model's flattened outputs on one batch, in export's output order."""
    import torch

    from ..models import run_flat

    with torch.no_grad():
        return [r.numpy() for r in run_flat(model, torch_inputs(cfg.model.inputs, batch))]


def _tolerance(cfg: Config, name: str) -> tuple[float, float]:
    v = cfg.validate_
    own = v.outputs.get(name)
    atol = own.atol if own is not None and own.atol is not None else v.atol
    cos = own.min_cosine if own is not None and own.min_cosine is not None else v.min_cosine
    return atol, cos


def check_output(name: str, got: np.ndarray, ref: np.ndarray, atol: float, min_cosine: float) -> OutputCheck:
    return check_agreement(name, agreement(got, ref, name), atol, min_cosine)


def check_agreement(name: str, a: dict[str, Any], atol: float, min_cosine: float) -> OutputCheck:
    failures = []
    if a["nonfinite"]:
        failures.append(f"output '{name}': {a['nonfinite']} NaN/Inf values in onnxruntime's outputs")
    # `not (x <= limit)` so that a NaN statistic fails too.
    if not a["max_abs_diff"] <= atol:
        failures.append(f"output '{name}': max abs diff {a['max_abs_diff']:.3g} > atol {atol:g}")
    if not a["cosine_min"] >= min_cosine:
        failures.append(f"output '{name}': min cosine {a['cosine_min']:.6f} < min_cosine {min_cosine}")
    return OutputCheck(**a, atol=atol, min_cosine=min_cosine, passed=not failures, failures=failures)


def _compare_streamed(cfg: Config, checkpoint: Path, session: Any, samples: Samples, names: list[str],
                      onnx_path: Path, reference: Path) -> dict[str, dict[str, Any]]:
    """onnxruntime and PyTorch batch by batch: agreement accumulated per output, PyTorch's rows
    appended to `reference` (an .npz); nothing of the evaluation set's size is held."""
    from ..data.npz_writer import NpzWriter
    from ..provenance import ProvenanceError

    bs, n = cfg.validate_.batch_size, len(samples)
    model = pytorch_model(cfg, checkpoint)
    ort_names = [o.name for o in session.get_outputs()]
    accs = {k: AgreementSum(k) for k in names}
    with NpzWriter(reference, names) as writer:
        for i in range(0, n, bs):
            batch = {k: np.asarray(v[i:i + bs]) for k, v in samples.x.items()}
            got = dict(zip(ort_names, session.run(None, batch)))
            refs = pytorch_batch(cfg, model, batch)
            if len(refs) != len(names):
                raise ProvenanceError(f"{onnx_path}: has {len(names)} outputs, the model returns {len(refs)}; "
                                      "re-run export")
            for name, ref in zip(names, refs):
                g = got[name]
                if i == 0 and np.shape(g)[1:] != np.shape(ref)[1:]:
                    raise DataError(f"output '{name}' has shape {[n, *np.shape(g)[1:]]}, the reference has "
                                    f"{[n, *np.shape(ref)[1:]]}; they must match to be compared")
                accs[name].add(g, ref)
                writer.add(name, ref)
        writer.close()
    return {k: a.result() for k, a in accs.items()}


def run(cfg: Config, checkpoint: Path, onnx_path: Path, eval_data: Path, out_dir: Path) -> ValidateReport:
    claim_dir(out_dir, "validate", inputs=(checkpoint, onnx_path, eval_data))  # only into an output it owns (fileio.claim_dir)
    from ..onnx_utils import load_onnx, ort_session
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
    with staging_dir(out_dir) as tmp:
        stats = _compare_streamed(cfg, checkpoint, session, samples, names, onnx_path, tmp / "reference.npz")
        per_output = {name: check_agreement(name, stats[name], *_tolerance(cfg, name)) for name in names}
        failures = [f for o in per_output.values() for f in o.failures]
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
