"""`trtpipe artifacts pull`: which published version it picks for a machine (named with
--for-cc/--for-tensorrt, or this one as probed), why, what it copies and what it refuses.
Every version is published by the project's own writers (tests/_small_registry.py: the publish
stage's helpers, make_manifest, registry.publish; TensorRT engine bytes stand in)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from pipeline import pull as pull_mod
from pipeline import registry
from pipeline.errors import ArtifactError, UsageError
from pipeline.manifest import read_manifest

from tests import _small_registry as small
from tests._project import trtpipe

ROOT = Path(__file__).resolve().parents[1]
LATER = "2026-12-02T10:00:00+00:00"


@pytest.fixture
def reg(tmp_path: Path) -> SimpleNamespace:
    """tiny: fp32 onnxruntime; fp16 onnxruntime and three engines (sm90 TensorRT 10.16, sm86 TensorRT
    8.6.1, ampere_plus built on sm80 with TensorRT 10.16); int8 one engine (sm90 TensorRT 8.6.1)."""
    reg, work = tmp_path / "registry", tmp_path / "w"
    ns = SimpleNamespace(reg=reg)
    ns.ort32 = small.published(work, reg, "fp32")
    ns.ort16 = small.published(work, reg, "fp16")
    ns.sm90, _, _ = small.published_engine(work, reg, "9.0", trt="10.16.0")
    ns.sm86, _, _ = small.published_engine(work, reg, "8.6", trt="8.6.1")
    ns.amp, _, _ = small.published_engine(work, reg, "8.0", trt="10.16.0", hardware_compatibility="ampere_plus")
    ns.int8, _, _ = small.published_engine(work, reg, "9.0", trt="8.6.1", precision="int8")
    return ns


def named(cc: str, trt: str) -> pull_mod.Machine:
    return pull_mod.machine_named(cc, trt)


def pick(reg: SimpleNamespace, cc: str, trt: str, precision: str = "fp16") -> pull_mod.Pick:
    (p,) = pull_mod.choose(reg.reg, named(cc, trt), precision=precision).picks
    return p


# ----------------------------------------------------------------------------------------- choosing


def test_an_engine_for_this_gpu_first(reg: SimpleNamespace) -> None:
    p = pick(reg, "9.0", "10.16.0")
    assert (p.version, p.rule, p.backend) == (reg.sm90, "gpu", "tensorrt")
    assert p.why.startswith("an engine for this GPU: built for compute capability 9.0, TensorRT 10.16.0")
    assert pick(reg, "8.6", "8.6.1").version == reg.sm86
    assert pick(reg, "8.0", "10.16.0").rule == "gpu"  # the ampere_plus engine on the GPU it was built on


@pytest.mark.parametrize("cc", ["8.6", "8.9", "9.0", "12.0"])
def test_a_hardware_compatible_engine_next(reg: SimpleNamespace, cc: str) -> None:
    if cc == "9.0":  # an engine for 9.0 with TensorRT 10.16 is published: it wins; without it, ampere_plus
        assert pick(reg, cc, "10.16.0").version == reg.sm90
        return
    p = pick(reg, cc, "10.16.0")
    assert (p.version, p.rule) == (reg.amp, "ampere_plus")
    assert "compute capability 8.0 or later (ampere_plus, built on 8.0), TensorRT 10.16.0" in p.why
    assert p.why.endswith(f"none is published for compute capability {cc} itself")


def test_onnxruntime_when_no_engine_fits(reg: SimpleNamespace) -> None:
    p = pick(reg, "7.5", "10.16.0")  # below ampere_plus: no engine fits
    assert (p.version, p.rule, p.backend) == (reg.ort16.version, "onnxruntime", "onnxruntime")
    assert "none of the 3 published fits compute capability 7.5 / TensorRT 10.16.0" in p.why
    p = pick(reg, "none", "none", "fp32")  # a CPU-only machine; fp32 has no engine at all
    assert p.rule == "onnxruntime" and "none is published" in p.why


def test_newest_publish_within_a_rule(reg: SimpleNamespace, tmp_path: Path) -> None:
    newer, _, _ = small.published_engine(tmp_path / "w", reg.reg, "9.0", trt="10.16.0", workspace_mb=2048,
                                         published_at=LATER, plan=b"rebuilt")
    p = pick(reg, "9.0", "10.16.0")
    assert p.version == newer and "the newest of 2 that fit" in p.why


def test_every_precision_or_one(reg: SimpleNamespace) -> None:
    report = pull_mod.choose(reg.reg, named("9.0", "8.6.1"))
    assert [(p.precision, p.rule) for p in report.picks] == [("fp32", "onnxruntime"), ("fp16", "onnxruntime"),
                                                            ("int8", "gpu")]
    assert report.model == "tiny" and report.picks[2].version == reg.int8


def test_refusal_names_what_each_version_is_for_and_the_machine(reg: SimpleNamespace, tmp_path: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(ArtifactError) as e:
        pull_mod.pull(reg.reg, out, named("8.6", "10.16"), precision="int8")
    msg = str(e.value)
    assert "\n" not in msg
    assert msg == (f"tiny int8: no published engine for compute capability 8.6 / TensorRT 10.16 (--for-cc/--for-tensorrt); "
                   f"published: {reg.int8} (compute capability 9.0, TensorRT 8.6.1); build on such a GPU or publish for it")
    assert not out.exists()
    # every precision: one that has no version for the machine refuses the whole pull, before anything is written
    with pytest.raises(ArtifactError, match="^tiny int8: no published engine"):
        pull_mod.pull(reg.reg, out, named("9.0", "10.16.0"))
    assert not out.exists()


def test_this_machine_as_probed(reg: SimpleNamespace, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without --for-*, the machine is what pipeline.compat.probe_here reports (here: stood in for a
    machine with an L4 and TensorRT 10.16, then for one with neither)."""
    from pipeline import compat

    monkeypatch.setattr(compat, "probe_here", lambda device_index=0: {
        "tensorrt": "10.16.0", "compute_capability": "8.9", "gpu": "NVIDIA L4", "onnxruntime": "1.20.0"})
    m = pull_mod.machine_here()
    assert (m.compute_capability, m.tensorrt, m.named) == ("8.9", "10.16.0", False)
    report = pull_mod.choose(reg.reg, m, precision="fp16")
    assert report.picks[0].version == reg.amp and report.machine.describe() == "compute capability 8.9 / TensorRT 10.16.0 here"

    monkeypatch.setattr(compat, "probe_here", lambda device_index=0: {
        "tensorrt": None, "tensorrt_error": "ModuleNotFoundError: No module named 'tensorrt'",
        "compute_capability": None, "gpu": None, "gpu_error": "no CUDA driver", "onnxruntime": "1.20.0"})
    with pytest.raises(ArtifactError) as e:
        pull_mod.choose(reg.reg, pull_mod.machine_here(), precision="int8")
    assert "tiny int8: no published engine for this machine (no CUDA GPU, no TensorRT); published: " in str(e.value)
    assert str(e.value).endswith("or publish an onnxruntime version")


