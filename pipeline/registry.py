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
and `verify` names the sections that changed. Publishing and verifying hold the registry's
lock file (`<registry>/.trtpipe.lock`), so two publishes, or a publish and a verify, take
turns instead of failing half-way.

`verify` recomputes every file's hash against the manifest, checks that the manifest
still derives its own version and matches the ledger, and asks pipeline.compat whether
the artifact can run on this machine. `load` does all of that before it hands out a runner."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Optional

from .errors import ArtifactError
from .fileio import sha256_file, staging_dir
from .manifest import IDENTITY_ROLES, MANIFEST, consistency_findings, content_digest, read_manifest, section_digests

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
    root.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(root / LOCK))
    try:
        lock.acquire(timeout=timeout)
    except Timeout:
        raise ArtifactError(f"{root / LOCK}: another trtpipe publish or verify has held the registry lock for {timeout:g} s; "
                            f"let it finish and {what} again (delete the lock file only if no trtpipe is running)") from None
    try:
        yield
    finally:
        lock.release()


# --------------------------------------------------------------------------- ledger


def ledger_entries(registry: str | Path, model: str) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """{version: its last ledger line} and the problems found reading the ledger."""
    path = Path(registry) / model / LEDGER
    entries: dict[str, dict[str, Any]] = {}
    problems: list[str] = []
    if not path.is_file():
        return entries, problems
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            e = json.loads(line)
            entries[str(e["version"])] = e
        except (json.JSONDecodeError, KeyError, TypeError):
            problems.append(f"{path}, line {number}: not a ledger entry")
    return entries, problems


def _append_ledger(registry: Path, m: Mapping[str, Any]) -> None:
    path = Path(registry) / m["model"] / LEDGER
    line = json.dumps({"version": m["version"], "content_digest": m.get("content_digest"),
                       "sections": section_digests(m), "published_at": m.get("published_at")}, sort_keys=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(line + "\n")
        f.flush()
        os.fsync(f.fileno())


def _ledger_root(vdir: Path, registry: str | Path, m: Mapping[str, Any]) -> Path:
    """The registry whose ledger records `vdir`: the one it sits in, else `registry` (a
    folder outside the layout, e.g. a publish pointer, is checked against that ledger)."""
    inside = vdir.parent.parent
    return inside if (inside / str(m.get("model")) / LEDGER).is_file() else Path(registry)


def ledger_findings(registry: str | Path, m: Mapping[str, Any]) -> list[Finding]:
    """Whether the manifest is the one its publish recorded, naming the sections that changed."""
    entries, problems = ledger_entries(registry, str(m.get("model")))
    out = [Finding("integrity", p, LEDGER) for p in problems]
    entry = entries.get(str(m.get("version")))
    if entry is None:
        out.append(Finding("integrity", f"version {m.get('version')} is not in the registry's ledger "
                                        f"({Path(registry) / str(m.get('model')) / LEDGER}): it was not published by "
                                        "trtpipe publish, or the ledger was edited", MANIFEST))
        return out
    if entry.get("content_digest") != content_digest(m):
        now = section_digests(m)
        was = entry.get("sections") or {}
        changed = [k for k in now if was.get(k) != now[k]] or ["(the ledger line itself)"]
        out.append(Finding("integrity", f"manifest content differs from what was published: {', '.join(changed)} "
                                        "changed; restore the folder (dvc checkout) or republish", MANIFEST))
    return out


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
        where = f"{registry}" if Path(registry).is_dir() else f"{registry} (no such folder)"
        raise ArtifactError(f"no published version '{version_or_path}' in {where}; `trtpipe artifacts list` shows the versions")
    raise ArtifactError(f"'{version_or_path}' matches {len(partial)} versions ({', '.join(d.name for d in partial)}); give more of it")


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

    def failures(self, integrity_only: bool = False) -> list[Finding]:
        kinds = ("integrity",) if integrity_only else ("integrity", "compat")
        return [f for f in self.findings if f.kind in kinds]

    def ok(self, integrity_only: bool = False) -> bool:
        return not self.failures(integrity_only)

    def as_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
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
        digest = sha256_file(f)
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
) -> list[VerifyResult]:
    targets = list(versions) if versions is not None else version_dirs(registry)
    if here is None and not integrity_only:
        from .compat import probe_here

        here = probe_here()
    results = []
    with registry_lock(registry, "verify"):
        for t in targets:
            try:
                results.append(verify(t, registry, here, integrity_only))
            except ArtifactError as e:  # one unreadable version never stops the others being verified
                results.append(VerifyResult(Path(str(t)).name, str(t), [Finding("integrity", str(e))]))
    return results


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
    from .compat import check_runs_here, probe_here
    from .fileio import read_json

    vdir = resolve(version_or_path, registry)
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
                "something outside the version's inputs changed (trtpipe code); keep the published one, or delete "
                "that folder deliberately to republish"
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
    with registry_lock(registry, "publish"):
        return _publish_locked(Path(registry), dest, m, sources)


def _publish_locked(registry: Path, dest: Path, m: dict[str, Any], sources: Mapping[str, Path]) -> tuple[str, Path]:
    # Holding the lock, no other publish is staging: what is left was interrupted (kill -9).
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
        _append_ledger(registry, m)
        return "published", dest
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_pointers(root: str | Path, versions: Mapping[str, Path]) -> dict[str, str]:
    """Replace `root` with one folder per key (e.g. precision), each a copy of that
    version folder: stable paths for DVC's `artifacts:` block. Unlike versions, pointers
    move: the whole folder is staged and swapped in one step."""
    root = Path(root)
    if root.is_dir() and sorted(p.name for p in root.iterdir()) == sorted(versions) and all(
        sha256_file(root / k) == sha256_file(v) for k, v in versions.items()
    ):
        return {k: str(root / k) for k in versions}  # already there: leave it untouched
    with staging_dir(root) as tmp:
        for key, vdir in versions.items():
            shutil.copytree(vdir, tmp / key)
        os.chmod(tmp, 0o755)
    return {k: str(root / k) for k in versions}
