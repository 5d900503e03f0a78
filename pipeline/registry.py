"""The registry of published versions: `<registry>/<model>/<version>/`, each folder
written once and never changed.

Publishing stages the complete folder beside its destination (`.<version>.staging-*`),
checks the copies against the manifest, and renames it into place. Renaming a folder onto
an existing non-empty one fails (POSIX), so of two concurrent publishers of one version
exactly one wins, and nothing ever deletes or rewrites a published version. A crash at
any step leaves either no version or the complete one (plus, at worst, a hidden staging
folder that `verify` reports and that is safe to delete once no publish is running).
Publishing a version that exists is a no-op when its content is the same and an error
when it is not.

Every publish appends the version's section digests to `<registry>/<model>/ledger.jsonl`
(pipeline.manifest): a manifest edited after publishing no longer matches its ledger line,
and `verify` names the sections that changed. Without $TRTPIPE_MANIFEST_KEY that detects
corruption and edits by someone who does not also rewrite the ledger, not a writer who
rewrites both; with the key every manifest and ledger line must carry a valid HMAC. A
publish killed between its rename and its ledger line leaves a complete unrecorded
version: the next publish (or `verify --repair`) records it under the lock when it
verifies; a ledger line cut short is mended before the next append. Publishing and verifying hold the registry's
lock file (`<registry>/.trtpipe.lock`), so two publishes, or a publish and a verify, take
turns instead of failing half-way.

`verify` recomputes every file's hash against the manifest, checks that the manifest
still derives its own version and matches the ledger, and asks pipeline.compat whether
the artifact can run on this machine. `load` does all of that before it hands out a runner."""

from __future__ import annotations

import contextlib
import errno
import hmac
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Optional

from .errors import ArtifactError
from .fileio import os_error_message, os_errors, sha256_file, staging_dir
from .log import get_logger
from .manifest import (IDENTITY_ROLES, KEY_ENV, MANIFEST, consistency_findings, content_digest, read_manifest,
                       section_digests, sign_entry, signing_key)

DEFAULT_REGISTRY = Path("artifacts", "registry")
STAGING_MARK = ".staging-"
LEDGER = "ledger.jsonl"
LOCK = ".trtpipe.lock"
LOCK_TIMEOUT_S = 600.0


@contextlib.contextmanager
def registry_lock(registry: str | Path, what: str, timeout: float = LOCK_TIMEOUT_S) -> Iterator[None]:
    """Hold the registry's lock file for `what` (publish, verify); a second holder waits."""
    from filelock import FileLock, Timeout

    root = Path(registry)
    check_registry_path(root)
    with os_errors(f"creating the registry folder for {what}"):
        root.mkdir(parents=True, exist_ok=True)
    if (root / LOCK).is_dir() or ((root / LOCK).exists() and not (root / LOCK).is_file()):
        raise ArtifactError(f"{root / LOCK}: the registry's lock path is a folder (or not a file), so no trtpipe can "
                            f"lock the registry; remove it (it holds nothing trtpipe wrote) and {what} again")
    lock = FileLock(str(root / LOCK))
    try:
        lock.acquire(timeout=timeout)
    except Timeout:
        raise ArtifactError(f"{root / LOCK}: another trtpipe publish or verify has held the registry lock for {timeout:g} s; "
                            f"let it finish and {what} again (delete the lock file only if no trtpipe is running)") from None
    except OSError as e:
        raise ArtifactError(os_error_message(e, f"taking the registry lock for {what}")) from None
    try:
        yield
    finally:
        lock.release()


def check_registry_path(registry: str | Path) -> None:
    """A registry that is a file (or sits under one) is refused in one line."""
    root = Path(registry)
    for p in [root, *root.parents]:
        if p.exists() or p.is_symlink():
            if not p.is_dir():
                what = "the registry" if p == root else f"a folder on the registry's path ({root})"
                raise ArtifactError(f"{p}: {what} is a file, not a folder; move it away or pass another --registry "
                                    "(publish.registry)")
            return


# --------------------------------------------------------------------------- ledger


@dataclass
class Ledger:
    """A model's ledger.jsonl as read: the last line per version, the lines that are not
    entries, and a last line without its newline (`torn`: an interrupted append)."""

    path: Path
    entries: dict[str, dict[str, Any]] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    torn: Optional[bytes] = None
    torn_parses: bool = False


