"""Small published versions, in milliseconds, made by the project's own writers.

A variant here is what the publish stage hands the registry: a build folder holding a real
ONNX model (one Mul node, so onnxruntime loads and runs it), build.json and eval.json
written as BuildReport / EvalReport by pipeline.reports.write_report, and the manifest made
by pipeline.manifest.make_manifest from those reports with the publish stage's own
helpers (settings, metrics, software). Only training and measuring are skipped: the
numbers in the reports are given, not measured. `published_engine` does the same for a
TensorRT engine of a given compute capability and TensorRT version (the engine bytes stand
in: no GPU here; the builder options in build.json come from trt_build.apply_builder_options
run on the stand-in TensorRT of tests/backends)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Optional

import numpy as np

from pipeline import registry
from pipeline.fileio import sha256_bytes, sha256_file
from pipeline.manifest import ROLE_ARTIFACT, ROLE_BUILD, ROLE_METRICS, make_manifest
from pipeline.reports import Agreement, BuildReport, EvalReport, LatencyRow, LatencyStats, write_report

PUBLISHED_AT = "2026-12-01T10:00:00+00:00"


def tiny_onnx(path: Path, scale: float = 2.0, doc: str = "") -> Path:
    """y = x * scale for x of shape [N, 4]; `doc` changes the bytes, not the model."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    node = helper.make_node("Mul", ["input", "scale"], ["logits"], name="mul")
    graph = helper.make_graph(
        [node], "tiny",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 4])],
        [numpy_helper.from_array(np.array([scale], dtype=np.float32), "scale")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="trtpipe-tests")
    model.ir_version = 8
    model.doc_string = doc
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def _stats(batch: int, p50: float) -> LatencyStats:
    return LatencyStats(batch_size=batch, iterations=10, p50_ms=p50, p90_ms=p50 * 1.1, p99_ms=p50 * 1.2,
                        mean_ms=p50 * 1.05, std_ms=0.01, min_ms=p50 * 0.9, throughput_per_s=batch * 1000.0 / p50)


def variant(work: Path, precision: str = "fp32", *, model: str = "tiny", scale: float = 2.0, top1: float = 97.5,
            latency: Optional[list[LatencyRow]] = None, published_at: Optional[str] = PUBLISHED_AT,
            config: Optional[dict[str, Any]] = None, rebuilt: str = "",
            extra: Optional[dict[str, tuple[bytes, str]]] = None) -> SimpleNamespace:
    """The build folder of one variant and its manifest, ready for registry.publish.
    `rebuilt`: other artifact bytes from the same inputs (a non-reproducible build);
    `extra`: more files, name -> (bytes, role)."""
    import onnxruntime

    from pipeline.stages.publish import _metrics, _settings, _software

    bdir = Path(work) / "build" / model / precision
    exported = tiny_onnx(Path(work) / "export" / model / f"{scale}.onnx", scale)  # the input
    onnx_path = tiny_onnx(bdir / "model.onnx", scale, rebuilt)  # the artifact built from it
    version = onnxruntime.__version__
    env = {"backend": "onnxruntime", "version": version, "device": "cpu", "cpu": "x86_64", "cores": 2}
    build = BuildReport(
        model=model, precision=precision, backend="onnxruntime", backend_version=version, backend_requested="auto",
        artifact="model.onnx", onnx_sha256=sha256_file(exported), sha256=sha256_file(onnx_path),
        engine_bytes=onnx_path.stat().st_size, build_seconds=0.25, built_at="2026-12-01T09:00:00+00:00",
        environment=env, flags=[], profiles=None, workspace_mb=None)
    write_report(bdir / "build.json", build)
    agree = Agreement(cosine=1.0, cosine_min=1.0, max_abs_diff=0.0, mean_abs_diff=0.0, rel_l2=0.0, snr_db=120.0,
                      top1_agreement=100.0)
    if latency is None:
        latency = [LatencyRow(batch_size=b, host=_stats(b, p50), warmup=1, method="onnxruntime.run")
                   for b, p50 in ((1, 0.5), (32, 3.0))]
    evaluation = EvalReport(
        model=model, precision=precision, backend="onnxruntime", backend_version=version, samples=64,
        metrics={"top1": top1}, agreement_fp32={"logits": agree}, agreement_pytorch={"logits": agree},
        latency=latency, latency_config={"warmup": 1, "iterations": 10}, device=env, seconds=1.5,
        engine_bytes=build.engine_bytes, build_seconds=build.build_seconds,
        sha256={"artifact": build.sha256, "onnx": build.onnx_sha256})
    write_report(bdir / "eval.json", evaluation)
    sources = {"model.onnx": onnx_path, "build.json": bdir / "build.json", "eval.json": bdir / "eval.json"}
    roles = {"model.onnx": ROLE_ARTIFACT, "build.json": ROLE_BUILD, "eval.json": ROLE_METRICS}
    for name, (data, role) in (extra or {}).items():
        (bdir / name).write_bytes(data)
        sources[name], roles[name] = bdir / name, role
    files = {n: {"sha256": sha256_file(p), "bytes": p.stat().st_size, "role": roles[n]} for n, p in sources.items()}
    config = config if config is not None else {"model": {"name": model}, "preprocess": {"scale": 1.0}}
    inputs = {"checkpoint": sha256_bytes(f"{model} checkpoint".encode()), "onnx": build.onnx_sha256,
              "config": sha256_bytes(json.dumps(config, sort_keys=True).encode())}
    manifest = make_manifest(
        model, precision, build.model_dump(), inputs=inputs, settings=_settings(precision, build),
        metrics=_metrics(evaluation), files=files, software=_software(build, None), config=config,
        io={"inputs": [{"name": "input", "dtype": "float32", "shape": ["N", 4]}],
            "outputs": [{"name": "logits", "dtype": "float32", "shape": ["N", 4]}], "opset": 17},
        published_at=published_at, notes=[])
    return SimpleNamespace(manifest=manifest, sources=sources, dir=bdir, build=build, eval=evaluation)


