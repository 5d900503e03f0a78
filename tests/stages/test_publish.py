"""publish on the real digits pipeline (CPU, onnxruntime): versions are deterministic,
written once, never overwritten or half-written, and move only when an input changes."""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import yaml

from pipeline.config import Config, _merge
from pipeline.errors import ArtifactError, PipelineError
from pipeline.fileio import read_json, sha256_file
from pipeline.reports import BuildReport, EvalReport, read_report, write_report
from pipeline.manifest import read_manifest
from pipeline import registry
from pipeline.stages import publish
from tests._digits_run import digits_base, evaluate_all

ROOT = Path(__file__).resolve().parents[2]


def make_config(root: Path, **over: Any) -> Config:
    data = yaml.safe_load((ROOT / "configs" / "digits.yaml").read_text())
    base = {
        "build": {"backend": "onnxruntime"},  # the same route on a GPU machine
        "evaluate": {"latency": {"warmup": 1, "iterations": 3, "batch_sizes": [1, 32]}},
        "publish": {"precisions": ["fp32", "fp16"], "registry": str(root / "registry")},
    }
    return Config.model_validate(_merge(_merge(data, base), over))


def make_calibration(cfg: Config, ws: Path, num_samples: int) -> Path:
    """The calibrate stage's outputs for the int8 build, from `num_samples` calibration samples."""
    from tests._digits_run import calibrate

    calibrate(cfg.model_copy(update={"calibration": cfg.calibration.model_copy(update={"num_samples": num_samples})}), ws)
    return ws / "calibrate"


def build_and_evaluate(cfg: Config, root: Path, precision: str) -> None:
    from tests._digits_run import build as run_build

    run_build(cfg, root, precision)
    evaluate_all(cfg, root, (precision,))


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """The session's shared digits run (prepare .. build fp32 + fp16, tests/_digits_run.py),
    evaluated here with this module's config."""

    base = digits_base(tmp_path_factory)
    root = tmp_path_factory.mktemp("digits")
    for d in ("prepare", "export", "validate", "calibrate", "build"):
        shutil.copytree(base / d, root / d)
    cfg = make_config(root)
    evaluate_all(cfg, root, ("fp32", "fp16"))
    return SimpleNamespace(root=root, cfg=cfg)


def workspace(digits: SimpleNamespace, tmp_path: Path) -> Path:
    """A private copy of the stage outputs, so a test may rebuild or change them."""
    ws = tmp_path / "ws"
    for d in ("prepare", "export", "validate", "calibrate", "build", "eval"):
        shutil.copytree(digits.root / d, ws / d)
    return ws


def run_publish(cfg: Config, ws: Path, registry_dir: Path | None = None, calib: str = "calibrate") -> dict[str, Any]:
    return publish.run(
        cfg, ws / "build", ws / "eval", registry_dir or ws / "registry", ws / "publish" / "published.json",
        ws / "prepare", ws / calib, ws / "export" / "model.onnx",
    )


def tree(path: Path) -> dict[str, tuple[str, int]]:
    """Every file under `path` with its sha256 and mtime (to prove nothing was rewritten)."""
    return {str(p.relative_to(path)): (sha256_file(p), p.stat().st_mtime_ns) for p in sorted(path.rglob("*")) if p.is_file()}


def test_publish_writes_complete_versions(digits: SimpleNamespace, tmp_path: Path) -> None:
    ws = workspace(digits, tmp_path)
    r = run_publish(digits.cfg, ws)
    assert [v["status"] for v in r["published"]] == ["published", "published"]
    dirs = registry.version_dirs(ws / "registry")
    assert len(dirs) == 2
    for v in r["published"]:
        vdir = Path(v["path"])
        m = read_manifest(vdir)
        assert vdir.name == m["version"] == v["version"]
        assert m["version"].startswith(f"digits-cnn-{v['precision']}-onnxruntime")
        assert m["version"].endswith(f"-cpu-{m['inputs_digest'][:8]}")
        # the build's settings and result, and (onnxruntime: byte-reproducible) the model built
        assert set(m["inputs"]) == {"checkpoint", "onnx", "config", "build", "artifact"}
        assert m["inputs"]["checkpoint"] == sha256_file(ws / "prepare" / "model.pt")
        assert m["inputs"]["onnx"] == sha256_file(ws / "export" / "model.onnx")
        assert sorted(p.name for p in vdir.iterdir()) == ["build.json", "eval.json", "manifest.json", "model.onnx"]
        assert m["files"]["model.onnx"]["sha256"] == sha256_file(ws / "build" / v["precision"] / "model.onnx")
        assert m["metrics"]["task"]["top1"] == read_json(ws / "eval" / f"{v['precision']}.json")["metrics"]["top1"]
        assert m["software"]["onnxruntime"] == m["backend_version"]
        assert registry.verify(vdir, ws / "registry").ok()
        # The stable pointer for DVC's artifacts block is a copy of the version.
        assert tree(Path(v["pointer"])).keys() == tree(vdir).keys()
        assert sha256_file(Path(v["pointer"])) == sha256_file(vdir)
    assert read_json(ws / "publish" / "published.json")["published"] == [
        {k: v for k, v in p.items() if k != "status"} for p in r["published"]
    ]
    assert not list((ws / "registry").rglob(".*staging*"))