def _parse_entry(line: str) -> Optional[dict[str, Any]]:
    try:
        e = json.loads(line)
        str(e["version"])
    except (json.JSONDecodeError, KeyError, TypeError, IndexError):
        return None
    return e if isinstance(e, dict) else None


def read_ledger(registry: str | Path, model: str) -> Ledger:
    path = Path(registry) / model / LEDGER
    led = Ledger(path)
    if not path.is_file():
        return led
    data = path.read_bytes()
    body, _, tail = data.rpartition(b"\n") if not data.endswith(b"\n") else (data, b"", b"")
    lines = body.decode(errors="replace").splitlines() if body else []
    if tail.strip():
        led.torn = tail
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        e = _parse_entry(line)
        if e is None:
            led.problems.append(f"{path}, line {number}: not a ledger entry")
        else:
            led.entries[str(e["version"])] = e
    if led.torn is not None:
        e = _parse_entry(led.torn.decode(errors="replace"))
        if e is not None:  # a whole line that only lost its newline
            led.torn_parses = True
            led.entries[str(e["version"])] = e
    return led


def ledger_entries(registry: str | Path, model: str) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """{version: its last ledger line} and the problems found reading the ledger."""
    led = read_ledger(registry, model)
    problems = list(led.problems)
    if led.torn is not None and not led.torn_parses:
        problems.append(f"{led.path}: its last line is cut short (no newline: an interrupted write)")
    return led.entries, problems


def _ledger_line(m: Mapping[str, Any]) -> str:
    entry: dict[str, Any] = {"version": m["version"], "content_digest": m.get("content_digest"),
                             "sections": section_digests(m), "published_at": m.get("published_at")}
    sig = sign_entry(entry)
    if sig:
        entry["signature"] = sig
    return json.dumps(entry, sort_keys=True)


def _append_ledger(registry: Path, m: Mapping[str, Any]) -> None:
    path = Path(registry) / m["model"] / LEDGER
    line = _ledger_line(m)
    with open(path, "a", encoding="utf-8") as f:
        f.write(line + "\n")
        f.flush()
        os.fsync(f.fileno())


def mend_ledger(registry: str | Path, model: str) -> Optional[str]:
    """Hold the lock. A last line without its newline: a whole entry gets its newline; a
    partial entry (an append cut short by a kill or a full disk) is removed, so the next
    append starts a line of its own. Anything else is refused before changing anything.
    Returns what was done (None: nothing to mend)."""
    led = read_ledger(registry, model)
    if led.torn is None:
        return None
    if led.torn_parses:
        with open(led.path, "ab") as f:
            f.write(b"\n")
            f.flush()
            os.fsync(f.fileno())
        return f"{led.path}: its last line had lost its newline; added it"
    if not led.torn.lstrip().startswith(b'{"'):
        raise ArtifactError(f"{led.path}: its last line has no newline and is not the start of a ledger entry "
                            f"({led.torn[:40]!r}); the ledger was damaged by something other than an interrupted "
                            "publish: restore it (dvc checkout or git) and run again; nothing was changed")
    size = led.path.stat().st_size
    with open(led.path, "r+b") as f:
        f.truncate(size - len(led.torn))
        f.flush()
        os.fsync(f.fileno())
    return (f"{led.path}: removed a partial last line ({len(led.torn)} bytes) that an interrupted write left; "
            "the version it was recording is recorded again if its folder verifies")


def _ledger_root(vdir: Path, registry: str | Path, m: Mapping[str, Any]) -> Path:
    """The registry whose ledger records `vdir`: the one it sits in, else `registry` (a
    folder outside the layout, e.g. a publish pointer, is checked against that ledger)."""
    inside = vdir.parent.parent
    return inside if (inside / str(m.get("model")) / LEDGER).is_file() else Path(registry)


def unrecorded_message(version: Any, ledger: Path) -> str:
    return (f"version {version} is not in the registry's ledger ({ledger}): a publish interrupted after moving the "
            "folder into place and before recording it leaves this (so does a folder copied in by hand); "
            "`trtpipe artifacts verify --repair` records it if its files and manifest verify (the next publish "
            "does too); if nobody published it, remove the folder")