def test_the_real_probe_of_this_machine() -> None:
    from pipeline.compat import probe_here

    m, h = pull_mod.machine_here(), probe_here()
    assert (m.tensorrt, m.onnxruntime, m.named) == (h["tensorrt"], h["onnxruntime"], False)
    assert m.compute_capability == (h["compute_capability"] and str(h["compute_capability"]))


# ----------------------------------------------------------------------------------------- copying


def test_pull_copies_the_version_and_the_copy_runs(reg: SimpleNamespace, tmp_path: Path) -> None:
    out = tmp_path / "deploy" / "tiny"
    report = pull_mod.pull(reg.reg, out, named("none", "none"), precision="fp32")
    (p,) = report.picks
    assert p.to == str(out / "fp32") and report.to == str(out)
    src = reg.ort32.path
    assert sorted(x.name for x in (out / "fp32").iterdir()) == sorted(x.name for x in src.iterdir())
    for f in src.iterdir():
        assert (out / "fp32" / f.name).read_bytes() == f.read_bytes()
    assert read_manifest(out / "fp32")["version"] == reg.ort32.version
    assert not [x for x in out.parent.iterdir() if x.name.startswith(".")]  # no working copy left
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    with registry.load(out / "fp32", reg.reg) as runner:
        np.testing.assert_array_equal(runner.infer({"input": x})["logits"], x * 2)  # tiny: y = 2x


def test_pull_into_an_empty_folder(reg: SimpleNamespace, tmp_path: Path) -> None:
    out = tmp_path / "empty"
    out.mkdir()
    pull_mod.pull(reg.reg, out, named("9.0", "10.16.0"), precision="fp16")
    assert (out / "fp16" / "model.plan").read_bytes() == (reg.reg / "tiny" / reg.sm90 / "model.plan").read_bytes()


def test_pull_never_overwrites(reg: SimpleNamespace, tmp_path: Path) -> None:
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(ArtifactError) as e:
        pull_mod.pull(reg.reg, out, named("9.0", "10.16.0"), precision="fp16")
    msg = str(e.value)
    assert "\n" not in msg and "not empty" in msg and "notes.txt" in msg and "never overwrites" in msg
    assert [x.name for x in out.iterdir()] == ["notes.txt"]
    for bad in (reg.reg / "tiny" / "x", reg.reg):
        with pytest.raises(ArtifactError, match="registry"):
            pull_mod.pull(reg.reg, bad, named("9.0", "10.16.0"), precision="fp16")
    assert not (reg.reg / "tiny" / "x").exists()


