"""Optimization profiles: the min / opt / max shape of every model input, from the ONNX
inputs and `build.profiles` (or the batch-only `build.profile`). Pure Python: no TensorRT.

A profile names ranges by dynamic axis, shared by every input that has the axis
(`{batch: [1, 8, 32], seq: [16, 128, 512]}`), or gives an input's full shapes
(`{pixel_values: {min: [1, 3, 224, 224], opt: [...], max: [...]}}`). Axis 0 of a
dynamic-batch input is the batch axis whatever the ONNX calls it; every other dynamic
axis is identified by the name export gave it (the config's axis names). TensorRT builds
one optimization profile per entry; the runtime picks the first that fits a request."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

from .config import BATCH_AXIS
from .errors import ConfigError, ModelError

Dim = Union[int, str, None]
Shapes = dict[str, dict[str, list[int]]]  # input -> {min, opt, max}


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


def _range(v: Any, where: str) -> tuple[int, int, int]:
    if not isinstance(v, (list, tuple)) or len(v) != 3 or not all(isinstance(x, int) and not isinstance(x, bool) for x in v):
        raise ConfigError(f"{where}: expected [min, opt, max] (three integers), got {v!r}")
    mn, opt, mx = (int(x) for x in v)
    if mn < 1 or not mn <= opt <= mx:
        raise ConfigError(f"{where}: need 1 <= min <= opt <= max, got {mn} / {opt} / {mx}")
    return mn, opt, mx


def _where(index: int, key: str, legacy: bool) -> str:
    if legacy:
        return "build.profile (min_batch/opt_batch/max_batch)"
    return f"build.profiles[{index}].{key}"


def _axis_shapes(name: str, dims: Sequence[Dim], spec: Mapping[str, Any], index: int, legacy: bool,
                 source: str) -> dict[str, list[int]]:
    shapes: dict[str, list[int]] = {"min": [], "opt": [], "max": []}
    for axis, d in enumerate(dims):
        if isinstance(d, int):
            for k in shapes:
                shapes[k].append(d)
            continue
        key = BATCH_AXIS if axis == 0 else d
        if key is None:
            raise ModelError(f"{source}: input '{name}' has an unnamed dynamic axis {axis}; export names every dynamic "
                             "axis after model.inputs: re-run export")
        if key not in spec:
            have = ", ".join(sorted(k for k in spec)) or "nothing"
            raise ConfigError(
                f"{_where(index, key, legacy)}: input '{name}' has dynamic axis {axis} '{key}', but the profile gives "
                f"no range for it (it has {have}); add {key}: [min, opt, max] to every entry of build.profiles")
        mn, opt, mx = _range(spec[key], _where(index, key, legacy))
        for k, v in zip(("min", "opt", "max"), (mn, opt, mx)):
            shapes[k].append(v)
    return shapes


def _input_shapes(name: str, dims: Sequence[Dim], given: Mapping[str, Any], index: int, source: str) -> dict[str, list[int]]:
    where = f"build.profiles[{index}].{name}"
    shapes = {}
    for k in ("min", "opt", "max"):
        s = list(given.get(k) or [])
        if len(s) != len(dims):
            raise ConfigError(f"{where}.{k}: {s} has rank {len(s)}, input '{name}' of {source} has rank {len(dims)} {list(dims)}")
        for axis, (got, want) in enumerate(zip(s, dims)):
            if isinstance(want, int) and got != want:
                raise ConfigError(f"{where}.{k}: axis {axis} is fixed to {want} in the model, got {got}")
            if got < 1:
                raise ConfigError(f"{where}.{k}: axis {axis} must be >= 1, got {got}")
        shapes[k] = s
    for axis in range(len(dims)):
        if not shapes["min"][axis] <= shapes["opt"][axis] <= shapes["max"][axis]:
            raise ConfigError(f"{where}: axis {axis} needs min <= opt <= max, got "
                              f"{shapes['min'][axis]} / {shapes['opt'][axis]} / {shapes['max'][axis]}")
    return shapes


def resolve_profiles(inputs: Mapping[str, Sequence[Dim]], specs: Sequence[Mapping[str, Any]],
                     source: Union[str, Path] = "the ONNX model", legacy: bool = False) -> list[Shapes]:
    """One {input: {min, opt, max}} per profile spec. `legacy`: the specs came from
    build.profile (for messages)."""
    source = str(source)
    if not specs:
        raise ConfigError("build.profiles is empty; give at least one profile")
    axes = {BATCH_AXIS} | {d for dims in inputs.values() for d in dims[1:] if isinstance(d, str)}
    out: list[Shapes] = []
    for index, spec in enumerate(specs):
        unknown = [k for k in spec if k not in inputs and k not in axes]
        if unknown:
            raise ConfigError(
                f"build.profiles[{index}]: '{unknown[0]}' is neither a model input ({', '.join(inputs)}) nor a dynamic "
                f"axis of one ({', '.join(sorted(axes))})")
        profile: Shapes = {}
        for name, dims in inputs.items():
            if name in spec:
                profile[name] = _input_shapes(name, dims, spec[name], index, source)
            else:
                profile[name] = _axis_shapes(name, dims, spec, index, legacy, source)
        out.append(profile)
    return out


def config_profiles(inputs: Mapping[str, Sequence[Dim]], build: Any, source: Union[str, Path] = "the ONNX model") -> list[Shapes]:
    """The profiles `build` (a BuildConfig) asks for, resolved against the ONNX inputs."""
    return resolve_profiles(inputs, build.profile_specs, source, legacy=build.profiles is None)


def fits(profile: Shapes, shapes: Mapping[str, Sequence[int]]) -> bool:
    """Whether every input shape lies inside the profile's [min, max] per axis."""
    for name, s in shapes.items():
        p = profile.get(name)
        if p is None or len(s) != len(p["min"]):
            return False
        if any(d < lo or d > hi for d, lo, hi in zip(s, p["min"], p["max"])):
            return False
    return True


def pick_profile(profiles: Sequence[Shapes], shapes: Mapping[str, Sequence[int]]) -> Optional[int]:
    """Index of the first profile that fits the request, or None."""
    return next((i for i, p in enumerate(profiles) if fits(p, shapes)), None)


def max_batch(profiles: Sequence[Shapes]) -> Optional[int]:
    """The largest batch any profile takes (None when there are no profiles)."""
    batches = [p[n]["max"][0] for p in profiles for n in p if p[n]["max"]]
    return max(batches) if batches else None


def describe(profiles: Sequence[Shapes]) -> str:
    parts = []
    for i, p in enumerate(profiles):
        parts.append(f"#{i} " + ", ".join(f"{n} {v['min']}..{v['max']}" for n, v in p.items()))
    return "; ".join(parts)