def ledger_findings(registry: str | Path, m: Mapping[str, Any]) -> list[Finding]:
    """Whether the manifest is the one its publish recorded, naming the sections that changed."""
    led = read_ledger(registry, str(m.get("model")))
    out = [Finding("integrity", p, LEDGER) for p in led.problems]
    entry = led.entries.get(str(m.get("version")))
    if entry is None:
        out.append(Finding("integrity", unrecorded_message(m.get("version"), led.path), MANIFEST))
        return out
    key = signing_key()
    if key and not entry.get("signature"):
        out.append(Finding("integrity", f"the ledger line of version {m.get('version')} is not signed, but ${KEY_ENV} "
                                        "is set and then every line must be: it was written without the key; republish "
                                        f"the version with the key set (remove the folder first), or unset ${KEY_ENV} "
                                        "to check digests and ledger only", LEDGER))
    elif key and not hmac.compare_digest(str(sign_entry(entry, key)), str(entry.get("signature"))):
        out.append(Finding("integrity", f"the ledger line of version {m.get('version')} does not match its signature "
                                        f"under ${KEY_ENV}: the ledger was edited (or written with another key); "
                                        "restore it (dvc checkout or git)", LEDGER))
    if entry.get("content_digest") != content_digest(m):
        now = section_digests(m)
        was = entry.get("sections") or {}
        changed = [k for k in now if was.get(k) != now[k]] or ["(the ledger line itself)"]
        out.append(Finding("integrity", f"manifest content differs from what was published: {', '.join(changed)} "
                                        "changed; restore the folder (dvc checkout) or republish", MANIFEST))
    return out


def record_interrupted(registry: str | Path, model: str) -> list[str]:
    """Hold the lock. A complete version folder with no ledger line (a publish killed between
    its rename and its ledger line) is recorded when its manifest derives its own digests,
    every file matches it and, with a key, its signature checks; returns one note per version
    recorded. Anything else is left for verify to report."""
    root = Path(registry)
    mdir = root / model
    if not mdir.is_dir():
        return []
    led = read_ledger(root, model)
    notes = []
    for vdir in sorted(v for v in mdir.iterdir() if v.is_dir() and not v.name.startswith(".")):
        if vdir.name in led.entries:
            continue
        try:
            m = read_manifest(vdir)
        except ArtifactError:
            continue
        if integrity_findings(vdir, m, (model, vdir.name)):
            continue
        _append_ledger(root, m)
        notes.append(f"{vdir}: recorded version {m['version']} in {led.path}: it had no ledger line (a publish "
                     "interrupted before writing it); its files and manifest verify")
    return notes


# --------------------------------------------------------------------------- listing


def version_dirs(registry: str | Path) -> list[Path]:
    """Every `<registry>/<model>/<version>` folder (hidden staging folders excluded)."""
    root = Path(registry)
    if not root.is_dir():
        return []
    out = []
    for model in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        out.extend(sorted(v for v in model.iterdir() if v.is_dir() and not v.name.startswith(".")))
    return out


def leftover_staging(registry: str | Path) -> list[Path]:
    root = Path(registry)
    if not root.is_dir():
        return []
    return sorted(v for m in root.iterdir() if m.is_dir() for v in m.iterdir() if v.name.startswith(".") and STAGING_MARK in v.name)


def resolve(version_or_path: str | Path, registry: str | Path = DEFAULT_REGISTRY) -> Path:
    """A version folder from a version string, a unique part of one (e.g. its hash8), or a
    path to a folder holding manifest.json (a version folder or a publish pointer)."""
    check_registry_path(registry)
    with os_errors(f"finding version {version_or_path}"):
        return _resolve(version_or_path, registry)


def _resolve(version_or_path: str | Path, registry: str | Path) -> Path:
    p = Path(version_or_path)
    if (p / MANIFEST).is_file() or (p.is_dir() and p.parent.parent.resolve() == Path(registry).resolve()):
        return p  # a folder given as such (a version folder without manifest is reported as damaged)
    dirs = version_dirs(registry)
    exact = [d for d in dirs if d.name == str(version_or_path)]
    if exact:
        return exact[0]
    partial = [d for d in dirs if str(version_or_path) in d.name]
    if len(partial) == 1:
        return partial[0]
    if not partial:
        for mdir in model_dirs(registry):
            led = read_ledger(registry, mdir.name)
            if str(version_or_path) in led.entries:
                raise ArtifactError(f"{mdir / str(version_or_path)}: version {version_or_path} is recorded in the ledger "
                                    f"({led.path}) but its folder is gone (deleted by hand?); restore it (dvc checkout) "
                                    "or republish it")
        where = f"{registry}" if Path(registry).is_dir() else f"{registry} (no such folder)"
        raise ArtifactError(f"no published version '{version_or_path}' in {where}; `trtpipe artifacts list` shows the versions")
    raise ArtifactError(f"'{version_or_path}' matches {len(partial)} versions ({', '.join(d.name for d in partial)}); give more of it")


