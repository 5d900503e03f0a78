"""The registry's promises, on small versions published in milliseconds
(tests/_small_registry.py): a published version is never restaged, rewritten or
overwritten; every refusal says what is wrong and what to do; verify, load, list and
resolve report what they find, field by field."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import threading
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest

from pipeline import registry
from pipeline.errors import ArtifactError, ReportError
from pipeline.fileio import sha256_file
from pipeline.manifest import ROLE_LAYERS, read_manifest, section_digests
from pipeline.reports import LatencyRow
from tests._small_registry import PUBLISHED_AT, _stats, published, tree, variant

ELLIPSIS = "\u2026"


def flip_byte(path: Path, offset: int = -1) -> None:
    os.chmod(path, 0o644)
    b = bytearray(path.read_bytes())
    b[offset] ^= 0x01
    path.write_bytes(bytes(b))


def ledger_lines(reg: Path, model: str = "tiny") -> list[str]:
    return (reg / model / registry.LEDGER).read_text().splitlines()


# --------------------------------------------------------------------------- the "version exists" guard


def test_republish_of_an_existing_version_is_unchanged_and_never_restaged(tmp_path: Path) -> None:
    """Publish, then lose the build folder's artifact and edit its build.json, then publish
    the same manifest again: the version exists, so publish answers "unchanged" without
    reading the sources again (nothing is staged: a staging copy would fail on the missing
    file or the edited one), and the registry is left byte for byte as it was."""
    reg = tmp_path / "registry"
    v = published(tmp_path, reg)
    assert (v.status, v.path) == ("published", reg / "tiny" / v.version)
    before = tree(reg)

    v.sources["model.onnx"].unlink()
    v.sources["build.json"].write_text("{}\n")
    assert registry.publish(reg, v.manifest, v.sources) == ("unchanged", v.path)

    assert tree(reg) == before  # same bytes, same mtimes
    assert registry.leftover_staging(reg) == []
    assert len(ledger_lines(reg)) == 1  # no second ledger line
    assert registry.verify(v.version, reg, here={}).ok()


def test_republish_of_changed_records_keeps_the_first_record(tmp_path: Path) -> None:
    """A new evaluation (other top1, other latency, other publication time) of the same
    build is the same version: unchanged, the published eval.json is the first one."""
    reg = tmp_path / "registry"
    v = published(tmp_path, reg)
    before = tree(reg)
    again = variant(tmp_path / "again", top1=12.5, published_at="2027-01-01T00:00:00+00:00")
    assert again.manifest["version"] == v.version
    assert registry.publish(reg, again.manifest, again.sources) == ("unchanged", v.path)
    assert tree(reg) == before
    assert read_manifest(v.path)["metrics"]["task"]["top1"] == 97.5


def test_same_version_with_other_artifact_bytes_is_refused(tmp_path: Path) -> None:
    """Same inputs, other bytes (a build that is not reproducible): refused with both
    hashes and what to do; the published version is left exactly as it was."""
    reg = tmp_path / "registry"
    v = published(tmp_path, reg)
    before = tree(reg)
    other = variant(tmp_path / "rebuild", rebuilt="rebuilt on another day")
    assert other.manifest["version"] == v.version
    old_sha = v.manifest["files"]["model.onnx"]["sha256"]
    new_sha = other.manifest["files"]["model.onnx"]["sha256"]
    assert old_sha != new_sha
    with pytest.raises(ArtifactError) as e:
        registry.publish(reg, other.manifest, other.sources)
    assert str(e.value) == (
        f"{v.path}: version {v.version} is already published with a different model.onnx "
        f"(published sha256 {old_sha[:12]}{ELLIPSIS}, this build {new_sha[:12]}{ELLIPSIS}); published versions are never "
        "overwritten. The same inputs gave other bytes: the build is not reproducible (TensorRT: reuse the timing cache) "
        "or something outside the version's inputs changed (trtpipe code); the published version stays as it is "
        "and stays valid: find what changed, or publish from a project whose inputs differ")
    assert tree(reg) == before
    assert len(ledger_lines(reg)) == 1


@pytest.mark.parametrize("where", ["published", "new"])
def test_an_identity_file_on_one_side_only_is_refused(tmp_path: Path, where: str) -> None:
    """layers.json is published content (ROLE_LAYERS): a republish that adds or drops it
    is another version's content."""
    reg = tmp_path / "registry"
    layers = {"layers.json": (b'{"Layers": ["mul"]}\n', ROLE_LAYERS)}
    v = published(tmp_path, reg, extra=layers if where == "published" else None)
    other = variant(tmp_path / "other", extra=None if where == "published" else layers)
    assert other.manifest["version"] == v.version
    sha = sha256_file(tmp_path / ("build" if where == "published" else "other/build") / "tiny" / "fp32" / "layers.json")
    published_side, new_side = (sha[:12], "None") if where == "published" else ("None", sha[:12])
    with pytest.raises(ArtifactError, match=re.escape(
            f"already published with a different layers.json (published sha256 {published_side}{ELLIPSIS}, "
            f"this build {new_side}{ELLIPSIS})")):
        registry.publish(reg, other.manifest, other.sources)


