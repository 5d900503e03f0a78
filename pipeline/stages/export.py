"""export: PyTorch -> ONNX with a dynamic batch axis, checked and shape-inferred.

Outputs: model.onnx and export.json (opset, I/O names, dtypes, shapes with dynamic
axes, torch and onnx versions, sha256 of checkpoint and ONNX)."""

from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import Any

from ..config import Config
from ..errors import ModelError
from ..fileio import sha256_file, staging_dir, write_json

BATCH_AXIS = "batch"


def _io_info(model: Any) -> dict[str, list[dict[str, Any]]]:
    import onnx

    def describe(values: Any, skip: set[str]) -> list[dict[str, Any]]:
        out = []
        for v in values:
            if v.name in skip:
                continue
            t = v.type.tensor_type
            dims = [d.dim_param if d.dim_param else d.dim_value for d in t.shape.dim]
            out.append({"name": v.name, "dtype": onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name, "shape": dims})
        return out

    inits = {i.name for i in model.graph.initializer}
    return {"inputs": describe(model.graph.input, inits), "outputs": describe(model.graph.output, set())}


def run(cfg: Config, checkpoint: Path, out_dir: Path) -> dict[str, Any]:
    import onnx
    import torch

    from ..models import build_model, load_checkpoint
    from ..onnx_utils import load_onnx

    start = time.perf_counter()
    model = load_checkpoint(build_model(cfg.model), checkpoint).eval()
    spec = cfg.model.input
    dummy = torch.zeros(2, *spec.shape, dtype=getattr(torch, spec.dtype))
    names_out = list(cfg.model.output_names)
    dynamic = {n: {0: BATCH_AXIS} for n in [spec.name, *names_out]} if cfg.export.dynamic_batch else None
    with staging_dir(out_dir) as tmp:
        onnx_path = tmp / "model.onnx"
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.onnx.export(
                    model, (dummy,), str(onnx_path), input_names=[spec.name], output_names=names_out,
                    dynamic_axes=dynamic, opset_version=cfg.export.opset, dynamo=False, do_constant_folding=True,
                )
        except Exception as e:
            raise ModelError(f"torch.onnx.export failed for model '{cfg.model.name}': {type(e).__name__}: {str(e).splitlines()[0][:300]}") from None
        proto = load_onnx(onnx_path)  # onnx.checker
        proto = onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True)
        onnx.save(proto, str(onnx_path))
        io = _io_info(proto)
        report = {
            "model": cfg.model.name,
            "opset": cfg.export.opset,
            "dynamic_axes": {n: {"0": BATCH_AXIS} for n in dynamic} if dynamic else {},
            **io,
            "nodes": len(proto.graph.node),
            "torch_version": torch.__version__,
            "onnx_version": onnx.__version__,
            "sha256": {"checkpoint": sha256_file(checkpoint), "onnx": sha256_file(onnx_path)},
            "seconds": round(time.perf_counter() - start, 3),
        }
        write_json(tmp / "export.json", report)
    return report
