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

from .cli_args import path_arg
from .errors import PipelineError

A = "artifacts"


def _cfg(args: argparse.Namespace) -> Any:
    from .config import load_config

    return load_config(args.config, args.params)


def _out(path: Any, key: str = "--out") -> Path:
    from .fileio import project_path

    return project_path(path, key)


def _print(obj: Any, as_json: bool, summary: str) -> None:
    if as_json:
        print(obj.model_dump_json(indent=2) if hasattr(obj, "model_dump_json") else
              json.dumps(obj, indent=2, default=str))
    else:
        print(summary)


def _timings(a: argparse.Namespace, report: Any) -> None:
    """`--timings FILE`: the stage's wall times and other run-to-run noise, which its report leaves out."""
    if getattr(a, "timings", None) is None:
        return
    from .fileio import write_json
    from .reports import peak_rss_mb, timings

    data = timings(report)
    data.setdefault("peak_rss_mb", peak_rss_mb())  # this process (calibrate's report measures its own)
    write_json(_claim_timings(a), data)


def _is_timings(data: bytes) -> bool:
    """What `--timings` writes: a JSON object whose keys are a stage name and its noise fields."""
    import json

    from .reports import NOISE

    try:
        d = json.loads(data)
    except ValueError:
        return False
    return isinstance(d, dict) and "stage" in d and set(d) <= {"stage", *NOISE, "candidates", "search"}


def _claim_timings(a: argparse.Namespace) -> Path:
    """`--timings FILE` may replace only an earlier timings file (never a checkpoint, a report or a folder)."""
    from .fileio import claim_file

    return claim_file(_out(a.timings, "--timings"), f"trtpipe {a.command}", "--timings", recognise=_is_timings,
                      kind="timings file")


def cmd_prepare(a: argparse.Namespace) -> None:
    from .stages import prepare

    r = prepare.run(_cfg(a), _out(a.out))
    _timings(a, r)
    d = r.data
    top1 = f"; PyTorch eval top-1 {r.pytorch_eval_top1:.2f}%" if r.pytorch_eval_top1 is not None else (
        "; no labels" if not d.labelled else "")
    _print(r, a.json, f"prepare: {r.weights['from']} weights; train/calib/eval = {d.train}/{d.calibration}/{d.evaluation}"
           f"{top1} -> {a.out}")


def cmd_export(a: argparse.Namespace) -> None:
    from .stages import export

    r = export.run(_cfg(a), a.checkpoint, _out(a.out))
    _timings(a, r)
    _print(r, a.json, f"export: opset {r.opset}, {r.nodes} nodes, inputs {[i.name for i in r.inputs]}, "
           f"outputs {[o.name for o in r.outputs]} -> {a.out}/model.onnx")


def cmd_validate(a: argparse.Namespace) -> None:
    from .stages import validate

    r = validate.run(_cfg(a), a.checkpoint, a.onnx, a.eval_data, _out(a.out))
    _timings(a, r)
    worst = max(o.max_abs_diff for o in r.outputs.values())
    _print(r, a.json, f"validate: ONNX matches PyTorch on {r.samples} samples, {len(r.outputs)} output(s) "
           f"(max abs diff {worst:.2e}) -> {a.out}")


def cmd_calibrate(a: argparse.Namespace) -> None:
    from .stages import calibrate

    r = calibrate.run(_cfg(a), a.onnx, a.calib_data, _out(a.out), validation=a.validation)
    _timings(a, r)
    skipped = f", {len(r.excluded)} left in higher precision" if r.excluded else ""
    wr = r.qdq.get("weight_rounding") or {}
    weights = [f"GPTQ rounding of {wr.get('weights', 0)} weights"] if wr.get("method") == "gptq" else []
    if r.qdq.get("bias_corrected_nodes") is not None:
        weights.append(f"bias correction of {r.qdq['bias_corrected_nodes']} nodes")
    extra = f"; {', '.join(weights)} in the Q/DQ ONNX" if weights else ""
    _print(r, a.json, f"calibrate: {r.method} over {r.samples} samples, {r.tensors} tensors{skipped}{extra}; cache "
           f"{r.cache['header']} -> {a.out}")


