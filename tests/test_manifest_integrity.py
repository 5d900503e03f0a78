"""manifest.json integrity: an edited manifest is caught and verify names what changed
(the section, the field, the file), with or without its own digests recomputed, and with
TRTPIPE_MANIFEST_KEY even when the ledger is edited too. Plus the manifest's parts,
checked against independent computations (canonical JSON bytes written out by hand,
hashlib/hmac), and every message read_manifest and consistency_findings give."""

from __future__ import annotations

import copy
import hashlib
import hmac
import json
from pathlib import Path
from typing import Any, Callable

import pytest

from pipeline import registry
from pipeline.errors import ArtifactError
from pipeline.manifest import (
    KEY_ENV,
    SECTIONS,
    build_environment,
    consistency_findings,
    content_digest,
    device_tag,
    digest_of,
    identity,
    make_manifest,
    normalize_cc,
    read_manifest,
    section_digests,
    sign,
    version_string,
)
from tests._small_registry import published

CHANGED = "manifest content differs from what was published: {} changed; restore the folder (dvc checkout) or republish"


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def edit_manifest(vdir: Path, edit: Callable[[dict[str, Any]], None], redigest: bool = True) -> dict[str, Any]:
    """Edit the published manifest.json; with `redigest`, recompute its content_digest as
    someone covering their tracks would."""
    path = vdir / "manifest.json"
    m = json.loads(path.read_text())
    edit(m)
    if redigest:
        m["content_digest"] = content_digest(m)
    path.write_text(json.dumps(m, indent=2) + "\n")
    return m


def findings(reg: Path, vdir: Path) -> list[tuple[str, str | None, str]]:
    return [(f.kind, f.file, f.message) for f in registry.verify(vdir, reg, here={}).findings]


# --------------------------------------------------------------------------- tampering, end to end


TAMPER = {
    "identity": lambda m: m.update(published_at="2020-01-01T00:00:00+00:00"),
    "software": lambda m: m["software"].update(onnxruntime="0.0.1"),
    "hardware": lambda m: m["hardware"].update(gpu="NVIDIA H100 80GB HBM3"),
    "build": lambda m: m["build"].update(build_seconds=0.001),
    "config": lambda m: m["config"]["preprocess"].update(scale=2.0),
    "io": lambda m: m["io"].update(opset=13),
    "metrics": lambda m: m["metrics"]["task"].update(top1=99.9),
    "files": lambda m: m["files"]["eval.json"].update(role="build_report"),
    "notes": lambda m: m["notes"].append("validated by hand"),
}


def test_every_section_is_tampered_with_somewhere() -> None:
    assert set(TAMPER) == set(SECTIONS)


@pytest.mark.parametrize("section", list(TAMPER))
def test_verify_names_the_tampered_section(tmp_path: Path, section: str) -> None:
    """A manifest edited after publishing, its content_digest recomputed to match: the
    ledger's section digests still name the section that changed, and only that one; load
    refuses it with the same words."""
    reg = tmp_path / "registry"
    v = published(tmp_path, reg)
    edit_manifest(v.path, TAMPER[section])
    assert findings(reg, v.path) == [("integrity", "manifest.json", CHANGED.format(section))]
    with pytest.raises(ArtifactError, match=f"refusing to load .*{section} changed"):
        registry.load(v.version, reg, here={})


def test_verify_names_every_tampered_section_and_the_stale_digest(tmp_path: Path) -> None:
    reg = tmp_path / "registry"
    v = published(tmp_path, reg)
    edit_manifest(v.path, lambda m: (TAMPER["metrics"](m), TAMPER["notes"](m)), redigest=False)
    assert findings(reg, v.path) == [
        ("integrity", "manifest.json",
         "content_digest does not match the manifest's content: the manifest was edited after publishing"),
        ("integrity", "manifest.json", CHANGED.format("metrics, notes")),
    ]


def test_verify_names_an_edited_identity(tmp_path: Path) -> None:
    """Claiming another checkpoint: the manifest no longer derives its own inputs_digest
    or version."""
    reg = tmp_path / "registry"
    v = published(tmp_path, reg)
    old = v.manifest["inputs_digest"]
    m = edit_manifest(v.path, lambda m: m["inputs"].update(checkpoint="0" * 64))
    now = digest_of(identity(m))
    expect = version_string("tiny", "fp32", "onnxruntime", m["backend_version"], "cpu", now)
    assert findings(reg, v.path) == [
        ("integrity", "manifest.json", f"inputs_digest {old[:12]}\u2026 does not match the manifest's own inputs and "
                                       f"settings ({now[:12]}\u2026): the manifest was edited after publishing"),
        ("integrity", "manifest.json", f"version {v.version} does not follow from the manifest's contents "
                                       f"(expected {expect})"),
        ("integrity", "manifest.json", CHANGED.format("identity")),
    ]