def test_publish_twice_is_a_noop(digits: SimpleNamespace, tmp_path: Path) -> None:
    ws = workspace(digits, tmp_path)
    first = run_publish(digits.cfg, ws)
    before, pointers_before = tree(ws / "registry"), tree(ws / "publish" / "current")
    record = (ws / "publish" / "published.json").read_bytes()
    second = run_publish(digits.cfg, ws)
    assert (ws / "publish" / "published.json").read_bytes() == record  # DVC sees the same output
    assert [v["version"] for v in second["published"]] == [v["version"] for v in first["published"]]
    assert [v["status"] for v in second["published"]] == ["unchanged", "unchanged"]
    assert tree(ws / "registry") == before  # same bytes, same mtimes: nothing rewritten
    assert tree(ws / "publish" / "current") == pointers_before
    assert len(registry.version_dirs(ws / "registry")) == 2


def test_rebuild_from_same_inputs_keeps_the_version(digits: SimpleNamespace, tmp_path: Path) -> None:
    """A fresh build and evaluation (new timestamps, new latencies) of the same inputs is
    the same version: publish is a no-op and keeps the first record."""
    ws = workspace(digits, tmp_path)
    first = run_publish(digits.cfg, ws)
    before = tree(ws / "registry")
    for p in ("fp32", "fp16"):
        build_and_evaluate(digits.cfg, ws, p)
    assert "built_at" not in read_json(ws / "build" / "fp32" / "build.json")  # run-to-run noise lives in timings
    second = run_publish(digits.cfg, ws)
    assert [v["version"] for v in second["published"]] == [v["version"] for v in first["published"]]
    assert [v["status"] for v in second["published"]] == ["unchanged", "unchanged"]
    assert tree(ws / "registry") == before


def test_config_change_gives_new_version_beside_the_old(digits: SimpleNamespace, tmp_path: Path) -> None:
    """A calibration knob does not version fp32/fp16; an input that shapes them does."""
    ws = workspace(digits, tmp_path)
    first = {v["precision"]: v["version"] for v in run_publish(digits.cfg, ws)["published"]}
    knob = make_config(ws, calibration={"method": "minmax"}, publish={"registry": str(ws / "registry")})
    assert {v["precision"]: v["version"] for v in run_publish(knob, ws)["published"]} == first

    changed = make_config(ws, data={"preprocess": {"mean": [0.4]}})  # what the model expects as input
    second = {v["precision"]: v for v in run_publish(changed, ws)["published"]}
    assert all(second[p]["version"] != first[p] for p in first)
    assert all(second[p]["status"] == "published" for p in first)
    names = {d.name for d in registry.version_dirs(ws / "registry")}
    assert names == set(first.values()) | {v["version"] for v in second.values()}
    assert all(r.ok() for r in registry.verify_all(ws / "registry"))
    # The pointers follow the latest publish.
    assert read_manifest(ws / "publish" / "current" / "fp16")["version"] == second["fp16"]["version"]