def cmd_tune(a: argparse.Namespace) -> None:
    from .stages import tune

    r = tune.run(_cfg(a), a.onnx, a.calib_dir, a.eval_data, _out(a.out), validation=a.validation,
                 calib_data=a.calib_data)
    _timings(a, r)
    kept = ", ".join(k["layer"] for k in r.kept[:6]) + (" ..." if len(r.kept) > 6 else "")
    ch = r.reference_points["chosen"]
    unit = "est. ns/sample" if r.latency_kind == "estimate" else "ms"
    _print(r, a.json, f"tune: keeps {len(r.kept)} of {len(r.layers)} layers in {r.keep_precision}"
           f"{f' ({kept})' if kept else ''}; {r.budget['metric']} {ch['metric_full']:.6g} on {r.samples['full']} "
           f"samples ({r.budget['text']}); cost {ch['cost']:.4g} {unit} (full INT8 "
           f"{r.reference_points['full_int8']['cost']:.4g}, all kept {r.reference_points['float']['cost']:.4g}); "
           f"{len(r.candidates)} candidates -> {a.out}")


def cmd_build(a: argparse.Namespace) -> None:
    from .stages import build

    out = _out(a.out or Path(A, "build", a.precision))
    calib_dir = a.calib_dir if a.precision in ("int8", "fp16") else None  # fp16: calibrate's maxima.json
    r = build.run(_cfg(a), a.precision, a.onnx, out, calib_dir=calib_dir, calib_data=a.calib_data,
                  validation=a.validation, tune_dir=a.tune_dir if a.precision == "int8" else None)
    _timings(a, r)
    _print(r, a.json, f"build@{a.precision}: {r.backend} {r.backend_version}, {r.engine_bytes} bytes in "
           f"{r.build_seconds} s -> {out}")


def cmd_evaluate(a: argparse.Namespace) -> None:
    from .stages import evaluate

    build_dir = a.build_dir or Path(A, "build", a.precision)
    out = _out(a.out or Path(A, "eval", f"{a.precision}.json"))
    r = evaluate.run(_cfg(a), a.precision, build_dir, a.fp32_dir, a.eval_data, a.reference, out)
    _timings(a, r)
    m = ", ".join(f"{k} {v:.4g}" for k, v in r.metrics.items())
    flags = f"; FLAGGED: {'; '.join(r.flags)}" if r.flags else ""
    _print(r, a.json, f"evaluate@{a.precision}: {r.backend}: {m or 'no task metrics'}{flags} -> {out}")


def cmd_compare(a: argparse.Namespace) -> None:
    from .stages import compare

    r = compare.run(_cfg(a), a.eval_dir, _out(a.out))
    if a.json:
        _print(r, True, "")
    else:
        print((Path(a.out) / "compare.md").read_text(), end="")


def cmd_publish(a: argparse.Namespace) -> None:
    from .fileio import claim_file
    from .stages import publish

    claim_file(_out(a.out), "publish", inputs=(a.build_root, a.eval_dir, a.prepare_dir, a.calib_dir, a.onnx, a.registry),
               recognise=_published_json, kind="published.json")
    r = publish.run(_cfg(a), a.build_root, a.eval_dir, a.registry, a.out, a.prepare_dir, a.calib_dir, a.onnx)
    _print(r, a.json, "\n".join(f"publish: {v['version']} ({v['status']})" for v in r["published"]))


def _published_json(data: bytes) -> bool:
    """published.json as publish writes it (claim_file's recogniser)."""
    try:
        d = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(d, dict) and isinstance(d.get("published"), list) and "registry" in d and "pointers" in d