def published(work: Path, reg: Path, precision: str = "fp32", **kw: Any) -> SimpleNamespace:
    """A variant published into `reg`; adds `status` and `path` (the version folder)."""
    v = variant(work, precision, **kw)
    v.status, v.path = registry.publish(reg, v.manifest, v.sources)
    v.version = v.manifest["version"]
    return v


ENGINE_PROFILE = [{"input": {"min": [1, 4], "opt": [8, 4], "max": [32, 4]}}]


def builder_details(trt_version: str, hardware_compatibility: Optional[str] = None) -> dict[str, Any]:
    """What trt_build.apply_builder_options records in build.json's details for a builder config of
    the stand-in TensorRT `trt_version` (tests/backends/trt_standin.py)."""
    from pipeline.backends.trt_build import apply_builder_options
    from tests.backends.trt_standin import make_trt

    trt = make_trt(trt_version)
    config = trt.Builder(None).create_builder_config()
    return apply_builder_options(trt, config, None, {}, hardware_compatibility)


def published_engine(work: Path, reg: Path, cc: str, *, scale: float = 2.0, published_at: str = PUBLISHED_AT,
                     plan: bytes = b"", profiles: Any = ENGINE_PROFILE, workspace_mb: int = 1024, trt: str = "10.3.0",
                     precision: str = "fp16", hardware_compatibility: Optional[str] = None,
                     model: str = "tiny") -> tuple[str, Path, dict]:
    """A TensorRT version built for compute capability `cc` with TensorRT `trt`, through
    registry.publish with the publish stage's helpers; returns (version, folder, manifest)."""
    from pipeline.stages.publish import _settings, _software

    level = hardware_compatibility or "none"
    bdir = Path(work) / "trt" / model / precision / f"{cc}-{trt}-{level}" / str(scale)
    exported = tiny_onnx(Path(work) / "export" / model / f"{scale}.onnx", scale)
    bdir.mkdir(parents=True, exist_ok=True)
    engine = bdir / "model.plan"
    engine.write_bytes(plan or f"engine for sm{cc} TensorRT {trt} {level} from {scale}".encode())
    env = {"backend": "tensorrt", "tensorrt": trt, "gpu": f"GPU sm{cc}", "compute_capability": cc,
           "driver": "550.54", "cuda_runtime": "12.4"}
    build = BuildReport(model=model, precision=precision, backend="tensorrt", backend_version=trt,
                        backend_requested="tensorrt", artifact="model.plan", onnx_sha256=sha256_file(exported),
                        sha256=sha256_file(engine), engine_bytes=engine.stat().st_size,
                        built_at="2026-12-01T09:00:00+00:00", environment=env, flags=[precision],
                        profiles=profiles, workspace_mb=workspace_mb,
                        details=builder_details(trt, hardware_compatibility))
    write_report(bdir / "build.json", build)
    sources = {"model.plan": engine, "build.json": bdir / "build.json"}
    roles = {"model.plan": ROLE_ARTIFACT, "build.json": ROLE_BUILD}
    files = {n: {"sha256": sha256_file(p), "bytes": p.stat().st_size, "role": roles[n]} for n, p in sources.items()}
    config = {"model": {"name": model}}
    inputs = {"checkpoint": sha256_bytes(f"{model} checkpoint".encode()), "onnx": build.onnx_sha256,
              "config": sha256_bytes(json.dumps(config, sort_keys=True).encode())}
    m = make_manifest(model, precision, build.model_dump(), inputs=inputs, settings=_settings(precision, build),
                      metrics={}, files=files, software=_software(build, None), config=config,
                      io={"inputs": [{"name": "input", "dtype": "float32", "shape": ["N", 4]}],
                          "outputs": [{"name": "logits", "dtype": "float32", "shape": ["N", 4]}], "opset": 17},
                      published_at=published_at, notes=[])
    _, path = registry.publish(reg, m, sources)
    return m["version"], path, m


def tree(path: Path) -> dict[str, tuple[str, int]]:
    """Every file under `path` with its sha256 and mtime (to prove nothing was rewritten)."""
    return {str(p.relative_to(path)): (sha256_file(p), p.stat().st_mtime_ns) for p in sorted(path.rglob("*")) if p.is_file()}
