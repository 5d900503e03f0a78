"""evaluate@<precision>: task metrics, agreement with the FP32 variant and with PyTorch on
every output, and latency, for one built variant. Writes eval/<precision>.json (an EvalReport).

Task metrics come from `evaluate.metrics` (built-in topK on a named output, or
'module:function' user metrics: pipeline.metrics.resolve_metrics) and are computed on the
variant's outputs and, with the same functions, on PyTorch's (`reference_metrics.pytorch`),
so compare can give deltas against both. Latency: `evaluate.latency` warm-up, iterations
and batch sizes, in every mode the backend has (TensorRT: plain enqueue and CUDA-graph
replay), host end-to-end and device time; each row names its method. A batch size that
fits no optimization profile is listed under `latency_skipped`, never silently dropped.
A number that cannot be trusted (NaN or Inf outputs, a NaN metric, agreement under
`evaluate.agreement_floor`) is listed under `flags`."""

from __future__ import annotations

import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Optional

import numpy as np

from ..backends import get_backend
from ..config import Config, split_agreement_key
from ..data import load_samples
from ..data.chunks import chunk_rows
from ..data.npz_rows import npz_row_chunks, npz_shapes
from ..errors import ArtifactError, DataError
from ..fileio import claim_file, json_report_of, not_a_folder
from ..latency import summarize
from ..metrics import (AgreementSum, TaskMetric, check_metric_specs, merge_task_metrics, metric_specs,
                       resolve_metrics)
from ..profiles import fits, max_batch
from ..reports import BuildReport, EvalReport, LatencyRow, LatencyStats, read_report, write_report
from ..runtime.runner import Runner


def load_variant(build_dir: Path) -> tuple[Runner, BuildReport]:
    """The build's runner, after checking the artifact is the one build.json describes."""
    from ..provenance import require_hash

    build_dir = Path(build_dir)
    info = read_report(build_dir / "build.json", BuildReport, "build report", "build")
    artifact = build_dir / info.artifact
    not_a_folder(artifact, "the built artifact")
    if not artifact.is_file():
        raise ArtifactError(f"{artifact}: built artifact missing; re-run build@{info.precision}")
    require_hash(artifact, info.sha256, f"the {info.precision} artifact", build_dir / "build.json", f"build@{info.precision}")
    return get_backend(info.backend).load(artifact, info.model_dump()), info


def _batch_limit(info: BuildReport, wanted: int) -> int:
    mb = max_batch(info.profiles or [])
    return min(wanted, mb) if mb else wanted


def predict(runner: Runner, x: dict[str, np.ndarray], batch_size: int) -> dict[str, np.ndarray]:
    parts: dict[str, list[np.ndarray]] = {n: [] for n in runner.output_names}
    n = len(next(iter(x.values())))
    for i in range(0, n, batch_size):
        for name, v in runner.infer({k: a[i:i + batch_size] for k, a in x.items()}).items():
            parts[name].append(v)
    return {name: np.concatenate(v) for name, v in parts.items()}


def _batch_of(x: dict[str, np.ndarray], bs: int) -> dict[str, np.ndarray]:
    n = len(next(iter(x.values())))
    reps = int(np.ceil(bs / n))
    return {k: np.ascontiguousarray(np.concatenate([v] * reps)[:bs] if reps > 1 else v[:bs]) for k, v in x.items()}


def measure_latency(runner: Runner, x: dict[str, np.ndarray], cfg: Config,
                    skipped: Optional[list[dict[str, Any]]] = None) -> list[LatencyRow]:
    lat = cfg.evaluate.latency
    rows = []
    for bs in lat.batch_sizes:
        batch = _batch_of(x, bs)
        shapes = {k: list(v.shape) for k, v in batch.items()}
        if runner.profiles and not any(fits(p, shapes) for p in runner.profiles):
            if skipped is not None:
                skipped.append({"batch_size": bs, "reason": f"shapes {shapes} fit no optimization profile "
                                f"(largest batch {max_batch(runner.profiles)})"})
            continue
        for mode in runner.time_modes:
            res = runner.time(batch, lat.warmup, lat.iterations, mode=mode)
            rows.append(LatencyRow(
                batch_size=bs, mode=mode, host=LatencyStats(**summarize(res["times_ms"], bs)),
                gpu=LatencyStats(**summarize(res["gpu_times_ms"], bs)) if res.get("gpu_times_ms") else None,
                warmup=lat.warmup, method=res["method"]))
    return rows


