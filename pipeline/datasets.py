"""Datasets for training (built-in model only), calibration and evaluation.

Sources (``data.source``):

* ``digits``: scikit-learn's 1797 labelled 8x8 digits, shaped (N, 1, 8, 8), values 0..16.
* ``npz`` / ``npy``: arrays of samples already in the model's layout, raw values
  (``.npz``: ``x`` and optionally ``y``).
* ``image_folder``: a folder of images, either one subfolder per class (labels are the
  sorted subfolder names' indices, as torchvision's ImageFolder does) or flat (no
  labels). Decoded with Pillow; only the samples a split needs are decoded.
* ``factory``: ``module:function``; ``function()`` returns an iterable of batches, each
  an array ``x`` or a pair ``(x, y)`` (numpy arrays or anything ``np.asarray`` takes).
  An endless generator needs ``data.max_samples``.

Preprocessing (``data.preprocess``), in this order:

1. images: decoded as RGB (or 1 channel for grayscale models; a grayscale image for a
   3-channel model is replicated, any other channel mismatch is an error naming the
   file); ``resize`` makes the shorter side that long (bilinear, antialiased, as
   torchvision's ``Resize``), ``center_crop`` cuts the centre square (torchvision's
   rounding). Arrays get the same resize and crop (in float) when they are set.
2. ``scale`` multiplies raw values (e.g. 1/255), then ``mean``/``std`` per channel,
   given in the model's channel order.
3. ``channel_order``: decoded images are RGB; ``bgr`` reverses them before step 2.
   Arrays are taken to be in the model's channel order already.
4. ``layout`` ``nchw``/``nhwc`` (arrays are stored in that layout) and ``dtype``.

Every sample must then have exactly ``model.input.shape``; a mismatch names the file.

Splitting is deterministic (``data.seed``): one seeded permutation, cut into train,
calibration and evaluation, so the sets never overlap. ``data.max_samples`` keeps a
seeded subset. With ``data.calibration_path``, calibration comes from that separate
source (same ``data.source`` kind) and the main source is split into train and
evaluation in the ratio ``split.train : split.evaluation``; the two sources must not be
the same file, folder or images.

The calibrate stage picks its samples from the prepared calibration set with
:func:`calibration_indices` and cuts them with :func:`calibration_batches`; any other
calibrator (TensorRT's own) should do the same to see the same batches.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Union

import numpy as np

from calibration.errors import CalibrationError
from pipeline.config import DataConfig, InputSpec, PreprocessConfig
from pipeline.errors import DataError
from pipeline.plugins import load_callable

IMAGE_EXTENSIONS = (".bmp", ".gif", ".jpeg", ".jpg", ".png", ".ppm", ".pgm", ".pbm", ".tif", ".tiff", ".webp")


@dataclass
class Samples:
    x: np.ndarray  # (N, *input.shape), preprocessed, float32 or float16
    y: Optional[np.ndarray] = None  # (N,) int64 labels when known
    ids: Optional[list[str]] = None  # where each sample came from (file, or "source[index]")
    classes: Optional[list[str]] = None  # class names of an image folder, by label index

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def take(self, idx: np.ndarray) -> "Samples":
        return Samples(self.x[idx], None if self.y is None else self.y[idx],
                       None if self.ids is None else [self.ids[i] for i in idx], self.classes)


@dataclass
class Splits:
    train: Samples
    calibration: Samples
    evaluation: Samples


# -- raw sources ------------------------------------------------------------------------------
@dataclass
class _ImageFiles:
    """An image folder, listed but not decoded."""

    root: Path
    files: list[Path]
    y: Optional[np.ndarray]
    classes: Optional[list[str]]

    def __len__(self) -> int:
        return len(self.files)


_Raw = Union[Samples, _ImageFiles]


def _digits(data: DataConfig, location: Optional[str], key: str) -> Samples:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = d.images.astype(np.float32)[:, None, :, :]  # (1797, 1, 8, 8), values 0..16
    return Samples(x=x, y=d.target.astype(np.int64), ids=[f"digits[{i}]" for i in range(len(x))])


def _arrays(data: DataConfig, location: Optional[str], key: str) -> Samples:
    if not location:
        raise DataError(f"data.source is '{data.source}' but {key} is not set; point it at the array file")
    path = Path(location)
    if not path.is_file():
        raise DataError(f"{path}: data file not found ({key})")
    try:
        loaded = np.load(path, allow_pickle=False)
    except Exception as e:
        raise DataError(f"{path}: cannot read as {data.source} ({type(e).__name__}: {e})") from None
    if isinstance(loaded, np.ndarray):
        x, y = loaded, None
    else:
        keys = set(loaded.files)
        if "x" not in keys:
            raise DataError(f"{path}: an .npz dataset needs an array named 'x' (and optionally 'y'); "
                            f"found {sorted(keys)}")
        x = loaded["x"]
        y = loaded["y"].astype(np.int64) if "y" in keys else None
    if x.ndim < 2:
        raise DataError(f"{path}: expected samples of shape (N, ...), got an array of shape {x.shape}")
    return Samples(x=x, y=y, ids=[f"{path}[{i}]" for i in range(x.shape[0])])


def _is_image(p: Path) -> bool:
    return p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS


def _image_folder(data: DataConfig, location: Optional[str], key: str) -> _ImageFiles:
    if not location:
        raise DataError(f"data.source is 'image_folder' but {key} is not set; point it at a folder of images")
    root = Path(location)
    if not root.is_dir():
        raise DataError(f"{root}: image folder not found ({key})")
    entries = sorted(p for p in root.iterdir() if not p.name.startswith("."))
    subdirs = [p for p in entries if p.is_dir()]
    flat = [p for p in entries if _is_image(p)]
    exts = ", ".join(IMAGE_EXTENSIONS)
    if subdirs and flat:
        raise DataError(f"{root}: holds both images ({flat[0].name}, ...) and subfolders ({subdirs[0].name}, ...); "
                        "use one subfolder per class, or only images (no labels)")
    if flat:
        return _ImageFiles(root, flat, None, None)
    files: list[Path] = []
    labels: list[int] = []
    classes = [d.name for d in subdirs]
    for label, d in enumerate(subdirs):
        found = sorted(p for p in d.rglob("*") if _is_image(p) and not any(
            part.startswith(".") for part in p.relative_to(d).parts))
        if not found:
            raise DataError(f"{d}: class folder '{d.name}' holds no images ({exts}); remove it or add images")
        files += found
        labels += [label] * len(found)
    if not files:
        raise DataError(f"{root}: no images found (looked for {exts}, directly or in class subfolders)")
    return _ImageFiles(root, files, np.asarray(labels, np.int64), classes)


def _factory(data: DataConfig, location: Optional[str], key: str) -> Samples:
    spec = location or ""
    fn = load_callable(spec, key, DataError)
    xs: list[np.ndarray] = []
    ys: list[Optional[np.ndarray]] = []
    count = 0
    for i, batch in enumerate(fn()):
        if isinstance(batch, (tuple, list)):
            if len(batch) != 2:
                raise DataError(f"{spec}: batch {i} is a sequence of {len(batch)} items; yield x or (x, y)")
            x, y = np.asarray(batch[0]), np.asarray(batch[1]).astype(np.int64).reshape(-1)
        else:
            x, y = np.asarray(batch), None
        if x.ndim < 2:
            raise DataError(f"{spec}: batch {i} has shape {x.shape}; yield batches of shape (N, ...)")
        if y is not None and y.shape[0] != x.shape[0]:
            raise DataError(f"{spec}: batch {i} has {x.shape[0]} samples but {y.shape[0]} labels")
        if xs and (x.shape[1:] != xs[0].shape[1:] or (y is None) != (ys[0] is None)):
            raise DataError(f"{spec}: batch {i} has sample shape {x.shape[1:]}{' without' if y is None else ' with'} "
                            f"labels, batch 0 had {xs[0].shape[1:]}{' without' if ys[0] is None else ' with'}; "
                            "every batch must match")
        xs.append(x)
        ys.append(y)
        count += x.shape[0]
        if data.max_samples and count >= data.max_samples:
            break
    if not xs:
        raise DataError(f"{spec}: the factory yielded no batches")
    x_all = np.concatenate(xs)
    y_all = None if ys[0] is None else np.concatenate(ys)  # type: ignore[arg-type]
    return Samples(x=x_all, y=y_all, ids=[f"{spec}[{i}]" for i in range(len(x_all))])


SOURCES = {"digits": _digits, "npz": _arrays, "npy": _arrays, "image_folder": _image_folder, "factory": _factory}


# -- preprocessing ----------------------------------------------------------------------------
def _image_geometry(spec: InputSpec, p: PreprocessConfig, what: str) -> tuple[int, int, int]:
    """(channels, height, width) of one sample, from the model's input shape and layout."""
    if len(spec.shape) != 3:
        raise DataError(f"{what}: images need a 3-D model.input.shape (C, H, W or H, W, C), got {list(spec.shape)}")
    if p.layout == "nchw":
        c, h, w = spec.shape
    else:
        h, w, c = spec.shape
    return int(c), int(h), int(w)


