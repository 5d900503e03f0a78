"""Reading ONNX models for calibration, with errors that name the file.

The calibration package imports nothing from ``pipeline/`` but the error family, so it
keeps this small loader of its own."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Union

from calibration.errors import CalibrationError


def load_model(path: Union[str, Path]) -> Any:
    """The ONNX ModelProto at ``path`` (external data loaded); CalibrationError when the
    file is missing or not a readable ONNX model."""
    import onnx

    path = Path(path)
    if not path.is_file():
        raise CalibrationError(f"{path}: ONNX file not found; run the export stage first")
    try:
        return onnx.load(str(path))
    except Exception as e:
        first = (str(e).splitlines() or [""])[0][:200]
        raise CalibrationError(f"{path}: not a readable ONNX model ({type(e).__name__}: {first}); re-run export") from None


def save_model(model: Any, path: Union[str, Path]) -> None:
    """Write the ModelProto `model` to `path`; past protobuf's 2 GiB limit its weights go beside it
    (`<name>.data`), as onnxruntime and TensorRT's parser read them."""
    import onnx

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if model.ByteSize() < 1_800_000_000:
        onnx.save_model(model, str(path))
    else:
        onnx.save_model(model, str(path), save_as_external_data=True, location=path.name + ".data")


def fresh_names(model: Any) -> Any:
    """A function giving names no tensor, initializer or node of ``model`` has yet (``base``, else
    ``base_1``, ``base_2``, ...); each name it gives is taken from then on."""
    graph = model.graph
    taken = ({i.name for i in graph.initializer} | {o for n in graph.node for o in [*n.input, *n.output]}
             | {n.name for n in graph.node} | {i.name for i in graph.input} | {o.name for o in graph.output})

    def fresh(base: str) -> str:
        name, k = base, 1
        while name in taken:
            name, k = f"{base}_{k}", k + 1
        taken.add(name)
        return name

    return fresh


def consumers(path: Union[str, Path], tensors: Any) -> list[str]:
    """The names of the nodes of the ONNX at ``path`` that read any of ``tensors`` (a tensor left out of
    calibration: its readers stay float in the Q/DQ model); weights are not loaded."""
    if not tensors:
        return []
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return sorted({n.name for n in model.graph.node if n.name and set(n.input) & set(tensors)})
