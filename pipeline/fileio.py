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
from typing import Any, BinaryIO, Callable, Iterator, Optional

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
    not_a_folder(path, what, ReportError)
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


def onnx_external_files(path: str | Path) -> list[str]:
    """The external-data files an ONNX model's tensors name (locations relative to the model's folder, sorted);
    [] for a model that holds its weights inline, or a file that is not a readable ONNX model."""
    import onnx
    from onnx.external_data_helper import _get_all_tensors, uses_external_data

    try:
        m = onnx.load(str(path), load_external_data=False)
    except Exception:  # not ONNX: whoever loads it says so
        return []
    locs = set()
    for t in _get_all_tensors(m):
        if uses_external_data(t):
            loc = {e.key: e.value for e in t.external_data}.get("location")
            if loc:
                locs.add(loc)
    return sorted(locs)


def sha256_model(path: str | Path) -> str:
    """sha256 that stands for a model file and everything it loads: for an ONNX model that keeps its weights
    in external-data files (models over 2 GB, or saved that way) a digest over model.onnx and each of those
    files, so a changed or missing weights file counts as a changed model; otherwise (every other file, and
    an ONNX model with inline weights) the file's plain sha256."""
    path = Path(path)
    plain = sha256_file(path)
    if path.suffix.lower() != ".onnx" or path.is_dir():
        return plain
    locs = onnx_external_files(path)
    if not locs:
        return plain
    h = hashlib.sha256(f"onnx+external-data\0{path.name}\0{plain}\n".encode())
    for loc in locs:
        f = path.parent / loc
        if not f.is_file():
            raise ArtifactError(f"{f}: external-data file of {path} (its tensors' location '{loc}') is missing; put it "
                                "back beside the model or re-run the stage that wrote the model")
        h.update(f"{loc}\0{sha256_file(f)}\n".encode())
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