def test_change_calibration_gives_new_int8_version(digits: SimpleNamespace, tmp_path: Path) -> None:
    ws = workspace(digits, tmp_path)
    cfg = make_config(ws, publish={"precisions": ["fp32", "fp16", "int8"], "registry": str(ws / "registry")})
    calib_npz = ws / "prepare" / "calib.npz"

    make_calibration(cfg, ws, num_samples=64)
    build_and_evaluate(cfg, ws, "int8")
    first = {v["precision"]: v for v in run_publish(cfg, ws)["published"]}
    m1 = read_manifest(first["int8"]["path"])
    assert m1["inputs"]["calibration_cache"] == sha256_file(ws / "calibrate" / "calibration.cache")
    assert m1["inputs"]["calibration_data"] == sha256_file(calib_npz)
    assert m1["files"]["calibration.cache"]["role"] == "calibration_cache"
    assert (Path(first["int8"]["path"]) / "calibration.cache").is_file()
    assert run_publish(cfg, ws)["published"][2]["status"] == "unchanged"

    # Other calibration: 320 samples instead of 64 (and the config says so).
    cfg2 = make_config(ws, calibration={"num_samples": 320}, publish={"precisions": ["fp32", "fp16", "int8"], "registry": str(ws / "registry")})
    make_calibration(cfg2, ws, num_samples=320)
    build_and_evaluate(cfg2, ws, "int8")
    second = {v["precision"]: v for v in run_publish(cfg2, ws)["published"]}
    assert second["int8"]["status"] == "published"
    assert second["int8"]["version"] != first["int8"]["version"]
    for p in ("fp32", "fp16"):  # calibration does not version them
        assert (second[p]["version"], second[p]["status"]) == (first[p]["version"], "unchanged")
    int8 = sorted(d.name for d in registry.version_dirs(ws / "registry") if "-int8-" in d.name)
    assert int8 == sorted([first["int8"]["version"], second["int8"]["version"]])
    assert all(r.ok() for r in registry.verify_all(ws / "registry"))  # the old one is intact beside the new


def test_other_model_bytes_are_another_version_beside_the_old(digits: SimpleNamespace, tmp_path: Path) -> None:
    """An onnxruntime model is byte-reproducible, so its bytes are among the version's
    inputs: other bytes publish another version, and the published one is left exactly as
    it was. (Engines, which are not byte-reproducible, are refused instead: the registry's
    own test, test_same_version_with_other_artifact_bytes_is_refused.)"""
    import onnx

    ws = workspace(digits, tmp_path)
    first = run_publish(digits.cfg, ws)
    before = tree(ws / "registry")
    bdir = ws / "build" / "fp16"
    model = onnx.load(str(bdir / "model.onnx"))
    model.doc_string = "rebuilt"  # other bytes, same meaning
    onnx.save(model, str(bdir / "model.onnx"))
    info = read_report(bdir / "build.json", BuildReport, "build", "build")
    info = info.model_copy(update={"sha256": sha256_file(bdir / "model.onnx"), "engine_bytes": (bdir / "model.onnx").stat().st_size})
    write_report(bdir / "build.json", info)
    ev = read_report(ws / "eval" / "fp16.json", EvalReport, "eval", "evaluate")
    write_report(ws / "eval" / "fp16.json", ev.model_copy(update={"engine_bytes": info.engine_bytes,
                                                                   "sha256": {**ev.sha256, "artifact": info.sha256}}))

    second = run_publish(digits.cfg, ws)
    assert [v["status"] for v in second["published"]] == ["unchanged", "published"]
    assert second["published"][1]["version"] != first["published"][1]["version"]
    after = tree(ws / "registry")
    old = [k for k in before if first["published"][1]["version"] in k]
    assert old and {k: after[k] for k in old} == {k: before[k] for k in old}  # the published version untouched