def test_an_edited_ledger_line_is_named(tmp_path: Path) -> None:
    reg = tmp_path / "registry"
    v = published(tmp_path, reg)
    ledger = reg / "tiny" / registry.LEDGER
    entry = json.loads(ledger.read_text())
    ledger.write_text(json.dumps({**entry, "content_digest": "0" * 64}) + "\n")
    assert findings(reg, v.path) == [("integrity", "manifest.json", CHANGED.format("(the ledger line itself)"))]


def test_with_a_key_even_manifest_and_ledger_edited_together_are_caught(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, "registry secret")
    reg = tmp_path / "registry"
    v = published(tmp_path, reg)
    assert v.manifest["signature"] == hmac.new(b"registry secret", v.manifest["content_digest"].encode(),
                                               hashlib.sha256).hexdigest()
    assert findings(reg, v.path) == []
    m = edit_manifest(v.path, TAMPER["metrics"])
    ledger = reg / "tiny" / registry.LEDGER
    ledger.write_text(json.dumps({"version": v.version, "content_digest": m["content_digest"],
                                  "sections": section_digests(m), "published_at": m["published_at"]}) + "\n")
    assert findings(reg, v.path) == [
        ("integrity", "manifest.json", f"signature does not match the content under ${KEY_ENV}: the manifest was "
                                       "edited (or signed with another key)"),
        ("integrity", "ledger.jsonl", f"the ledger line of version {v.version} is not signed, but ${KEY_ENV} is set "
                                      "and then every line must be: it was written without the key; republish the "
                                      f"version with the key set (remove the folder first), or unset ${KEY_ENV} to "
                                      "check digests and ledger only")]
    monkeypatch.setenv(KEY_ENV, "another key")
    assert len(findings(reg, v.path)) == 2
    monkeypatch.delenv(KEY_ENV)
    assert findings(reg, v.path) == []  # without the key the signature cannot be checked


def test_files_changed_after_publishing_are_named(tmp_path: Path) -> None:
    reg = tmp_path / "registry"
    v = published(tmp_path, reg)
    with open(v.path / "eval.json", "ab") as f:
        f.write(b" ")
    (v.path / "build.json").unlink()
    (v.path / "notes.txt").write_text("added")
    got = findings(reg, v.path)
    size = v.manifest["files"]["eval.json"]["bytes"]
    assert got[0] == ("integrity", "build.json", "missing (listed in the manifest)")
    assert got[1] == ("integrity", "eval.json", f"size {size + 1} bytes, manifest says {size}")
    assert got[2][:2] == ("integrity", "eval.json") and got[2][2].startswith("sha256 ")
    assert got[3] == ("integrity", "notes.txt", "not listed in the manifest (added after publishing)")
    assert len(got) == 4


@pytest.mark.parametrize("name", ["../model.onnx", "sub/model.onnx", ".", "..", "", "manifest.json"])
def test_a_file_entry_outside_the_version_folder_is_refused(tmp_path: Path, name: str) -> None:
    reg = tmp_path / "registry"
    v = published(tmp_path, reg)
    edit_manifest(v.path, lambda m: m["files"].update({name: {"sha256": "0" * 64, "bytes": 1, "role": "metrics"}}))
    assert ("integrity", name, "not a plain file name inside the version folder") in findings(reg, v.path)


# --------------------------------------------------------------------------- the parts, by hand


@pytest.mark.parametrize("cc,want", [
    ("9.0", "9.0"), ("sm_90", "9.0"), ("SM90", "9.0"), (" sm_86 ", "8.6"), ("86", "8.6"), ("100", "10.0"),
    ("12.10", "12.10"), (9.0, "9.0"), ((8, 9), "8.9"), ([7, 5], "7.5"), ("08.06", "8.6"),
    (None, None), ("", None), ("9", "9"), ("1000", "1000"), ("gpu", "gpu"), ((8, 9, 0), "(8, 9, 0)"),
])
def test_normalize_cc(cc: Any, want: Any) -> None:
    assert normalize_cc(cc) == want