def test_same_version_claiming_other_inputs_is_refused(tmp_path: Path) -> None:
    reg = tmp_path / "registry"
    v = published(tmp_path, reg)
    claim = {**v.manifest, "inputs_digest": "0" * 64}
    with pytest.raises(ArtifactError) as e:
        registry.publish(reg, claim, v.sources)
    assert str(e.value) == (f"{v.path}: version {v.version} is published with other inputs (digest "
                            f"{v.manifest['inputs_digest']}, now {'0' * 64}); remove one deliberately")


@pytest.mark.parametrize("what", ["folder", "file"])
def test_something_else_at_the_version_path_is_never_overwritten(tmp_path: Path, what: str) -> None:
    reg = tmp_path / "registry"
    v = variant(tmp_path)
    dest = reg / "tiny" / v.manifest["version"]
    dest.parent.mkdir(parents=True)
    if what == "folder":
        dest.mkdir()
        (dest / "notes.txt").write_text("mine")
    else:
        dest.write_text("mine")
    with pytest.raises(ArtifactError) as e:
        registry.publish(reg, v.manifest, v.sources)
    assert str(e.value) == (
        f"{dest}: version {v.manifest['version']} exists but is not a readable published version (no manifest; this "
        "folder is not a published trtpipe version (or was half-copied)); published folders are never overwritten: "
        "inspect it and remove it deliberately")
    assert (dest / "notes.txt" if what == "folder" else dest).read_text() == "mine"
    assert not (reg / "tiny" / registry.LEDGER).exists()


def test_an_empty_folder_at_the_version_path_is_published_into(tmp_path: Path) -> None:
    reg = tmp_path / "registry"
    v = variant(tmp_path)
    dest = reg / "tiny" / v.manifest["version"]
    dest.mkdir(parents=True)
    assert registry.publish(reg, v.manifest, v.sources) == ("published", dest)
    assert registry.verify(dest, reg, here={}).ok()


def test_a_damaged_published_version_is_not_taken_as_the_same(tmp_path: Path) -> None:
    reg = tmp_path / "registry"
    v = published(tmp_path, reg)
    flip_byte(v.path / "model.onnx")
    with pytest.raises(ArtifactError) as e:
        registry.publish(reg, v.manifest, v.sources)
    msg = str(e.value)
    assert msg.startswith(f"{v.path}: version {v.version} is already published but fails verification "
                          f"(model.onnx: sha256 ")
    assert msg.endswith("); restore it (dvc checkout) or remove it deliberately; it is never overwritten")


def test_a_published_version_missing_from_the_ledger_is_recorded_when_it_verifies(tmp_path: Path) -> None:
    """What a publish killed between its rename and its ledger line leaves: the next publish
    (under the lock) records the complete version instead of blaming tampering
    (tests/test_registry_faults.py has the rest)."""
    reg = tmp_path / "registry"
    v = published(tmp_path, reg)
    ledger = reg / "tiny" / registry.LEDGER
    line = ledger.read_text()
    ledger.unlink()
    assert registry.publish(reg, v.manifest, v.sources) == ("unchanged", v.path)
    assert ledger.read_text() == line


@pytest.mark.parametrize("code", [errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR])
def test_losing_the_rename_race_to_the_same_content_is_unchanged(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                 code: int) -> None:
    """Another publisher renames the same version into place between our check and our
    rename: the rename fails (which errno depends on the filesystem) and the version that
    won is compared like any existing one."""
    reg = tmp_path / "registry"
    v = variant(tmp_path)
    real_rename = os.rename

    def rival_wins(src, dst):
        shutil.copytree(src, dst)  # the rival's identical folder
        registry._append_ledger(reg, v.manifest)
        raise OSError(code, os.strerror(code), str(dst))

    monkeypatch.setattr(registry.os, "rename", rival_wins)
    assert registry.publish(reg, v.manifest, v.sources) == ("unchanged", reg / "tiny" / v.manifest["version"])
    monkeypatch.setattr(registry.os, "rename", real_rename)
    assert registry.leftover_staging(reg) == []
    assert len(ledger_lines(reg)) == 1