def publish_order(registry: str | Path, m: Mapping[str, Any]) -> tuple[str, int]:
    """A sort key on which later is newer: published_at, then the position in the model's ledger."""
    entries = list(read_ledger(registry, str(m.get("model"))).entries)
    return (str(m.get("published_at") or ""), entries.index(m["version"]) if m.get("version") in entries else -1)


def summary(vdir: Path, m: Mapping[str, Any]) -> dict[str, Any]:
    """One row of `trtpipe artifacts list`."""
    metrics = m.get("metrics") or {}
    # p50 per batch size: the fastest mode, on the device clock where measured (as compare's
    # headline); a row is {batch_size, mode, host: {p50_ms ...}, gpu: {...} | None}.
    lat: dict[Any, float] = {}
    for r in (r for r in metrics.get("latency") or [] if isinstance(r, dict)):
        p50 = (r.get("gpu") or r.get("host") or {}).get("p50_ms")
        if isinstance(p50, (int, float)) and p50 < lat.get(r.get("batch_size"), float("inf")):  # "NaN": not measured
            lat[r.get("batch_size")] = p50
    batch = 1 if 1 in lat else next(iter(lat), None)
    art = (m.get("files") or {}).get(m.get("artifact"), {})
    return {
        "version": m.get("version"),
        "model": m.get("model"),
        "precision": m.get("precision"),
        "backend": f"{m.get('backend')} {m.get('backend_version')}",
        "device": m.get("device"),
        "gpu": (m.get("hardware") or {}).get("gpu"),
        "top1": (metrics.get("task") or {}).get("top1"),
        "top1_agreement": metrics.get("top1_agreement_fp32"),
        "latency_ms": lat.get(batch),
        "latency_batch": batch,
        "bytes": art.get("bytes"),
        "published_at": m.get("published_at"),
        "path": str(vdir),
    }


def list_versions(registry: str | Path = DEFAULT_REGISTRY) -> list[dict[str, Any]]:
    check_registry_path(registry)
    with os_errors("listing the registry"):
        return _list_versions(registry)


def _list_versions(registry: str | Path) -> list[dict[str, Any]]:
    rows = []
    for d in version_dirs(registry):
        try:
            rows.append(summary(d, read_manifest(d)))
        except ArtifactError as e:
            rows.append({"version": d.name, "model": d.parent.name, "error": str(e), "path": str(d)})
    order = {"fp32": 0, "fp16": 1, "int8": 2}
    rows.sort(key=lambda r: (r.get("model") or "", order.get(r.get("precision") or "", 9), r.get("published_at") or "", r["version"]))
    return rows


# --------------------------------------------------------------------------- verify


@dataclass
class Finding:
    kind: str  # "integrity": content or manifest damaged; "compat": cannot run here; "note": informational
    message: str
    file: Optional[str] = None

    def __str__(self) -> str:
        return f"{self.file}: {self.message}" if self.file else self.message


@dataclass
class VerifyResult:
    version: str
    path: str
    findings: list[Finding] = field(default_factory=list)
    checked_files: int = 0
    runs_here: Optional[bool] = None  # None: not checked (integrity only)
    what: str = "version"  # "pointer": a publish/current copy

    def failures(self, integrity_only: bool = False) -> list[Finding]:
        kinds = ("integrity",) if integrity_only else ("integrity", "compat")
        return [f for f in self.findings if f.kind in kinds]

    def ok(self, integrity_only: bool = False) -> bool:
        return not self.failures(integrity_only)

    def as_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            **({} if self.what == "version" else {"what": self.what}),  # "pointer", "ledger"
            "path": self.path,
            "ok": self.ok(),
            "integrity_ok": self.ok(integrity_only=True),
            "runs_here": self.runs_here,
            "checked_files": self.checked_files,
            "findings": [{"kind": f.kind, "file": f.file, "message": f.message} for f in self.findings],
        }