def _config_path(a: argparse.Namespace) -> str:
    from .yamlio import load_yaml

    if a.config is not None:
        return str(a.config)
    params = load_yaml(a.params, "params file") if Path(a.params).exists() else {}
    return str((params or {}).get("config") or "")


def cmd_dvc(a: argparse.Namespace) -> None:
    from . import dvcgen
    from .errors import ConfigError

    cfg = _cfg(a)
    config_path = _config_path(a)
    if a.check:
        problems = dvcgen.check(cfg, config_path)
        if problems:
            raise ConfigError(f"dvc.yaml is out of date for {config_path}: " + "; ".join(problems[:8])
                              + (f" (and {len(problems) - 8} more)" if len(problems) > 8 else "")
                              + "; run `trtpipe dvc` to regenerate it")
        print(f"dvc.yaml lists every input of every stage for {config_path}")
        return
    from .fileio import write_text

    doc = dvcgen.generate(cfg, config_path)
    if dvcgen.needs_version_file(doc):  # trtpipe installed outside the project: its code via its version
        write_text(dvcgen.VERSION_FILE, dvcgen.installed_version())
    write_text("dvc.yaml", dvcgen.render(doc, config_path))
    print(f"dvc.yaml written for {config_path}")


def cmd_init(a: argparse.Namespace) -> None:
    from .project_init import init

    files = init(Path("."), a.name)
    print("init: wrote " + ", ".join(str(f) for f in files) + "; edit the config for your model, run `trtpipe dvc`, "
          "then `dvc repro` (needs `git init` and `dvc init` first)")


def _check_dvc_sync(a: argparse.Namespace) -> None:
    """Under `dvc repro`, a stage first checks that dvc.yaml watches everything it reads."""
    import os

    if not os.environ.get("DVC_STAGE") or a.command not in STAGES or not Path("dvc.yaml").is_file():
        return
    from . import dvcgen
    from .errors import ConfigError

    config_path = _config_path(a)
    problems = dvcgen.check(_cfg(a), config_path)
    if problems:
        raise ConfigError(f"dvc.yaml does not watch every input of this pipeline for {config_path}, so dvc repro "
                          f"would keep stale results: {'; '.join(problems[:4])}; run `trtpipe dvc` to regenerate "
                          "dvc.yaml, then dvc repro")


STAGES = ("prepare", "export", "validate", "calibrate", "tune", "build", "evaluate", "compare", "publish")


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=path_arg, default=None, help="configs/<model>.yaml (default: the one params.yaml names)")
    p.add_argument("--params", type=path_arg, default=Path("params.yaml"), help="params file with overrides (default: params.yaml)")
    p.add_argument("--json", action="store_true", help="print the stage's report as JSON")