def test_a_rename_that_fails_otherwise_publishes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    reg = tmp_path / "registry"
    v = variant(tmp_path)

    def denied(src, dst):
        raise OSError(errno.EACCES, "Permission denied", str(dst))

    monkeypatch.setattr(registry.os, "rename", denied)
    dest = reg / "tiny" / v.manifest["version"]
    with pytest.raises(ArtifactError) as e:
        registry.publish(reg, v.manifest, v.sources)
    assert str(e.value) == f"{dest}: could not rename the staged version into place (Permission denied)"
    assert registry.version_dirs(reg) == [] and registry.leftover_staging(reg) == []
    assert not (reg / "tiny" / registry.LEDGER).exists()


# --------------------------------------------------------------------------- publishing


def test_published_folder_is_readable_by_everyone_and_holds_the_manifest_as_written(tmp_path: Path) -> None:
    reg = tmp_path / "registry"
    v = published(tmp_path, reg)
    assert v.path.stat().st_mode & 0o777 == 0o755  # mkdtemp makes 0700
    assert sorted(p.name for p in v.path.iterdir()) == ["build.json", "eval.json", "manifest.json", "model.onnx"]
    # 2-space indented JSON ending in a newline, as `artifacts show --json` and a diff see it
    assert (v.path / "manifest.json").read_text() == json.dumps(v.manifest, indent=2) + "\n"
    for name, src in v.sources.items():
        assert (v.path / name).read_bytes() == src.read_bytes()


def test_ledger_gets_one_canonical_line_per_publish(tmp_path: Path) -> None:
    reg = tmp_path / "registry"
    a = published(tmp_path, reg)
    b = published(tmp_path / "b", reg, scale=3.0, published_at=None)
    want = [{"version": x.version, "content_digest": x.manifest["content_digest"],
             "sections": section_digests(x.manifest), "published_at": x.manifest["published_at"]} for x in (a, b)]
    assert ledger_lines(reg) == [json.dumps(w, sort_keys=True) for w in want]
    entries, problems = registry.ledger_entries(reg, "tiny")
    assert entries == {w["version"]: w for w in want} and problems == []


def test_files_to_publish_must_be_the_manifests(tmp_path: Path) -> None:
    reg = tmp_path / "registry"
    v = variant(tmp_path)
    sources = {k: p for k, p in v.sources.items() if k != "eval.json"}
    with pytest.raises(ArtifactError) as e:
        registry.publish(reg, v.manifest, sources)
    assert str(e.value) == (f"{reg / 'tiny' / v.manifest['version']}: files to publish ['build.json', 'model.onnx'] "
                            "differ from the manifest's ['build.json', 'eval.json', 'model.onnx']")


def test_a_missing_source_publishes_nothing(tmp_path: Path) -> None:
    reg = tmp_path / "registry"
    v = variant(tmp_path)
    v.sources["eval.json"].unlink()
    with pytest.raises(ArtifactError) as e:
        registry.publish(reg, v.manifest, v.sources)
    assert str(e.value) == (f"{reg / 'tiny' / v.manifest['version']}: could not stage the version (No such file or "
                            f"directory: {v.sources['eval.json']}); nothing was published")
    assert registry.version_dirs(reg) == [] and registry.leftover_staging(reg) == []


