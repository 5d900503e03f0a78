"""Atomic writes, hashing and small JSON helpers.

Every artifact is written to a temporary file in its destination folder and renamed
into place, so an interrupted stage never leaves a half-written file a later stage
would trust."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from .errors import ArtifactError, ConfigError, ReportError

STAGING_TAG = ".tmp-"  # hidden working folders/files: .<name>.tmp-<pid>-<random>


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | Path, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success rename it onto `path`, else remove it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sweep_staging(path)
    fd, tmp = tempfile.mkstemp(prefix=_staging_prefix(path), suffix=suffix or path.suffix, dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; artifacts are ordinary files
    try:
        with _named_as(tmp_path, path):
            yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_bytes(path: str | Path, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path: str | Path, text: str) -> Path:
    return write_bytes(path, text.encode())


def _staging_prefix(dst: Path) -> str:
    return f".{dst.name}{STAGING_TAG}{os.getpid()}-"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_staging(dst: str | Path) -> list[Path]:
    """Remove the hidden working copies an interrupted run left beside `dst` (those whose
    process is gone); returns what was removed."""
    dst = Path(dst)
    removed = []
    if not dst.parent.is_dir():
        return removed
    prefix = f".{dst.name}{STAGING_TAG}"
    for p in dst.parent.iterdir():
        if not p.name.startswith(prefix):
            continue
        pid = p.name[len(prefix):].split("-", 1)[0]
        if pid.isdigit() and (int(pid) == os.getpid() or _pid_alive(int(pid))):
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed.append(p)
    return removed


def finite_json(o: Any) -> Any:
    """Non-finite floats as the strings JSON readers of trtpipe reports accept."""
    if isinstance(o, float) and not math.isfinite(o):
        return "NaN" if math.isnan(o) else ("Infinity" if o > 0 else "-Infinity")
    if isinstance(o, dict):
        return {k: finite_json(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [finite_json(v) for v in o]
    return o


def _json_default(o: Any) -> Any:
    import numpy as np

    if isinstance(o, np.generic):
        return finite_json(o.item())
    if isinstance(o, np.ndarray):
        return finite_json(o.tolist())
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


def write_json(path: str | Path, obj: Any) -> Path:
    """Strict JSON (NaN and Inf written as strings), atomically."""
    return write_text(path, json.dumps(finite_json(obj), indent=2, sort_keys=False, default=_json_default,
                                       allow_nan=False) + "\n")


def read_json(path: str | Path, what: str = "report") -> Any:
    path = Path(path)
    if not path.is_file():
        raise ReportError(f"{path}: {what} not found; run the stage that writes it (dvc repro) first")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ReportError(f"{path}: {what} is not valid JSON ({e.msg} at line {e.lineno})") from None


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    path = Path(path)
    if not path.exists():
        raise ArtifactError(f"{path}: not found, cannot hash it")
    h = hashlib.sha256()
    if path.is_dir():
        for p in sorted(q for q in path.rglob("*") if q.is_file()):
            h.update(p.relative_to(path).as_posix().encode() + b"\0")
            h.update(sha256_file(p).encode())
        return h.hexdigest()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def replace_dir(src: Path, dst: Path, attempts: int = 20) -> None:
    """Move a fully written folder onto `dst`, replacing an older `dst`. Safe against a
    concurrent writer of the same `dst`: each attempt moves the current `dst` aside under
    a name of its own, and the last writer wins."""
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(attempts):
        old = None
        if dst.exists() or dst.is_symlink():
            old = Path(tempfile.mkdtemp(prefix=_staging_prefix(dst), dir=dst.parent))
            try:
                os.replace(dst, old / "old")
            except FileNotFoundError:  # another writer moved it first
                pass
        try:
            os.replace(src, dst)
        except OSError as e:
            if e.errno in (errno.ENOTEMPTY, errno.EEXIST):  # another writer put its folder there meanwhile
                continue
            raise
        finally:
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        return
    raise ArtifactError(f"{dst}: could not move the new folder into place; another process keeps writing it")


@contextlib.contextmanager
def staging_dir(dst: str | Path) -> Iterator[Path]:
    """A temporary folder beside `dst` that replaces `dst` only if the block succeeds."""
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    sweep_staging(dst)
    tmp = Path(tempfile.mkdtemp(prefix=_staging_prefix(dst), dir=dst.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700
    try:
        with _named_as(tmp, dst):
            yield tmp
        replace_dir(tmp, dst)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def _named_as(tmp: Path, dst: Path) -> Iterator[None]:
    """Errors raised while writing into the hidden working copy `tmp` name `dst` instead,
    the output the user knows."""
    from .errors import PipelineError

    try:
        yield
    except PipelineError as e:
        if str(tmp) in str(e):
            raise type(e)(str(e).replace(str(tmp), str(dst))) from None
        raise
    except OSError as e:
        if e.filename and str(tmp) in str(e.filename):
            e.filename = str(e.filename).replace(str(tmp), str(dst))
        raise


def project_path(path: Any, key: str, root: str | Path | None = None) -> Path:
    """An output path a setting or option names: never empty, and inside the project (the
    working directory) after resolving '..' and symlinks, unless given as an absolute path
    on purpose."""
    if path is None or not str(path).strip():
        raise ConfigError(f"{key} is empty; give a path inside the project (e.g. artifacts/...)")
    p = Path(path)
    if p.is_absolute():
        return p
    base = Path(root or Path.cwd()).resolve()
    resolved = (base / p).resolve()
    if resolved != base and base not in resolved.parents:
        raise ArtifactError(f"{key} '{path}' resolves to {resolved}, outside the project {base} (through '..' or a "
                            "symlink); use a path inside the project, or an absolute path to write elsewhere on purpose")
    return p
