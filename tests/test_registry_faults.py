"""Fault classes of the registry / publish / verify path (issue 18, item 5), each met the way
a user meets it: through `trtpipe` (cli.main, or a subprocess where the process itself must
be killed or limited), asserting the exit status, ONE line on stderr naming the thing at
fault, and that nothing already published changed (file hashes before and after).

1. tamper evidence: keyed mode is strict (unsigned or wrongly signed manifests and ledger
   lines fail), an unkeyed verify says signatures went unchecked, a version folder deleted
   by hand is reported, publish/current copies are verified by default;
2. values a checksum cannot vet (calibration cache / ranges.json scales): tests/stages part below;
3. interrupted publishes: a version renamed into place without its ledger line is recorded
   (never blamed on tampering), a torn last ledger line is mended or refused before anything;
4. OS errors are one line: registry path a file, lock path a folder, names too long, file
   size limit, permission denied;
5. publish.precisions empty or duplicated is refused; pointers of precisions not published stay."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from pipeline import cli, registry
from pipeline.errors import ArtifactError
from pipeline.fileio import sha256_file
from pipeline.manifest import KEY_ENV, content_digest, section_digests
from tests._small_registry import published, tree, variant

ROOT = Path(__file__).resolve().parents[1]


def trtpipe(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str, str]:
    cli._extra_commands.clear()  # cli.main registers the extra commands on every call
    capsys.readouterr()
    code = cli.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def one_line(err: str, *fragments: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for f in fragments:
        assert f in lines[0], (f, lines[0])
    return lines[0]


def hashes(path: Path) -> dict[str, str]:
    return {k: v[0] for k, v in tree(path).items()}


def edit_json(path: Path, edit: Any) -> dict[str, Any]:
    m = json.loads(path.read_text())
    edit(m)
    path.write_text(json.dumps(m, indent=2) + "\n")
    return m


# --------------------------------------------------------------------------- 1. tamper evidence


def test_keyed_verify_fails_a_manifest_whose_signature_was_removed(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, "registry secret")
    reg = tmp_path / "registry"
    v = published(tmp_path, reg)
    assert trtpipe(capsys, "artifacts", "verify", "--registry", reg, "--integrity-only")[0] == 0
    edit_json(v.path / "manifest.json", lambda m: m.update(signature=None))
    before = hashes(reg)
    code, out, err = trtpipe(capsys, "artifacts", "verify", "--registry", reg, "--integrity-only")
    assert code == 1
    one_line(err, "trtpipe artifacts: error: verify: 1 of 1", v.version, "manifest is not signed", KEY_ENV,
             "republish it with the key set")
    assert "signatures checked under" in out
    code, out, err = trtpipe(capsys, "artifacts", "verify", v.version, "--registry", reg, "--integrity-only")
    assert code == 1 and "manifest is not signed" in one_line(err)
    with pytest.raises(ArtifactError, match=f"refusing to load {v.version}: manifest.json: manifest is not signed"):
        registry.load(v.version, reg, here={})
    edit_json(v.path / "manifest.json", lambda m: m.pop("signature"))  # the key gone altogether
    assert trtpipe(capsys, "artifacts", "verify", "--registry", reg, "--integrity-only")[0] == 1
    monkeypatch.delenv(KEY_ENV)  # without the key it passes, and says signatures were not checked
    code, out, _ = trtpipe(capsys, "artifacts", "verify", "--registry", reg, "--integrity-only")
    assert code == 0 and "signatures not checked" in out
    assert {k: h for k, h in hashes(reg).items() if k != f"tiny/{v.version}/manifest.json"} == \
        {k: h for k, h in before.items() if k != f"tiny/{v.version}/manifest.json"}


def test_keyed_verify_fails_a_version_published_without_the_key(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(KEY_ENV, raising=False)
    reg = tmp_path / "registry"
    v = published(tmp_path, reg)
    before = hashes(reg)
    monkeypatch.setenv(KEY_ENV, "k")
    code, out, err = trtpipe(capsys, "artifacts", "verify", "--registry", reg, "--integrity-only", "--json")
    assert code == 1
    one_line(err, v.version, "manifest is not signed")
    doc = json.loads(out)
    assert doc["signatures_checked"] is True
    msgs = [f["message"] for f in doc["results"][0]["findings"]]
    assert any("manifest is not signed" in m for m in msgs)
    assert any(f"the ledger line of version {v.version} is not signed" in m for m in msgs)
    # publishing it again under the key does not make it pass: published folders are never rewritten
    with pytest.raises(ArtifactError, match="already published but fails verification"):
        registry.publish(reg, v.manifest, v.sources)
    assert hashes(reg) == before


def test_keyed_verify_fails_a_ledger_line_forged_to_match_an_edited_manifest(
        tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """The writer who can edit the manifest and append a matching ledger line: with the key,
    neither an unsigned line nor one signed with another key passes."""
    monkeypatch.setenv(KEY_ENV, "registry secret")
    reg = tmp_path / "registry"
    v = published(tmp_path, reg)
    m = edit_json(v.path / "manifest.json", lambda m: m["metrics"]["task"].update(top1=99.9))
    m["content_digest"] = content_digest(m)
    (v.path / "manifest.json").write_text(json.dumps(m, indent=2) + "\n")
    ledger = reg / "tiny" / registry.LEDGER
    forged = {"version": v.version, "content_digest": m["content_digest"], "sections": section_digests(m),
              "published_at": m["published_at"]}
    with open(ledger, "a") as f:
        f.write(json.dumps(forged, sort_keys=True) + "\n")
    code, _, err = trtpipe(capsys, "artifacts", "verify", "--registry", reg, "--integrity-only")
    assert code == 1
    one_line(err, v.version, "signature does not match")
    from pipeline.manifest import sign_entry

    with open(ledger, "a") as f:
        f.write(json.dumps({**forged, "signature": sign_entry(forged, "another key")}, sort_keys=True) + "\n")
    res = registry.verify(v.version, reg, here={})
    assert [f.file for f in res.failures()] == ["manifest.json", "ledger.jsonl"]
    assert "does not match its signature" in res.failures()[1].message


def test_unkeyed_verify_says_signatures_went_unchecked(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(KEY_ENV, raising=False)
    reg = tmp_path / "registry"
    published(tmp_path, reg)
    code, out, err = trtpipe(capsys, "artifacts", "verify", "--registry", reg, "--integrity-only")
    assert code == 0 and err == ""
    assert (f"signatures not checked (${KEY_ENV} is not set): the digests and the ledger detect accidental "
            "corruption and edits by someone who does not also rewrite the ledger; they cannot stop a writer who "
            "rewrites both") in out
    code, out, _ = trtpipe(capsys, "artifacts", "verify", "--registry", reg, "--integrity-only", "--json")
    doc = json.loads(out)
    assert code == 0 and doc["signatures_checked"] is False and "cannot stop a writer" in doc["signatures"]
    monkeypatch.setenv(KEY_ENV, "")  # an empty key is no key
    assert json.loads(trtpipe(capsys, "artifacts", "verify", "--registry", reg, "--integrity-only",
                              "--json")[1])["signatures_checked"] is False


def test_a_version_folder_deleted_by_hand_is_reported(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    reg = tmp_path / "registry"
    a = published(tmp_path, reg)
    b = published(tmp_path / "b", reg, scale=3.0)
    shutil.rmtree(a.path)
    before = hashes(reg)
    code, out, err = trtpipe(capsys, "artifacts", "verify", "--registry", reg, "--integrity-only")
    assert code == 1
    one_line(err, "verify: 1 of 2", a.version, "recorded in the ledger", "is gone", "restore it")
    assert f"OK   {b.version}" in out and f"FAIL {a.version}" in out
    code, _, err = trtpipe(capsys, "artifacts", "show", a.version, "--registry", reg)
    assert code == 1
    one_line(err, a.version, "its folder is gone")
    shutil.rmtree(b.path)  # every folder gone: still reported, not "no versions"
    code, _, err = trtpipe(capsys, "artifacts", "verify", "--registry", reg, "--integrity-only")
    assert code == 1 and "verify: 2 of 2" in one_line(err)
    assert set(hashes(reg)) <= set(before)


def test_publish_pointers_are_verified_by_default(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    reg = Path("artifacts", "registry")
    a = published(tmp_path / "work", reg)
    b = published(tmp_path / "work-b", reg, "fp16", scale=3.0)
    current = Path("artifacts", "publish", "current")
    registry.write_pointers(current, {"fp32": a.path, "fp16": b.path})
    code, out, _ = trtpipe(capsys, "artifacts", "verify", "--integrity-only")
    assert code == 0
    assert f"OK   current/fp32 -> {a.version}" in out and f"OK   current/fp16 -> {b.version}" in out
    published_before = hashes(reg)
    with open(current / "fp16" / "eval.json", "ab") as f:
        f.write(b" ")
    code, out, err = trtpipe(capsys, "artifacts", "verify", "--integrity-only")
    assert code == 1
    one_line(err, "current/fp16", b.version, "not byte-identical", "eval.json differs", "re-run trtpipe publish")
    (current / "fp16" / "eval.json").write_bytes((b.path / "eval.json").read_bytes())
    (current / "fp32" / "notes.txt").write_text("added by hand")
    code, _, err = trtpipe(capsys, "artifacts", "verify", "--integrity-only")
    assert code == 1 and "notes.txt not in the version" in one_line(err, "current/fp32")
    shutil.rmtree(current / "fp32")
    shutil.copytree(a.path, current / "fp32")
    edit_json(current / "fp32" / "manifest.json", lambda m: m.update(version="tiny-fp32-elsewhere"))
    code, _, err = trtpipe(capsys, "artifacts", "verify", "--integrity-only")
    assert code == 1 and "is not in artifacts/registry" in one_line(err, "current/fp32", "tiny-fp32-elsewhere")
    assert trtpipe(capsys, "artifacts", "verify", "--integrity-only", "--pointers", "none")[0] == 0
    assert hashes(reg) == published_before


# --------------------------------------------------------------------------- 3. interrupted publishes


KILLED_BETWEEN_RENAME_AND_LEDGER = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    from pipeline import registry
    from tests._small_registry import variant
    v = variant(Path(sys.argv[1]), scale=float(sys.argv[3]) if len(sys.argv) > 3 else 2.0)
    def killed(*a, **k):
        os.kill(os.getpid(), signal.SIGKILL)
    registry._append_ledger = killed
    registry.publish(Path(sys.argv[2]), v.manifest, v.sources)
""")


