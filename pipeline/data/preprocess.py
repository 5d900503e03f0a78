"""From raw arrays to model inputs: padding of dynamic axes, image geometry, scale and
mean/std for float inputs, and safe dtype conversion for integer and bool inputs.

Integer inputs (token ids, masks) are data: never normalized and never cast through
float; a float, complex or string array given for one is an error, as is a value that
does not fit the input's integer type."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ..config import DataConfig, PreprocessConfig, TensorSpec
from ..errors import DataError
from .images import resize_crop_array


def _kind_error(a: np.ndarray, spec: TensorSpec, where: str) -> DataError:
    return DataError(f"{where}: input '{spec.name}' data has dtype {a.dtype}, which cannot feed a {spec.dtype} input; "
                     "give real numbers (float or integer arrays)" if spec.is_float else
                     f"{where}: input '{spec.name}' data has dtype {a.dtype}, but the input is {spec.dtype}: give "
                     "integer (or bool) arrays; integer inputs are never cast from float")


def check_kind(a: np.ndarray, spec: TensorSpec, where: str) -> None:
    """Raw data must be real numbers for a float input, integers or bools for an integer one."""
    kinds = "biuf" if spec.is_float else "biu"
    if a.dtype.kind not in kinds:
        raise _kind_error(a, spec, where)


def to_integer_input(a: np.ndarray, spec: TensorSpec, where: str) -> np.ndarray:
    """Integer/bool data for an integer/bool input, converted without loss."""
    check_kind(a, spec, where)
    want = np.dtype(spec.dtype)
    if a.size and want != np.bool_:
        info = np.iinfo(want)
        lo, hi = int(a.min()), int(a.max())
        if lo < info.min or hi > info.max:
            raise DataError(f"{where}: input '{spec.name}' has values {lo}..{hi}, outside {spec.dtype}'s range")
    if want == np.bool_ and a.size and a.dtype != np.bool_ and not np.isin(a, (0, 1)).all():
        raise DataError(f"{where}: input '{spec.name}' is bool but its data holds values other than 0 and 1")
    return np.ascontiguousarray(a.astype(want, copy=False))


def pad_concat(parts: Sequence[np.ndarray], spec: TensorSpec, data: DataConfig, where: str) -> np.ndarray:
    """Concatenate batches of one input, padding (or cutting) every named dynamic axis to
    `data.pad_to[axis]`, else to the longest batch."""
    parts = [np.asarray(p) for p in parts]
    rank = len(spec.shape) + 1
    for i, p in enumerate(parts):
        if p.ndim != rank:
            raise DataError(f"{where}: input '{spec.name}' batch {i} has shape {list(p.shape)}; the model takes "
                            f"(N, {', '.join(map(str, spec.shape))})")
    target = {}
    for axis, d in spec.dynamic_axes.items():
        target[axis] = data.pad_to.get(d) or max(p.shape[axis] for p in parts)
    if all(p.shape[a] == n for p in parts for a, n in target.items()):
        return np.concatenate(parts) if len(parts) > 1 else parts[0]
    fill = data.pad_value.get(spec.name, 0)
    out = []
    for p in parts:
        for axis, n in target.items():
            if p.shape[axis] > n:
                p = np.take(p, np.arange(n), axis=axis)
            elif p.shape[axis] < n:
                widths = [(0, 0)] * p.ndim
                widths[axis] = (0, n - p.shape[axis])
                p = np.pad(p, widths, constant_values=np.asarray(fill).astype(p.dtype))
        out.append(p)
    return np.concatenate(out)


def _channel_axis(layout: str) -> int:
    return -1 if layout == "nhwc" else 1


def normalize(out: np.ndarray, p: PreprocessConfig, axis: int) -> np.ndarray:
    """``out * scale``, then ``(out - mean) / std`` along the channel ``axis``."""
    out = out.astype(np.float32, copy=False) * np.float32(p.scale)
    if p.mean is None and p.std is None:
        return out
    c = out.shape[axis]
    shape = [1] * out.ndim
    shape[axis] = -1
    mean = np.asarray(p.mean if p.mean is not None else [0.0], np.float32)
    std = np.asarray(p.std if p.std is not None else [1.0], np.float32)
    if mean.size not in (1, c) or std.size not in (1, c):
        raise DataError(f"data.preprocess.mean/std have {mean.size}/{std.size} values for {c} channels; "
                        f"give 1 or {c} values")
    if np.any(std == 0):
        raise DataError("data.preprocess.std has a zero; every std must be non-zero")
    return (out - mean.reshape(shape)) / std.reshape(shape)


def preprocess_float(x: np.ndarray, spec: TensorSpec, data: DataConfig, where: str) -> np.ndarray:
    """A float input's arrays: optional resize / centre crop, then scale, mean/std, dtype."""
    check_kind(x, spec, where)
    p = data.preprocess
    applies = p.inputs is None or spec.name in p.inputs
    out = np.asarray(x)
    if applies and (p.resize or p.center_crop):
        if out.ndim != 4:
            raise DataError(f"data.preprocess.resize/center_crop need image arrays (N, C, H, W) or (N, H, W, C) for "
                            f"input '{spec.name}', got shape {out.shape}")
        hwc = out if p.layout == "nhwc" else out.transpose(0, 2, 3, 1)
        done = np.stack([resize_crop_array(np.asarray(s, np.float32), p) for s in hwc])
        out = done if p.layout == "nhwc" else done.transpose(0, 3, 1, 2)
    if applies:
        out = normalize(out, p, _channel_axis(p.layout)) if out.ndim > 1 else out
    return np.ascontiguousarray(out.astype(spec.dtype, copy=False))


def to_input(x: np.ndarray, spec: TensorSpec, data: DataConfig, where: str) -> np.ndarray:
    """Raw arrays of one input, ready for the model."""
    if spec.is_float:
        return preprocess_float(x, spec, data, where)
    return to_integer_input(x, spec, where)