def _add_verbosity(p: argparse.ArgumentParser) -> None:
    """-v/-q on a parser and every subcommand under it. SUPPRESS as the default, so that a flag
    given before the subcommand (`trtpipe -q build`) is not reset by the subcommand's default."""
    if not any("--verbose" in a.option_strings for a in p._actions):
        p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                       help="debug lines on stderr")
        p.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                       help="warnings and errors only on stderr; no progress bars")
    for a in p._actions:
        if isinstance(a, argparse._SubParsersAction):
            for child in a.choices.values():
                _add_verbosity(child)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="trtpipe", description="PyTorch -> ONNX -> TensorRT (FP32/FP16/INT8), validated, compared, versioned.")
    parser.add_argument("--version", action="version", version=f"trtpipe {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="<stage>", required=True)

    def stage(name: str, fn: Callable[[argparse.Namespace], None], help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        _add_common(p)
        if name in STAGES:
            p.add_argument("--timings", type=path_arg, default=None,
                           help="write the stage's wall times here (kept out of its report, so that the report "
                                "is the same on every run of the same inputs)")
        p.set_defaults(func=fn)
        return p

    p = stage("prepare", cmd_prepare, "train (built-in model) or load the checkpoint; split and preprocess the data")
    p.add_argument("--out", type=path_arg, default=Path(A, "prepare"))
    p = stage("export", cmd_export, "export the PyTorch model to ONNX (dynamic batch) and check it")
    p.add_argument("--checkpoint", type=path_arg, default=Path(A, "prepare", "model.pt"))
    p.add_argument("--out", type=path_arg, default=Path(A, "export"))
    p = stage("validate", cmd_validate, "compare the ONNX in onnxruntime against PyTorch on real samples; fail beyond tolerance")
    p.add_argument("--checkpoint", type=path_arg, default=Path(A, "prepare", "model.pt"))
    p.add_argument("--onnx", type=path_arg, default=Path(A, "export", "model.onnx"))
    p.add_argument("--eval-data", type=path_arg, default=Path(A, "prepare", "eval.npz"))
    p.add_argument("--out", type=path_arg, default=Path(A, "validate"))
    p = stage("calibrate", cmd_calibrate, "INT8 calibration: ranges, TensorRT cache and Q/DQ ONNX")
    p.add_argument("--onnx", type=path_arg, default=Path(A, "export", "model.onnx"))
    p.add_argument("--calib-data", type=path_arg, default=Path(A, "prepare", "calib.npz"))
    p.add_argument("--validation", type=path_arg, default=Path(A, "validate", "validate.json"),
                   help="validate.json that passed this ONNX (default: artifacts/validate/validate.json)")
    p.add_argument("--out", type=path_arg, default=Path(A, "calibrate"))
    p = stage("tune", cmd_tune, "the fewest layers kept out of INT8 so that the accuracy budget (tune:) holds")
    p.add_argument("--onnx", type=path_arg, default=Path(A, "export", "model.onnx"))
    p.add_argument("--calib-dir", type=path_arg, default=Path(A, "calibrate"))
    p.add_argument("--eval-data", type=path_arg, default=Path(A, "prepare", "eval.npz"))
    p.add_argument("--calib-data", type=path_arg, default=Path(A, "prepare", "calib.npz"),
                   help="calibration samples (TensorRT candidates, when the stage cache cannot be used)")
    p.add_argument("--validation", type=path_arg, default=Path(A, "validate", "validate.json"),
                   help="validate.json that passed this ONNX (default: artifacts/validate/validate.json)")
    p.add_argument("--out", type=path_arg, default=Path(A, "tune"))
    p = stage("build", cmd_build, "build one precision's engine (TensorRT) or model (onnxruntime)")
    p.add_argument("--precision", required=True, choices=["fp32", "fp16", "int8"])
    p.add_argument("--onnx", type=path_arg, default=Path(A, "export", "model.onnx"))
    p.add_argument("--calib-dir", type=path_arg, default=Path(A, "calibrate"))
    p.add_argument("--calib-data", type=path_arg, default=Path(A, "prepare", "calib.npz"),
                   help="calibration samples (TensorRT's calibrator; the fp16 range check)")
    p.add_argument("--validation", type=path_arg, default=Path(A, "validate", "validate.json"),
                   help="validate.json that passed this ONNX (default: artifacts/validate/validate.json)")
    p.add_argument("--tune-dir", type=path_arg, default=None,
                   help="int8 with build.int8_from_tune: the tune stage's folder (default: artifacts/tune)")
    p.add_argument("--out", type=path_arg, default=None, help="default: artifacts/build/<precision>")
    p = stage("evaluate", cmd_evaluate, "accuracy, agreement with FP32 and PyTorch, latency of one variant")
    p.add_argument("--precision", required=True, choices=["fp32", "fp16", "int8"])
    p.add_argument("--build-dir", type=path_arg, default=None, help="default: artifacts/build/<precision>")
    p.add_argument("--fp32-dir", type=path_arg, default=Path(A, "build", "fp32"))
    p.add_argument("--eval-data", type=path_arg, default=Path(A, "prepare", "eval.npz"))
    p.add_argument("--reference", type=path_arg, default=Path(A, "validate", "reference.npz"))
    p.add_argument("--out", type=path_arg, default=None, help="default: artifacts/eval/<precision>.json")
    p = stage("compare", cmd_compare, "the variants side by side: compare.json, compare.md, tradeoff.png")
    p.add_argument("--eval-dir", type=path_arg, default=Path(A, "eval"))
    p.add_argument("--out", type=path_arg, default=Path(A, "compare"))
    p = stage("publish", cmd_publish, "publish each variant as a versioned artifact with a manifest")
    p.add_argument("--build-root", type=path_arg, default=Path(A, "build"))
    p.add_argument("--eval-dir", type=path_arg, default=Path(A, "eval"))
    p.add_argument("--registry", type=path_arg, default=None, help="default: publish.registry from the config")
    p.add_argument("--prepare-dir", type=path_arg, default=Path(A, "prepare"))
    p.add_argument("--calib-dir", type=path_arg, default=Path(A, "calibrate"))
    p.add_argument("--onnx", type=path_arg, default=Path(A, "export", "model.onnx"))
    p.add_argument("--out", type=path_arg, default=Path(A, "publish", "published.json"))
    p = stage("dvc", cmd_dvc, "write dvc.yaml from the config: every file each stage reads is a dependency")
    p.add_argument("--check", action="store_true", help="only check that dvc.yaml lists every dependency (exit 1 if not)")
    p = sub.add_parser("init", help="start a project of your own here: configs/<name>.yaml, params.yaml, dvc.yaml",
                       description="write a config skeleton, params.yaml and dvc.yaml into this folder (never "
                                   "overwrites a file)")
    p.add_argument("--name", default=None, help="model name and configs/<name>.yaml (default: this folder's name)")
    p.set_defaults(func=cmd_init)
    for extra in _extra_commands:
        extra(sub)
    _add_verbosity(parser)
    return parser


# Other modules (gate, artifacts) register their subcommands here.
_extra_commands: list[Callable[[Any], None]] = []


def _load_extras() -> None:
    import importlib

    if _extra_commands:
        return
    for mod in ("pipeline.gate_cli", "pipeline.artifacts_cli", "pipeline.diagnose"):
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
    from . import __version__
    from .log import configure, get_logger

    configure(verbose=getattr(args, "verbose", False), quiet=getattr(args, "quiet", False))
    get_logger().debug(f"trtpipe {__version__} (python {sys.version.split()[0]}) in {Path.cwd()}: "
                       + " ".join(str(x) for x in (sys.argv[1:] if argv is None else argv)))
    try:
        _check_dvc_sync(args)
        if getattr(args, "timings", None) is not None:
            _claim_timings(args)  # refused before any work, not after it
        args.func(args)
    except PipelineError as e:
        return _fail(args.command, str(e), e.exit_code)
    except KeyboardInterrupt:
        print(f"trtpipe {args.command}: interrupted; outputs left as they were", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `trtpipe ... | head`: the reader left; quiet, as Unix tools are (128 + SIGPIPE)
        _silence_stdout()
        return 141
    except Exception as e:  # an OSError, or a library's exception wrapping one (torch: RuntimeError)
        why = _environment_error(e)
        if why is None:
            raise  # a bug: keep the traceback
        return _fail(args.command, why, 1)
    return 0


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so the interpreter's final flush into a closed pipe stays quiet."""
    import os

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def _fail(command: str, message: str, code: int) -> int:
    msg = " ".join(message.split())
    print(f"trtpipe {command}: error: {msg}", file=sys.stderr)
    return code


def _environment_error(e: BaseException) -> Optional[str]:
    """A one-line message for what the machine did (disk full, no permission, name too long, file size
    limit, a folder where a file should be ...), else None (a bug: keep the traceback)."""
    from .fileio import environment_error

    return environment_error(e)


if __name__ == "__main__":
    sys.exit(main())