def _resized_size(width: int, height: int, shorter: int) -> tuple[int, int]:
    """torchvision's Resize(int): the shorter side becomes ``shorter``, the other scales (truncated)."""
    if width <= height:
        return shorter, int(shorter * height / width)
    return int(shorter * width / height), shorter


def _crop_box(width: int, height: int, size: int) -> tuple[int, int, int, int]:
    """torchvision's centre-crop box (left, top, right, bottom)."""
    top = int(round((height - size) / 2.0))
    left = int(round((width - size) / 2.0))
    return left, top, left + size, top + size


def _decode_image(path: Path, channels: int, p: PreprocessConfig) -> np.ndarray:
    """One image file -> float32 HWC array after channel handling, resize and centre crop."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()
            img = im
            if img.mode == "P":
                img = img.convert("RGBA" if "transparency" in img.info else "RGB")
            elif img.mode == "1":
                img = img.convert("L")
            elif img.mode in ("CMYK", "YCbCr", "LAB", "HSV"):
                img = img.convert("RGB")
            elif img.mode in ("I;16", "I;16B", "I;16L", "I"):
                img = img.convert("F")
            native = len(img.getbands())
            if native == 1 and channels == 3:
                img = img.convert("RGB")  # grayscale replicated into R, G, B
            elif native != channels:
                raise DataError(f"{path}: image has {native} channel(s) (mode {im.mode}), the model input expects "
                                f"{channels}; convert the images or fix model.input.shape")
            if p.resize:
                img = img.resize(_resized_size(img.width, img.height, p.resize), Image.BILINEAR)
            if p.center_crop:
                if p.center_crop > min(img.width, img.height):
                    raise DataError(f"{path}: image is {img.width}x{img.height} (after resize={p.resize}), smaller "
                                    f"than data.preprocess.center_crop={p.center_crop}; set resize >= center_crop")
                img = img.crop(_crop_box(img.width, img.height, p.center_crop))
            arr = np.asarray(img, dtype=np.float32)
    except DataError:
        raise
    except Exception as e:  # PIL.UnidentifiedImageError, truncated files, ...
        raise DataError(f"{path}: cannot decode image ({type(e).__name__}: {str(e)[:200]})") from None
    return arr[:, :, None] if arr.ndim == 2 else arr


def _resize_crop_array(hwc: np.ndarray, p: PreprocessConfig) -> np.ndarray:
    """The image resize and centre crop for one float HWC array (per channel, PIL mode F)."""
    from PIL import Image

    out = hwc
    if p.resize:
        h, w = out.shape[:2]
        size = _resized_size(w, h, p.resize)
        out = np.stack([np.asarray(Image.fromarray(np.ascontiguousarray(out[:, :, c], np.float32))
                                   .resize(size, Image.BILINEAR)) for c in range(out.shape[2])], axis=2)
    if p.center_crop:
        h, w = out.shape[:2]
        if p.center_crop > min(h, w):
            raise DataError(f"samples are {w}x{h} (after resize={p.resize}), smaller than "
                            f"data.preprocess.center_crop={p.center_crop}; set resize >= center_crop")
        left, top, right, bottom = _crop_box(w, h, p.center_crop)
        out = out[top:bottom, left:right]
    return out


def _channel_axis(ndim: int, layout: str) -> int:
    return -1 if layout == "nhwc" else 1


def _normalize(out: np.ndarray, p: PreprocessConfig, axis: int) -> np.ndarray:
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


def preprocess(x: np.ndarray, data: DataConfig) -> np.ndarray:
    """Arrays in the model's layout: optional resize / centre crop, then scale, mean/std, dtype."""
    p = data.preprocess
    out = np.asarray(x)
    if p.resize or p.center_crop:
        if out.ndim != 4:
            raise DataError(f"data.preprocess.resize/center_crop need image arrays (N, C, H, W) or (N, H, W, C), "
                            f"got shape {out.shape}")
        hwc = out if p.layout == "nhwc" else out.transpose(0, 2, 3, 1)
        done = np.stack([_resize_crop_array(np.asarray(s, np.float32), p) for s in hwc])
        out = done if p.layout == "nhwc" else done.transpose(0, 3, 1, 2)
    out = _normalize(out, p, _channel_axis(out.ndim, p.layout))
    return np.ascontiguousarray(out.astype(p.dtype, copy=False))