def test_build_environment_precedence() -> None:
    """build.device < environment.device < environment < software < hardware."""
    layers = {
        "device": {"gpu": "from build.device", "driver": "1", "cores": 8},
        "environment": {"device": {"gpu": "from env.device", "driver_cuda": "12.2"}, "gpu": "from env",
                        "cpu": "x86_64", "tensorrt": None},
        "software": {"gpu": "from software", "tensorrt": "8.6.1", "cuda_runtime": "12.4"},
        "hardware": {"gpu": "from hardware", "compute_capability": "sm_90"},
        "backend": "tensorrt", "backend_version": "10.0.0",
    }
    assert build_environment(layers) == {"gpu": "from hardware", "driver": "1", "cores": 8, "driver_cuda": "12.2",
                                         "cpu": "x86_64", "tensorrt": "8.6.1", "cuda_runtime": "12.4",
                                         "compute_capability": "9.0"}
    for drop, gpu in (("hardware", "from software"), ("software", "from env"), ("environment", "from build.device")):
        layers.pop(drop)
        assert build_environment(layers)["gpu"] == gpu
    assert build_environment({"backend": "tensorrt", "backend_version": "10.0.0"}) == {"tensorrt": "10.0.0"}
    assert build_environment({"backend": "tensorrt"}) == {}
    assert build_environment({"backend": "onnxruntime", "backend_version": "1.17"}) == {}
    assert build_environment({"environment": {"device": "cpu", "cores": 2}}) == {"device": "cpu", "cores": 2}


def test_device_tag() -> None:
    assert device_tag("tensorrt", {"compute_capability": "sm_89"}) == "sm89"
    assert device_tag("tensorrt", {"compute_capability": "10.0"}) == "sm100"
    assert device_tag("tensorrt", {"device": "cpu"}) == "gpu"
    assert device_tag("onnxruntime", {"device": "cuda:0", "compute_capability": "9.0"}) == "cuda:0"
    assert device_tag("onnxruntime", {"device": None}) == "cpu"


def test_digests_are_sha256_of_canonical_json() -> None:
    """Sorted keys, no spaces, str() for anything else: the bytes written out here."""
    ident = {"model": "m", "precision": "fp16", "backend": "tensorrt", "backend_version": "8.6.1", "device": "sm90",
             "inputs": {"onnx": "b", "checkpoint": "a"}, "settings": {"path": Path("x")}, "ignored": 1}
    assert identity(ident) == {k: ident[k] for k in ("model", "precision", "backend", "backend_version", "device",
                                                     "inputs", "settings")}
    assert digest_of(identity(ident)) == sha(
        b'{"backend":"tensorrt","backend_version":"8.6.1","device":"sm90","inputs":{"checkpoint":"a","onnx":"b"},'
        b'"model":"m","precision":"fp16","settings":{"path":"x"}}')
    m = {"metrics": {"b": 1, "a": float("nan")}, "notes": ["x"], "files": {}}
    parts = section_digests(m)
    assert list(parts) == list(SECTIONS)
    assert parts["metrics"] == sha(b'{"a":NaN,"b":1}')
    assert parts["notes"] == sha(b'["x"]') and parts["files"] == sha(b"{}") and parts["io"] == sha(b"null")
    assert parts["identity"] == sha(
        b'{"artifact":null,"backend":null,"backend_version":null,"device":null,"inputs":null,"inputs_digest":null,'
        b'"kind":null,"model":null,"precision":null,"published_at":null,"schema_version":null,"settings":null,'
        b'"version":null}')
    canonical = "{" + ",".join(f'"{k}":"{parts[k]}"' for k in sorted(parts)) + "}"
    assert content_digest(m) == sha(canonical.encode())


def test_version_string_is_safe_as_a_folder_name() -> None:
    assert version_string("my model/v2", "fp16", "tensorrt", "8.6.1", "sm90", "0123456789abcdef") == \
        "my_model_v2-fp16-tensorrt8.6.1-sm90-01234567"
    assert version_string("m", "fp32", "onnxruntime", None, "cpu", "abcdef0123") == "m-fp32-onnxruntime-cpu-abcdef01"