def integrity_findings(vdir: Path, m: Mapping[str, Any], expect_name: Optional[tuple[str, str]] = None) -> list[Finding]:
    """Every way the folder's content differs from its manifest. `expect_name`:
    (model, version) taken from the registry layout, checked against the manifest."""
    vdir = Path(vdir)
    out = [Finding("integrity", msg, MANIFEST) for msg in consistency_findings(m)]
    if expect_name is not None:
        model, name = expect_name
        if name != m.get("version") or model != m.get("model"):
            out.append(Finding("integrity", f"folder {model}/{name} holds version {m.get('model')}/{m.get('version')}", MANIFEST))
    files: Mapping[str, Mapping[str, Any]] = m.get("files") or {}
    for name, meta in files.items():
        if Path(name).name != name or name in ("", ".", "..", MANIFEST):
            out.append(Finding("integrity", "not a plain file name inside the version folder", name))
            continue
        f = vdir / name
        if not f.is_file():
            out.append(Finding("integrity", "missing (listed in the manifest)", name))
            continue
        size = f.stat().st_size
        if meta.get("bytes") is not None and size != meta["bytes"]:
            out.append(Finding("integrity", f"size {size} bytes, manifest says {meta['bytes']}", name))
        try:
            digest = sha256_file(f)
        except OSError as e:
            out.append(Finding("integrity", f"cannot be read ({e.strerror or e}); check its permissions", name))
            continue
        if digest != meta.get("sha256"):
            out.append(Finding("integrity", f"sha256 {digest[:16]}… does not match the manifest's {str(meta.get('sha256'))[:16]}…", name))
    for extra in sorted(p.name for p in vdir.iterdir() if p.name != MANIFEST and p.name not in files):
        out.append(Finding("integrity", "not listed in the manifest (added after publishing)", extra))
    return out


def verify(
    version_or_path: str | Path,
    registry: str | Path = DEFAULT_REGISTRY,
    here: Optional[Mapping[str, Any]] = None,
    integrity_only: bool = False,
) -> VerifyResult:
    """Recompute every hash against the manifest and (unless integrity_only) check whether
    the artifact can run on `here` (default: this machine, probed)."""
    vdir = resolve(version_or_path, registry)
    in_layout = vdir.parent.parent.resolve() == Path(registry).resolve()
    try:
        m = read_manifest(vdir)
    except ArtifactError as e:
        return VerifyResult(vdir.name, str(vdir), [Finding("integrity", str(e).split(": ", 1)[-1], MANIFEST)])
    res = VerifyResult(str(m["version"]), str(vdir), checked_files=len(m.get("files") or {}))
    res.findings += integrity_findings(vdir, m, (vdir.parent.name, vdir.name) if in_layout else None)
    res.findings += ledger_findings(_ledger_root(vdir, registry, m), m)
    if not integrity_only:
        from .compat import compat_findings, probe_here

        problems = compat_findings(m, probe_here() if here is None else here)
        res.findings += [Finding("compat", p) for p in problems]
        res.runs_here = not problems
    return res


def verify_all(
    registry: str | Path = DEFAULT_REGISTRY,
    versions: Optional[Iterable[str | Path]] = None,
    here: Optional[Mapping[str, Any]] = None,
    integrity_only: bool = False,
    pointers: Optional[str | Path] = None,
) -> list[VerifyResult]:
    """Verify `versions` (default: every version folder, and every version the ledgers
    record whose folder is gone), then the copies in `pointers` (publish/current) if given."""
    check_registry_path(registry)
    everything = versions is None
    targets = list(versions) if versions is not None else version_dirs(registry)
    if here is None and not integrity_only:
        from .compat import probe_here

        here = probe_here()
    results = []
    with registry_lock(registry, "verify"), os_errors("verifying the registry"):
        for t in targets:
            try:
                results.append(verify(t, registry, here, integrity_only))
            except ArtifactError as e:  # one unreadable version never stops the others being verified
                results.append(VerifyResult(Path(str(t)).name, str(t), [Finding("integrity", str(e))]))
        if everything:
            results += ledger_results(registry)
        if pointers is not None:
            results += verify_pointers(pointers, registry)
    return results


def model_dirs(registry: str | Path) -> list[Path]:
    root = Path(registry)
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")) if root.is_dir() else []


def ledger_results(registry: str | Path) -> list[VerifyResult]:
    """What the ledgers say beyond the version folders: a recorded version whose folder is
    gone (a failure), a last line cut short by an interrupted write (a note)."""
    out = []
    for mdir in model_dirs(registry):
        led = read_ledger(registry, mdir.name)
        for v in led.entries:
            if not (mdir / v).is_dir():
                out.append(VerifyResult(v, str(mdir / v), [Finding(
                    "integrity", f"version {v} is recorded in the ledger ({led.path}) but its folder {mdir / v} is gone "
                    "(deleted by hand?); trtpipe never removes a version: restore it (dvc checkout) or republish it "
                    "(if it was removed on purpose, remove its line from the ledger too)")]))
        if led.torn is not None and not led.torn_parses:
            out.append(VerifyResult(f"{mdir.name}/{LEDGER}", str(led.path), what="ledger", findings=[Finding(
                "note", "its last line is cut short (an interrupted write); `trtpipe artifacts verify --repair` "
                "(or the next publish) removes it", LEDGER)]))
    return out