Scores = tuple[dict[str, float], dict[str, Optional[str]], dict[str, float], dict[str, dict[str, Any]],
               dict[str, dict[str, Any]]]


def _score_streamed(runner: Runner, ref_runner: Optional[Runner], samples: Any, reference: Path,
                    metrics_fns: list[TaskMetric], bs: int, rbs: int, rows: int) -> Scores:
    """Metrics and agreement of the variant (against fp32 and PyTorch) chunk by chunk: the
    variant's, fp32's and PyTorch's outputs of one chunk of samples at a time. A user metric's
    accumulator keeps what it reads (its function is called once on the whole arrays); nothing
    else of the evaluation set's size is held."""
    names = list(runner.output_names)
    acc_var = [m.accumulate(samples.x) for m in metrics_fns]
    acc_torch = [m.accumulate(samples.x) for m in metrics_fns]
    agree_f = {n: AgreementSum(n) for n in names}
    agree_t = {n: AgreementSum(n) for n in names}
    n = len(samples)
    chunks = npz_row_chunks(reference, names, rows)
    for lo in range(0, n, rows):
        xs = {k: v[lo:lo + rows] for k, v in samples.x.items()}
        ys = samples.y[lo:lo + rows] if samples.y is not None else None
        out = predict(runner, xs, bs)
        f32 = out if ref_runner is None else predict(ref_runner, xs, rbs)
        torch_out = next(chunks)  # as many rows as the evaluation set: run() checked the headers
        for a in acc_var:
            a.add(out, ys, torch_out)
        for a in acc_torch:
            a.add(torch_out, ys, torch_out)
        for k in names:
            agree_f[k].add(out[k], f32[k])
            agree_t[k].add(out[k], torch_out[k])
    metrics, reads = merge_task_metrics(metrics_fns, [a.result() for a in acc_var])
    torch_metrics, _ = merge_task_metrics(metrics_fns, [a.result() for a in acc_torch])
    return metrics, reads, torch_metrics, {k: a.result() for k, a in agree_f.items()}, {k: a.result() for k, a in agree_t.items()}


def _flags(cfg: Config, metrics: dict[str, float], agree: dict[str, dict[str, dict[str, Any]]], precision: str) -> list[str]:
    """Why a number of this evaluation cannot be trusted (empty: nothing found)."""
    flags = []
    for name, a in agree["fp32"].items():
        if a.get("nonfinite"):
            flags.append(f"output '{name}' has {a['nonfinite']} NaN/Inf values")
    for k, v in metrics.items():
        if v != v:
            flags.append(f"metric {k} is NaN")
    for key, floor in cfg.evaluate.agreement_floor.items():
        ref, stat, output = split_agreement_key(key)
        ref = ref or "fp32"
        if ref == "fp32" and precision == "fp32":
            continue  # agreement with itself
        for name, a in agree[ref].items():
            if output is not None and name != output:
                continue
            v = a.get(stat)
            if v is not None and not v >= floor:
                flags.append(f"{stat} vs {ref} on output '{name}' is {v:.6g}, under evaluate.agreement_floor "
                             f"{key} = {floor:g}")
    return flags