def _load_images(files: _ImageFiles, idx: np.ndarray, data: DataConfig, spec: InputSpec) -> Samples:
    """Decode and preprocess the images at ``idx`` into one preallocated array."""
    p = data.preprocess
    what = f"data.source=image_folder ({files.root})"
    channels, height, width = _image_geometry(spec, p, what)
    shape = (len(idx), channels, height, width) if p.layout == "nchw" else (len(idx), height, width, channels)
    x = np.empty(shape, dtype=p.dtype)
    for k, i in enumerate(idx):
        path = files.files[i]
        img = _decode_image(path, channels, p)
        if img.shape[:2] != (height, width):
            raise DataError(
                f"{path}: image is {img.shape[1]}x{img.shape[0]} after preprocessing (resize={p.resize}, "
                f"center_crop={p.center_crop}), the model's input '{spec.name}' expects {width}x{height}; "
                "set data.preprocess.resize/center_crop or fix model.input.shape")
        if p.channel_order == "bgr":
            img = img[:, :, ::-1]
        img = _normalize(img, p, -1)
        x[k] = img.transpose(2, 0, 1) if p.layout == "nchw" else img
    y = None if files.y is None else files.y[idx]
    return Samples(x=x, y=y, ids=[str(files.files[i]) for i in idx], classes=files.classes)


