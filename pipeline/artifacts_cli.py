"""`trtpipe artifacts list | show VERSION | verify [VERSION]`: the published versions.

Registered into the main CLI by pipeline.cli._load_extras through `register(subparsers)`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Mapping, Optional

from .cli_args import path_arg
from .errors import ArtifactError
from .registry import DEFAULT_REGISTRY


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


def cmd_verify(a: argparse.Namespace) -> None:
    from .compat import probe_here
    from .registry import leftover_staging, verify_all, version_dirs

    targets = [a.version] if a.version else version_dirs(a.registry)
    if not targets:
        raise ArtifactError(f"{a.registry}: no published versions to verify; run trtpipe publish (or pass --registry)")
    here = None if a.integrity_only else probe_here()
    results = verify_all(a.registry, targets, here=here, integrity_only=a.integrity_only)
    failed = [r for r in results if not r.ok(a.integrity_only)]
    if a.json:
        print(json.dumps({"registry": str(a.registry), "here": here, "integrity_only": a.integrity_only,
                          "results": [r.as_dict() for r in results]}, indent=2, default=str))
    else:
        if here is not None:
            trt = here.get("tensorrt") or "none"
            gpu = f"{here.get('gpu')} (compute capability {here.get('compute_capability')})" if here.get("compute_capability") else "none"
            print(f"here: TensorRT {trt}; GPU {gpu}; onnxruntime {here.get('onnxruntime') or 'none'}")
        for r in results:
            status = "OK  " if r.ok(a.integrity_only) else "FAIL"
            what = f"{r.checked_files} files match" if r.ok(integrity_only=True) else "content does not match the manifest"
            run = "" if r.runs_here is None else ("; runs here" if r.runs_here else "; cannot run here")
            print(f"{status} {r.version}: {what}{run}")
            for f in r.findings:
                print(f"     {f.kind}: {f}")
        for p in leftover_staging(a.registry):
            print(f"note: {p} is left from an interrupted publish; delete it once no publish is running")
    if failed:
        first = failed[0].failures(a.integrity_only)[0]
        raise ArtifactError(
            f"verify: {len(failed)} of {len(results)} version(s) failed; {failed[0].version}: {first}"
            + ("" if a.integrity_only or any(f.kind == "integrity" for f in failed[0].findings) else
               " (only the integrity of the files: --integrity-only)")
        )


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "artifacts", help="list, show and verify published versions",
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
    common(q)
    q.set_defaults(func=cmd_verify)
