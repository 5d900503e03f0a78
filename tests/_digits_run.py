"""Real digits runs for the evaluate/compare/gate tests, built by calling the stage functions
in a temporary folder (seconds on a CPU; the training in prepare dominates).

INT8 does not wait for the calibrate stage: `make_qdq` writes a Q/DQ ONNX with onnxruntime's
static quantizer (MinMax ranges over calib.npy, symmetric int8, per-channel weights, float
biases) into a calibrate-like folder, and the real build stage's onnxruntime int8 route
takes it from there. `scale_activations` breaks such a model on purpose (every activation
scale multiplied, as a calibration cache with scales x100 would)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Iterable, Optional

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
_CACHE: dict[str, Path] = {}


def digits_config(tmp: Path, **sections: Any) -> Any:
    """configs/digits.yaml on the onnxruntime backend with short latency runs, plus `sections` merged over it."""
    import yaml

    from pipeline.config import load_config

    params = {
        "config": str(ROOT / "configs" / "digits.yaml"),
        "build": {"backend": "onnxruntime"},
        "evaluate": {"latency": {"warmup": 3, "iterations": 30, "batch_sizes": [1, 32]}},
    }
    for k, v in sections.items():
        params[k] = {**params.get(k, {}), **v}
    path = tmp / f"params-{abs(hash(repr(sorted(params.items())))) % 10**8}.yaml"
    path.write_text(yaml.safe_dump(params))
    return load_config(None, path)


def make_qdq(onnx_path: Path, calib_npy: Path, out_path: Path, input_name: str = "input") -> Path:
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static

    x = np.load(calib_npy)

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter([{input_name: x[i : i + 32]} for i in range(0, len(x), 32)])

        def get_next(self) -> Optional[dict[str, np.ndarray]]:
            return next(self.it, None)

    out_path.parent.mkdir(parents=True, exist_ok=True)
    quantize_static(
        str(onnx_path), str(out_path), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax,
        extra_options={"ActivationSymmetric": True, "WeightSymmetric": True, "QuantizeBias": False},
    )
    return out_path


def scale_activations(qdq_path: Path, factor: float) -> int:
    """Multiply every activation scale (the scale input of each QuantizeLinear) by `factor`, in place."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(qdq_path))
    names = {n.input[1] for n in model.graph.node if n.op_type == "QuantizeLinear"}
    done = 0
    for init in model.graph.initializer:
        if init.name in names:
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * np.float32(factor), init.name))
            done += 1
    onnx.save(model, str(qdq_path))
    return done


def digits_base(tmp_path_factory: Any) -> Path:
    """prepare, export, validate, build fp32/fp16: once per test session."""
    if "base" not in _CACHE:
        from pipeline.stages import build, export, prepare, validate

        d = tmp_path_factory.mktemp("digits-base")
        cfg = digits_config(d)
        prepare.run(cfg, d / "prepare")
        export.run(cfg, d / "prepare" / "model.pt", d / "export")
        validate.run(cfg, d / "prepare" / "model.pt", d / "export" / "model.onnx", d / "prepare" / "eval.npz", d / "validate")
        for p in ("fp32", "fp16"):
            build.run(cfg, p, d / "export" / "model.onnx", d / "build" / p)
        make_qdq(d / "export" / "model.onnx", d / "prepare" / "calib.npy", d / "calibrate" / "model.qdq.onnx")
        _CACHE["base"] = d
    return _CACHE["base"]


def evaluate_all(cfg: Any, d: Path, precisions: Iterable[str]) -> None:
    from pipeline.stages import evaluate

    for p in precisions:
        evaluate.run(cfg, p, d / "build" / p, d / "build" / "fp32", d / "prepare" / "eval.npz",
                     d / "validate" / "reference.npz", d / "eval" / f"{p}.json")


def digits_run(tmp_path_factory: Any, name: str = "clean", int8_scale: float = 1.0, **config_sections: Any) -> Path:
    """A folder with prepare/ export/ validate/ build/{fp32,fp16,int8} eval/ compare/ from real stage runs.

    int8_scale != 1 multiplies the int8 model's activation scales (a broken calibration)."""
    key = f"{name}:{int8_scale}:{sorted(config_sections.items())!r}"
    if key not in _CACHE:
        from pipeline.stages import build, compare

        base = digits_base(tmp_path_factory)
        d = tmp_path_factory.mktemp(f"digits-{name}")
        for sub in ("prepare", "export", "validate", "build", "calibrate"):
            shutil.copytree(base / sub, d / sub)
        cfg = digits_config(d, **config_sections)
        if int8_scale != 1.0:
            assert scale_activations(d / "calibrate" / "model.qdq.onnx", int8_scale) > 0
        build.run(cfg, "int8", d / "export" / "model.onnx", d / "build" / "int8", calib_dir=d / "calibrate")
        evaluate_all(cfg, d, ("fp32", "fp16", "int8"))
        compare.run(cfg, d / "eval", d / "compare")
        _CACHE[key] = d
    return _CACHE[key]
