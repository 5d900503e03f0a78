"""Optimization-profile shapes for a TensorRT build, from the ONNX inputs and
`build.profile` (min/opt/max batch on axis 0 of every input). Pure Python: no TensorRT."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence, Union

from ..errors import BackendError, ConfigError, ModelError

Dim = Union[int, str, None]


def onnx_inputs(onnx_path: Union[str, Path]) -> dict[str, list[Dim]]:
    """Graph inputs that are not initializers: name -> dims (int, or the dim_param
    string / None for a dynamic axis)."""
    import onnx

    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise ModelError(f"{onnx_path}: ONNX file not found; run `trtpipe export` (or calibrate, for the Q/DQ model) first")
    try:
        model = onnx.load(str(onnx_path), load_external_data=False)
    except Exception as e:  # protobuf DecodeError and friends
        raise ModelError(f"{onnx_path}: not a readable ONNX model ({type(e).__name__}: {e}); re-export it") from None
    inits = {i.name for i in model.graph.initializer}
    out: dict[str, list[Dim]] = {}
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        dims: list[Dim] = []
        for d in vi.type.tensor_type.shape.dim:
            if d.HasField("dim_value") and d.dim_value > 0:
                dims.append(int(d.dim_value))
            elif d.HasField("dim_param"):
                dims.append(d.dim_param)
            else:
                dims.append(None)
        out[vi.name] = dims
    if not out:
        raise ModelError(f"{onnx_path}: the graph has no inputs")
    return out


def _batches(profile: Any) -> tuple[int, int, int]:
    if isinstance(profile, Mapping):
        get = profile.get
    else:
        def get(k: str) -> Any:
            return getattr(profile, k)
    return int(get("min_batch")), int(get("opt_batch")), int(get("max_batch"))


def check_profile(profile: Any) -> tuple[int, int, int]:
    """(min, opt, max) batch, or a ConfigError naming build.profile."""
    mn, opt, mx = _batches(profile)
    if mn < 1:
        raise ConfigError(f"build.profile.min_batch must be >= 1, got {mn}")
    if not mn <= opt <= mx:
        raise ConfigError(
            f"build.profile: need min_batch <= opt_batch <= max_batch, got min_batch {mn}, opt_batch {opt}, "
            f"max_batch {mx}; fix build.profile in the config (or params.yaml)"
        )
    return mn, opt, mx


def profile_shapes(inputs: Mapping[str, Sequence[Dim]], profile: Any,
                   source: Union[str, Path] = "the ONNX model") -> dict[str, dict[str, Any]]:
    """name -> {min, opt, max: [dims], static_batch: bool}. Axis 0 takes the profile's
    batch range when it is dynamic; every other axis must be fixed in the ONNX."""
    mn, opt, mx = check_profile(profile)
    shapes: dict[str, dict[str, Any]] = {}
    for name, dims in inputs.items():
        for axis, d in enumerate(dims):
            if axis > 0 and not isinstance(d, int):
                raise BackendError(
                    f"{source}: input '{name}' has a dynamic axis {axis} ({d or '?'}); only the batch axis (0) may be "
                    "dynamic for TensorRT here: export the model with fixed sizes for the other axes"
                )
        if not dims:
            shapes[name] = {"min": [], "opt": [], "max": [], "static_batch": True}
            continue
        rest = [int(d) for d in dims[1:]]  # type: ignore[arg-type]
        if isinstance(dims[0], int):
            b = int(dims[0])
            shapes[name] = {"min": [b, *rest], "opt": [b, *rest], "max": [b, *rest], "static_batch": True}
        else:
            shapes[name] = {"min": [mn, *rest], "opt": [opt, *rest], "max": [mx, *rest], "static_batch": False}
    return shapes


def calibration_shapes(shapes: Mapping[str, Mapping[str, Any]], batch_size: int) -> dict[str, list[int]]:
    """One fixed shape per input for the calibration profile: `batch_size` on a dynamic batch axis."""
    out = {}
    for name, s in shapes.items():
        dims = list(s["opt"])
        if dims and not s["static_batch"]:
            dims[0] = int(batch_size)
        out[name] = dims
    return out