def test_a_source_that_changes_while_copied_publishes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A concurrent rebuild appends to the artifact while it is copied: the staged copy
    no longer matches the manifest; the first difference is named."""
    reg = tmp_path / "registry"
    v = variant(tmp_path)
    real_copy = shutil.copyfile

    def racing_copy(src, dst, *a, **k):
        out = real_copy(src, dst, *a, **k)
        if Path(dst).name == "model.onnx":
            with open(dst, "ab") as f:
                f.write(b"\0\0\0")
        return out

    monkeypatch.setattr(registry.shutil, "copyfile", racing_copy)
    size = v.manifest["files"]["model.onnx"]["bytes"]
    with pytest.raises(ArtifactError) as e:
        registry.publish(reg, v.manifest, v.sources)
    assert str(e.value) == (f"{reg / 'tiny' / v.manifest['version']}: staged copy does not match the manifest "
                            f"(model.onnx: size {size + 3} bytes, manifest says {size}); a source changed while "
                            "publishing: run publish again")
    assert registry.version_dirs(reg) == [] and registry.leftover_staging(reg) == []


def test_a_manifest_holding_nan_never_reaches_disk(tmp_path: Path) -> None:
    """manifest.json is strict JSON: a raw NaN (make_manifest writes "NaN" strings) is refused."""
    reg = tmp_path / "registry"
    v = variant(tmp_path)
    m = json.loads(json.dumps(v.manifest))
    m["metrics"]["task"]["top1"] = float("nan")
    with pytest.raises(ValueError, match="not JSON compliant"):
        registry.publish(reg, m, v.sources)
    assert registry.version_dirs(reg) == [] and registry.leftover_staging(reg) == []


def test_staging_is_a_hidden_folder_beside_the_version(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Until the rename, the version exists only as `.<version>.staging-*` in its model's
    folder: not a version to list or load, but what verify reports (and the next publish
    sweeps) if the publisher is killed right there."""
    reg = tmp_path / "registry"
    v = variant(tmp_path)
    seen = {}
    real_rename = os.rename

    def look(src, dst):
        seen["staging"], seen["versions"] = registry.leftover_staging(reg), registry.version_dirs(reg)
        seen["src"] = Path(src)
        return real_rename(src, dst)

    monkeypatch.setattr(registry.os, "rename", look)
    registry.publish(reg, v.manifest, v.sources)
    assert seen["versions"] == []
    assert seen["staging"] == [seen["src"]]
    assert seen["src"].parent == reg / "tiny"
    assert seen["src"].name.startswith(f".{v.manifest['version']}.staging-")


def test_publish_sweeps_interrupted_stagings_of_its_model_only(tmp_path: Path) -> None:
    reg = tmp_path / "registry"
    mine = reg / "tiny" / ".tiny-fp32-x.staging-abc"
    theirs = reg / "other" / ".other-fp32-x.staging-abc"
    for d in (mine, theirs):
        d.mkdir(parents=True)
        (d / "model.onnx").write_bytes(b"half")
    published(tmp_path, reg)
    assert not mine.exists()
    assert registry.leftover_staging(reg) == [theirs]


def test_publish_creates_the_registry(tmp_path: Path) -> None:
    reg = tmp_path / "a" / "b" / "registry"
    v = published(tmp_path, reg)
    assert v.status == "published" and (reg / registry.LOCK).is_file()


@contextlib.contextmanager
def lock_held_by_another(reg: Path, release_after: float = 1.0) -> Iterator[None]:
    """The registry lock held by someone else, who lets go after `release_after` s at the
    latest (so that a waiter that never gives up is caught, not hung)."""
    from filelock import FileLock

    reg.mkdir(parents=True, exist_ok=True)
    held = FileLock(str(reg / registry.LOCK), thread_local=False)
    held.acquire()
    timer = threading.Timer(release_after, held.release)
    timer.start()
    try:
        yield
    finally:
        timer.cancel()
        held.release()


def test_a_held_lock_times_out_with_advice(tmp_path: Path) -> None:
    reg = tmp_path / "registry"
    with lock_held_by_another(reg):
        with pytest.raises(ArtifactError) as e:
            with registry.registry_lock(reg, "publish", timeout=0.05):
                pass
    assert str(e.value) == (f"{reg / registry.LOCK}: another trtpipe publish or verify has held the registry lock for "
                            "0.05 s; let it finish and publish again (delete the lock file only if no trtpipe is running)")
    with registry.registry_lock(reg, "verify", timeout=0.05):  # released: free again
        pass


@pytest.mark.parametrize("what", ["publish", "verify"])
def test_publish_and_verify_wait_for_the_lock_and_say_which_to_rerun(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                    what: str) -> None:
    """Both hold the registry lock; one that gives up (here after 0.05 s instead of 600 s)
    says which command to run again and leaves nothing behind."""
    reg = tmp_path / "registry"
    v = published(tmp_path, reg) if what == "verify" else None
    x = variant(tmp_path / "x")
    real = registry.registry_lock
    monkeypatch.setattr(registry, "registry_lock", lambda root, w, timeout=0.05: real(root, w, timeout=0.05))
    with lock_held_by_another(reg):
        with pytest.raises(ArtifactError, match=f"let it finish and {what} again"):
            if what == "publish":
                registry.publish(reg, x.manifest, x.sources)
            else:
                registry.verify_all(reg, here={})
    assert registry.version_dirs(reg) == ([v.path] if v else [])


