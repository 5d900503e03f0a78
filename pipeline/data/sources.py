"""Raw data sources (`data.source`), read into named arrays before preprocessing.

* ``digits``: scikit-learn's 1797 labelled 8x8 digits, (N, 1, 8, 8), values 0..16 (one input).
* ``npz``: one array per model input under the input's name (``x`` is accepted for a
  one-input model) and optionally the labels under ``data.labels_key`` (default ``y``).
* ``npy``: one array of samples (one-input models).
* ``image_folder``: one subfolder per class (labels: the sorted subfolder names' indices,
  as torchvision's ImageFolder) or flat (no labels); listed here, decoded by the splits.
* ``factory``: ``module:function``; ``function()`` returns an iterable of batches, each an
  array ``x``, a pair ``(x, y)``, a dict of named arrays (labels under ``data.labels_key``)
  or a pair ``(dict, y)``. Batches may differ in the sizes of named dynamic axes (sequences
  of different lengths): they are padded to a common length. An endless generator needs
  ``data.max_samples``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np

from ..config import DataConfig, TensorSpec
from ..errors import DataError
from ..plugins import load_callable
from .images import ImageFiles, list_image_folder
from .preprocess import pad_concat
from .samples import Samples

Raw = Union[Samples, ImageFiles]


def check_labels(y: Any, n: int, where: str) -> np.ndarray:
    """Labels must be real numbers, finite, and one per sample."""
    y = np.asarray(y)
    if y.dtype.kind not in "biuf":
        raise DataError(f"{where}: labels have dtype {y.dtype}; labels must be numbers (class indices for top-k): "
                        "map class names to indices first")
    if y.ndim == 0 or y.shape[0] != n:
        raise DataError(f"{where}: {0 if y.ndim == 0 else y.shape[0]} labels for {n} samples; give one label per sample")
    if y.dtype.kind == "f" and not np.isfinite(y).all():
        bad = int(np.flatnonzero(~np.isfinite(y.reshape(n, -1)).all(axis=1))[0])
        raise DataError(f"{where}: label {bad} is {y.reshape(n, -1)[bad][0]}; labels must be finite numbers")
    if y.dtype.kind == "f" and np.array_equal(y, np.round(y)):
        y = y.astype(np.int64)  # integral float labels (a common export) become class indices
    elif y.dtype.kind in "biu":
        y = y.astype(np.int64)
    return y


def _digits(data: DataConfig, location: Optional[str], key: str, inputs: Sequence[TensorSpec]) -> Samples:
    from sklearn.datasets import load_digits

    spec = _one_input(inputs, "digits")
    d = load_digits()
    x = d.images.astype(np.float32)[:, None, :, :]  # (1797, 1, 8, 8), values 0..16
    return Samples({spec.name: x}, d.target.astype(np.int64), ids=[f"digits[{i}]" for i in range(len(x))])


def _one_input(inputs: Sequence[TensorSpec], source: str) -> TensorSpec:
    if len(inputs) != 1:
        raise DataError(f"data.source '{source}' holds one array of samples, but the model has {len(inputs)} inputs "
                        f"({', '.join(i.name for i in inputs)}); use data.source npz (one key per input) or factory")
    return inputs[0]


def _arrays(data: DataConfig, location: Optional[str], key: str, inputs: Sequence[TensorSpec]) -> Samples:
    if not location:
        raise DataError(f"data.source is '{data.source}' but {key} is not set; point it at the array file")
    path = Path(location)
    from ..fileio import not_a_folder

    not_a_folder(path, f"the data file ({key})", DataError)
    if not path.is_file():
        raise DataError(f"{path}: data file not found ({key})")
    try:
        loaded = np.load(path, allow_pickle=False)
        if isinstance(loaded, np.ndarray):
            arrays, y = {_one_input(inputs, data.source).name: loaded}, None
        else:
            with loaded:
                keys = set(loaded.files)
                names = [i.name for i in inputs]
                if all(n in keys for n in names):
                    arrays = {n: loaded[n] for n in names}
                elif len(names) == 1 and "x" in keys:
                    arrays = {names[0]: loaded["x"]}
                else:
                    want = ", ".join(f"'{n}'" for n in names) + (" (or 'x')" if len(names) == 1 else "")
                    raise DataError(f"{path}: an .npz dataset needs an array per model input named {want} and "
                                    f"optionally labels '{data.labels_key}'; found {sorted(keys)}")
                y = loaded[data.labels_key] if data.labels_key in keys else None
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"{path}: cannot read as {data.source} ({type(e).__name__}: {str(e)[:200]})") from None
    n = {k: (v.shape[0] if v.ndim else 0) for k, v in arrays.items()}
    for name, a in arrays.items():
        if a.ndim < 1:
            raise DataError(f"{path}: expected samples of shape (N, ...) for input '{name}', got an array of shape {a.shape}")
    if len(set(n.values())) != 1:
        raise DataError(f"{path}: inputs hold different numbers of samples {n}; every input needs one row per sample")
    count = next(iter(n.values()))
    if y is not None:
        y = check_labels(y, count, f"{path} ({data.labels_key})")
    specs = {i.name: i for i in inputs}
    arrays = {k: pad_concat([v], specs[k], data, str(path)) if specs[k].dynamic_axes and data.pad_to else v
              for k, v in arrays.items()}
    return Samples(arrays, y, ids=[f"{path}[{i}]" for i in range(count)])


def _image_folder(data: DataConfig, location: Optional[str], key: str, inputs: Sequence[TensorSpec]) -> ImageFiles:
    _one_input(inputs, "image_folder")
    return list_image_folder(location, key)


def _split_batch(batch: Any, i: int, spec: str, data: DataConfig, names: list[str]) -> tuple[dict[str, Any], Any]:
    y = None
    if isinstance(batch, (tuple, list)):
        if len(batch) != 2:
            raise DataError(f"{spec}: batch {i} is a sequence of {len(batch)} items; yield x, (x, y), a dict of "
                            "named arrays, or (dict, y)")
        batch, y = batch
    if isinstance(batch, dict):
        missing = [n for n in names if n not in batch]
        if missing:
            raise DataError(f"{spec}: batch {i} has keys {sorted(batch)}, missing model input(s) {missing}")
        if data.labels_key in batch:
            if y is not None:
                raise DataError(f"{spec}: batch {i} gives labels twice (as '{data.labels_key}' and as the pair's second item)")
            y = batch[data.labels_key]
        return {n: batch[n] for n in names}, y
    if len(names) != 1:
        raise DataError(f"{spec}: batch {i} is one array, but the model has inputs {names}; yield a dict of named arrays")
    return {names[0]: batch}, y


def _factory(data: DataConfig, location: Optional[str], key: str, inputs: Sequence[TensorSpec]) -> Samples:
    spec = location or ""
    fn: Callable[..., Any] = load_callable(spec, key, DataError)
    names = [i.name for i in inputs]
    parts: dict[str, list[np.ndarray]] = {n: [] for n in names}
    ys: list[Optional[np.ndarray]] = []
    count = 0
    i = -1
    try:
        iterator = iter(fn())
        for i, batch in enumerate(iterator):
            x, y = _split_batch(batch, i, spec, data, names)
            arrays = {n: np.asarray(v) for n, v in x.items()}
            sizes = {n: (a.shape[0] if a.ndim else 0) for n, a in arrays.items()}
            if any(a.ndim < 1 for a in arrays.values()) or len(set(sizes.values())) != 1:
                raise DataError(f"{spec}: batch {i} has shapes {[list(a.shape) for a in arrays.values()]}; yield "
                                "batches of shape (N, ...) with the same N for every input")
            n = next(iter(sizes.values()))
            if y is not None:
                y = check_labels(y, n, f"{spec}: batch {i}")
            if ys and (y is None) != (ys[0] is None):
                raise DataError(f"{spec}: batch {i} is {'un' if y is None else ''}labelled but batch 0 was "
                                f"{'' if y is None else 'un'}labelled; every batch must match")
            for name, a in arrays.items():
                parts[name].append(a)
            ys.append(y)
            count += n
            if data.max_samples and count >= data.max_samples:
                break
    except DataError:
        raise
    except Exception as e:  # the user's generator raised
        at = f"at batch {i + 1}" if i >= 0 else "before the first batch"
        raise DataError(f"{key} '{spec}' raised {type(e).__name__} {at}: {str(e).splitlines()[0][:200] if str(e) else ''}; "
                        "fix the data factory") from None
    if not ys:
        raise DataError(f"{spec}: the factory yielded no batches")
    specs = {s.name: s for s in inputs}
    x_all = {n: pad_concat(p, specs[n], data, spec) for n, p in parts.items()}
    y_all = None if ys[0] is None else np.concatenate(ys)  # type: ignore[arg-type]
    return Samples(x_all, y_all, ids=[f"{spec}[{k}]" for k in range(count)])


SOURCES = {"digits": _digits, "npz": _arrays, "npy": _arrays, "image_folder": _image_folder, "factory": _factory}


def load_source(data: DataConfig, location: Optional[str], key: str, inputs: Sequence[TensorSpec]) -> Raw:
    if data.source not in SOURCES:
        raise DataError(f"data.source '{data.source}' is not supported; choose one of {sorted(SOURCES)}")
    raw = SOURCES[data.source](data, location, key, inputs)
    if len(raw) == 0:
        where = f" ({location})" if location else ""
        raise DataError(f"data.source={data.source}{where}: dataset is empty; point {key} at data with at least one sample")
    return raw