def check_shape(samples: Samples, spec: InputSpec, what: str) -> None:
    if len(samples) == 0:
        raise DataError(f"{what}: dataset is empty; it needs at least one sample of shape {spec.shape}")
    got = list(samples.x.shape[1:])
    if got != list(spec.shape):
        raise DataError(
            f"{what}: samples have shape {got}, the model's input '{spec.name}' expects {list(spec.shape)}; "
            "fix data.preprocess (resize/center_crop/layout) or model.input.shape"
        )
    if samples.y is not None and samples.y.shape[0] != samples.x.shape[0]:
        raise DataError(f"{what}: {samples.x.shape[0]} samples but {samples.y.shape[0]} labels")
    finite = np.isfinite(samples.x)
    if not finite.all():
        bad = int(np.flatnonzero(~finite.reshape(len(samples), -1).all(axis=1))[0])
        where = samples.ids[bad] if samples.ids else f"sample {bad}"
        raise DataError(f"{what}: {where} contains NaN or Inf after preprocessing")


def _materialize(raw: _Raw, idx: np.ndarray, data: DataConfig, spec: InputSpec, what: str) -> Samples:
    """Preprocessed samples ``idx`` of a source, checked against the model's input."""
    if isinstance(raw, _ImageFiles):
        out = _load_images(raw, idx, data, spec)
    else:
        part = raw.take(idx)
        out = Samples(preprocess(part.x, data), part.y, part.ids)
    if len(idx):
        check_shape(out, spec, what)
    return out


def _load_source(data: DataConfig, location: Optional[str], key: str) -> _Raw:
    if data.source not in SOURCES:
        raise DataError(f"data.source '{data.source}' is not supported; choose one of {sorted(SOURCES)}")
    raw = SOURCES[data.source](data, location, key)
    if len(raw) == 0:
        where = f" ({location})" if location else ""
        raise DataError(f"data.source={data.source}{where}: dataset is empty; point {key} at data with at least one sample")
    return raw


def _check_disjoint(data: DataConfig, main: _Raw, calib: _Raw) -> None:
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
    if isinstance(main, _ImageFiles) and isinstance(calib, _ImageFiles):
        shared = {os.path.realpath(f) for f in main.files} & {os.path.realpath(f) for f in calib.files}
        if shared:
            raise DataError(f"data.calibration_path ({data.calibration_path}) shares {len(shared)} image(s) with "
                            f"data.path, e.g. {sorted(shared)[0]}; calibration must not overlap evaluation")