def _new_staging(dst: Path) -> Path:
    """An empty staging folder beside `dst` (earlier ones left by a killed run swept first), with the
    permissions a folder made here would have (mkdtemp makes 0700)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    sweep_staging(dst)
    tmp = Path(tempfile.mkdtemp(prefix=_staging_prefix(dst), dir=dst.parent))
    os.chmod(tmp, 0o777 & ~_umask())
    return tmp


@contextlib.contextmanager
def staging_dir(dst: str | Path) -> Iterator[Path]:
    """A temporary folder beside `dst` that replaces `dst` only if the block succeeds."""
    dst = Path(dst)
    tmp = _new_staging(dst)
    try:
        with _named_as(tmp, dst):
            yield tmp
        ignore = dst / ".gitignore"  # DVC's, for file outputs inside this folder: not the stage's to delete
        if ignore.is_file() and not (tmp / ".gitignore").exists():
            shutil.copy2(ignore, tmp / ".gitignore")
        replace_dir(tmp, dst)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def new_dir(dst: str | Path, owner: str, key: str = "--to") -> Iterator[Path]:
    """A temporary folder beside `dst` that becomes `dst` if the block succeeds, where `dst` does not
    exist or is an empty folder: never over anything (refused before the block in one line; a folder
    filled while the block ran makes the rename fail, and nothing is written). Unlike `staging_dir`,
    which replaces its own earlier output."""
    dst = Path(dst)
    fix = f"give {key} a new or empty folder, or remove that one yourself"
    _outside_checks(dst, key, owner, (), fix)
    if dst.is_symlink() or (dst.exists() and not dst.is_dir()):
        raise _refuse(key, dst, "is a file (or a link), not a folder", fix)
    held = sorted(e.name for e in dst.iterdir()) if dst.is_dir() else []
    if held:
        raise _refuse(key, dst, f"exists and is not empty (it holds {', '.join(held[:4])}"
                      f"{' ...' if len(held) > 4 else ''}); {owner} never overwrites", fix)
    tmp = _new_staging(dst)
    try:
        with _named_as(tmp, dst):
            yield tmp
        try:
            os.rename(tmp, dst)  # onto a missing or empty folder only: POSIX refuses a non-empty one
        except OSError as e:
            if e.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
                raise
            raise _refuse(key, dst, f"something was written there while {owner} ran; nothing of {owner}'s "
                          "was written", fix) from None
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


def named_as(value: Any, tmp: str | Path, dst: str | Path) -> Any:
    """`value` (a report's dicts, lists and strings) with every path inside the hidden working copy `tmp`
    naming `dst` instead, where the file is once the stage has succeeded."""
    if isinstance(value, str):
        return value.replace(str(tmp), str(dst))
    if isinstance(value, dict):
        return {k: named_as(v, tmp, dst) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(named_as(v, tmp, dst) for v in value)
    return value


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


# -- OS errors at the command-line boundary ---------------------------------------------------------------
# What the machine did (as opposed to a bug in trtpipe): the CLI turns these into one line naming the path.
ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS, errno.ENAMETOOLONG,
                      errno.EFBIG, errno.EISDIR, errno.ENOTDIR, errno.ELOOP, errno.EMFILE, errno.ENFILE, errno.EIO,
                      errno.EMLINK, errno.ETXTBSY}
_WHAT_TO_DO = {
    errno.ENOSPC: "free space and re-run",
    errno.EDQUOT: "free space (disk quota) and re-run",
    errno.EACCES: "check the permissions of the file and its folder",
    errno.EPERM: "check the permissions of the file and its folder",
    errno.EROFS: "the filesystem is read-only: write elsewhere (--out) or remount it",
    errno.ENAMETOOLONG: "a file name is longer than this filesystem allows: shorten it (e.g. model.name or --out)",
    errno.EFBIG: "the file is larger than this process may write: raise the file size limit (ulimit -f) and re-run",
    errno.EISDIR: "a folder is where a file is expected: move the folder away or point the option at the file",
    errno.ENOTDIR: "a file is where a folder is expected on that path: move it away or choose another path",
    errno.ELOOP: "a symbolic link on that path loops: fix the link",
    errno.EMFILE: "too many open files: raise the limit (ulimit -n) and re-run",
    errno.ENFILE: "too many open files on this machine: retry later",
    errno.EIO: "the disk reported an I/O error: check the device",
}


def os_error_in(e: BaseException) -> Optional[OSError]:
    """The OSError behind `e`: itself, or one in its __cause__/__context__ chain (a library such as torch
    wraps the OS's error in its own RuntimeError)."""
    seen = set()
    cur: Optional[BaseException] = e
    while cur is not None and id(cur) not in seen:
        if isinstance(cur, OSError) and cur.errno is not None:
            return cur
        seen.add(id(cur))
        cur = cur.__cause__ or cur.__context__
    return None


def environment_error(e: BaseException) -> Optional[str]:
    """One line for what the machine did (disk full, no permission, name too long, file size limit, a folder
    where a file should be ...), naming the path and what to do; None for anything else (a bug)."""
    os_err = os_error_in(e)
    if os_err is None:
        if "No space left on device" in str(e):  # a library's own words, without the OSError behind them
            return "disk full while writing an output: free space and re-run; finished outputs stay as they were"
        return None
    code = os_err.errno
    if code not in ENVIRONMENT_ERRNOS:
        return None
    where = str(os_err.filename) if os_err.filename else "an output"
    if getattr(os_err, "filename2", None):
        where += f" -> {os_err.filename2}"
    what = os_err.strerror or os.strerror(code)
    if code in (errno.ENOSPC, errno.EDQUOT):
        return (f"disk full while writing {where} ({what}): {_WHAT_TO_DO[code]}; finished outputs stay as they were "
                "and no half-written file is kept")
    if code in (errno.EACCES, errno.EPERM):
        return f"permission denied: {where}: {what}; {_WHAT_TO_DO[code]}"
    return f"{where}: {what}; {_WHAT_TO_DO.get(code, 'fix that and re-run')}"


def write_through(path: str | Path, write: Callable[[BinaryIO], None]) -> Path:
    """Write `path` through `write(file)` (torch.save, np.savez, onnx.save ... on an open file). An OS error
    the library wraps in its own exception (torch: RuntimeError) surfaces as that OSError, naming `path`."""
    path = Path(path)
    try:
        with open(path, "wb") as f:
            write(f)
    except OSError as e:
        if e.filename or e.errno is None:
            raise
        raise OSError(e.errno, e.strerror, str(path)) from e  # a write on the open file names no path
    except Exception as e:
        cause = os_error_in(e)
        if cause is None:
            raise
        raise OSError(cause.errno, cause.strerror or os.strerror(cause.errno or 0), str(path)) from e
    return path


def not_a_folder(path: str | Path, what: str, error: type = ArtifactError) -> None:
    """Refuse a folder where the file `what` is expected (before a "not found" that would mislead)."""
    p = Path(path)
    if p.is_dir():
        raise error(f"{p}: is a folder, but {what} is a file; move the folder away or point the option/setting at "
                    "the file, then re-run")


# -- output ownership: a stage writes only into an output it owns, and never replaces what it did not create ------
STAGE_REPORTS = {"prepare": "prepare.json", "export": "export.json", "validate": "validate.json",
                 "calibrate": "calibrate.json", "tune": "tune.json", "build": "build.json", "compare": "compare.json"}
# The calibrate stage's outputs, by name: read by tune, build, publish, diagnose and provenance (tune writes
# its own Q/DQ model and cache under the same names).
CALIBRATE_REPORT = STAGE_REPORTS["calibrate"]
RANGES_FILE = "ranges.json"
CACHE_FILE = "calibration.cache"
QDQ_FILE = "model.qdq.onnx"
MAXIMA_FILE = "maxima.json"  # max|x| of every float tensor on the calibration samples (FP16 range check)
REGISTRY_LOCK = ".trtpipe.lock"  # in every registry's root (pipeline.registry)
PROJECT_MARKERS = ("dvc.yaml", "params.yaml", ".git", ".dvc", "pyproject.toml")
_NOT_OURS = (".gitignore",)
# Files a stage writes into its folder that git keeps (dvc.yaml's `metrics` with cache: false), so a fresh
# clone has them without the rest of the output: a folder holding only these is the stage's own.
GIT_KEPT = {"compare": ("metrics.json",)}
DATA_SUFFIXES = (".pt", ".pth", ".onnx", ".npz", ".npy", ".engine", ".plan", ".cache", ".yaml", ".yml", ".py", ".lock",
                 ".data", ".pb", ".safetensors", ".bin")  # DVC's, beside its outputs: no one's content


def _refuse(key: str, path: Path, why: str, fix: str) -> "ArtifactError":
    return ArtifactError(f"{key} {path}: {why}; {fix}")


def _outside_checks(path: Path, key: str, owner: str, inputs: tuple, fix: str) -> None:
    """What no output may be: the project folder or one above it, a project root, or an input of this run."""
    r = path.resolve()
    cwd = Path.cwd().resolve()
    if r == cwd or r in cwd.parents:
        raise _refuse(key, path, f"is the project folder{'' if r == cwd else ' or a folder above it'}, and {owner} "
                      "would replace everything in it", fix)
    if path.is_dir():
        marker = next((m for m in PROJECT_MARKERS if (path / m).exists()), None)
        if marker:
            raise _refuse(key, path, f"holds {marker}: it is a project's root, not an output of {owner}", fix)
        if (path / "manifest.json").exists():
            raise _refuse(key, path, "holds a published version (manifest.json), which is never overwritten", fix)
    for a in [r, *r.parents]:
        if (a / REGISTRY_LOCK).exists():
            raise _refuse(key, path, f"is {'' if a == r else 'inside '}the registry {a}, which only publish writes", fix)
    for i in inputs:
        if i is None:
            continue
        ir = Path(i).resolve()
        if r == ir or r in ir.parents:
            raise _refuse(key, path, f"is {'' if r == ir else 'a folder holding '}an input of this run ({i}); "
                          f"{owner} would overwrite what it reads", fix)


def claim_dir(path: str | Path, owner: str, key: str = "--out", inputs: tuple = (),
              identity: Optional[dict[str, Any]] = None) -> Path:
    """A stage's output folder, which the stage replaces whole: allowed only when it does not exist, is empty,
    or is recognisably this stage's own previous output (its report, STAGE_REPORTS[owner], of that stage, and
    of the same `identity`, e.g. {"precision": "fp16"} for build). Refuses the project folder and those above
    it, a project root, another stage's folder, the registry, the artifacts root and a file, in one line."""
    p = Path(path)
    report = STAGE_REPORTS[owner]
    fix = (f"give {key} a new or empty folder (or {owner}'s own earlier output), or move that folder away "
           "yourself if you mean to replace it")
    _outside_checks(p, key, owner, inputs, fix)
    if not p.exists() and not p.is_symlink():
        return p
    if not p.is_dir():
        raise _refuse(key, p, f"is a file, and {owner} writes a folder there (replacing it)", fix)
    held = sorted(e.name for e in p.iterdir() if e.name not in _NOT_OURS and STAGING_TAG not in e.name)
    if not held or (all(n in GIT_KEPT.get(owner, ()) for n in held) and all((p / n).is_file() for n in held)):
        return p  # empty, or what git keeps of this stage's output in a fresh clone
    mine = p / report
    if not mine.is_file():
        raise _refuse(key, p, f"is not empty and is not {owner}'s output (no {report} in it; it holds "
                      f"{', '.join(held[:4])}{' ...' if len(held) > 4 else ''}), and {owner} would replace it whole", fix)
    try:
        data = json.loads(mine.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        data = None
    if not isinstance(data, dict) or data.get("stage") != owner:
        got = data.get("stage") if isinstance(data, dict) else None
        raise _refuse(key, p, f"its {report} is not a {owner} report" + (f" (a {got} report)" if got else ""), fix)
    for k, v in (identity or {}).items():
        if data.get(k) != v:
            raise _refuse(key, p, f"holds the {owner} output for {k} {data.get(k)!r}, not {v!r}", fix)
    return p


def claim_file(path: str | Path, owner: str, key: str = "--out", inputs: tuple = (),
               recognise: Optional[Callable[[bytes], bool]] = None, append: bool = False,
               kind: str = "file") -> Path:
    """A file output: never a folder, never an input of this run, never the project folder's own files; an
    existing file may be replaced only when `recognise(its bytes)` says this tool wrote it (a report of
    the right kind). With `append` (a file others add to, like $GITHUB_STEP_SUMMARY) an existing file must be
    text and none of the project's data, model or report files."""
    p = Path(path)
    fix = (f"give {key} a new path (or {owner}'s own earlier {kind}), or move that file away yourself if you mean "
           "to replace it")
    _outside_checks(p, key, owner, inputs, fix)
    if p.is_dir():
        raise _refuse(key, p, f"is a folder, and {owner} writes a file ({kind}) there", fix)
    if not p.exists():
        return p
    if p.suffix.lower() in DATA_SUFFIXES:
        raise _refuse(key, p, f"is a {p.suffix} file (a model, data, config or code file), not {owner}'s {kind}", fix)
    try:
        head = p.read_bytes()
    except OSError:
        head = b""
    if append:
        text_ok = b"\0" not in head[:1 << 16]
        try:
            head.decode("utf-8")
        except UnicodeDecodeError:
            text_ok = False
        if not text_ok or p.suffix.lower() in (".json", ".xml"):
            raise _refuse(key, p, f"is not a text summary file (binary or a report), so {owner} will not append to it",
                          fix)
        return p
    if recognise is None or not recognise(head):
        raise _refuse(key, p, f"exists and is not {owner}'s own {kind} (not recognisably written by it)", fix)
    return p


def json_report_of(stage: str, **identity: Any) -> Callable[[bytes], bool]:
    """A recogniser for claim_file: a JSON object of `stage` (and `identity`)."""
    def recognise(data: bytes) -> bool:
        try:
            d = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError):
            return False
        return isinstance(d, dict) and d.get("stage") == stage and all(d.get(k) == v for k, v in identity.items())
    return recognise


_OS_ADVICE = {
    errno.ENAMETOOLONG: "the name is longer than this filesystem allows (a long model.name?): shorten it",
    errno.EFBIG: "the file is larger than this process may write (ulimit -f): raise the limit",
    errno.ENOSPC: "the disk is full: free space",
    errno.EDQUOT: "the disk quota is exhausted: free space",
    errno.EACCES: "permission denied: check the folder's permissions",
    errno.EPERM: "operation not permitted: check the folder's permissions",
    errno.EROFS: "the filesystem is read-only",
    errno.ENOTDIR: "a path on the way is a file where a folder is expected: move that file away or choose another path",
    errno.EEXIST: "a file is in the way where a folder is expected: move it away or choose another path",
    errno.EISDIR: "a folder is in the way where a file is expected: move it away",
    errno.ENOENT: "not found",
    errno.ELOOP: "too many levels of symbolic links",
}


def os_error_message(e: OSError, what: str) -> str:
    """One line for an OSError met while doing `what`: the path, the OS's words, what to do."""
    where = e.filename or ""
    if getattr(e, "filename2", None):
        where = f"{where} -> {e.filename2}"
    advice = _OS_ADVICE.get(e.errno or -1, "")
    text = e.strerror or str(e) or type(e).__name__
    return f"{where or what}: {what} failed: {text}" + (f"; {advice}" if advice else "")


@contextlib.contextmanager
def os_errors(what: str, error: type = ArtifactError) -> Iterator[None]:
    """Turn an OSError raised in the block into `error` (one line naming the path), never a traceback."""
    try:
        yield
    except OSError as e:
        raise error(os_error_message(e, what)) from None