def test_sign_is_hmac_sha256_under_the_key(monkeypatch: pytest.MonkeyPatch) -> None:
    want = hmac.new(b"k3y", b"digest", hashlib.sha256).hexdigest()
    assert sign("digest", "k3y") == want
    monkeypatch.delenv(KEY_ENV, raising=False)
    assert sign("digest") is None
    monkeypatch.setenv(KEY_ENV, "")
    assert sign("digest") is None
    monkeypatch.setenv(KEY_ENV, "k3y")
    assert sign("digest") == want
    assert sign("digest", "other") != want


TRT_BUILD = {
    "backend": "tensorrt", "backend_version": "8.6.1", "artifact": "model.engine", "backend_requested": "auto",
    "environment": {"tensorrt": "8.6.1", "device": {"gpu": "NVIDIA A100", "compute_capability": "8.0", "driver": "535",
                                                    "cuda_runtime": "12.2", "memory_bytes": 1}},
    "flags": ["FP16"], "profiles": None, "workspace_mb": 1024, "calibration": None, "build_seconds": 3.5,
    "engine_bytes": 10, "built_at": "2026-01-01T00:00:00+00:00", "onnx_sha256": "a" * 64, "details": {"x": 1},
}
FILES = {"model.engine": {"sha256": "d" * 64, "bytes": 10, "role": "artifact"},
         "build.json": {"sha256": "e" * 64, "bytes": 5, "role": "build_report"}}


def trt_manifest(**over: Any) -> dict[str, Any]:
    args = dict(inputs={"checkpoint": "a" * 64, "onnx": "b" * 64}, settings={"precision": "fp16"},
                metrics={"task": {"top1": float("inf")}}, files=FILES, software={"tensorrt": "8.6.1"})
    args.update(over)
    return make_manifest("digits", "fp16", copy.deepcopy(TRT_BUILD), **args)


def test_make_manifest_fields(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(KEY_ENV, raising=False)
    m = trt_manifest()
    assert m["schema_version"] == 2 and m["kind"] == "trtpipe.manifest"
    assert (m["model"], m["precision"], m["backend"], m["backend_version"], m["device"], m["artifact"]) == \
        ("digits", "fp16", "tensorrt", "8.6.1", "sm80", "model.engine")
    assert m["inputs_digest"] == digest_of(identity(m))
    assert m["version"] == f"digits-fp16-tensorrt8.6.1-sm80-{m['inputs_digest'][:8]}"
    assert m["hardware"] == {"gpu": "NVIDIA A100", "compute_capability": "8.0", "driver": "535", "cuda_runtime": "12.2"}
    # the build facts, not the backend's details or the ONNX hash (an input)
    assert m["build"] == {"flags": ["FP16"], "workspace_mb": 1024, "calibration": None, "build_seconds": 3.5,
                          "engine_bytes": 10, "built_at": "2026-01-01T00:00:00+00:00", "backend_requested": "auto"}
    assert list(m["files"]) == ["build.json", "model.engine"]  # sorted
    assert (m["config"], m["io"], m["notes"], m["published_at"], m["signature"]) == ({}, {}, [], None, None)
    assert m["metrics"] == {"task": {"top1": "Infinity"}}  # strict JSON
    assert m["content_digest"] == content_digest(m)
    assert consistency_findings(m) == []
    ort = make_manifest("digits", "fp32", {"backend": "onnxruntime", "artifact": "model.onnx",
                                           "environment": {"device": "cpu", "cpu": "arm64"}},
                        inputs={}, settings={}, metrics={}, files={}, software={})
    assert (ort["backend_version"], ort["device"], ort["hardware"], ort["build"]) == ("", "cpu", {"device": "cpu",
                                                                                               "cpu": "arm64"}, {})


def test_make_manifest_signs_under_the_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, "k")
    m = trt_manifest(notes=["n"], published_at="t", config={"c": 1}, io={"opset": 17})
    assert (m["notes"], m["published_at"], m["config"], m["io"]) == (["n"], "t", {"c": 1}, {"opset": 17})
    assert m["signature"] == hmac.new(b"k", m["content_digest"].encode(), hashlib.sha256).hexdigest()


@pytest.mark.parametrize("edit,finding", [
    (lambda m: m["hardware"].update(compute_capability="9.0"),
     "hardware.compute_capability 9.0 does not match device sm80 in the version"),
    (lambda m: m["software"].update(tensorrt="10.3.0"),
     "software.tensorrt 10.3.0 does not match backend_version 8.6.1 in the version"),
    (lambda m: m.update(artifact="other.engine"), "artifact other.engine is not listed in files"),
])
def test_consistency_names_the_contradiction(edit: Callable[[dict[str, Any]], None], finding: str) -> None:
    m = trt_manifest()
    edit(m)
    m["content_digest"] = content_digest(m)
    assert consistency_findings(m) == [finding]