def repair(registry: str | Path = DEFAULT_REGISTRY) -> list[str]:
    """Under the lock, what an interrupted publish left: a torn last ledger line is mended
    and a complete version with no ledger line is recorded (pipeline.registry.record_interrupted).
    Returns what was done."""
    check_registry_path(registry)
    notes: list[str] = []
    with registry_lock(registry, "verify --repair"), os_errors("repairing the registry"):
        for mdir in model_dirs(registry):
            note = mend_ledger(registry, mdir.name)
            notes += ([note] if note else []) + record_interrupted(registry, mdir.name)
    return notes


def _tree_diff(a: Path, b: Path) -> list[str]:
    """The files by which folder `a` differs from folder `b` (missing, extra, other bytes)."""
    fa = {p.relative_to(a).as_posix(): p for p in a.rglob("*") if not p.is_dir()}
    fb = {p.relative_to(b).as_posix(): p for p in b.rglob("*") if not p.is_dir()}
    out = []
    for name in sorted(set(fa) | set(fb)):
        if name not in fa:
            out.append(f"{name} missing")
        elif name not in fb:
            out.append(f"{name} not in the version")
        elif fa[name].is_symlink() or not fa[name].is_file() or sha256_file(fa[name]) != sha256_file(fb[name]):
            out.append(f"{name} differs")
    return out


def verify_pointers(pointers: str | Path, registry: str | Path = DEFAULT_REGISTRY) -> list[VerifyResult]:
    """Each `pointers/<name>/` (publish/current) must be a byte-identical copy of the version
    its manifest names in `registry`."""
    root = Path(pointers)
    if not root.exists():
        return []
    if not root.is_dir():
        return [VerifyResult(root.name, str(root), what="pointer", findings=[Finding("integrity", "the publish pointers path is a file, not a "
                                                                           "folder; re-run trtpipe publish")])]
    out = []
    for p in sorted(root.iterdir()):
        label = f"{root.name}/{p.name}"
        if not p.is_dir() or p.is_symlink():
            out.append(VerifyResult(label, str(p), what="pointer", findings=[Finding("integrity", "not a copy of a published version (a file in "
                                                                         "the pointers folder); re-run trtpipe publish",
                                                            p.name)]))
            continue
        try:
            m = read_manifest(p)
        except ArtifactError as e:
            out.append(VerifyResult(label, str(p), what="pointer", findings=[Finding("integrity", str(e))]))
            continue
        vdir = Path(registry) / str(m.get("model")) / str(m.get("version"))
        label = f"{label} -> {m.get('version')}"
        if not (vdir / MANIFEST).is_file():
            out.append(VerifyResult(label, str(p), what="pointer", findings=[Finding("integrity", f"points at version {m.get('version')}, which "
                                                                         f"is not in {registry}; re-run trtpipe publish "
                                                                         "(or pass the registry it belongs to)")]))
            continue
        diff = _tree_diff(p, vdir)
        res = VerifyResult(label, str(p), what="pointer", checked_files=len(m.get("files") or {}) + 1)
        if diff:
            res.findings.append(Finding("integrity", f"not byte-identical to the version it points at ({vdir}): "
                                                     f"{', '.join(diff[:5])}{' ...' if len(diff) > 5 else ''}; re-run "
                                                     "trtpipe publish to replace the pointers"))
        out.append(res)
    return out


# --------------------------------------------------------------------------- load


def load(
    version_or_path: str | Path,
    registry: str | Path = DEFAULT_REGISTRY,
    here: Optional[Mapping[str, Any]] = None,
    verify_hashes: bool = True,
) -> Any:
    """A runner for a published version, after checking its manifest: every hash (unless
    verify_hashes=False) and that it can run here (`here`: simulate another machine).
    Refuses with an ArtifactError naming the file, or both sides of a mismatch."""
    vdir = resolve(version_or_path, registry)
    with os_errors(f"loading {version_or_path}"):
        return _load(vdir, registry, here, verify_hashes)


