"""`trtpipe artifacts list | show VERSION | verify [VERSION] | export --triton DIR | pull [MODEL] --to DIR`:
the published versions.

Registered into the main CLI by pipeline.cli._load_extras through `register(subparsers)`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Mapping, Optional

from .cli_args import path_arg
from .errors import ArtifactError
from .manifest import KEY_ENV
from .registry import DEFAULT_REGISTRY

DEFAULT_POINTERS = Path("artifacts", "publish", "current")


def _fmt(v: Any, spec: str = "", none: str = "-") -> str:
    if v is None:
        return none
    try:
        return format(v, spec)
    except (TypeError, ValueError):
        return str(v)


def _size(n: Optional[int]) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    line = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def cmd_list(a: argparse.Namespace) -> None:
    from .registry import leftover_staging, list_versions

    rows = list_versions(a.registry)
    if a.json:
        print(json.dumps({"registry": str(a.registry), "versions": rows}, indent=2, default=str))
        return
    if not rows:
        print(f"no published versions in {a.registry}" + ("" if Path(a.registry).is_dir() else " (no such folder; run trtpipe publish)"))
        return
    body = []
    for r in rows:
        if "error" in r:
            body.append([r["version"], "?", "?", "?", "-", "-", "-", "-", "-", "UNREADABLE"])
            continue
        lat = f"{_fmt(r['latency_ms'], '.3f')} @{r['latency_batch']}" if r.get("latency_ms") is not None else "-"
        body.append(
            [
                r["version"], r["precision"], r["backend"], r["device"] + (f" ({r['gpu']})" if r.get("gpu") else ""),
                _fmt(r.get("top1"), ".2f"), _fmt(r.get("top1_agreement"), ".4f"), lat, _size(r.get("bytes")),
                (r.get("published_at") or "-")[:19], "",
            ]
        )
    header = ["VERSION", "PRECISION", "BACKEND", "DEVICE", "TOP1 %", "AGREE FP32", "P50 MS @BS", "SIZE", "PUBLISHED", ""]
    print(_table(body, header))
    print(f"{len(rows)} version(s) in {a.registry}")
    for p in leftover_staging(a.registry):
        print(f"note: {p} is left from an interrupted publish; delete it once no publish is running")


def _show_text(m: Mapping[str, Any], path: Path) -> str:
    out = [f"{m['version']}  ({path})", ""]

    def section(title: str, items: Mapping[str, Any], width: int = 20) -> None:
        out.append(title)
        for k, v in items.items():
            if isinstance(v, (dict, list)):
                v = json.dumps(v, separators=(", ", ": "), default=str)
            out.append(f"  {k:<{width}} {v}")
        out.append("")

    section("variant", {
        "model": m.get("model"), "precision": m.get("precision"),
        "backend": f"{m.get('backend')} {m.get('backend_version')}", "device": m.get("device"),
        "artifact": m.get("artifact"), "published": m.get("published_at"), "schema": m.get("schema_version"),
    })
    section("inputs (sha256)", {**m.get("inputs", {}), "digest": m.get("inputs_digest")})
    section("software", m.get("software") or {})
    section("hardware", m.get("hardware") or {})
    section("build settings", {**(m.get("settings") or {}), **{k: v for k, v in (m.get("build") or {}).items() if v is not None}})
    if m.get("io"):
        section("io", m["io"])
    metrics = m.get("metrics") or {}
    met: dict[str, Any] = {}
    for k, v in (metrics.get("task") or {}).items():
        met[k] = f"{v:.2f} %" if isinstance(v, (int, float)) else v
    if metrics.get("top1_agreement_fp32") is not None:
        met["top1 agreement fp32"] = f"{metrics['top1_agreement_fp32']:.4f}"
    for name, ag in (metrics.get("agreement_fp32") or {}).items():
        if isinstance(ag, dict):
            met[f"{name} vs fp32"] = f"cosine {ag.get('cosine', float('nan')):.6f}, max |diff| {ag.get('max_abs_diff', float('nan')):.3g}"
    for r in metrics.get("latency") or []:
        met[f"latency bs={r.get('batch_size')}"] = (
            f"p50 {_fmt(r.get('p50_ms'), '.3f')} ms, p99 {_fmt(r.get('p99_ms'), '.3f')} ms, {_fmt(r.get('throughput_per_s'), '.0f')}/s"
        )
    if metrics.get("backend"):
        dev = metrics.get("device") or {}
        met["measured by"] = f"{metrics['backend']} on {dev.get('gpu') or dev.get('cpu') or dev.get('device') or '?'}"
    section("metrics", met)
    out.append("files")
    for name, f in (m.get("files") or {}).items():
        out.append(f"  {name:<20} {f.get('role', ''):<18} {_size(f.get('bytes')):>10}  sha256 {f.get('sha256')}")
    for n in m.get("notes") or []:
        out.append(f"note: {n}")
    return "\n".join(out)


def cmd_show(a: argparse.Namespace) -> None:
    from .manifest import read_manifest
    from .registry import resolve

    vdir = resolve(a.version, a.registry)
    m = read_manifest(vdir)
    print(json.dumps(m, indent=2, default=str) if a.json else _show_text(m, vdir))


SIGNATURES_UNCHECKED = (f"signatures not checked (${KEY_ENV} is not set): the digests and the ledger detect "
                        "accidental corruption and edits by someone who does not also rewrite the ledger; they cannot "
                        "stop a writer who rewrites both (set the key when publishing and verifying for that)")
SIGNATURES_CHECKED = f"signatures checked under ${KEY_ENV}: every manifest and ledger line must carry a valid one"


def _pointers(a: argparse.Namespace) -> Optional[Path]:
    """The publish pointers to verify: --pointers, else publish/current beside the default
    registry (None: not checked, e.g. another --registry without --pointers)."""
    if a.pointers is not None:
        if str(a.pointers) == "none":
            return None
        if not Path(a.pointers).is_dir():
            raise ArtifactError(f"{a.pointers}: --pointers is not a folder; give the publish/current folder (or none)")
        return Path(a.pointers)
    if Path(a.registry) == Path(DEFAULT_REGISTRY):
        return DEFAULT_POINTERS if DEFAULT_POINTERS.is_dir() else None
    return None


def cmd_verify(a: argparse.Namespace) -> None:
    from .compat import probe_here
    from .manifest import signing_key
    from .registry import check_registry_path, leftover_staging, model_dirs, read_ledger, repair, verify_all, version_dirs

    check_registry_path(a.registry)
    repaired = repair(a.registry) if a.repair else []
    if not a.version and not version_dirs(a.registry) and not any(read_ledger(a.registry, d.name).entries
                                                                   for d in model_dirs(a.registry)):
        raise ArtifactError(f"{a.registry}: no published versions to verify; run trtpipe publish (or pass --registry)")
    pointers = None if a.version else _pointers(a)
    here = None if a.integrity_only else probe_here()
    results = verify_all(a.registry, [a.version] if a.version else None, here=here, integrity_only=a.integrity_only,
                         pointers=pointers)
    failed = [r for r in results if not r.ok(a.integrity_only)]
    keyed = signing_key() is not None
    if a.json:
        print(json.dumps({"registry": str(a.registry), "here": here, "integrity_only": a.integrity_only,
                          "signatures_checked": keyed, "signatures": SIGNATURES_CHECKED if keyed else SIGNATURES_UNCHECKED,
                          "pointers": str(pointers) if pointers is not None else None, "repaired": repaired,
                          "results": [r.as_dict() for r in results]}, indent=2, default=str))
    else:
        for note in repaired:
            print(f"repaired: {note}")
        print(SIGNATURES_CHECKED if keyed else SIGNATURES_UNCHECKED)
        if here is not None:
            trt = here.get("tensorrt") or "none"
            gpu = f"{here.get('gpu')} (compute capability {here.get('compute_capability')})" if here.get("compute_capability") else "none"
            print(f"here: TensorRT {trt}; GPU {gpu}; onnxruntime {here.get('onnxruntime') or 'none'}")
        for r in results:
            status = "OK  " if r.ok(a.integrity_only) else "FAIL"
            what = ((f"{r.checked_files} files match" if r.checked_files else "checked") if r.ok(integrity_only=True)
                    else "content does not match the manifest" if r.checked_files else "does not verify")
            run = "" if r.runs_here is None else ("; runs here" if r.runs_here else "; cannot run here")
            print(f"{status} {r.version}: {what}{run}")
            for f in r.findings:
                print(f"     {f.kind}: {f}")
        for p in leftover_staging(a.registry):
            print(f"note: {p} is left from an interrupted publish; delete it once no publish is running")
    if failed:
        first = failed[0].failures(a.integrity_only)[0]
        versions = [r for r in results if r.what == "version"]
        counts = f"{sum(1 for r in failed if r.what == 'version')} of {len(versions)} version(s) failed"
        ptrs = [r for r in results if r.what == "pointer"]
        if ptrs:
            counts += f", and {sum(1 for r in failed if r.what == 'pointer')} of {len(ptrs)} publish pointer(s) " \
                      f"({pointers})"
        raise ArtifactError(
            f"verify: {counts}; {failed[0].version}: {first}"
            + ("" if a.integrity_only or any(f.kind == "integrity" for f in failed[0].findings) else
               " (only the integrity of the files: --integrity-only)")
        )


def cmd_export(a: argparse.Namespace) -> None:
    from .triton import export

    written = export(a.registry, a.triton, a.version)
    if a.json:
        print(json.dumps({"triton": str(a.triton), "models": written}, indent=2))
        return
    for name, w in written.items():
        print(f"{a.triton}/{name}: {', '.join(f'{arch} {f}' for arch, f in w['files'].items())} from {', '.join(w['versions'])}")


def cmd_pull(a: argparse.Namespace) -> None:
    from .pull import machine_here, machine_named, pull, text

    named = a.for_cc is not None or a.for_tensorrt is not None
    machine = machine_named(a.for_cc, a.for_tensorrt) if named else machine_here()
    report = pull(a.registry, a.to, machine, a.model, a.precision)
    print(report.model_dump_json(indent=2) if a.json else text(report))


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "artifacts", help="list, show, verify, export and pull published versions",
        description="The published versions in the registry: list them, show one's manifest, verify hashes and whether it can run here.",
    )
    sub = p.add_subparsers(dest="artifacts_command", metavar="<command>", required=True)

    def common(q: argparse.ArgumentParser) -> None:
        q.add_argument("--registry", type=path_arg, default=DEFAULT_REGISTRY, help=f"registry folder (default: {DEFAULT_REGISTRY})")
        q.add_argument("--json", action="store_true", help="print JSON")

    q = sub.add_parser("list", help="the published versions as a table", description="The published versions as a table.")
    common(q)
    q.set_defaults(func=cmd_list)
    q = sub.add_parser("show", help="one version's manifest", description="One version's manifest, readable (or --json).")
    q.add_argument("version", help="version string, a unique part of it (e.g. its hash8), or a version folder")
    common(q)
    q.set_defaults(func=cmd_show)
    q = sub.add_parser(
        "verify", help="recompute every hash; check the version can run here",
        description="Recompute every file's sha256 against the manifest and check the manifest against this machine "
        "(TensorRT version and compute capability for engines, onnxruntime for models). Exit 1 on any failure.",
    )
    q.add_argument("version", nargs="?", help="one version (default: all)")
    q.add_argument("--integrity-only", action="store_true", help="check the files only, not whether they can run here")
    q.add_argument("--pointers", type=path_arg, default=None,
                   help=f"the publish pointers folder whose copies must be byte-identical to their versions (default: "
                   f"{DEFAULT_POINTERS} with the default registry; 'none' to skip)")
    q.add_argument("--repair", action="store_true",
                   help="first complete what an interrupted publish left: record a complete version whose ledger line "
                   "is missing, remove a ledger line cut short")
    common(q)
    q.set_defaults(func=cmd_verify)
    q = sub.add_parser("export", help="write a Triton model repository from published versions",
                       description="Write a Triton Inference Server model repository (config.pbtxt, one engine per "
                       "compute capability) from the latest published version per architecture, or --version ones.")
    q.add_argument("--triton", type=path_arg, required=True, help="the model repository folder to write")
    q.add_argument("--version", action="append", default=None, help="a version to export (repeatable; default: latest per architecture)")
    common(q)
    q.set_defaults(func=cmd_export)
    q = sub.add_parser(
        "pull", help="copy the published version that runs on this machine (or --for-cc/--for-tensorrt) to --to",
        description="Pick, per precision, the published version of MODEL that runs on this machine (its compute "
        "capability and TensorRT) or on the machine --for-cc/--for-tensorrt name: an engine for that GPU first, then a "
        "hardware-compatible (ampere_plus) engine, then an onnxruntime (CPU) model; the newest publish within a rule. "
        "Verify it and copy its files and manifest to DIR/<precision>/ (DIR new or empty; never overwritten).")
    q.add_argument("model", nargs="?", help="the model (default: the only one in the registry)")
    q.add_argument("--to", type=path_arg, required=True, metavar="DIR",
                   help="folder to copy into (must not exist, or be empty)")
    q.add_argument("--precision", choices=("fp32", "fp16", "int8"), default=None,
                   help="one precision (default: every published precision)")
    q.add_argument("--for-cc", default=None, metavar="CC",
                   help="pull for a machine with this compute capability (e.g. 9.0; none: no GPU) instead of this one; "
                   "needs --for-tensorrt")
    q.add_argument("--for-tensorrt", default=None, metavar="VERSION",
                   help="that machine's TensorRT version (e.g. 10.16; none: no TensorRT)")
    common(q)
    q.set_defaults(func=cmd_pull)
