"""`trtpipe artifacts pull`: the published version of a model that runs on a machine, copied out.

The machine is this one (TensorRT version and compute capability as pipeline.compat probes them)
or one named with `--for-cc 9.0 --for-tensorrt 10.16` (a fleet's deploy script; tests). Among the
published versions of the model, per precision (every published precision, or `--precision`),
those that pipeline.compat says run there are ranked by one rule each, the first rule that has a
version wins, and within a rule the newest publish:

1. `gpu`: a TensorRT engine built for this compute capability with this TensorRT;
2. `ampere_plus`: a hardware-compatible engine (build.hardware_compatibility: ampere_plus, same
   TensorRT) built on another GPU, on a machine of compute capability 8.0 or later;
3. `onnxruntime`: an onnxruntime (CPU) model, which runs on any machine.

The picked version is verified first (every file against its manifest, the manifest against its
own digests and the registry's ledger: pipeline.registry.verify), then its files and manifest are
copied to `--to DIR/<precision>/` (the layout of publish/current) in a hidden folder beside DIR,
checked again, and renamed into place: DIR must not exist or be empty, and is never overwritten.
A precision that has no version for the machine refuses the whole pull in one line naming what
each published version was built for and what the machine is."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Optional

from pydantic import BaseModel, ConfigDict

from .errors import ArtifactError, UsageError
from .manifest import MANIFEST, hardware_compatibility, normalize_cc, read_manifest
from .registry import DEFAULT_REGISTRY, check_registry_path, publish_order, version_dirs

RULES = {
    "gpu": "an engine for this GPU",
    "ampere_plus": "a hardware-compatible engine (ampere_plus)",
    "onnxruntime": "onnxruntime (CPU), which runs on any machine",
}
PRECISION_ORDER = {"fp32": 0, "fp16": 1, "int8": 2}


class Machine(BaseModel):
    """What an artifact is pulled for: this machine as probed, or one named on the command line."""

    model_config = ConfigDict(extra="forbid")
    compute_capability: Optional[str]  # None: no CUDA GPU
    tensorrt: Optional[str]  # None: no TensorRT
    gpu: Optional[str] = None
    onnxruntime: Optional[str] = None  # probed only; a named machine's is not checked
    named: bool = False
    errors: dict[str, str] = {}  # why a probe found nothing (tensorrt_error, gpu_error, onnxruntime_error)

    def here(self) -> dict[str, Any]:
        """The `here` mapping of pipeline.compat."""
        out: dict[str, Any] = {"compute_capability": self.compute_capability, "tensorrt": self.tensorrt,
                               "gpu": self.gpu, **self.errors}
        if not self.named:
            out["onnxruntime"] = self.onnxruntime
        return out

    def describe(self) -> str:
        """'compute capability 8.6 / TensorRT 10.16 here' ('... (--for-cc/--for-tensorrt)' for a named
        machine), or 'this machine (no CUDA GPU, no TensorRT)'."""
        gpu = f"compute capability {self.compute_capability}" if self.compute_capability else "no CUDA GPU"
        trt = f"TensorRT {self.tensorrt}" if self.tensorrt else "no TensorRT"
        if self.compute_capability and self.tensorrt:
            return f"{gpu} / {trt} " + ("(--for-cc/--for-tensorrt)" if self.named else "here")
        return ("the machine --for-cc/--for-tensorrt name" if self.named else "this machine") + f" ({gpu}, {trt})"


class Pick(BaseModel):
    """One precision's pick and where it was copied."""

    model_config = ConfigDict(extra="forbid")
    precision: str
    version: str
    backend: str
    rule: str  # gpu | ampere_plus | onnxruntime
    why: str
    source: str
    to: Optional[str] = None
    files: list[str] = []


class PullReport(BaseModel):
    """What `trtpipe artifacts pull` picked and copied (its --json)."""

    model_config = ConfigDict(extra="forbid")
    kind: str = "trtpipe.pull"
    model: str
    registry: str
    machine: Machine
    to: Optional[str] = None
    picks: list[Pick]
    skipped: list[str] = []


# --------------------------------------------------------------------------- the machine


def machine_here() -> Machine:
    """This machine, as pipeline.compat probes it."""
    from .compat import probe_here

    h = probe_here()
    errors = {k: str(v) for k, v in h.items() if k.endswith("_error") and v}
    return Machine(compute_capability=normalize_cc(h.get("compute_capability")), tensorrt=h.get("tensorrt"),
                   gpu=h.get("gpu"), onnxruntime=h.get("onnxruntime"), errors=errors)