def run(
    cfg: Config, precision: str, build_dir: Path, fp32_dir: Path, eval_data: Path, reference: Path, out_path: Path
) -> EvalReport:
    from ..provenance import ProvenanceError, prepared, require_hash, sha256_of
    from ..reports import ValidateReport

    claim_file(out_path, "evaluate", inputs=(build_dir, fp32_dir, eval_data, reference),  # fileio.claim_file
               recognise=json_report_of("evaluate", precision=precision), kind=f"evaluation report of {precision}")

    start = time.perf_counter()
    eval_data, reference = Path(eval_data), Path(reference)
    if (eval_data.parent / "prepare.json").is_file():
        prepared(eval_data, "eval.npz")
    samples = load_samples(eval_data, cfg.model.inputs, cfg.data.labels_key, "evaluation data")
    not_a_folder(reference, "the PyTorch reference (reference.npz)")
    if not reference.is_file():
        raise ArtifactError(f"{reference}: PyTorch reference outputs not found; run the validate stage first")
    validation = reference.parent / "validate.json"
    vrep = read_report(validation, ValidateReport, "validation report", "validate", ProvenanceError)
    require_hash(reference, vrep.sha256.get("reference.npz"), "the PyTorch reference", validation, "validate")
    if vrep.sha256.get("eval_data") != sha256_of(eval_data):
        raise ProvenanceError(f"{reference}: PyTorch outputs of other evaluation data than {eval_data}; re-run validate")
    try:
        ref_shapes = npz_shapes(reference)
    except Exception as e:
        raise ArtifactError(f"{reference}: cannot read ({type(e).__name__}); re-run validate") from None
    runner, info = load_variant(build_dir)
    if info.precision != precision:
        raise ArtifactError(f"{build_dir}/build.json: is a {info.precision} build, not {precision}; re-run build@{precision}")
    if info.onnx_sha256 != vrep.sha256.get("onnx"):
        raise ProvenanceError(f"{build_dir}: built from another ONNX than validate checked ({validation}); re-run "
                              f"build@{precision} (dvc repro)")
    specs, _ = metric_specs(cfg.evaluate, runner.output_names, samples.y is not None)  # prepare said what it chose
    check_metric_specs(specs, runner.output_names, samples.y is not None, cfg.data.labels_key)
    metrics_fns = resolve_metrics(specs, runner.output_names)
    missing = [n for n in runner.output_names if n not in ref_shapes]
    if missing:
        raise DataError(f"{reference}: has no PyTorch outputs for {missing}; re-run validate")
    for name in runner.output_names:  # the reference is read row by row against the samples
        rows = ref_shapes[name][0][0] if ref_shapes[name][0] else 0
        if rows != len(samples):
            raise DataError(f"{reference}: holds PyTorch outputs '{name}' for {rows} samples, the evaluation data has "
                            f"{len(samples)}; re-run validate")
    bs = _batch_limit(info, cfg.evaluate.batch_size)
    same = Path(build_dir).resolve() == Path(fp32_dir).resolve()
    ref_runner, fp32_sha, rbs = None, info.sha256, bs
    if not (precision == "fp32" and same):
        ref_runner, ref_info = load_variant(fp32_dir)
        if ref_info.precision != "fp32" or ref_info.onnx_sha256 != info.onnx_sha256:
            raise ProvenanceError(f"{fp32_dir}: is not the fp32 build of the same ONNX as {build_dir}; re-run build@fp32")
        fp32_sha, rbs = ref_info.sha256, _batch_limit(ref_info, cfg.evaluate.batch_size)
    skipped: list[dict[str, Any]] = []
    rows = chunk_rows({n: ref_shapes[n][0] for n in runner.output_names}, samples.x, bs)  # outputs and inputs
    with runner, (ref_runner if ref_runner is not None else nullcontext()):
        scores = _score_streamed(runner, ref_runner, samples, reference, metrics_fns, bs, rbs, rows)
        latency = measure_latency(runner, samples.x, cfg, skipped)
        device = runner.device()
    metrics, reads, torch_metrics, agree_fp32, agree_torch = scores
    report = EvalReport(
        model=cfg.model.name,
        precision=precision,
        backend=info.backend,
        backend_version=info.backend_version,
        samples=len(samples),
        metrics=metrics,
        metric_outputs=reads,
        reference_metrics={"pytorch": torch_metrics},
        agreement_fp32=agree_fp32,
        agreement_pytorch=agree_torch,
        latency=latency,
        latency_config=cfg.evaluate.latency.model_dump(),
        latency_skipped=skipped,
        device=device,
        engine_bytes=info.engine_bytes,
        build_seconds=info.build_seconds,
        flags=_flags(cfg, metrics, {"fp32": agree_fp32, "pytorch": agree_torch}, precision),
        seconds=round(time.perf_counter() - start, 3),
        sha256={"artifact": info.sha256, "fp32_artifact": fp32_sha, "eval_data": sha256_of(eval_data),
                "reference": sha256_of(reference), "onnx": info.onnx_sha256},
    )
    write_report(out_path, report)
    return report