def load_splits(data: DataConfig, spec: InputSpec) -> Splits:
    """Load the configured source(s), preprocess them and split them deterministically."""
    what = f"data.source={data.source}" + (f" ({data.path})" if data.path else "")
    raw = _load_source(data, data.path, "data.path")
    rng = np.random.default_rng(data.seed)
    order = rng.permutation(len(raw))
    if data.max_samples:
        order = order[: data.max_samples]
    n = len(order)
    s = data.split
    if data.calibration_path:
        cal_raw = _load_source(data, data.calibration_path, "data.calibration_path")
        _check_disjoint(data, raw, cal_raw)
        share = s.train / (s.train + s.evaluation)
        n_train = int(round(n * share))
        n_eval = n - n_train
        if n_eval < 1:
            raise DataError(f"{what}: {n} samples leave no evaluation set (split.train={s.train}, "
                            f"split.evaluation={s.evaluation})")
        cal_order = np.random.default_rng(data.seed).permutation(len(cal_raw))
        cal_what = f"data.source={data.source} ({data.calibration_path})"
        return Splits(train=_materialize(raw, order[:n_train], data, spec, what),
                      calibration=_materialize(cal_raw, cal_order, data, spec, cal_what),
                      evaluation=_materialize(raw, order[n_train:], data, spec, what))
    n_train = int(round(n * s.train))
    n_cal = int(round(n * s.calibration))
    n_eval = min(int(round(n * s.evaluation)), n - n_train - n_cal)
    if n_cal < 1 or n_eval < 1:
        raise DataError(f"{what}: {n} samples are too few to split into calibration ({n_cal}) and "
                        f"evaluation ({n_eval}) sets")
    idx_train, idx_cal = order[:n_train], order[n_train : n_train + n_cal]
    idx_eval = order[n_train + n_cal : n_train + n_cal + n_eval]
    return Splits(train=_materialize(raw, idx_train, data, spec, what),
                  calibration=_materialize(raw, idx_cal, data, spec, what),
                  evaluation=_materialize(raw, idx_eval, data, spec, what))


# -- which calibration samples, in which batches ------------------------------------------------
def load_calibration_samples(path: Path, input_shape: list[int]) -> np.ndarray:
    """The prepared samples, memory-mapped, checked against the model's input shape."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: calibration samples not found; run the prepare stage first")
    try:
        x = np.load(path, mmap_mode="r", allow_pickle=False)
    except Exception as e:
        raise DataError(f"{path}: not a readable .npy array ({type(e).__name__}: {e})") from None
    if not isinstance(x, np.ndarray) or x.dtype.kind != "f":
        raise DataError(f"{path}: calibration samples must be a float array, got "
                        f"{getattr(x, 'dtype', type(x).__name__)}; re-run prepare")
    if list(x.shape[1:]) != list(input_shape):
        raise DataError(f"{path}: samples have shape {list(x.shape[1:])}, the model input expects "
                        f"{list(input_shape)}; re-run prepare with this config")
    return x


def calibration_indices(num_available: int, num_samples: int, seed: int) -> np.ndarray:
    """Indices of the prepared calibration samples to use, in the order they are fed.

    All of them, in file order, when ``num_samples >= num_available``; otherwise a seeded
    choice (``numpy.random.default_rng(seed)``) of ``num_samples``, kept in file order.
    """
    if num_available <= 0:
        raise CalibrationError("the calibration set is empty; prepare needs data.split.calibration > 0")
    if num_samples >= num_available:
        return np.arange(num_available)
    return np.sort(np.random.default_rng(seed).choice(num_available, size=num_samples, replace=False))


def calibration_batches(x: np.ndarray, indices: np.ndarray, batch_size: int,
                        source: str = "calibration data") -> Iterator[np.ndarray]:
    """Full batches of ``x[indices]`` in order (a last partial batch is dropped, as a
    calibrator with a fixed batch size would). Reads one batch at a time, so ``x`` can be
    a memory-mapped ``.npy``. Fewer samples than one batch is an error naming ``source``."""
    if len(indices) < batch_size:
        raise CalibrationError(
            f"{source}: {len(indices)} calibration samples are fewer than one batch of {batch_size} "
            "(calibration.batch_size); lower calibration.batch_size or provide more calibration samples")
    return _iter_batches(x, np.asarray(indices), int(batch_size))


def _iter_batches(x: np.ndarray, indices: np.ndarray, batch_size: int) -> Iterator[np.ndarray]:
    contiguous = bool(np.all(np.diff(indices) == 1)) if len(indices) > 1 else True
    for b in range(len(indices) // batch_size):
        sel = indices[b * batch_size:(b + 1) * batch_size]
        if contiguous:
            yield np.ascontiguousarray(x[sel[0]:sel[-1] + 1])
        else:
            yield np.ascontiguousarray(x[sel])


__all__ = ["Samples", "Splits", "load_splits", "preprocess", "check_shape", "calibration_indices",
           "calibration_batches", "IMAGE_EXTENSIONS", "SOURCES"]