def test_stale_or_mismatched_inputs_are_refused(digits: SimpleNamespace, tmp_path: Path) -> None:
    ws = workspace(digits, tmp_path)
    # An evaluation of another build.
    shutil.copyfile(ws / "eval" / "fp16.json", ws / "eval" / "fp32.json")
    with pytest.raises(ArtifactError, match=r"fp32\.json: measures another build"):
        run_publish(digits.cfg, ws)
    shutil.copyfile(digits.root / "eval" / "fp32.json", ws / "eval" / "fp32.json")
    # A build folder whose artifact was changed after the build.
    with open(ws / "build" / "fp32" / "model.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(ArtifactError, match=r"fp32/model\.onnx: does not match the sha256 its build\.json records"):
        run_publish(digits.cfg, ws)
    assert not (ws / "registry").exists() or not registry.version_dirs(ws / "registry")


def test_interrupted_publish_leaves_nothing_half_written(digits: SimpleNamespace, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ws = workspace(digits, tmp_path)
    real_copy = shutil.copyfile
    calls = {"n": 0}

    def failing_copy(src, dst, *a, **k):  # dies on the second file of the first version
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(errno.ENOSPC, "No space left on device", str(dst))
        return real_copy(src, dst, *a, **k)

    monkeypatch.setattr(registry.shutil, "copyfile", failing_copy)
    with pytest.raises(ArtifactError, match="No space left on device.*nothing was published"):
        run_publish(digits.cfg, ws)
    monkeypatch.undo()
    assert registry.version_dirs(ws / "registry") == []
    assert [p.name for p in (ws / "registry" / "digits-cnn").iterdir()] == []  # no staging left behind

    # A crash (SIGKILL) between staging and rename leaves a hidden staging folder only:
    # not a version, ignored by list, reported by verify; the next publish sweeps it and completes.
    (ws / "registry" / "digits-cnn" / ".digits-cnn-fp32-x.staging-abc").mkdir()
    assert len(registry.leftover_staging(ws / "registry")) == 1
    r = run_publish(digits.cfg, ws)
    assert [v["status"] for v in r["published"]] == ["published", "published"]
    assert len(registry.list_versions(ws / "registry")) == 2
    assert registry.leftover_staging(ws / "registry") == []


_PUBLISH = """
import sys, yaml
from pathlib import Path
from pipeline.config import Config
from pipeline.stages import publish
ws, registry = Path(sys.argv[1]), Path(sys.argv[2])
cfg = Config.model_validate(yaml.safe_load((ws / "cfg.yaml").read_text()))
r = publish.run(cfg, ws / "build", ws / "eval", registry, ws / "publish" / "published.json", ws / "prepare",
                ws / "calibrate", ws / "export" / "model.onnx")
print(" ".join(v["status"] for v in r["published"]))
"""


def test_concurrent_publishers_take_turns(digits: SimpleNamespace, tmp_path: Path) -> None:
    """Four processes publish the same versions into one registry at once: the registry's lock
    makes them take turns; no traceback, each version published exactly once, the rest
    'unchanged', everything verifies, no staging folder left behind."""
    import subprocess
    import sys

    import yaml

    workspaces = []
    for k in range(4):
        ws = workspace(digits, tmp_path / f"p{k}")
        (ws / "cfg.yaml").write_text(yaml.safe_dump(digits.cfg.raw()))
        workspaces.append(ws)
    reg = tmp_path / "shared-registry"
    procs = [subprocess.Popen([sys.executable, "-c", _PUBLISH, str(ws), str(reg)], cwd=ROOT, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for ws in workspaces]
    results = [p.communicate(timeout=600) + (p.returncode,) for p in procs]
    assert all(rc == 0 for _, _, rc in results), [err for _, err, _ in results]
    statuses = [out.split() for out, _, _ in results]
    for i in range(2):  # fp32, fp16
        assert sorted(s[i] for s in statuses) == ["published", "unchanged", "unchanged", "unchanged"]
    assert len(registry.version_dirs(reg)) == 2
    assert all(v.ok() for v in registry.verify_all(reg))
    assert registry.leftover_staging(reg) == []
    entries, problems = registry.ledger_entries(reg, "digits-cnn")
    assert len(entries) == 2 and problems == []


def test_concurrent_publisher_with_other_content_is_an_error(digits: SimpleNamespace, tmp_path: Path) -> None:
    ws = workspace(digits, tmp_path)
    m = json.loads(json.dumps(read_manifest(run_publish(digits.cfg, ws)["published"][0]["path"])))
    vdir = ws / "registry" / m["model"] / m["version"]
    before = tree(vdir)
    other = tmp_path / "other.onnx"
    other.write_bytes(b"not the same model")
    m["files"]["model.onnx"] = {"sha256": sha256_file(other), "bytes": other.stat().st_size, "role": "artifact"}
    sources = {"model.onnx": other, "build.json": vdir / "build.json", "eval.json": vdir / "eval.json"}
    with pytest.raises(ArtifactError, match="already published with a different model.onnx"):
        registry.publish(ws / "registry", m, sources)
    assert tree(vdir) == before


def test_unbuilt_variant_is_a_pipeline_error(digits: SimpleNamespace, tmp_path: Path) -> None:
    ws = workspace(digits, tmp_path)
    cfg = make_config(ws, publish={"precisions": ["fp32", "int8"], "registry": str(ws / "registry")})
    with pytest.raises(PipelineError, match=r"int8/build\.json: variant not built"):
        run_publish(cfg, ws)
    assert not (ws / "registry").exists()  # checked before anything is published