def machine_named(cc: Optional[str], tensorrt: Optional[str]) -> Machine:
    """The machine `--for-cc CC --for-tensorrt VERSION` names ('none' for either: it has none)."""
    if (cc is None) != (tensorrt is None):
        raise UsageError("--for-cc and --for-tensorrt go together (an engine runs only with the TensorRT that built "
                         "it, on a GPU it was built for); give both, e.g. --for-cc 9.0 --for-tensorrt 10.16")
    norm = None if str(cc).lower() == "none" else normalize_cc(cc)
    if norm is not None and not _is_cc(norm):
        raise UsageError(f"--for-cc {cc!r}: give a compute capability like 8.6 or 9.0 (or none: a machine without a GPU)")
    trt = None if str(tensorrt).lower() == "none" else str(tensorrt)
    if trt is not None and not trt[:1].isdigit():
        raise UsageError(f"--for-tensorrt {tensorrt!r}: give a TensorRT version like 10.16 or 8.6.1 (or none)")
    return Machine(compute_capability=norm, tensorrt=trt, named=True)


def _is_cc(cc: str) -> bool:
    major, _, minor = cc.partition(".")
    return major.isdigit() and minor.isdigit()


# --------------------------------------------------------------------------- choosing


def _built_for(m: dict[str, Any]) -> str:
    """'compute capability 9.0, TensorRT 8.6.1' (an engine), or 'onnxruntime 1.20.1, cpu'."""
    from .compat import engine_needs

    if m.get("backend") == "tensorrt":
        trt = (m.get("software") or {}).get("tensorrt") or m.get("backend_version")
        cc = (m.get("hardware") or {}).get("compute_capability")
        return f"{engine_needs(cc, hardware_compatibility(m))}, TensorRT {trt}"
    return f"{m.get('backend')} {m.get('backend_version')}, {m.get('device') or 'cpu'}"


def _rule(m: dict[str, Any], machine: Machine) -> Optional[str]:
    """The rule under which version `m` runs on `machine`, or None when it does not run there."""
    from .compat import compat_findings

    if compat_findings(m, machine.here()):
        return None
    if m.get("backend") != "tensorrt":
        return "onnxruntime"
    built = normalize_cc((m.get("hardware") or {}).get("compute_capability"))
    return "gpu" if built == machine.compute_capability else "ampere_plus"


def _why(rule: str, m: dict[str, Any], machine: Machine, fitting: int, engines: int) -> str:
    """One sentence: the rule that picked `m` and why no better rule did."""
    newest = f"; the newest of {fitting} that fit" if fitting > 1 else ""
    if rule == "gpu":
        return f"{RULES[rule]}: built for {_built_for(m)}; the machine: {machine.describe()}{newest}"
    if rule == "ampere_plus":
        return (f"{RULES[rule]}: runs on {_built_for(m)}; none is published for compute capability "
                f"{machine.compute_capability} itself{newest}")
    none = "none is published" if not engines else f"none of the {engines} published fits {machine.describe()}"
    return f"{RULES[rule]}; an engine would be preferred, but {none}{newest}"


def _refusal(model: str, precision: str, machine: Machine, candidates: list[dict[str, Any]]) -> ArtifactError:
    engines = all(m.get("backend") == "tensorrt" for m in candidates)
    what = "engine" if engines else "version"
    published = ", ".join(f"{m['version']} ({_built_for(m)})" for m in candidates)
    if machine.named:
        fix = "build on such a GPU or publish for it"
    elif machine.compute_capability:
        fix = "build on this GPU or publish for it"
    else:
        fix = "pull on a machine with such a GPU (or name one with --for-cc/--for-tensorrt), or publish an onnxruntime version"
    return ArtifactError(f"{model} {precision}: no published {what} for {machine.describe()}; published: {published}; {fix}")


def _read(registry: Path, model: str) -> tuple[list[tuple[Path, dict[str, Any]]], list[str]]:
    """(version folder, manifest) of every readable version of `model`, and one note per unreadable one."""
    found, skipped = [], []
    for d in version_dirs(registry):
        if d.parent.name != model:
            continue
        try:
            found.append((d, read_manifest(d)))
        except ArtifactError as e:
            skipped.append(f"{d.name}: not considered ({str(e).split(': ', 1)[-1]})")
    return found, skipped


def _model(registry: Path, model: Optional[str]) -> str:
    names = sorted({d.parent.name for d in version_dirs(registry)})
    if not names:
        where = registry if registry.is_dir() else f"{registry} (no such folder)"
        raise ArtifactError(f"no published versions in {where}; run trtpipe publish (or dvc pull), or pass --registry")
    if model is None:
        if len(names) > 1:
            raise UsageError(f"{registry} holds {len(names)} models ({', '.join(names)}); name one: "
                             "trtpipe artifacts pull MODEL --to DIR")
        return names[0]
    if model not in names:
        raise ArtifactError(f"no published model '{model}' in {registry}; it holds {', '.join(names)}")
    return model


