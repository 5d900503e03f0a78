"""`trtpipe <stage>`: thin command-line entries for every stage.

Imports stay lazy so `--help` is instant. A PipelineError becomes one line on stderr and
its exit status (1, or 2 for usage and bad report input); any other exception is a bug
and keeps its traceback."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from .errors import PipelineError

A = "artifacts"


def _cfg(args: argparse.Namespace) -> Any:
    from .config import load_config

    return load_config(args.config, args.params)


def _print(obj: Any, as_json: bool, summary: str) -> None:
    print(json.dumps(obj, indent=2, default=str) if as_json else summary)


def cmd_prepare(a: argparse.Namespace) -> None:
    from .stages import prepare

    r = prepare.run(_cfg(a), a.out)
    d = r["data"]
    _print(r, a.json, f"prepare: {r['weights']['from']} weights; train/calib/eval = {d['train']}/{d['calibration']}/{d['evaluation']}; "
           f"PyTorch eval top-1 {100 * (r['pytorch_eval_top1'] or 0):.2f}% -> {a.out}")


def cmd_export(a: argparse.Namespace) -> None:
    from .stages import export

    r = export.run(_cfg(a), a.checkpoint, a.out)
    _print(r, a.json, f"export: opset {r['opset']}, {r['nodes']} nodes, inputs {[i['name'] for i in r['inputs']]} -> {a.out}/model.onnx")


def cmd_validate(a: argparse.Namespace) -> None:
    from .stages import validate

    r = validate.run(_cfg(a), a.checkpoint, a.onnx, a.eval_data, a.out)
    worst = max(o["max_abs_diff"] for o in r["outputs"].values())
    _print(r, a.json, f"validate: ONNX matches PyTorch on {r['samples']} samples (max abs diff {worst:.2e}) -> {a.out}")


def cmd_calibrate(a: argparse.Namespace) -> None:
    from .stages import calibrate

    r = calibrate.run(_cfg(a), a.onnx, a.calib_data, a.out)
    _print(r, a.json, f"calibrate: {r.get('method')} over {r.get('samples')} samples, {r.get('tensors')} tensors -> {a.out}")


def cmd_build(a: argparse.Namespace) -> None:
    from .stages import build

    out = a.out or Path(A, "build", a.precision)
    calib_dir = a.calib_dir if a.precision == "int8" else None
    calib_data = a.calib_data if a.precision == "int8" else None
    r = build.run(_cfg(a), a.precision, a.onnx, out, calib_dir=calib_dir, calib_data=calib_data)
    _print(r, a.json, f"build@{a.precision}: {r['backend']} {r['backend_version']}, {r['engine_bytes']} bytes in {r['build_seconds']} s -> {out}")


def cmd_evaluate(a: argparse.Namespace) -> None:
    from .stages import evaluate

    build_dir = a.build_dir or Path(A, "build", a.precision)
    out = a.out or Path(A, "eval", f"{a.precision}.json")
    r = evaluate.run(_cfg(a), a.precision, build_dir, a.fp32_dir, a.eval_data, a.reference, out)
    m = ", ".join(f"{k} {v:.4g}" for k, v in r["metrics"].items() if isinstance(v, (int, float)))
    _print(r, a.json, f"evaluate@{a.precision}: {r['backend']}: {m} -> {out}")


def cmd_compare(a: argparse.Namespace) -> None:
    from .stages import compare

    r = compare.run(_cfg(a), a.eval_dir, a.out)
    if a.json:
        _print(r, True, "")
    else:
        print((Path(a.out) / "compare.md").read_text(), end="")


def cmd_publish(a: argparse.Namespace) -> None:
    from .stages import publish

    r = publish.run(_cfg(a), a.build_root, a.eval_dir, a.registry, a.out, a.prepare_dir, a.calib_dir, a.onnx)
    _print(r, a.json, "\n".join(f"publish: {v['version']} ({v['status']})" for v in r["published"]))


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, default=None, help="configs/<model>.yaml (default: the one params.yaml names)")
    p.add_argument("--params", type=Path, default=Path("params.yaml"), help="params file with overrides (default: params.yaml)")
    p.add_argument("--json", action="store_true", help="print the stage's report as JSON")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="trtpipe", description="PyTorch -> ONNX -> TensorRT (FP32/FP16/INT8), validated, compared, versioned.")
    parser.add_argument("--version", action="version", version=f"trtpipe {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="<stage>", required=True)

    def stage(name: str, fn: Callable[[argparse.Namespace], None], help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        _add_common(p)
        p.set_defaults(func=fn)
        return p

    p = stage("prepare", cmd_prepare, "train (built-in model) or load the checkpoint; split and preprocess the data")
    p.add_argument("--out", type=Path, default=Path(A, "prepare"))
    p = stage("export", cmd_export, "export the PyTorch model to ONNX (dynamic batch) and check it")
    p.add_argument("--checkpoint", type=Path, default=Path(A, "prepare", "model.pt"))
    p.add_argument("--out", type=Path, default=Path(A, "export"))
    p = stage("validate", cmd_validate, "compare the ONNX in onnxruntime against PyTorch on real samples; fail beyond tolerance")
    p.add_argument("--checkpoint", type=Path, default=Path(A, "prepare", "model.pt"))
    p.add_argument("--onnx", type=Path, default=Path(A, "export", "model.onnx"))
    p.add_argument("--eval-data", type=Path, default=Path(A, "prepare", "eval.npz"))
    p.add_argument("--out", type=Path, default=Path(A, "validate"))
    p = stage("calibrate", cmd_calibrate, "INT8 calibration: ranges, TensorRT cache and Q/DQ ONNX")
    p.add_argument("--onnx", type=Path, default=Path(A, "export", "model.onnx"))
    p.add_argument("--calib-data", type=Path, default=Path(A, "prepare", "calib.npy"))
    p.add_argument("--out", type=Path, default=Path(A, "calibrate"))
    p = stage("build", cmd_build, "build one precision's engine (TensorRT) or model (onnxruntime)")
    p.add_argument("--precision", required=True, choices=["fp32", "fp16", "int8"])
    p.add_argument("--onnx", type=Path, default=Path(A, "export", "model.onnx"))
    p.add_argument("--calib-dir", type=Path, default=Path(A, "calibrate"))
    p.add_argument("--calib-data", type=Path, default=Path(A, "prepare", "calib.npy"))
    p.add_argument("--out", type=Path, default=None, help="default: artifacts/build/<precision>")
    p = stage("evaluate", cmd_evaluate, "accuracy, agreement with FP32 and PyTorch, latency of one variant")
    p.add_argument("--precision", required=True, choices=["fp32", "fp16", "int8"])
    p.add_argument("--build-dir", type=Path, default=None, help="default: artifacts/build/<precision>")
    p.add_argument("--fp32-dir", type=Path, default=Path(A, "build", "fp32"))
    p.add_argument("--eval-data", type=Path, default=Path(A, "prepare", "eval.npz"))
    p.add_argument("--reference", type=Path, default=Path(A, "validate", "reference.npz"))
    p.add_argument("--out", type=Path, default=None, help="default: artifacts/eval/<precision>.json")
    p = stage("compare", cmd_compare, "the variants side by side: compare.json, compare.md, tradeoff.png")
    p.add_argument("--eval-dir", type=Path, default=Path(A, "eval"))
    p.add_argument("--out", type=Path, default=Path(A, "compare"))
    p = stage("publish", cmd_publish, "publish each variant as a versioned artifact with a manifest")
    p.add_argument("--build-root", type=Path, default=Path(A, "build"))
    p.add_argument("--eval-dir", type=Path, default=Path(A, "eval"))
    p.add_argument("--registry", type=Path, default=None, help="default: publish.registry from the config")
    p.add_argument("--prepare-dir", type=Path, default=Path(A, "prepare"))
    p.add_argument("--calib-dir", type=Path, default=Path(A, "calibrate"))
    p.add_argument("--onnx", type=Path, default=Path(A, "export", "model.onnx"))
    p.add_argument("--out", type=Path, default=Path(A, "publish", "published.json"))
    for extra in _extra_commands:
        extra(sub)
    return parser


# Other modules (gate, artifacts) register their subcommands here.
_extra_commands: list[Callable[[Any], None]] = []


def _load_extras() -> None:
    import importlib

    if _extra_commands:
        return
    for mod in ("pipeline.gate_cli", "pipeline.artifacts_cli"):
        try:
            m = importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name != mod:
                raise
            continue
        _extra_commands.append(m.register)


def main(argv: Optional[Sequence[str]] = None) -> int:
    _load_extras()
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except PipelineError as e:
        msg = " ".join(str(e).split())
        print(f"trtpipe {args.command}: error: {msg}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"trtpipe {args.command}: interrupted; outputs left as they were", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
