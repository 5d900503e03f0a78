"""The registry: verify recomputes every hash and checks the manifest against this
machine; load refuses a damaged version or one built for another GPU / TensorRT, naming
both sides; `trtpipe artifacts list | show | verify`."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import yaml

from pipeline import cli, registry
from pipeline.compat import check_runs_here, compat_findings, probe_here
from pipeline.config import Config, _merge
from pipeline.errors import ArtifactError
from pipeline.fileio import sha256_file, write_json
from pipeline.manifest import read_manifest
from pipeline.reports import BuildReport, write_report
from pipeline.stages import build, evaluate, export, prepare, publish, validate
from pipeline.stages.evaluate import predict

ROOT = Path(__file__).resolve().parents[1]
A100 = {"tensorrt": "8.6.1", "gpu": "NVIDIA A100-SXM4-80GB", "compute_capability": "8.0", "driver": "535.104.05", "cuda_runtime": "12.2"}
H100_SAME_TRT = {"tensorrt": "8.6.1", "compute_capability": "9.0", "gpu": "NVIDIA H100 80GB HBM3"}
A100_TRT10 = {"tensorrt": "10.3.0", "compute_capability": "8.0", "gpu": "NVIDIA A100-SXM4-80GB"}
NO_TRT = {"tensorrt": None, "tensorrt_error": "ModuleNotFoundError: No module named 'tensorrt'", "compute_capability": None, "gpu": None, "onnxruntime": "1.17.0"}


def _has_tensorrt() -> bool:
    try:
        import tensorrt  # noqa: F401
    except Exception:
        return False
    return True


@pytest.fixture(scope="module")
def reg(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """A registry with the real digits fp32 variant (onnxruntime, CPU) and an fp16 TensorRT
    variant whose build.json and eval.json (BuildReport and EvalReport, as the TensorRT
    backend and evaluate write them) say it was built on an A100 with TensorRT 8.6.1; only
    the engine bytes are a stand-in: there is no TensorRT here."""
    root = tmp_path_factory.mktemp("reg")
    data = yaml.safe_load((ROOT / "configs" / "digits.yaml").read_text())
    cfg = Config.model_validate(_merge(data, {
        "model": {"train": {"epochs": 2}},
        "build": {"backend": "onnxruntime"},
        "evaluate": {"latency": {"warmup": 1, "iterations": 3, "batch_sizes": [1]}},
        "publish": {"precisions": ["fp32"], "registry": str(root / "registry")},
    }))
    onnx_path = root / "export" / "model.onnx"
    validation = root / "validate" / "validate.json"
    prepare.run(cfg, root / "prepare")
    export.run(cfg, root / "prepare" / "model.pt", root / "export")
    validate.run(cfg, root / "prepare" / "model.pt", onnx_path, root / "prepare" / "eval.npz", root / "validate")
    build.run(cfg, "fp32", onnx_path, root / "build" / "fp32", validation=validation)
    fp32_eval = evaluate.run(cfg, "fp32", root / "build" / "fp32", root / "build" / "fp32", root / "prepare" / "eval.npz",
                             root / "validate" / "reference.npz", root / "eval" / "fp32.json")
    ort = publish.run(cfg, root / "build", root / "eval", root / "registry", root / "publish" / "published.json",
                      root / "prepare", root / "calibrate", onnx_path)["published"][0]

    trt_dir = root / "build-trt" / "fp16"
    trt_dir.mkdir(parents=True)
    engine = trt_dir / "model.engine"
    engine.write_bytes(np.random.default_rng(0).bytes(4096))
    write_json(trt_dir / "layers.json", {"Layers": ["conv", "relu", "gemm"], "Bindings": ["input", "logits"]})
    dev = {"index": 0, "gpu": A100["gpu"], "compute_capability": "8.0", "multiprocessors": 108, "memory_bytes": 85 << 30,
           "driver": A100["driver"], "driver_cuda": "12.2", "cuda_runtime": A100["cuda_runtime"]}
    profile = {"input": {"min": [1, 1, 8, 8], "opt": [32, 1, 8, 8], "max": [128, 1, 8, 8]}}
    trt_build = BuildReport(
        model="digits-cnn", precision="fp16", backend="tensorrt", backend_version="8.6.1", backend_requested="auto",
        artifact="model.engine", onnx_sha256=sha256_file(onnx_path), sha256=sha256_file(engine),
        engine_bytes=engine.stat().st_size, build_seconds=12.5, built_at="2026-11-30T12:00:00+00:00",
        environment={"backend": "tensorrt", "version": "8.6.1", "tensorrt": "8.6.1", "device": dev,
                     "cuda_memory": ["pycuda"]},
        flags=["FP16", "TF32"], profiles=[profile], workspace_mb=1024,
        details={"tensorrt": "8.6.1", "layers_file": "layers.json"})
    write_report(trt_dir / "build.json", trt_build)
    trt_eval = fp32_eval.model_copy(update={
        "precision": "fp16", "backend": "tensorrt", "backend_version": "8.6.1", "device": dev,
        "engine_bytes": trt_build.engine_bytes, "build_seconds": trt_build.build_seconds,
        "sha256": {**fp32_eval.sha256, "artifact": trt_build.sha256}})
    write_report(root / "eval-trt.json", trt_eval)
    trt = publish.publish_variant(cfg, "fp16", trt_dir, root / "eval-trt.json", root / "registry", root / "prepare",
                                  root / "calibrate", onnx_path)
    return SimpleNamespace(root=root, cfg=cfg, ort=ort, trt=trt, registry=root / "registry")


def copy_registry(reg: SimpleNamespace, tmp_path: Path) -> Path:
    dst = tmp_path / "registry"
    shutil.copytree(reg.registry, dst)
    return dst


def flip_byte(path: Path, offset: int = 1000) -> None:
    os.chmod(path, 0o644)
    b = bytearray(path.read_bytes())
    b[offset] ^= 0x01
    path.write_bytes(bytes(b))


def trtpipe(*args: str) -> int:
    cli._extra_commands.clear()  # cli.main registers the extra commands on every call
    return cli.main(list(args))


# --------------------------------------------------------------------------- load


def test_load_returns_a_working_runner(reg: SimpleNamespace) -> None:
    with np.load(reg.root / "prepare" / "eval.npz") as z:
        x, y = {"input": z["input"]}, z["y"]
    with registry.load(reg.ort["version"], reg.registry) as runner:
        assert runner.backend == "onnxruntime"
        out = predict(runner, x, 128)["logits"]
    top1 = 100 * float((out.argmax(1) == y).mean())
    assert top1 == pytest.approx(read_manifest(reg.ort["path"])["metrics"]["task"]["top1"])
    # by its hash8, or by path (e.g. the publish pointer)
    registry.load(reg.ort["version"][-8:], reg.registry).close()
    registry.load(reg.root / "publish" / "current" / "fp32", reg.registry).close()


def test_load_refuses_a_flipped_byte(reg: SimpleNamespace, tmp_path: Path) -> None:
    r = copy_registry(reg, tmp_path)
    vdir = registry.resolve(reg.ort["version"], r)
    flip_byte(vdir / "model.onnx")
    with pytest.raises(ArtifactError, match=r"refusing to load .*model\.onnx: sha256 .* does not match the manifest"):
        registry.load(reg.ort["version"], r)


@pytest.mark.parametrize(
    "here, both_sides",
    [
        (H100_SAME_TRT, ["compute capability 8.0", "NVIDIA A100-SXM4-80GB", "compute capability 9.0", "NVIDIA H100 80GB HBM3"]),
        (A100_TRT10, ["TensorRT 8.6.1", "TensorRT 10.3.0"]),
        ({**A100, "tensorrt": "8.5.3"}, ["TensorRT 8.6.1", "TensorRT 8.5.3"]),
    ],
)
def test_load_refuses_another_gpu_or_tensorrt(reg: SimpleNamespace, here: dict[str, Any], both_sides: list[str]) -> None:
    with pytest.raises(ArtifactError) as e:
        registry.load(reg.trt["version"], reg.registry, here=here)
    msg = str(e.value)
    for side in both_sides:
        assert side in msg, msg
    assert reg.trt["version"] in msg


def test_load_without_tensorrt_says_so(reg: SimpleNamespace) -> None:
    with pytest.raises(ArtifactError, match=r"cannot run here: no TensorRT .*needs TensorRT 8\.6\.1 on a GPU of compute capability 8\.0"):
        registry.load(reg.trt["version"], reg.registry, here=NO_TRT)


@pytest.mark.skipif(_has_tensorrt(), reason="the stand-in engine would reach a real TensorRT")
def test_matching_machine_passes_the_manifest_check(reg: SimpleNamespace) -> None:
    """On the machine the manifest names, the check passes and loading goes on to the
    backend (which here has no TensorRT: a BackendError, not a refusal by the manifest)."""
    from pipeline.errors import BackendError

    with pytest.raises(BackendError, match="tensorrt"):
        registry.load(reg.trt["version"], reg.registry, here=A100)


def test_tensorrt_manifest_records_the_build_machine(reg: SimpleNamespace) -> None:
    m = read_manifest(reg.trt["path"])
    assert reg.trt["version"].startswith("digits-cnn-fp16-tensorrt8.6.1-sm80-")
    assert m["hardware"] == {k: A100[k] for k in ("gpu", "compute_capability", "driver", "cuda_runtime")}
    assert m["software"]["tensorrt"] == "8.6.1" and m["software"]["cuda_runtime"] == "12.2" and m["software"]["driver"] == "535.104.05"
    assert m["files"]["layers.json"]["role"] == "layers"
    assert m["config"]["build"]["workspace_mb"] == 1024  # TensorRT knobs version TensorRT variants
    assert "build" not in read_manifest(reg.ort["path"])["config"]  # ... and not onnxruntime ones


# --------------------------------------------------------------------------- verify


def test_verify_clean_and_compat(reg: SimpleNamespace) -> None:
    res = {r.version: r for r in registry.verify_all(reg.registry, here=NO_TRT)}
    assert res[reg.ort["version"]].ok() and res[reg.ort["version"]].runs_here
    t = res[reg.trt["version"]]
    assert t.ok(integrity_only=True) and not t.ok() and t.runs_here is False
    assert [f.kind for f in t.findings] == ["compat", "compat"]
    assert "cannot run here: no TensorRT" in str(t.findings[0])
    assert all(r.ok() for r in registry.verify_all(reg.registry, here=A100))


@pytest.mark.parametrize("name", ["model.engine", "layers.json", "build.json", "eval.json"])
def test_verify_names_the_flipped_file(reg: SimpleNamespace, tmp_path: Path, name: str) -> None:
    r = copy_registry(reg, tmp_path)
    flip_byte(registry.resolve(reg.trt["version"], r) / name, offset=10)
    res = registry.verify(reg.trt["version"], r, here=A100)
    assert not res.ok(integrity_only=True)
    assert [(f.kind, f.file) for f in res.findings] == [("integrity", name)]
    assert registry.verify(reg.ort["version"], r, here=A100).ok()


def test_verify_catches_added_missing_and_edited(reg: SimpleNamespace, tmp_path: Path) -> None:
    r = copy_registry(reg, tmp_path)
    vdir = registry.resolve(reg.ort["version"], r)
    (vdir / "extra.bin").write_bytes(b"x")
    (vdir / "eval.json").unlink()
    m = json.loads((vdir / "manifest.json").read_text())
    m["inputs"]["checkpoint"] = "0" * 64  # claims another checkpoint
    (vdir / "manifest.json").write_text(json.dumps(m))
    found = [(f.file, f.message) for f in registry.verify(vdir, r, here={}).findings]
    assert ("extra.bin", "not listed in the manifest (added after publishing)") in found
    assert ("eval.json", "missing (listed in the manifest)") in found
    assert any(f == "manifest.json" and "edited after publishing" in msg for f, msg in found), found
    with pytest.raises(ArtifactError, match="refusing to load"):
        registry.load(vdir, r, here={})


def test_verify_renamed_version_folder(reg: SimpleNamespace, tmp_path: Path) -> None:
    r = copy_registry(reg, tmp_path)
    vdir = registry.resolve(reg.ort["version"], r)
    vdir.rename(vdir.with_name("digits-cnn-fp32-best"))
    res = registry.verify("digits-cnn-fp32-best", r, here={})
    assert any("holds version" in f.message for f in res.findings)


# --------------------------------------------------------------------------- compat


def test_compat_partial_here_is_not_checked() -> None:
    trt = {"backend": "tensorrt", "software": {"tensorrt": "8.6.1"}, "hardware": {"compute_capability": "8.0"}}
    check_runs_here(trt, {"compute_capability": "sm_80"})  # unknown TensorRT: not checked; sm_80 == 8.0
    assert compat_findings(trt, {}) == []
    assert compat_findings({"backend": "onnxruntime"}, {"onnxruntime": None}) == ["cannot run here: onnxruntime does not import; pip install onnxruntime"]
    with pytest.raises(ArtifactError, match="unknown backend"):
        check_runs_here({"backend": "openvino"}, {})


def test_probe_here_on_this_machine() -> None:
    here = probe_here()
    assert {"tensorrt", "compute_capability", "gpu", "onnxruntime"} <= set(here)
    import onnxruntime

    assert here["onnxruntime"] == onnxruntime.__version__
    if not _has_tensorrt():
        assert here["tensorrt"] is None and "tensorrt" in here["tensorrt_error"]


# --------------------------------------------------------------------------- CLI


def test_cli_list(reg: SimpleNamespace, capsys: pytest.CaptureFixture[str]) -> None:
    assert trtpipe("artifacts", "list", "--registry", str(reg.registry)) == 0
    out = capsys.readouterr().out
    assert reg.ort["version"] in out and reg.trt["version"] in out and "NVIDIA A100" in out
    assert "2 version(s)" in out
    assert trtpipe("artifacts", "list", "--registry", str(reg.registry), "--json") == 0
    rows = json.loads(capsys.readouterr().out)["versions"]
    assert [(r["precision"], r["device"]) for r in rows] == [("fp32", "cpu"), ("fp16", "sm80")]


def test_cli_show(reg: SimpleNamespace, capsys: pytest.CaptureFixture[str]) -> None:
    assert trtpipe("artifacts", "show", reg.trt["version"], "--registry", str(reg.registry)) == 0
    out = capsys.readouterr().out
    for s in ("compute_capability   8.0", "tensorrt             8.6.1", "model.engine", "layers.json", "inputs (sha256)"):
        assert s in out, s
    assert trtpipe("artifacts", "show", reg.ort["version"], "--registry", str(reg.registry), "--json") == 0
    assert json.loads(capsys.readouterr().out) == read_manifest(reg.ort["path"])
    assert trtpipe("artifacts", "show", "nope", "--registry", str(reg.registry)) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no published version 'nope'" in err


def test_cli_verify_clean_and_tampered(reg: SimpleNamespace, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # On this machine the TensorRT engine cannot run: a finding, exit 1, no traceback.
    if not _has_tensorrt():
        assert trtpipe("artifacts", "verify", "--registry", str(reg.registry)) == 1
        cap = capsys.readouterr()
        assert "cannot run here: no TensorRT" in cap.out and "Traceback" not in cap.err
        assert f"OK   {reg.ort['version']}" in cap.out
    assert trtpipe("artifacts", "verify", "--registry", str(reg.registry), "--integrity-only") == 0
    assert trtpipe("artifacts", "verify", reg.ort["version"], "--registry", str(reg.registry)) == 0
    capsys.readouterr()

    r = copy_registry(reg, tmp_path)
    flip_byte(registry.resolve(reg.ort["version"], r) / "model.onnx")
    assert trtpipe("artifacts", "verify", "--registry", str(r), "--integrity-only") == 1
    cap = capsys.readouterr()
    assert f"FAIL {reg.ort['version']}" in cap.out and "model.onnx: sha256" in cap.out
    assert cap.err.count("\n") == 1 and "model.onnx" in cap.err and "1 of 2 version(s) failed" in cap.err
    assert trtpipe("artifacts", "verify", reg.ort["version"], "--registry", str(r), "--json") == 1
    res = json.loads(capsys.readouterr().out)["results"][0]
    assert res["integrity_ok"] is False and res["findings"][0]["file"] == "model.onnx"


def test_cli_reports_leftover_staging(reg: SimpleNamespace, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    r = copy_registry(reg, tmp_path)
    (r / "digits-cnn" / ".digits-cnn-fp32-x.staging-1234").mkdir()
    assert trtpipe("artifacts", "list", "--registry", str(r)) == 0
    out = capsys.readouterr().out
    assert "2 version(s)" in out and "interrupted publish" in out