def _load(vdir: Path, registry: str | Path, here: Optional[Mapping[str, Any]], verify_hashes: bool) -> Any:
    from .compat import check_runs_here, probe_here
    from .fileio import read_json

    m = read_manifest(vdir)
    problems = integrity_findings(vdir, m) if verify_hashes else [Finding("integrity", p, MANIFEST) for p in consistency_findings(m)]
    root = _ledger_root(vdir, registry, m)
    if (root / str(m.get("model")) / LEDGER).is_file():  # a copy outside any registry has only its own digests
        problems += ledger_findings(root, m)
    if problems:
        raise ArtifactError(
            f"{vdir}: refusing to load {m['version']}: " + "; ".join(map(str, problems))
            + "; restore the folder (dvc checkout) or republish it"
        )
    check_runs_here(m, probe_here() if here is None else here, where=f"{vdir / MANIFEST} ({m['version']})")
    from .backends import get_backend

    build_info = read_json(vdir / "build.json", "build report") if (vdir / "build.json").is_file() else {}
    return get_backend(m["backend"]).load(vdir / m["artifact"], {**build_info, "manifest": dict(m)})


# --------------------------------------------------------------------------- publish


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems do not support fsync on directories
    finally:
        os.close(fd)


def _same_as_published(dest: Path, m: Mapping[str, Any]) -> None:
    """Return if `dest` holds the same content as manifest `m`; raise otherwise."""
    try:
        old = read_manifest(dest)
    except ArtifactError as e:
        raise ArtifactError(
            f"{dest}: version {m['version']} exists but is not a readable published version ({str(e).split(': ', 1)[-1]}); "
            "published folders are never overwritten: inspect it and remove it deliberately"
        ) from None
    broken = integrity_findings(dest, old)
    if broken:
        raise ArtifactError(
            f"{dest}: version {m['version']} is already published but fails verification ({broken[0]}); "
            "restore it (dvc checkout) or remove it deliberately; it is never overwritten"
        )
    broken = ledger_findings(dest.parent.parent, old)
    if broken:
        raise ArtifactError(
            f"{dest}: version {m['version']} is already published but fails verification ({broken[0]}); "
            "restore it (dvc checkout) or remove it deliberately; it is never overwritten"
        )
    if old.get("inputs_digest") != m.get("inputs_digest"):
        raise ArtifactError(
            f"{dest}: version {m['version']} is published with other inputs (digest {old.get('inputs_digest')}, "
            f"now {m.get('inputs_digest')}); remove one deliberately"
        )
    new_files, old_files = m.get("files") or {}, old.get("files") or {}
    names = sorted(
        {n for n, v in new_files.items() if v.get("role") in IDENTITY_ROLES}
        | {n for n, v in old_files.items() if v.get("role") in IDENTITY_ROLES}
    )
    for n in names:
        a, b = old_files.get(n, {}).get("sha256"), new_files.get(n, {}).get("sha256")
        if a != b:
            raise ArtifactError(
                f"{dest}: version {m['version']} is already published with a different {n} "
                f"(published sha256 {str(a)[:12]}…, this build {str(b)[:12]}…); published versions are never overwritten. "
                "The same inputs gave other bytes: the build is not reproducible (TensorRT: reuse the timing cache) or "
                "something outside the version's inputs changed (trtpipe code); the published version stays as it is "
                "and stays valid: find what changed, or publish from a project whose inputs differ"
            )


def publish(
    registry: str | Path,
    manifest: Mapping[str, Any],
    sources: Mapping[str, Path],
) -> tuple[str, Path]:
    """Write `<registry>/<model>/<version>/` once: the files in `sources` (name -> source
    path; their sha256 must be those in manifest['files']) and manifest.json.
    Returns ('published' | 'unchanged', folder)."""
    m = dict(manifest)
    dest = Path(registry) / m["model"] / m["version"]
    if set(sources) != set(m.get("files") or {}):
        raise ArtifactError(f"{dest}: files to publish {sorted(sources)} differ from the manifest's {sorted(m.get('files') or {})}")
    check_names(dest)
    check_registry_path(registry)
    with registry_lock(registry, "publish"), os_errors(f"publishing {m['version']}"):
        return _publish_locked(Path(registry), dest, m, sources)


def _name_max(folder: Path) -> int:
    for p in [folder, *folder.parents]:
        if p.is_dir():
            try:
                return int(os.pathconf(p, "PC_NAME_MAX"))
            except (OSError, ValueError, AttributeError):
                return 255
    return 255


