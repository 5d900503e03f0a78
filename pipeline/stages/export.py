"""export: PyTorch -> ONNX with named inputs and outputs and named dynamic axes, checked
and shape-inferred.

Whatever forward() returns (a tensor; tuples, lists, dicts or HuggingFace ModelOutputs of
tensors, nested) is flattened into named outputs (model.outputs, or names derived from
the structure). The batch axis of every input and output is dynamic (export.dynamic_batch),
and every axis the config names (`[seq]`, `[3, height, width]`) is dynamic under that name.
Tracing uses batch 2 and, for a named axis, the opt size of the first build profile.

Outputs: model.onnx and export.json (an ExportReport: opset, inputs and outputs by name,
dtype and shape, dynamic axes, the output structure, torch and onnx versions, sha256 of
checkpoint and ONNX)."""

from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from ..config import BATCH_AXIS, Config
from ..errors import ConfigError, ModelError
from ..fileio import claim_dir, sha256_file, sha256_model, staging_dir
from ..reports import ExportReport, TensorInfo, write_report

TRACE_BATCH = 2


def io_info(model: Any) -> tuple[list[TensorInfo], list[TensorInfo]]:
    """The graph's inputs (initializers excluded) and outputs with dtypes and dims."""
    import onnx

    def describe(values: Any, skip: set[str]) -> list[TensorInfo]:
        out = []
        for v in values:
            if v.name in skip:
                continue
            t = v.type.tensor_type
            dims = [d.dim_param if d.dim_param else (d.dim_value if d.HasField("dim_value") else None) for d in t.shape.dim]
            out.append(TensorInfo(name=v.name, dtype=onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name, shape=dims))
        return out

    inits = {i.name for i in model.graph.initializer}
    return describe(model.graph.input, inits), describe(model.graph.output, set())


def axis_sizes(cfg: Config) -> dict[str, int]:
    """Tracing size of every named axis: its opt size in the first build profile."""
    first = cfg.build.profile_specs[0]
    sizes: dict[str, int] = {}
    for key, v in first.items():
        if isinstance(v, list) and len(v) == 3:
            sizes[key] = int(v[1])
    for spec in cfg.model.inputs:
        given = first.get(spec.name)
        if isinstance(given, dict) and given.get("opt"):
            opt = list(given["opt"])[1:]
            for d, n in zip(spec.shape, opt):
                if isinstance(d, str):
                    sizes.setdefault(d, int(n))
    return sizes


def dummy_inputs(cfg: Config) -> list[Any]:
    """One traced batch per input: seeded normal floats, ones for integer and bool inputs."""
    import torch

    sizes = axis_sizes(cfg)
    rng = np.random.default_rng(0)
    out = []
    for spec in cfg.model.inputs:
        dims = []
        for d in spec.shape:
            if isinstance(d, str):
                if d not in sizes:
                    raise ConfigError(f"model.inputs '{spec.name}' has dynamic axis '{d}' but build.profiles gives no "
                                      f"range for it; add {d}: [min, opt, max] (export traces at the opt size)")
                dims.append(sizes[d])
            else:
                dims.append(d)
        shape = (TRACE_BATCH, *dims)
        if spec.is_float:
            a = rng.standard_normal(shape).astype(spec.dtype)
        else:
            a = np.ones(shape, dtype=spec.dtype)
        out.append(torch.from_numpy(a))
    return out


def dynamic_axes(cfg: Config, out_names: list[str]) -> dict[str, dict[int, str]]:
    axes: dict[str, dict[int, str]] = {}
    outputs = {o.name: o for o in cfg.model.outputs or []}
    for spec in cfg.model.inputs:
        axes[spec.name] = ({0: BATCH_AXIS} if cfg.export.dynamic_batch else {}) | spec.dynamic_axes
    for name in out_names:
        named = outputs[name].dynamic_axes if name in outputs else {}
        axes[name] = ({0: BATCH_AXIS} if cfg.export.dynamic_batch else {}) | named
    return {k: v for k, v in axes.items() if v}


def _infer_shapes(proto: Any) -> Any:
    import onnx

    try:
        return onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True)
    except Exception:  # best effort: TensorRT and onnxruntime infer shapes themselves
        return onnx.shape_inference.infer_shapes(proto)


def run(cfg: Config, checkpoint: Path, out_dir: Path) -> ExportReport:
    claim_dir(out_dir, "export", inputs=(checkpoint,))  # only into an output it owns (fileio.claim_dir)
    import onnx
    import torch

    from ..models import FlatOutputs, build_model, describe_structure, flatten_outputs, load_checkpoint, output_names
    from ..onnx_utils import load_onnx
    from ..provenance import prepared

    start = time.perf_counter()
    checkpoint = Path(checkpoint)
    if (checkpoint.parent / "prepare.json").is_file():
        prepared(checkpoint, "model.pt")
    model = load_checkpoint(build_model(cfg.model), checkpoint).eval()
    dummy = dummy_inputs(cfg)
    try:
        with torch.no_grad():
            eager = model(*dummy)
    except Exception as e:
        raise ModelError(f"model '{cfg.model.name}' fails on a traced batch of shapes "
                         f"{[list(t.shape) for t in dummy]} ({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}); "
                         "check model.inputs (order, shapes, dtypes) against forward()") from None
    structure = describe_structure(eager)
    names_out = output_names(flatten_outputs(eager), cfg.model.output_names, structure)
    names_in = cfg.model.input_names
    axes = dynamic_axes(cfg, names_out)
    with staging_dir(out_dir) as tmp:
        onnx_path = tmp / "model.onnx"
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.onnx.export(
                    FlatOutputs(model), tuple(dummy), str(onnx_path), input_names=names_in, output_names=names_out,
                    dynamic_axes=axes or None, opset_version=cfg.export.opset, dynamo=False, do_constant_folding=True,
                )
        except Exception as e:
            raise ModelError(f"torch.onnx.export failed for model '{cfg.model.name}': {type(e).__name__}: {str(e).splitlines()[0][:300]}") from None
        proto = load_onnx(onnx_path)  # onnx.checker
        proto = _infer_shapes(proto)
        onnx.save(proto, str(onnx_path))
        ins, outs = io_info(proto)
        missing = [n for n in names_in if n not in {i.name for i in ins}]
        if missing:
            raise ModelError(f"model '{cfg.model.name}': input(s) {missing} are not used by forward() and were dropped "
                             "from the ONNX graph; remove them from model.inputs")
        report = ExportReport(
            model=cfg.model.name,
            opset=cfg.export.opset,
            inputs=ins,
            outputs=outs,
            dynamic_axes={n: {str(k): v for k, v in a.items()} for n, a in axes.items()},
            output_structure=structure,
            nodes=len(proto.graph.node),
            torch_version=torch.__version__,
            onnx_version=onnx.__version__,
            seconds=round(time.perf_counter() - start, 3),
            sha256={"checkpoint": sha256_file(checkpoint), "onnx": sha256_model(onnx_path)},
        )
        write_report(tmp / "export.json", report)
    return report