# --------------------------------------------------------------------------- verify


def test_verify_of_a_clean_version_field_by_field(tmp_path: Path) -> None:
    reg = tmp_path / "registry"
    v = published(tmp_path, reg)
    assert registry.verify(v.version, reg, here={}).as_dict() == {
        "version": v.version, "path": str(v.path), "ok": True, "integrity_ok": True, "runs_here": True,
        "checked_files": 3, "findings": []}


def test_verify_checks_this_machine_unless_told_integrity_only(tmp_path: Path) -> None:
    reg = tmp_path / "registry"
    v = published(tmp_path, reg)
    no_ort = {"onnxruntime": None}
    res = registry.verify(v.version, reg, here=no_ort)
    assert (res.ok(), res.ok(integrity_only=True), res.runs_here) == (False, True, False)
    assert [(f.kind, f.file, f.message) for f in res.findings] == [
        ("compat", None, "cannot run here: onnxruntime does not import; pip install onnxruntime")]
    assert res.failures(integrity_only=True) == [] and len(res.failures()) == 1
    only = registry.verify(v.version, reg, here=no_ort, integrity_only=True)
    assert (only.ok(), only.runs_here, only.findings) == (True, None, [])


def test_verify_reports_an_unreadable_manifest_as_one_finding(tmp_path: Path) -> None:
    reg = tmp_path / "registry"
    v = published(tmp_path, reg)
    (v.path / "manifest.json").write_text("{not json")
    res = registry.verify(v.path, reg, here={})
    assert res.as_dict() == {
        "version": v.version, "path": str(v.path), "ok": False, "integrity_ok": False, "runs_here": None,
        "checked_files": 0,
        "findings": [{"kind": "integrity", "file": "manifest.json",
                      "message": "manifest is not valid JSON (Expecting property name enclosed in double quotes: line 1 "
                                 "column 2 (char 1)); the version folder is damaged: restore it (dvc checkout) or "
                                 "republish"}]}


def test_verify_names_a_folder_that_holds_another_version(tmp_path: Path) -> None:
    reg = tmp_path / "registry"
    v = published(tmp_path, reg)
    moved = reg / "other" / v.version
    moved.parent.mkdir()
    v.path.rename(moved)
    found = [str(f) for f in registry.verify(moved, reg, here={}).findings]
    assert f"manifest.json: folder other/{v.version} holds version tiny/{v.version}" in found


def test_a_version_folder_is_checked_against_the_ledger_of_the_registry_it_sits_in(tmp_path: Path) -> None:
    reg = tmp_path / "registry"
    v = published(tmp_path, reg)
    assert registry.verify(v.path, tmp_path / "not-the-registry", here={}).ok()
    registry.load(v.path, tmp_path / "not-the-registry", here={}).close()


def test_a_copy_outside_the_registry_is_checked_against_its_ledger(tmp_path: Path) -> None:
    """A publish pointer (a copy of the version folder under another name) is not in the
    layout: its name is not checked, its manifest is checked against the registry's ledger."""
    reg = tmp_path / "registry"
    v = published(tmp_path, reg)
    pointer = tmp_path / "current" / "fp32"
    shutil.copytree(v.path, pointer)
    res = registry.verify(pointer, reg, here={})
    assert res.ok() and res.version == v.version and res.path == str(pointer)
    m = json.loads((pointer / "manifest.json").read_text())
    m["notes"] = ["tested by hand"]
    (pointer / "manifest.json").write_text(json.dumps(m))
    msgs = [f.message for f in registry.verify(pointer, reg, here={}).findings]
    assert "manifest content differs from what was published: notes changed; restore the folder (dvc checkout) or " \
           "republish" in msgs


def test_verify_all_reports_each_version_and_one_that_does_not_resolve(tmp_path: Path) -> None:
    reg = tmp_path / "registry"
    v = published(tmp_path, reg)
    res = registry.verify_all(reg, versions=[v.version, "nope"], here={"onnxruntime": None})
    assert [r.version for r in res] == [v.version, "nope"]
    assert res[0].runs_here is False  # the given machine, not this one
    assert res[1].as_dict() == {
        "version": "nope", "path": "nope", "ok": False, "integrity_ok": False, "runs_here": None, "checked_files": 0,
        "findings": [{"kind": "integrity", "file": None,
                      "message": f"no published version 'nope' in {reg}; `trtpipe artifacts list` shows the versions"}]}
    assert [r.version for r in registry.verify_all(reg, integrity_only=True)] == [v.version]