def test_pull_verifies_before_copying(reg: SimpleNamespace, tmp_path: Path) -> None:
    (reg.reg / "tiny" / reg.sm90 / "model.plan").write_bytes(b"tampered")
    out = tmp_path / "out"
    with pytest.raises(ArtifactError) as e:
        pull_mod.pull(reg.reg, out, named("9.0", "10.16.0"), precision="fp16")
    msg = str(e.value)
    assert "\n" not in msg and f"refusing to pull {reg.sm90}" in msg and "model.plan" in msg
    assert not out.exists()


def test_pull_refuses_an_edited_manifest(reg: SimpleNamespace, tmp_path: Path) -> None:
    path = reg.reg / "tiny" / reg.amp / "manifest.json"
    m = json.loads(path.read_text())
    m["hardware"]["gpu"] = "NVIDIA H100"  # descriptive only, but no longer what was published
    path.write_text(json.dumps(m, indent=2))
    with pytest.raises(ArtifactError, match=f"refusing to pull {reg.amp}: manifest.json: content_digest does not match"):
        pull_mod.pull(reg.reg, tmp_path / "out", named("8.9", "10.16.0"), precision="fp16")


# ----------------------------------------------------------------------------------------- the command


def test_cli_pull_text_and_json(reg: SimpleNamespace, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    assert trtpipe("artifacts", "pull", "tiny", "--registry", str(reg.reg), "--to", str(out), "--precision", "fp16",
                   "--for-cc", "8.9", "--for-tensorrt", "10.16.0") == 0
    text = capsys.readouterr().out
    assert f"picked tiny fp16: {reg.amp}" in text and "rule: a hardware-compatible engine (ampere_plus)" in text
    assert f"copied to {out / 'fp16'}" in text
    assert "machine: compute capability 8.9 / TensorRT 10.16.0 (--for-cc/--for-tensorrt)" in text

    out2 = tmp_path / "out2"
    assert trtpipe("artifacts", "pull", "--registry", str(reg.reg), "--to", str(out2), "--for-cc", "9.0",
                   "--for-tensorrt", "8.6.1", "--json") == 0
    report = pull_mod.PullReport.model_validate_json(capsys.readouterr().out)
    assert [(p.precision, p.version) for p in report.picks] == [("fp32", reg.ort32.version), ("fp16", reg.ort16.version),
                                                               ("int8", reg.int8)]
    assert report.machine.named and report.machine.compute_capability == "9.0"
    assert all(Path(p.to, "manifest.json").is_file() for p in report.picks)


@pytest.mark.parametrize("args, code, words", [
    (["--for-cc", "9.0"], 2, "--for-cc and --for-tensorrt go together"),
    (["--for-cc", "ampere", "--for-tensorrt", "10.16"], 2, "--for-cc 'ampere'"),
    (["--for-cc", "9.0", "--for-tensorrt", "latest"], 2, "--for-tensorrt 'latest'"),
    (["other", "--for-cc", "9.0", "--for-tensorrt", "10.16"], 1, "no published model 'other'"),
    (["--precision", "int8", "--for-cc", "8.6", "--for-tensorrt", "10.16"], 1, "tiny int8: no published engine"),
])
def test_cli_refusals_are_one_line(reg: SimpleNamespace, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                   args: list[str], code: int, words: str) -> None:
    out = tmp_path / "out"
    assert trtpipe("artifacts", "pull", "--registry", str(reg.reg), "--to", str(out), *args) == code
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and words in err, err
    assert not out.exists()


def test_cli_names_the_models_when_several(reg: SimpleNamespace, tmp_path: Path) -> None:
    small.published(tmp_path / "w2", reg.reg, "fp32", model="other")
    r = subprocess.run([sys.executable, "-m", "pipeline.cli", "artifacts", "pull", "--registry", str(reg.reg),
                        "--to", str(tmp_path / "out")], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "2 models (other, tiny)" in r.stderr and "Traceback" not in r.stderr
    with pytest.raises(ArtifactError, match="no published fp16 version.*published precisions: fp32"):
        pull_mod.choose(reg.reg, named("9.0", "10.16"), model="other", precision="fp16")
    with pytest.raises(UsageError):
        pull_mod.choose(reg.reg, named("9.0", "10.16"))
    assert not (tmp_path / "out").exists()
