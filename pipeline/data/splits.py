"""Deterministic train / calibration / evaluation splits that never overlap.

One seeded permutation (`data.seed`) of the source is cut into the three sets;
`data.max_samples` keeps a seeded subset first. With `data.calibration_path`, calibration
comes from that separate source (same `data.source` kind) and the main source is all
evaluation data, unless `data.split` is given, which then divides it into train and
evaluation in the ratio `split.train : split.evaluation`; the two sources must not be
the same file, folder or images. Only the samples a split needs are decoded."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence, Union

import numpy as np

from ..config import DataConfig, TensorSpec
from ..errors import DataError
from .images import ImageFiles, decode_sample, image_geometry
from .preprocess import to_input
from .samples import Samples
from .sources import Raw, load_source


@dataclass
class Splits:
    train: Samples
    calibration: Samples
    evaluation: Samples


def _load_images(files: ImageFiles, idx: np.ndarray, data: DataConfig, spec: TensorSpec,
                 stream_ok: bool = True) -> Samples:
    """The images at ``idx``: streamed (an index of the files, decoded batch by batch;
    pipeline.data.stream) when data.stream says so, else decoded into one preallocated array."""
    from .stream import ImageStream, hash_files, should_stream

    p = data.preprocess
    what = f"data.source=image_folder ({files.root})"
    image_geometry(spec, p, what)  # a fixed 3-D shape: one sample is spec.shape, in the layout's order
    y = None if files.y is None else files.y[idx]
    ids = [str(files.files[i]) for i in idx]
    if stream_ok and len(idx) and should_stream(data.stream, len(idx), spec):
        stream = ImageStream(ids, hash_files(ids), spec, p)
        stream[0]  # the first image decodes now: a wrong geometry or channel count fails here, not stages later
        return Samples({spec.name: stream}, y, ids=ids, classes=files.classes)
    x = np.empty((len(idx), *spec.shape), dtype=spec.dtype)
    for k, i in enumerate(idx):
        x[k] = decode_sample(files.files[i], files.files[i], spec, p)
    return Samples({spec.name: x}, y, ids=ids, classes=files.classes)


def check_samples(samples: Samples, inputs: Sequence[TensorSpec], what: str) -> None:
    """Preprocessed samples against the model's inputs: fixed sizes, and finite floats."""
    if len(samples) == 0:
        raise DataError(f"{what}: dataset is empty; it needs at least one sample")
    for spec in inputs:
        a = samples.x[spec.name]
        got = list(a.shape[1:])
        fixed_ok = len(got) == len(spec.shape) and all(
            not isinstance(d, int) or g == d for g, d in zip(got, spec.shape))
        if not fixed_ok:
            raise DataError(
                f"{what}: samples of input '{spec.name}' have shape {got}, the model expects {list(spec.shape)}; "
                "fix data.preprocess (resize/center_crop/layout) or the input's shape in the config")
        if spec.is_float:
            finite = np.isfinite(a)
            if not finite.all():
                bad = int(np.flatnonzero(~finite.reshape(len(a), -1).all(axis=1))[0])
                where = samples.ids[bad] if samples.ids else f"sample {bad}"
                raise DataError(f"{what}: {where} (input '{spec.name}') contains NaN or Inf after preprocessing")


def _materialize(raw: Raw, idx: np.ndarray, data: DataConfig, inputs: Sequence[TensorSpec], what: str,
                 stream_ok: bool = True) -> Samples:
    """Preprocessed samples ``idx`` of a source, checked against the model's inputs (an
    image split may stream, except the train split, which training holds anyway)."""
    if isinstance(raw, ImageFiles):
        out = _load_images(raw, idx, data, inputs[0], stream_ok)
    else:
        part = raw.take(idx)
        out = Samples({s.name: to_input(part.x[s.name], s, data, what) for s in inputs}, part.y, part.ids)
    if len(idx) and not any(hasattr(v, "subset") for v in out.x.values()):  # a stream checks each image it decodes
        check_samples(out, inputs, what)
    return out


def _check_disjoint(data: DataConfig, main: Raw, calib: Raw) -> None:
    """A separate calibration source must not be the evaluation data."""
    same = False
    if data.source == "digits":
        same = True
    elif data.source == "factory":
        same = data.path == data.calibration_path
    elif data.path and data.calibration_path:
        same = os.path.realpath(data.path) == os.path.realpath(data.calibration_path)
    if same:
        raise DataError(f"data.calibration_path ({data.calibration_path}) is the same data as data.path "
                        f"({data.path or data.source}); calibration must not overlap evaluation: point it at "
                        "other data, or unset it to split calibration off data.path")
    if isinstance(main, ImageFiles) and isinstance(calib, ImageFiles):
        shared = {os.path.realpath(f) for f in main.files} & {os.path.realpath(f) for f in calib.files}
        if shared:
            raise DataError(f"data.calibration_path ({data.calibration_path}) shares {len(shared)} image(s) with "
                            f"data.path, e.g. {sorted(shared)[0]}; calibration must not overlap evaluation")


def load_splits(data: DataConfig, inputs: Union[TensorSpec, Sequence[TensorSpec]]) -> Splits:
    """Load the configured source(s), preprocess them and split them deterministically."""
    inputs = [inputs] if isinstance(inputs, TensorSpec) else list(inputs)
    what = f"data.source={data.source}" + (f" ({data.path})" if data.path else "")
    raw = load_source(data, data.path, "data.path", inputs)
    rng = np.random.default_rng(data.seed)
    order = rng.permutation(len(raw))
    if data.max_samples:
        order = order[: data.max_samples]
    n = len(order)
    s = data.split
    if data.calibration_path:
        cal_raw = load_source(data, data.calibration_path, "data.calibration_path", inputs)
        _check_disjoint(data, raw, cal_raw)
        share = s.train / (s.train + s.evaluation) if data.split_is_explicit else 0.0
        n_train = int(round(n * share))
        if n - n_train < 1:
            raise DataError(f"{what}: {n} samples leave no evaluation set (split.train={s.train}, "
                            f"split.evaluation={s.evaluation})")
        cal_order = np.random.default_rng(data.seed).permutation(len(cal_raw))
        cal_what = f"data.source={data.source} ({data.calibration_path})"
        return Splits(train=_materialize(raw, order[:n_train], data, inputs, what, stream_ok=False),
                      calibration=_materialize(cal_raw, cal_order, data, inputs, cal_what),
                      evaluation=_materialize(raw, order[n_train:], data, inputs, what))
    n_train = int(round(n * s.train))
    n_cal = int(round(n * s.calibration))
    n_eval = min(int(round(n * s.evaluation)), n - n_train - n_cal)
    if n_cal < 1 or n_eval < 1:
        raise DataError(f"{what}: {n} samples are too few to split into calibration ({n_cal}) and "
                        f"evaluation ({n_eval}) sets; raise data.split.calibration / evaluation, or set "
                        "data.calibration_path")
    idx_train, idx_cal = order[:n_train], order[n_train : n_train + n_cal]
    idx_eval = order[n_train + n_cal : n_train + n_cal + n_eval]
    return Splits(train=_materialize(raw, idx_train, data, inputs, what, stream_ok=False),
                  calibration=_materialize(raw, idx_cal, data, inputs, what),
                  evaluation=_materialize(raw, idx_eval, data, inputs, what))