def test_consistency_of_a_manifest_without_optional_parts() -> None:
    """An onnxruntime manifest has no compute capability or TensorRT to compare; missing
    sections are not findings of their own."""
    m = trt_manifest()
    for k in ("hardware", "software"):
        m[k] = {}
    m["content_digest"] = content_digest(m)
    assert consistency_findings(m) == []
    ort = {**m, "backend": "onnxruntime", "hardware": {"compute_capability": "7.0"}, "software": {"tensorrt": "1"}}
    ort["inputs_digest"] = digest_of(identity(ort))
    ort["version"] = version_string(ort["model"], ort["precision"], "onnxruntime", ort["backend_version"], ort["device"],
                                    ort["inputs_digest"])
    ort["content_digest"] = content_digest(ort)
    assert consistency_findings(ort) == []


def test_a_signature_is_only_checked_with_a_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, "k")
    m = trt_manifest()
    monkeypatch.setenv(KEY_ENV, "other")
    assert consistency_findings(m) == [f"signature does not match the content under ${KEY_ENV}: the manifest was "
                                       "edited (or signed with another key)"]
    unsigned = {**m, "signature": None}  # keyed mode is strict: an unsigned manifest fails
    assert consistency_findings(unsigned) == [
        f"manifest is not signed, but ${KEY_ENV} is set and then every version must be: it was published without the "
        "key or its signature was removed; republish it with the key set (remove the folder first), or unset "
        f"${KEY_ENV} to check digests and ledger only"]
    monkeypatch.delenv(KEY_ENV)
    assert consistency_findings(m) == [] and consistency_findings(unsigned) == []


# --------------------------------------------------------------------------- read_manifest


def write(folder: Path, text: str | bytes) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    p = folder / "manifest.json"
    p.write_bytes(text.encode() if isinstance(text, str) else text)
    return p


DAMAGED = "; the version folder is damaged: restore it (dvc checkout) or republish"


@pytest.mark.parametrize("content,message", [
    (b"{not json", "manifest is not valid JSON (Expecting property name enclosed in double quotes: line 1 column 2 "
                   "(char 1))" + DAMAGED),
    (b"\xff\xfe{}", "manifest is not valid JSON ('utf-8' codec can't decode byte 0xff in position 0: invalid start "
                    "byte)" + DAMAGED),
    (b"[1]", "not a trtpipe manifest (kind 'list')"),
    (b'{"kind": "dvc.lock"}', "not a trtpipe manifest (kind 'dvc.lock')"),
    (b'{"kind": "trtpipe.manifest", "schema_version": 1}',
     "manifest schema_version 1, this trtpipe reads 2; use the trtpipe that published it"),
    (b'{"kind": "trtpipe.manifest"}', "manifest schema_version None, this trtpipe reads 2; use the trtpipe that published it"),
])
def test_read_manifest_says_what_is_wrong(tmp_path: Path, content: bytes, message: str) -> None:
    path = write(tmp_path / "v", content)
    with pytest.raises(ArtifactError) as e:
        read_manifest(path.parent)
    assert str(e.value) == f"{path}: {message}"


def test_read_manifest_names_the_field(tmp_path: Path) -> None:
    m = trt_manifest()
    folder = tmp_path / "v"
    for edit, message in [
        (lambda d: d.pop("files"), "manifest lacks files (Field required)"),
        (lambda d: d["files"]["model.engine"].update(bytes="ten"),
         "manifest has a bad value at files.model.engine.bytes (Input should be a valid integer, unable to parse "
         "string as an integer)"),
        (lambda d: d.update(extra_field=1), "manifest has a bad value at extra_field (Extra inputs are not permitted)"),
    ]:
        d = copy.deepcopy(m)
        edit(d)
        path = write(folder, json.dumps(d))
        with pytest.raises(ArtifactError) as e:
            read_manifest(folder)
        assert str(e.value) == f"{path}: {message}{DAMAGED}"
    write(folder, json.dumps(m))
    assert read_manifest(folder) == m
    with pytest.raises(ArtifactError) as e:
        read_manifest(tmp_path / "empty")
    assert str(e.value) == (f"{tmp_path / 'empty' / 'manifest.json'}: no manifest; this folder is not a published "
                            "trtpipe version (or was half-copied)")

