"""Real digits runs for the evaluate/compare/gate/publish tests, built by calling the stage
functions in a temporary folder laid out as `dvc repro` lays out artifacts/ (seconds on a
CPU; the training in prepare dominates).

`digits_base` runs prepare, export, validate, calibrate and build@fp32/fp16 once per
session. `digits_run` copies it and runs build@int8, evaluate and compare, with config
sections merged over the digits config: a `calibration` section re-runs calibrate. The
"broken" run calibrates at the 1st percentile of |x| (`calibration.method: percentile`,
`percentile: 1`): a real configuration that clips nearly every activation, so its INT8
variant is badly wrong, as a mistaken calibration would make it."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Iterable

ROOT = Path(__file__).resolve().parents[1]
_CACHE: dict[str, Path] = {}
BROKEN = {"calibration": {"method": "percentile", "percentile": 1.0}}


def digits_config(tmp: Path, **sections: Any) -> Any:
    """configs/digits.yaml on the onnxruntime backend with short latency runs and a
    64-sample calibration, plus `sections` merged over it."""
    import yaml

    from pipeline.config import load_config

    params = {
        "config": str(ROOT / "configs" / "digits.yaml"),
        "override": True,  # these values win over configs/digits.yaml's, on purpose
        "build": {"backend": "onnxruntime"},
        "calibration": {"num_samples": 64},
        "evaluate": {"latency": {"warmup": 3, "iterations": 30, "batch_sizes": [1, 32]}},
    }
    for k, v in sections.items():
        params[k] = {**params.get(k, {}), **v}
    path = tmp / f"params-{abs(hash(repr(sorted(params.items())))) % 10**8}.yaml"
    path.write_text(yaml.safe_dump(params))
    return load_config(None, path, quiet=True)


def calibrate(cfg: Any, d: Path) -> None:
    from pipeline.stages import calibrate as stage

    stage.run(cfg, d / "export" / "model.onnx", d / "prepare" / "calib.npz", d / "calibrate",
              validation=d / "validate" / "validate.json", progress=False)


def build(cfg: Any, d: Path, precision: str) -> None:
    from pipeline.stages import build as stage

    stage.run(cfg, precision, d / "export" / "model.onnx", d / "build" / precision, calib_dir=d / "calibrate",
              calib_data=d / "prepare" / "calib.npz", validation=d / "validate" / "validate.json")


def digits_base(tmp_path_factory: Any) -> Path:
    """prepare, export, validate, calibrate, build fp32/fp16: once per test session."""
    if "base" not in _CACHE:
        from pipeline.stages import export, prepare, validate

        d = tmp_path_factory.mktemp("digits-base")
        cfg = digits_config(d)
        prepare.run(cfg, d / "prepare")
        export.run(cfg, d / "prepare" / "model.pt", d / "export")
        validate.run(cfg, d / "prepare" / "model.pt", d / "export" / "model.onnx", d / "prepare" / "eval.npz", d / "validate")
        calibrate(cfg, d)
        for p in ("fp32", "fp16"):
            build(cfg, d, p)
        _CACHE["base"] = d
    return _CACHE["base"]


def evaluate_all(cfg: Any, d: Path, precisions: Iterable[str]) -> None:
    from pipeline.stages import evaluate

    for p in precisions:
        evaluate.run(cfg, p, d / "build" / p, d / "build" / "fp32", d / "prepare" / "eval.npz",
                     d / "validate" / "reference.npz", d / "eval" / f"{p}.json")


def digits_run(tmp_path_factory: Any, name: str = "clean", **config_sections: Any) -> Path:
    """A folder with prepare/ export/ validate/ calibrate/ build/{fp32,fp16,int8} eval/ compare/
    from real stage runs."""
    key = f"{name}:{sorted(config_sections.items())!r}"
    if key not in _CACHE:
        from pipeline.stages import compare

        base = digits_base(tmp_path_factory)
        d = tmp_path_factory.mktemp(f"digits-{name}")
        for sub in ("prepare", "export", "validate", "build", "calibrate"):
            shutil.copytree(base / sub, d / sub)
        cfg = digits_config(d, **config_sections)
        if "calibration" in config_sections:
            calibrate(cfg, d)
        build(cfg, d, "int8")
        evaluate_all(cfg, d, ("fp32", "fp16", "int8"))
        compare.run(cfg, d / "eval", d / "compare")
        _CACHE[key] = d
    return _CACHE[key]