def choose(registry: str | Path, machine: Machine, model: Optional[str] = None,
           precision: Optional[str] = None) -> PullReport:
    """Pick one version per precision for `machine` (nothing is copied or verified yet)."""
    registry = Path(registry)
    check_registry_path(registry)
    model = _model(registry, model)
    found, skipped = _read(registry, model)
    by_precision: dict[str, list[tuple[Path, dict[str, Any]]]] = {}
    for d, m in found:
        by_precision.setdefault(str(m.get("precision")), []).append((d, m))
    if precision is not None and precision not in by_precision:
        raise ArtifactError(f"{model} has no published {precision} version in {registry}; published precisions: "
                            f"{', '.join(sorted(by_precision, key=lambda p: PRECISION_ORDER.get(p, 9))) or 'none'}")
    picks = []
    for p in sorted(by_precision if precision is None else [precision], key=lambda p: PRECISION_ORDER.get(p, 9)):
        candidates = sorted(by_precision[p], key=lambda dm: publish_order(registry, dm[1]))
        ruled = [(r, d, m) for d, m in candidates if (r := _rule(m, machine)) is not None]
        if not ruled:
            raise _refusal(model, p, machine, [m for _, m in candidates])
        rule = next(r for r in RULES if any(rr == r for rr, _, _ in ruled))
        same = [(d, m) for r, d, m in ruled if r == rule]
        d, m = same[-1]  # the newest publish
        engines = sum(1 for _, c in candidates if c.get("backend") == "tensorrt")
        picks.append(Pick(precision=p, version=m["version"], backend=m["backend"], rule=rule,
                          why=_why(rule, m, machine, len(same), engines), source=str(d)))
    return PullReport(model=model, registry=str(registry), machine=machine, picks=picks, skipped=skipped)


# --------------------------------------------------------------------------- copying


def _verified(registry: Path, source: Path) -> dict[str, Any]:
    """The manifest of `source` once its files, its own digests and the registry's ledger check out."""
    from .registry import verify

    res = verify(source, registry, integrity_only=True)
    bad = res.failures(integrity_only=True)
    if bad:
        raise ArtifactError(f"{source}: refusing to pull {res.version}: {bad[0]}; restore the folder (dvc pull or "
                            "dvc checkout) or republish it")
    return read_manifest(source)


def _copy_version(source: Path, m: dict[str, Any], dst: Path) -> list[str]:
    """Copy the version's files and manifest into `dst` (a new folder) and check the copies."""
    from .registry import integrity_findings

    dst.mkdir()
    names = [*sorted(m.get("files") or {}), MANIFEST]
    for name in names:
        shutil.copyfile(source / name, dst / name)
    bad = integrity_findings(dst, m)
    if bad:
        raise ArtifactError(f"{source}: the copy does not match the manifest ({bad[0]}): the version changed while "
                            "being copied; pull again")
    return names


def _check_not_in_registry(registry: Path, to: Path) -> None:
    reg, dst = registry.resolve(), to.resolve()
    if dst == reg or reg in dst.parents or dst in reg.parents:
        raise ArtifactError(f"--to {to}: is {'inside ' if reg in dst.parents else ''}the registry {registry} (or holds "
                            "it); give a folder outside it")


def pull(registry: str | Path, to: str | Path, machine: Machine, model: Optional[str] = None,
         precision: Optional[str] = None) -> PullReport:
    """Choose (`choose`), verify each pick, and copy them to `to/<precision>/` in one rename."""
    from .fileio import new_dir, os_errors

    registry, to = Path(registry), Path(to)
    report = choose(registry, machine, model, precision)
    _check_not_in_registry(registry, to)
    manifests = {p.precision: _verified(registry, Path(p.source)) for p in report.picks}
    with os_errors(f"pulling into {to}"), new_dir(to, "trtpipe artifacts pull") as tmp:
        for p in report.picks:
            p.files = _copy_version(Path(p.source), manifests[p.precision], tmp / p.precision)
            p.to = str(to / p.precision)
    report.to = str(to)
    return report


def text(report: PullReport) -> str:
    """What `trtpipe artifacts pull` prints."""
    lines = [f"machine: {report.machine.describe()}"]
    for p in report.picks:
        lines.append(f"picked {report.model} {p.precision}: {p.version}")
        lines.append(f"  rule: {p.why}")
        if p.to:
            lines.append(f"  copied to {p.to} ({len(p.files)} files, verified against the manifest)")
    for s in report.skipped:
        lines.append(f"note: {s}")
    return "\n".join(lines)


__all__ = ["Machine", "Pick", "PullReport", "RULES", "choose", "machine_here", "machine_named", "pull", "text",
           "DEFAULT_REGISTRY"]