def test_finding_reads_as_file_then_message() -> None:
    assert str(registry.Finding("integrity", "missing (listed in the manifest)", "eval.json")) == \
        "eval.json: missing (listed in the manifest)"
    assert str(registry.Finding("compat", "cannot run here")) == "cannot run here"


# --------------------------------------------------------------------------- load


def test_load_gives_a_working_runner(tmp_path: Path) -> None:
    reg = tmp_path / "registry"
    v = published(tmp_path, reg, scale=3.0)
    with registry.load(v.version, reg, here={}) as runner:
        out = runner.infer({"input": np.ones((2, 4), np.float32)})
    np.testing.assert_array_equal(out["logits"], np.full((2, 4), 3.0, np.float32))


def test_load_refuses_naming_every_problem(tmp_path: Path) -> None:
    reg = tmp_path / "registry"
    v = published(tmp_path, reg)
    flip_byte(v.path / "eval.json")
    (v.path / "extra.bin").write_bytes(b"x")
    with pytest.raises(ArtifactError) as e:
        registry.load(v.version, reg, here={})
    assert re.fullmatch(
        re.escape(f"{v.path}: refusing to load {v.version}: eval.json: sha256 ") + f"[0-9a-f]{{16}}{ELLIPSIS}"
        + re.escape(" does not match the manifest's ") + f"[0-9a-f]{{16}}{ELLIPSIS}"
        + re.escape("; extra.bin: not listed in the manifest (added after publishing); restore the folder "
                    "(dvc checkout) or republish it"), str(e.value)), str(e.value)


def test_load_without_hashing_still_checks_the_manifest(tmp_path: Path) -> None:
    reg = tmp_path / "registry"
    v = published(tmp_path, reg)
    (v.path / "extra.bin").write_bytes(b"x")
    registry.load(v.version, reg, here={}, verify_hashes=False).close()  # files are not looked at
    m = json.loads((v.path / "manifest.json").read_text())
    m["artifact"] = "other.onnx"
    (v.path / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ArtifactError) as e:
        registry.load(v.version, reg, here={}, verify_hashes=False)
    assert str(e.value).startswith(f"{v.path}: refusing to load {v.version}: manifest.json: artifact other.onnx is "
                                   "not listed in files; manifest.json: content_digest does not match")


def test_load_checks_the_ledger_of_the_registry_it_sits_in(tmp_path: Path) -> None:
    reg = tmp_path / "registry"
    v = published(tmp_path, reg)
    outside = tmp_path / "copy" / "somewhere" / v.version
    shutil.copytree(v.path, outside)
    (reg / "tiny" / registry.LEDGER).write_text("")  # the registry no longer records it
    with pytest.raises(ArtifactError, match=re.escape(f"manifest.json: version {v.version} is not in the registry's ledger")):
        registry.load(v.version, reg, here={})
    registry.load(outside, tmp_path / "no-registry", here={}).close()  # a copy outside any registry: its own digests


def test_load_refuses_a_machine_that_cannot_run_it(tmp_path: Path) -> None:
    reg = tmp_path / "registry"
    v = published(tmp_path, reg)
    with pytest.raises(ArtifactError) as e:
        registry.load(v.version, reg, here={"onnxruntime": None})
    assert str(e.value) == (f"{v.path / 'manifest.json'} ({v.version}): cannot run here: onnxruntime does not import; "
                            "pip install onnxruntime")


