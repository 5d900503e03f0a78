"""evaluate@<precision>: task metrics, agreement with the FP32 variant and with PyTorch,
and latency, for one built variant. Writes eval/<precision>.json.

Task metrics come from `evaluate.metrics` (built-in topK, or 'module:function' user
metrics: pipeline.metrics.resolve_metrics) and are computed on the variant's outputs and,
with the same functions, on PyTorch's (`reference_metrics.pytorch`), so compare can give
deltas against both. Latency: `evaluate.latency` warm-up, iterations and batch sizes; each
row names its timing method, and the report names the device. A batch size outside the
engine's optimization profile is listed under `latency_skipped`, never silently dropped."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from ..backends import Runner, get_backend
from ..config import Config
from ..errors import ArtifactError
from ..fileio import read_json, write_json
from ..latency import summarize
from ..metrics import agreement, compute_task_metrics, resolve_metrics
from .validate import load_eval

SCHEMA_VERSION = 1


def load_variant(build_dir: Path) -> tuple[Runner, dict[str, Any]]:
    info = read_json(Path(build_dir) / "build.json", "build report")
    artifact = Path(build_dir) / info["artifact"]
    if not artifact.is_file():
        raise ArtifactError(f"{artifact}: built artifact missing; re-run the build stage")
    return get_backend(info["backend"]).load(artifact, info), info


def max_batch(info: dict[str, Any], wanted: int) -> int:
    profile = info.get("profile") or {}
    return min(wanted, int(profile.get("max_batch", wanted)))


def predict(runner: Runner, x: np.ndarray, batch_size: int) -> dict[str, np.ndarray]:
    name = runner.input_names[0]
    parts: dict[str, list[np.ndarray]] = {n: [] for n in runner.output_names}
    for i in range(0, len(x), batch_size):
        for n, v in runner.infer({name: x[i : i + batch_size]}).items():
            parts[n].append(v)
    return {n: np.concatenate(v) for n, v in parts.items()}


def measure_latency(
    runner: Runner, x: np.ndarray, cfg: Config, info: dict[str, Any], skipped: list[dict[str, Any]] | None = None
) -> list[dict[str, Any]]:
    lat = cfg.evaluate.latency
    rows = []
    for bs in lat.batch_sizes:
        if max_batch(info, bs) < bs:
            if skipped is not None:
                skipped.append({"batch_size": bs, "reason": f"above the optimization profile's max_batch {max_batch(info, bs)}"})
            continue
        reps = int(np.ceil(bs / len(x)))
        batch = np.concatenate([x] * reps)[:bs] if reps > 1 else x[:bs]
        res = runner.time({runner.input_names[0]: np.ascontiguousarray(batch)}, lat.warmup, lat.iterations)
        row = {**summarize(res["times_ms"], bs), "warmup": lat.warmup, "method": res["method"]}
        if "gpu_times_ms" in res:
            row["gpu"] = summarize(res["gpu_times_ms"], bs)
        rows.append(row)
    return rows


def run(
    cfg: Config, precision: str, build_dir: Path, fp32_dir: Path, eval_data: Path, reference: Path, out_path: Path
) -> dict[str, Any]:
    start = time.perf_counter()
    task_metrics = resolve_metrics(cfg.evaluate.metrics)  # fail on a bad 'module:function' before any work
    x, y = load_eval(eval_data)
    bs = cfg.evaluate.batch_size
    if not Path(reference).is_file():
        raise ArtifactError(f"{reference}: PyTorch reference outputs not found; run the validate stage first")
    with np.load(reference) as z:
        torch_ref = {n: z[n] for n in z.files}
    runner, info = load_variant(build_dir)
    skipped: list[dict[str, Any]] = []
    with runner:
        outputs = predict(runner, x, max_batch(info, bs))
        latency = measure_latency(runner, x, cfg, info, skipped)
        device = runner.device()
    if precision == "fp32" and Path(build_dir).resolve() == Path(fp32_dir).resolve():
        fp32_outputs = outputs
    else:
        ref_runner, ref_info = load_variant(fp32_dir)
        with ref_runner:
            fp32_outputs = predict(ref_runner, x, max_batch(ref_info, bs))
    ref_out = {n: torch_ref[n] for n in outputs if n in torch_ref} if set(outputs) <= set(torch_ref) else None
    report = {
        "schema_version": SCHEMA_VERSION,
        "model": cfg.model.name,
        "precision": precision,
        "backend": info["backend"],
        "backend_version": info.get("backend_version"),
        "samples": int(len(x)),
        "metrics": compute_task_metrics(task_metrics, outputs, y, reference=ref_out, inputs=x),
        # The same metrics on PyTorch's outputs, so compare can give deltas against PyTorch too.
        "reference_metrics": {
            "pytorch": compute_task_metrics(task_metrics, ref_out, y, reference=ref_out, inputs=x) if ref_out else {},
        },
        "metric_functions": [m.name for m in task_metrics],
        "agreement_fp32": {n: agreement(outputs[n], fp32_outputs[n]) for n in outputs},
        "agreement_pytorch": {n: agreement(outputs[n], torch_ref[n]) for n in outputs if n in torch_ref},
        "latency": latency,
        "latency_config": cfg.evaluate.latency.model_dump(),
        "latency_skipped": skipped,
        "device": device,
        "engine_bytes": info.get("engine_bytes"),
        "build_seconds": info.get("build_seconds"),
        "seconds": round(time.perf_counter() - start, 3),
    }
    write_json(out_path, report)
    return report
