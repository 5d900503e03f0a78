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
from pathlib import Path
from typing import Any, Optional

import numpy as np

from ..backends import get_backend
from ..config import Config, split_agreement_key
from ..data import load_samples
from ..errors import ArtifactError, DataError
from ..fileio import claim_file, json_report_of, not_a_folder
from ..latency import summarize
from ..metrics import agreement, check_metric_specs, compute_task_metrics, metric_specs, resolve_metrics
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
        with np.load(reference) as z:
            torch_ref = {n: z[n] for n in z.files}
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
    bs = _batch_limit(info, cfg.evaluate.batch_size)
    skipped: list[dict[str, Any]] = []
    with runner:
        outputs = predict(runner, samples.x, bs)
        latency = measure_latency(runner, samples.x, cfg, skipped)
        device = runner.device()
    same = Path(build_dir).resolve() == Path(fp32_dir).resolve()
    if precision == "fp32" and same:
        fp32_outputs, fp32_sha = outputs, info.sha256
    else:
        ref_runner, ref_info = load_variant(fp32_dir)
        if ref_info.precision != "fp32" or ref_info.onnx_sha256 != info.onnx_sha256:
            raise ProvenanceError(f"{fp32_dir}: is not the fp32 build of the same ONNX as {build_dir}; re-run build@fp32")
        with ref_runner:
            fp32_outputs = predict(ref_runner, samples.x, _batch_limit(ref_info, cfg.evaluate.batch_size))
        fp32_sha = ref_info.sha256
    missing = [n for n in outputs if n not in torch_ref]
    if missing:
        raise DataError(f"{reference}: has no PyTorch outputs for {missing}; re-run validate")
    ref_out = {n: torch_ref[n] for n in outputs}
    metrics, reads = compute_task_metrics(metrics_fns, outputs, samples.y, reference=ref_out, inputs=samples.x)
    torch_metrics, _ = compute_task_metrics(metrics_fns, ref_out, samples.y, reference=ref_out, inputs=samples.x)
    agree_fp32 = {n: agreement(outputs[n], fp32_outputs[n], n) for n in outputs}
    agree_torch = {n: agreement(outputs[n], ref_out[n], n) for n in outputs}
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