def test_load_hands_the_backend_build_json_and_the_manifest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The TensorRT runner re-checks the machine from what load passes it (build.json's
    facts and the manifest); onnxruntime ignores it."""
    from pipeline import backends

    reg = tmp_path / "registry"
    v = published(tmp_path, reg)
    got = {}

    class Recorder:
        def load(self, artifact, build_info):
            got.update(artifact=artifact, info=build_info)
            return "runner"

    monkeypatch.setattr(backends, "get_backend", lambda name: Recorder())
    assert registry.load(v.version, reg, here={}) == "runner"
    assert got["artifact"] == v.path / "model.onnx"
    assert got["info"] == {**json.loads((v.path / "build.json").read_text()), "manifest": read_manifest(v.path)}


def test_load_without_hashing_names_an_unreadable_build_report(tmp_path: Path) -> None:
    reg = tmp_path / "registry"
    v = published(tmp_path, reg)
    (v.path / "build.json").write_text("{")
    with pytest.raises(ReportError) as e:
        registry.load(v.version, reg, here={}, verify_hashes=False)
    assert str(e.value).startswith(f"{v.path / 'build.json'}: build report is not valid JSON")


# --------------------------------------------------------------------------- resolve and list


def test_resolve_by_name_part_or_path(tmp_path: Path) -> None:
    reg = tmp_path / "registry"
    a = published(tmp_path, reg)
    b = published(tmp_path / "b", reg, scale=3.0)
    assert registry.resolve(a.version, reg) == a.path
    assert registry.resolve(a.version[-8:], reg) == a.path
    assert registry.resolve(b.path, reg) == b.path
    shutil.copytree(a.path, reg / "tiny" / f"{a.version}-backup")  # a user's copy beside it
    assert registry.resolve(a.version, reg) == a.path  # the exact name wins
    with pytest.raises(ArtifactError) as e:
        registry.resolve("tiny-fp32", reg)
    names = sorted([a.version, b.version, f"{a.version}-backup"])
    assert str(e.value) == f"'tiny-fp32' matches 3 versions ({', '.join(names)}); give more of it"
    with pytest.raises(ArtifactError) as e:
        registry.resolve("nope", reg)
    assert str(e.value) == f"no published version 'nope' in {reg}; `trtpipe artifacts list` shows the versions"
    elsewhere = tmp_path / "elsewhere"  # a folder, but neither a version nor in the registry
    elsewhere.mkdir()
    with pytest.raises(ArtifactError, match="no published version"):
        registry.resolve(elsewhere, reg)
    (a.path / "manifest.json").unlink()  # a version folder without its manifest is still that folder
    assert registry.resolve(a.path, reg) == a.path
    with pytest.raises(ArtifactError) as e:
        registry.resolve("nope", tmp_path / "missing")
    assert str(e.value) == (f"no published version 'nope' in {tmp_path / 'missing'} (no such folder); "
                            "`trtpipe artifacts list` shows the versions")


def test_list_rows_field_by_field(tmp_path: Path) -> None:
    reg = tmp_path / "registry"
    v = published(tmp_path, reg)
    import onnxruntime

    assert registry.list_versions(reg) == [{
        "version": v.version, "model": "tiny", "precision": "fp32", "backend": f"onnxruntime {onnxruntime.__version__}",
        "device": "cpu", "gpu": None, "top1": 97.5, "top1_agreement": 100.0, "latency_ms": 0.5, "latency_batch": 1,
        "bytes": v.manifest["files"]["model.onnx"]["bytes"], "published_at": PUBLISHED_AT, "path": str(v.path)}]


@pytest.mark.parametrize("rows,want", [
    # batch 1 first, whatever the order; its fastest mode, on the device clock where measured
    ([(8, "plain", 2.0, None), (1, "plain", 0.7, None), (1, "cuda_graph", 0.9, 0.4)], (0.4, 1)),
    ([(1, "plain", 0.7, 0.6), (1, "cuda_graph", 0.9, 0.8)], (0.6, 1)),
    # no batch 1: the first batch size measured
    ([(8, "plain", 2.0, None), (4, "plain", 1.0, None)], (2.0, 8)),
    ([], (None, None)),
    # a p50 that was not measured (NaN, written as the string "NaN") is no latency
    ([(1, "plain", float("nan"), None), (2, "plain", 1.5, None)], (1.5, 2)),
])
def test_list_shows_the_headline_latency(tmp_path: Path, rows, want) -> None:
    latency = [LatencyRow(batch_size=b, mode=mode, host=_stats(b, host), gpu=_stats(b, gpu) if gpu else None,
                          warmup=1, method="test") for b, mode, host, gpu in rows]
    v = published(tmp_path, tmp_path / "registry", latency=latency)
    row = registry.summary(v.path, read_manifest(v.path))
    assert (row["latency_ms"], row["latency_batch"]) == want


def test_list_orders_by_model_precision_and_date_and_keeps_unreadable_versions(tmp_path: Path) -> None:
    reg = tmp_path / "registry"
    int8 = published(tmp_path / "1", reg, "int8", model="alpha")
    fp16_late = published(tmp_path / "2", reg, "fp16", model="alpha", scale=5.0, published_at="2026-12-03T00:00:00+00:00")
    fp16_early = published(tmp_path / "3", reg, "fp16", model="alpha", scale=4.0, published_at="2026-12-02T00:00:00+00:00")
    fp32 = published(tmp_path / "4", reg, "fp32", model="alpha")
    beta = published(tmp_path / "5", reg, "fp32", model="beta")
    assert [r["version"] for r in registry.list_versions(reg)] == [
        fp32.version, fp16_early.version, fp16_late.version, int8.version, beta.version]
    (fp32.path / "manifest.json").write_text("[]")
    rows = registry.list_versions(reg)
    bad = rows[-2]  # unreadable: after the readable versions of its model
    assert bad == {"version": fp32.version, "model": "alpha", "path": str(fp32.path),
                   "error": f"{fp32.path / 'manifest.json'}: not a trtpipe manifest (kind 'list')"}
    assert [r["version"] for r in rows] == [fp16_early.version, fp16_late.version, int8.version, fp32.version,
                                            beta.version]


def test_list_orders_undated_first_then_by_version(tmp_path: Path) -> None:
    reg = tmp_path / "registry"
    same = [published(tmp_path / str(k), reg, scale=float(k), published_at="2026-12-05T00:00:00+00:00") for k in (2, 3, 4)]
    undated = published(tmp_path / "u", reg, scale=9.0, published_at=None)
    assert [r["version"] for r in registry.list_versions(reg)] == [undated.version] + sorted(x.version for x in same)


def test_list_skips_hidden_folders_and_files(tmp_path: Path) -> None:
    reg = tmp_path / "registry"
    v = published(tmp_path, reg)
    (reg / ".cache").mkdir()
    (reg / ".cache" / "something").mkdir()
    (reg / "tiny" / ".tiny-fp32-y.staging-1").mkdir()
    (reg / "tiny" / "README").write_text("x")
    (reg / "README").write_text("x")
    (reg / "tiny" / ".hidden").mkdir()
    (reg / "tiny" / "not-hidden.staging-2").mkdir()
    assert registry.version_dirs(reg) == sorted([v.path, reg / "tiny" / "not-hidden.staging-2"])
    assert registry.version_dirs(tmp_path / "missing") == [] and registry.leftover_staging(tmp_path / "missing") == []
    assert registry.leftover_staging(reg) == [reg / "tiny" / ".tiny-fp32-y.staging-1"]


# --------------------------------------------------------------------------- the ledger


def test_ledger_lines_that_are_not_entries_are_named(tmp_path: Path) -> None:
    reg = tmp_path / "registry"
    v = published(tmp_path, reg)
    ledger = reg / "tiny" / registry.LEDGER
    good = ledger.read_bytes()
    ledger.write_bytes(good + b"\n" + b"not json\n" + b'{"no_version": 1}\n' + b"[1, 2]\n" + b"\xff\xfe\n" + good)
    entries, problems = registry.ledger_entries(reg, "tiny")
    assert list(entries) == [v.version]
    assert problems == [f"{ledger}, line {n}: not a ledger entry" for n in (3, 4, 5, 6)]
    res = registry.verify(v.version, reg, here={})
    assert [(f.kind, f.file) for f in res.findings] == [("integrity", registry.LEDGER)] * 4
    assert registry.ledger_entries(reg, "nothing") == ({}, [])


# --------------------------------------------------------------------------- pointers


def test_pointers_are_copies_replaced_only_when_they_change(tmp_path: Path) -> None:
    reg = tmp_path / "registry"
    a = published(tmp_path, reg)
    b = published(tmp_path / "b", reg, "fp16", scale=3.0)
    root = tmp_path / "publish" / "current"
    where = registry.write_pointers(root, {"fp32": a.path, "fp16": b.path})
    assert where == {"fp32": str(root / "fp32"), "fp16": str(root / "fp16")}
    assert sha256_file(root / "fp32") == sha256_file(a.path) and sha256_file(root / "fp16") == sha256_file(b.path)
    assert root.stat().st_mode & 0o777 == 0o755
    before = tree(root)
    assert registry.write_pointers(root, {"fp32": a.path, "fp16": b.path}) == where
    assert tree(root) == before  # untouched: DVC sees the same output
    c = published(tmp_path / "c", reg, scale=7.0)
    registry.write_pointers(root, {"fp32": c.path})  # the fp16 pointer is kept: it was not published here
    assert sorted(p.name for p in root.iterdir()) == ["fp16", "fp32"]
    assert read_manifest(root / "fp32")["version"] == c.version
    assert sha256_file(root / "fp16") == sha256_file(b.path)
    registry.write_pointers(root, {"fp32": c.path}, prune=True)  # only when asked
    assert sorted(p.name for p in root.iterdir()) == ["fp32"]
    registry.write_pointers(root, {"fp32": a.path})  # same key, another version
    assert read_manifest(root / "fp32")["version"] == a.version