def check_names(dest: Path) -> None:
    """The model and version folder names (and the hidden staging name beside the version)
    must fit the filesystem: refused in one line before anything is written."""
    limit = _name_max(dest.parent)
    for name, what in ((dest.parent.name, "model folder"), (f".{dest.name}{STAGING_MARK}xxxxxxxx", "version folder")):
        if len(os.fsencode(name)) > limit:
            raise ArtifactError(f"{dest}: the {what} name would be {len(os.fsencode(name))} bytes, this filesystem "
                                f"allows {limit}; shorten model.name (it is part of the version)")


def _publish_locked(registry: Path, dest: Path, m: dict[str, Any], sources: Mapping[str, Path]) -> tuple[str, Path]:
    # Holding the lock, no other publish is running: what is left was interrupted (kill -9).
    # First the ledger: a torn last line is mended (or the publish refused) before anything
    # changes, and a version renamed into place but never recorded is recorded.
    for note in [mend_ledger(registry, m["model"])] + record_interrupted(registry, m["model"]):
        if note:
            get_logger(__name__).info(note)
    for old in [v for v in leftover_staging(registry) if v.parent.name == m["model"]]:
        shutil.rmtree(old, ignore_errors=True)
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        _same_as_published(dest, m)
        return "unchanged", dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}{STAGING_MARK}", dir=dest.parent))
    try:
        try:
            for name, src in sources.items():
                shutil.copyfile(src, tmp / name)
                _fsync(tmp / name)
            (tmp / MANIFEST).write_text(json.dumps(m, indent=2, default=str, allow_nan=False) + "\n")
            _fsync(tmp / MANIFEST)
        except OSError as e:
            raise ArtifactError(f"{dest}: could not stage the version ({e.strerror or e}: {e.filename}); nothing was published") from None
        # A source that changed while it was copied (a concurrent rebuild) is caught here.
        bad = [f for f in integrity_findings(tmp, m) if f.kind == "integrity"]
        if bad:
            raise ArtifactError(f"{dest}: staged copy does not match the manifest ({bad[0]}); a source changed while publishing: run publish again")
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700
        try:
            os.rename(tmp, dest)  # atomic; fails if dest exists and is not empty
        except OSError as e:
            if e.errno not in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR):
                raise ArtifactError(f"{dest}: could not rename the staged version into place ({e.strerror})") from None
            _same_as_published(dest, m)  # another publisher won the race
            return "unchanged", dest
        _fsync(dest.parent)
        try:
            _append_ledger(registry, m)
        except OSError as e:
            raise ArtifactError(f"{dest}: the version is in place but its ledger line could not be written "
                                f"({os_error_message(e, 'appending to the ledger')}); once that is fixed, "
                                "`trtpipe artifacts verify --repair` (or the next publish) records it") from None
        return "published", dest
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_pointers(root: str | Path, versions: Mapping[str, Path], prune: bool = False) -> dict[str, str]:
    """Point `root/<key>/` (key: e.g. precision) at each version, a copy of its folder:
    stable paths for DVC's `artifacts:` block. Unlike versions, pointers move: the whole
    folder is staged and swapped in one step. Pointers for keys not in `versions` are kept
    as they are unless `prune` (a publish never drops the pointer of a precision it did
    not publish by accident)."""
    root = Path(root)
    keep = {} if prune or not root.is_dir() else {
        p.name: p for p in root.iterdir() if p.name not in versions and p.is_dir() and not p.name.startswith(".")}
    want = {**keep, **versions}
    if root.is_dir() and sorted(p.name for p in root.iterdir()) == sorted(want) and all(
        sha256_file(root / k) == sha256_file(v) for k, v in versions.items()
    ):
        return {k: str(root / k) for k in versions}  # already there: leave it untouched
    try:
        with staging_dir(root) as tmp:
            for key, vdir in want.items():
                shutil.copytree(vdir, tmp / key)
            os.chmod(tmp, 0o755)
    except shutil.Error as e:  # copytree collects its failures: name the first
        first = e.args[0][0] if e.args and isinstance(e.args[0], list) and e.args[0] else None
        why = f"{first[0]}: {first[2]}" if first and len(first) == 3 else str(e)[:200]
        raise ArtifactError(f"{root}: could not write the publish pointers ({why}); the published versions are "
                            "unchanged, the pointers are as they were") from None
    except OSError as e:
        raise ArtifactError(os_error_message(e, "writing the publish pointers") + "; the published versions are "
                            "unchanged, the pointers are as they were") from None
    return {k: str(root / k) for k in versions}