def run_python(code: str, *args: Any) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, env=env,
                          timeout=300, cwd=ROOT)


def test_a_publish_killed_between_rename_and_ledger_is_an_interrupted_publish(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    reg = tmp_path / "registry"
    other = published(tmp_path / "other", reg, scale=5.0)
    res = run_python(KILLED_BETWEEN_RENAME_AND_LEDGER, tmp_path, reg)
    assert res.returncode == -signal.SIGKILL, res.stderr
    v = variant(tmp_path)
    vdir = reg / "tiny" / v.manifest["version"]
    assert (vdir / "manifest.json").is_file()  # complete, renamed into place, not recorded
    assert v.manifest["version"] not in registry.ledger_entries(reg, "tiny")[0]
    before = hashes(reg)
    code, _, err = trtpipe(capsys, "artifacts", "verify", "--registry", reg, "--integrity-only")
    assert code == 1
    line = one_line(err, v.manifest["version"], "a publish interrupted after moving the folder into place",
                    "trtpipe artifacts verify --repair")
    assert "edited" not in line and "tamper" not in line
    with pytest.raises(ArtifactError, match="a publish interrupted after moving the folder into place"):
        registry.load(v.manifest["version"], reg, here={})
    assert hashes(reg) == before
    code, out, err = trtpipe(capsys, "artifacts", "verify", "--registry", reg, "--integrity-only", "--repair")
    assert code == 0, err
    assert f"repaired: {vdir}: recorded version {v.manifest['version']}" in out
    assert {k: h for k, h in hashes(reg).items() if not k.endswith("ledger.jsonl")} == \
        {k: h for k, h in before.items() if not k.endswith("ledger.jsonl")}
    assert set(registry.ledger_entries(reg, "tiny")[0]) == {other.version, v.manifest["version"]}
    registry.load(v.manifest["version"], reg, here={}).close()


def test_the_next_publish_records_an_interrupted_one_and_an_edited_one_stays_reported(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    reg = tmp_path / "registry"
    assert run_python(KILLED_BETWEEN_RENAME_AND_LEDGER, tmp_path, reg).returncode == -signal.SIGKILL
    v = variant(tmp_path)
    vdir = reg / "tiny" / v.manifest["version"]
    # the next publish (any version of the model) records it under the lock
    b = published(tmp_path / "b", reg, scale=3.0)
    assert set(registry.ledger_entries(reg, "tiny")[0]) == {v.manifest["version"], b.version}
    assert trtpipe(capsys, "artifacts", "verify", "--registry", reg, "--integrity-only")[0] == 0
    # an unrecorded folder whose files do not match its manifest is not recorded: still reported
    assert run_python(KILLED_BETWEEN_RENAME_AND_LEDGER, tmp_path / "d", reg, 7.0).returncode == -signal.SIGKILL
    d = variant(tmp_path / "d", scale=7.0)
    ddir = reg / "tiny" / d.manifest["version"]
    with open(ddir / "eval.json", "ab") as f:
        f.write(b" ")
    before = hashes(reg)
    e = published(tmp_path / "e", reg, scale=9.0)
    assert d.manifest["version"] not in registry.ledger_entries(reg, "tiny")[0]
    code, _, err = trtpipe(capsys, "artifacts", "verify", "--registry", reg, "--integrity-only")
    assert code == 1
    one_line(err, d.manifest["version"], "eval.json")
    assert {k: h for k, h in hashes(reg).items() if k in before and not k.endswith("ledger.jsonl")} == \
        {k: h for k, h in before.items() if not k.endswith("ledger.jsonl")}
    assert e.version in registry.ledger_entries(reg, "tiny")[0]


def test_a_ledger_line_cut_short_is_mended_by_the_next_publish(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    reg = tmp_path / "registry"
    a = published(tmp_path, reg)
    ledger = reg / "tiny" / registry.LEDGER
    good = ledger.read_bytes()
    b = variant(tmp_path / "b", scale=3.0)
    partial = registry._ledger_line(b.manifest).encode()[:57]  # an append cut short: no newline
    ledger.write_bytes(good + partial)
    code, out, _ = trtpipe(capsys, "artifacts", "verify", "--registry", reg, "--integrity-only")
    assert code == 0 and "its last line is cut short" in out
    a_files = hashes(a.path)
    status, path = registry.publish(reg, b.manifest, b.sources)
    assert status == "published"
    assert ledger.read_bytes() == good + registry._ledger_line(b.manifest).encode() + b"\n"
    entries, problems = registry.ledger_entries(reg, "tiny")
    assert set(entries) == {a.version, b.manifest["version"]} and problems == []
    assert hashes(a.path) == a_files
    assert trtpipe(capsys, "artifacts", "verify", "--registry", reg, "--integrity-only")[0] == 0


def test_a_ledger_whose_last_line_lost_its_newline_gets_it_back(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    reg = tmp_path / "registry"
    a = published(tmp_path, reg)
    ledger = reg / "tiny" / registry.LEDGER
    good = ledger.read_bytes()
    ledger.write_bytes(good.rstrip(b"\n"))
    assert trtpipe(capsys, "artifacts", "verify", "--registry", reg, "--integrity-only")[0] == 0
    b = published(tmp_path / "b", reg, scale=3.0)
    assert ledger.read_bytes() == good + registry._ledger_line(b.manifest).encode() + b"\n"
    assert set(registry.ledger_entries(reg, "tiny")[0]) == {a.version, b.version}


def test_a_torn_ledger_line_that_is_no_entry_is_refused_before_anything_changes(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    reg = tmp_path / "registry"
    published(tmp_path, reg)
    ledger = reg / "tiny" / registry.LEDGER
    ledger.write_bytes(ledger.read_bytes() + b"edited by hand")
    before = hashes(reg)
    b = variant(tmp_path / "b", scale=3.0)
    with pytest.raises(ArtifactError) as e:
        registry.publish(reg, b.manifest, b.sources)
    one_line(str(e.value), str(ledger), "not the start of a ledger entry", "nothing was changed")
    assert hashes(reg) == before
    code, _, err = trtpipe(capsys, "artifacts", "verify", "--registry", reg, "--integrity-only", "--repair")
    assert code == 1 and "not the start of a ledger entry" in one_line(err)
    assert hashes(reg) == before


# --------------------------------------------------------------------------- 4. OS errors, one line


def test_a_registry_path_that_is_a_file(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    reg = tmp_path / "registry"
    reg.write_text("not a folder")
    for args in (("list",), ("verify",), ("show", "abc")):
        code, _, err = trtpipe(capsys, "artifacts", *args, "--registry", reg)
        assert code == 1, args
        one_line(err, f"{reg}: the registry is a file, not a folder")
    v = variant(tmp_path)
    with pytest.raises(ArtifactError, match="the registry is a file"):
        registry.publish(reg, v.manifest, v.sources)
    with pytest.raises(ArtifactError, match="a folder on the registry's path"):
        registry.publish(reg / "sub", v.manifest, v.sources)
    assert reg.read_text() == "not a folder"


def test_a_lock_path_that_is_a_folder(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    reg = tmp_path / "registry"
    published(tmp_path, reg)
    (reg / registry.LOCK).unlink(missing_ok=True)
    (reg / registry.LOCK).mkdir()
    before = hashes(reg)
    code, _, err = trtpipe(capsys, "artifacts", "verify", "--registry", reg, "--integrity-only")
    assert code == 1
    one_line(err, str(reg / registry.LOCK), "lock path is a folder", "remove it")
    b = variant(tmp_path / "b", scale=3.0)
    with pytest.raises(ArtifactError, match="lock path is a folder"):
        registry.publish(reg, b.manifest, b.sources)
    assert hashes(reg) == before


def test_a_model_name_too_long_for_the_filesystem(tmp_path: Path) -> None:
    reg = tmp_path / "registry"
    v = variant(tmp_path, model="m" * 230)  # the version adds ~45 bytes: over NAME_MAX (255)
    with pytest.raises(ArtifactError) as e:
        registry.publish(reg, v.manifest, v.sources)
    one_line(str(e.value), "shorten model.name", "bytes, this filesystem allows")
    assert not reg.exists() or registry.version_dirs(reg) == []
    w = variant(tmp_path / "w")
    with pytest.raises(ArtifactError, match="model folder name would be 300 bytes"):  # the model folder itself
        registry.publish(reg, {**w.manifest, "model": "m" * 300}, w.sources)


def test_the_file_size_limit_while_publishing_is_one_line(tmp_path: Path) -> None:
    reg = tmp_path / "registry"
    a = published(tmp_path / "a", reg, scale=5.0)
    before = hashes(reg)
    v = variant(tmp_path)
    limit = min(p.stat().st_size for p in v.sources.values()) + 1  # the first bigger copy fails
    code = textwrap.dedent(f"""
        import resource, signal, sys
        from pathlib import Path
        from pipeline import registry
        from pipeline.errors import PipelineError
        from tests._small_registry import variant
        v = variant(Path(sys.argv[1]))  # its files first, then the limit: only the publish meets it
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))
        try:
            registry.publish(Path(sys.argv[2]), v.manifest, v.sources)
        except PipelineError as e:
            print(e, file=sys.stderr)
            sys.exit(1)
    """)
    res = run_python(code, tmp_path, reg)
    assert res.returncode == 1, res.stderr
    one_line(res.stderr, "File too large", "nothing was published")
    assert hashes(reg) == before and registry.leftover_staging(reg) == []
    assert a.version in registry.ledger_entries(reg, "tiny")[0]


def test_the_file_size_limit_on_the_ledger_leaves_a_recoverable_version(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                      capsys: pytest.CaptureFixture) -> None:
    import errno

    reg = tmp_path / "registry"
    v = variant(tmp_path)

    def efbig(*a: Any, **k: Any) -> None:
        raise OSError(errno.EFBIG, os.strerror(errno.EFBIG), str(reg / "tiny" / registry.LEDGER))

    monkeypatch.setattr(registry, "_append_ledger", efbig)
    with pytest.raises(ArtifactError) as e:
        registry.publish(reg, v.manifest, v.sources)
    one_line(str(e.value), v.manifest["version"], "ledger line could not be written", "File too large",
             "trtpipe artifacts verify --repair")
    monkeypatch.undo()
    assert trtpipe(capsys, "artifacts", "verify", "--registry", reg, "--integrity-only", "--repair")[0] == 0


def test_permission_denied_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture) -> None:
    """Where the registry's model folder may not be written (as root, the OS never says no:
    the denial is made where publish creates its staging folder)."""
    import errno

    reg = tmp_path / "registry"
    a = published(tmp_path / "a", reg, scale=5.0)
    before = hashes(reg)

    def denied(*args: Any, **kw: Any) -> str:
        raise PermissionError(errno.EACCES, "Permission denied", str(reg / "tiny"))

    monkeypatch.setattr(registry.tempfile, "mkdtemp", denied)
    v = variant(tmp_path)
    with pytest.raises(ArtifactError) as e:
        registry.publish(reg, v.manifest, v.sources)
    one_line(str(e.value), str(reg / "tiny"), "Permission denied", "check the folder's permissions")
    monkeypatch.undo()
    assert hashes(reg) == before
    monkeypatch.setattr(registry, "sha256_file", lambda p: (_ for _ in ()).throw(
        PermissionError(errno.EACCES, "Permission denied", str(p))))
    code, _, err = trtpipe(capsys, "artifacts", "verify", "--registry", reg, "--integrity-only")
    assert code == 1
    one_line(err, "verify: 1 of 1", a.version, "build.json: cannot be read (Permission denied)")
    with pytest.raises(ArtifactError, match="Permission denied"):
        registry.load(a.version, reg, here={})


# --------------------------------------------------------------------------- 2 and 5: the publish stage


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The session's digits run (prepare .. build fp32/fp16/int8, evaluate; onnxruntime)."""
    from tests._digits_run import digits_run

    return digits_run(tmp_path_factory)


def project(digits: Path, root: Path, **publish: Any) -> Path:
    """A project folder holding the digits run as artifacts/, configs/c.yaml and params.yaml."""
    import yaml

    for d in ("prepare", "export", "validate", "calibrate", "build", "eval"):
        shutil.copytree(digits / d, root / "artifacts" / d)
    data = yaml.safe_load((ROOT / "configs" / "digits.yaml").read_text())
    data.setdefault("build", {})["backend"] = "onnxruntime"
    data.setdefault("calibration", {})["num_samples"] = 64
    data.setdefault("publish", {}).update(publish)
    (root / "configs").mkdir()
    (root / "configs" / "c.yaml").write_text(yaml.safe_dump(data))
    (root / "params.yaml").write_text(yaml.safe_dump({"config": "configs/c.yaml"}))
    return root


def set_precisions(root: Path, precisions: Any) -> None:
    import yaml

    path = root / "configs" / "c.yaml"
    data = yaml.safe_load(path.read_text())
    data["publish"]["precisions"] = precisions
    path.write_text(yaml.safe_dump(data))


def recorded(root: Path, name: str) -> None:
    """calibrate.json records the file's present sha256: only the values can betray it."""
    cj = root / "artifacts" / "calibrate" / "calibrate.json"
    edit_json(cj, lambda r: r["sha256"].update({name: sha256_file(root / "artifacts" / "calibrate" / name)}))


@pytest.fixture()
def proj(digits: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = project(digits, tmp_path / "proj")
    monkeypatch.chdir(root)
    return root


def first_activation(root: Path) -> str:
    ranges = json.loads((root / "artifacts" / "calibrate" / "ranges.json").read_text())
    return next(iter(ranges["tensors"]))


CACHE_EDITS = {
    "nan": ("7fc00000", "nan", "is not finite"),
    "+inf": ("7f800000", "inf", "is not finite"),
    "-inf": ("ff800000", "-inf", "is not finite"),
    "negative": ("bf800000", "-1.0", "is negative"),
    "zero": ("0", "0.0", "is zero"),
}


@pytest.mark.parametrize("case", list(CACHE_EDITS) + ["malformed hex", "unknown tensor"])
def test_publish_refuses_a_calibration_cache_whose_values_are_wrong(proj: Path, capsys: pytest.CaptureFixture,
                                                                    case: str) -> None:
    code, _, err = trtpipe(capsys, "publish")
    assert code == 0, err
    before = hashes(proj / "artifacts" / "registry")
    current = hashes(proj / "artifacts" / "publish")
    cache = proj / "artifacts" / "calibrate" / "calibration.cache"
    lines = cache.read_text().splitlines()
    name = first_activation(proj)
    i = next(k for k, line in enumerate(lines) if line.rpartition(": ")[0] == name)
    if case == "malformed hex":
        lines[i] = f"{name}: 3f80zz00"
    elif case == "unknown tensor":
        lines.append("not_a_tensor_of_this_network: 3c000000")
    else:
        lines[i] = f"{name}: {CACHE_EDITS[case][0]}"
    cache.write_text("\n".join(lines) + "\n")
    recorded(proj, "calibration.cache")
    code, out, err = trtpipe(capsys, "publish")
    assert code == 1
    if case == "malformed hex":
        one_line(err, str(Path("artifacts/calibrate/calibration.cache")), name, "3f80zz00")
    elif case == "unknown tensor":
        one_line(err, "calibration.cache", "not_a_tensor_of_this_network", "does not have")
    else:
        _, value, why = CACHE_EDITS[case]
        one_line(err, "calibration.cache", repr(name), f"has scale {value}", why)
    assert hashes(proj / "artifacts" / "registry") == before
    assert hashes(proj / "artifacts" / "publish") == current


def test_publish_accepts_tensorrts_own_unnamed_constants(proj: Path, capsys: pytest.CaptureFixture) -> None:
    """TensorRT's parser adds tensors the ONNX does not name; its caches hold them (0 for weights)."""
    cache = proj / "artifacts" / "calibrate" / "calibration.cache"
    cache.write_text(cache.read_text() + "(Unnamed Layer* 0) [Constant]_output: 0\n"
                     "(Unnamed Layer* 7) [Shuffle]_output: 3c010204\n")
    recorded(proj, "calibration.cache")
    code, _, err = trtpipe(capsys, "publish")
    assert code == 0, err
    cache.write_text(cache.read_text() + "(Unnamed Layer* 9) [Shuffle]_output: 7f800000\n")  # but not an Inf
    recorded(proj, "calibration.cache")
    code, _, err = trtpipe(capsys, "publish")
    assert code == 1 and "(Unnamed Layer* 9) [Shuffle]_output" in one_line(err, "is not finite")


RANGE_EDITS = {
    "amax nan": ("amax", "NaN", "not a number"),
    "amax inf": ("amax", float("inf"), "is not finite"),
    "amax negative": ("amax", -3.0, "is negative"),
    "scale zero": ("scale", 0.0, "is zero"),
    "scale_hex malformed": ("scale_hex", "xyz", "not the hex of a float32"),
    "scale_hex other": ("scale_hex", "3f800000", "but scale"),
}


@pytest.mark.parametrize("case", list(RANGE_EDITS) + ["unknown tensor"])
def test_publish_refuses_ranges_whose_values_are_wrong(proj: Path, capsys: pytest.CaptureFixture, case: str) -> None:
    ranges = proj / "artifacts" / "calibrate" / "ranges.json"
    name = first_activation(proj)
    doc = json.loads(ranges.read_text())
    if case == "unknown tensor":
        doc["tensors"]["ghost"] = dict(doc["tensors"][name])
        name, want = "ghost", "does not have"
    else:
        key, value, want = RANGE_EDITS[case]
        doc["tensors"][name][key] = value
    ranges.write_text(json.dumps(doc))  # json writes inf as Infinity, as a careless tool would
    recorded(proj, "ranges.json")
    code, _, err = trtpipe(capsys, "publish")
    assert code == 1
    one_line(err, "ranges.json", repr(name), want)
    assert not (proj / "artifacts" / "registry").exists()


def test_publish_precisions_empty_or_duplicated_is_refused(proj: Path, capsys: pytest.CaptureFixture) -> None:
    assert trtpipe(capsys, "publish")[0] == 0
    before = hashes(proj / "artifacts")
    for precisions, want in (([], "is empty"), (["fp32", "int8", "fp32"], "names fp32 more than once")):
        set_precisions(proj, precisions)
        code, _, err = trtpipe(capsys, "publish")
        assert code == 1
        one_line(err, "publish.precisions", want)
        assert hashes(proj / "artifacts") == before  # pointers and registry as they were


def test_a_publish_of_fewer_precisions_keeps_the_other_pointers(proj: Path, capsys: pytest.CaptureFixture) -> None:
    assert trtpipe(capsys, "publish")[0] == 0
    current = proj / "artifacts" / "publish" / "current"
    assert sorted(p.name for p in current.iterdir()) == ["fp16", "fp32", "int8"]
    kept = {p: hashes(current / p) for p in ("fp16", "int8")}
    set_precisions(proj, ["fp32"])
    code, _, err = trtpipe(capsys, "publish")
    assert code == 0, err
    assert sorted(p.name for p in current.iterdir()) == ["fp16", "fp32", "int8"]
    assert {p: hashes(current / p) for p in ("fp16", "int8")} == kept
    code, out, _ = trtpipe(capsys, "artifacts", "verify", "--integrity-only")  # pointers checked by default
    assert code == 0 and out.count("OK   current/") == 3


def test_publish_with_a_model_name_too_long_is_one_line(proj: Path, capsys: pytest.CaptureFixture) -> None:
    import yaml

    path = proj / "configs" / "c.yaml"
    data = yaml.safe_load(path.read_text())
    data["model"]["name"] = "digits-" + "x" * 240
    path.write_text(yaml.safe_dump(data))
    code, _, err = trtpipe(capsys, "publish")
    assert code == 1
    one_line(err, "shorten model.name")
    assert not (proj / "artifacts" / "registry").exists() or registry.version_dirs(proj / "artifacts" / "registry") == []


def test_publish_over_a_torn_ledger_completes(proj: Path, capsys: pytest.CaptureFixture) -> None:
    set_precisions(proj, ["fp32"])
    assert trtpipe(capsys, "publish")[0] == 0
    ledger = next((proj / "artifacts" / "registry").glob(f"*/{registry.LEDGER}"))
    ledger.write_bytes(ledger.read_bytes() + b'{"content_digest": "ab')  # an append cut short
    set_precisions(proj, ["fp32", "fp16", "int8"])
    code, _, err = trtpipe(capsys, "publish")
    assert code == 0, err
    assert "removed a partial last line" in err  # a note, not an error
    entries, problems = registry.ledger_entries(proj / "artifacts" / "registry", ledger.parent.name)
    assert len(entries) == 3 and problems == []
    assert trtpipe(capsys, "artifacts", "verify", "--integrity-only")[0] == 0
