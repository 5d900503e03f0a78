"""Named samples in memory and on disk, and the calibration batches cut from them.

On disk a set of samples is one `.npz`: one array per model input under the input's
name, with the batch axis first, and the labels (when known) under `data.labels_key`
(default `y`). It is the format `prepare` writes (`calib.npz`, `eval.npz`) and one of
the formats `data.source: npz` reads."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Sequence, Union

import numpy as np

from ..config import TensorSpec
from ..errors import DataError


@dataclass
class Samples:
    x: dict[str, np.ndarray]  # input name -> (N, *sample shape)
    y: Optional[np.ndarray] = None  # (N, ...) labels when known
    ids: Optional[list[str]] = None  # where each sample came from (file, or "source[index]")
    classes: Optional[list[str]] = None  # class names of an image folder, by label index

    def __len__(self) -> int:
        return int(next(iter(self.x.values())).shape[0]) if self.x else 0

    def take(self, idx: np.ndarray) -> "Samples":
        """The samples at `idx` (a streamed input stays streamed)."""
        return Samples({k: v.subset(idx) if hasattr(v, "subset") else v[idx] for k, v in self.x.items()},
                       None if self.y is None else self.y[idx],
                       None if self.ids is None else [self.ids[i] for i in idx], self.classes)

    @property
    def streamed(self) -> bool:
        """Whether an input is decoded batch by batch (pipeline.data.stream) rather than held."""
        return any(hasattr(v, "subset") for v in self.x.values())


def save_samples(path: Path, samples: Samples, labels_key: str) -> Path:
    """Write `samples` as one `.npz` (atomically)."""
    from ..fileio import atomic_path, write_through

    from .stream import stream_arrays

    arrays: dict[str, np.ndarray] = {}
    for name, v in samples.x.items():
        if hasattr(v, "subset"):  # streamed: the index of its files, not the pixels
            arrays.update(stream_arrays(v))
        else:
            arrays[name] = v
    if samples.y is not None:
        arrays[labels_key] = samples.y
    with atomic_path(path, suffix=".npz") as tmp:
        write_through(tmp, lambda f: np.savez(f, **arrays))
    return Path(path)


def load_samples(path: Path, inputs: Sequence[TensorSpec], labels_key: str = "y",
                 what: str = "samples") -> Samples:
    """Read a samples `.npz` and check it against the model's inputs: every input present,
    with its dtype kind, rank and fixed sizes, and as many samples as labels."""
    path = Path(path)
    from ..fileio import not_a_folder

    not_a_folder(path, f"{what} (an .npz)", DataError)
    if not path.is_file():
        raise DataError(f"{path}: {what} not found; run the prepare stage first")
    try:
        with np.load(path, allow_pickle=False) as z:
            if not hasattr(z, "files"):
                raise DataError(f"{path}: {what} must be an .npz of named arrays, got a single array; re-run prepare")
            arrays = {k: z[k] for k in z.files}
    except DataError:
        raise
    except Exception as e:  # BadZipFile, truncated members, pickled objects
        raise DataError(f"{path}: {what} cannot be read ({type(e).__name__}: {str(e)[:160]}); the file is damaged: "
                        "re-run prepare") from None
    from .stream import INDEX_KEY, stream_from_npz

    if INDEX_KEY in arrays:  # a streamed image split: its one input decodes batch by batch
        if len(inputs) != 1:
            raise DataError(f"{path}: {what} streams images for one input, the model has {len(inputs)}; re-run prepare")
        stream = stream_from_npz(arrays.pop(INDEX_KEY), f"{path}", inputs[0])
        y = arrays.get(labels_key)
        if y is not None and (y.ndim == 0 or y.shape[0] != len(stream)):
            raise DataError(f"{path}: {y.shape[0] if y.ndim else 0} labels for {len(stream)} samples; re-run prepare")
        return Samples({inputs[0].name: stream}, y, ids=list(stream.files))
    missing = [s.name for s in inputs if s.name not in arrays]
    if missing:
        raise DataError(f"{path}: {what} has no array for input(s) {missing} (it holds {sorted(arrays)}); "
                        "re-run prepare with this config")
    x = {s.name: arrays[s.name] for s in inputs}
    n = {k: int(v.shape[0]) if v.ndim else -1 for k, v in x.items()}
    if len(set(n.values())) != 1 or -1 in n.values():
        raise DataError(f"{path}: inputs hold different numbers of samples {n}; re-run prepare")
    for s in inputs:
        check_array(x[s.name], s, f"{path}: input '{s.name}'")
    y = arrays.get(labels_key)
    if y is not None and (y.ndim == 0 or y.shape[0] != next(iter(n.values()))):
        raise DataError(f"{path}: {y.shape[0] if y.ndim else 0} labels for {next(iter(n.values()))} samples; re-run prepare")
    return Samples(x, y)


def check_array(a: np.ndarray, spec: TensorSpec, where: str) -> None:
    """A batched array against its spec: dtype, rank, fixed sizes (named axes take any size)."""
    want = np.dtype(spec.dtype)
    if a.dtype != want:
        raise DataError(f"{where} has dtype {a.dtype}, the model takes {want}; re-run prepare with this config")
    if a.ndim != len(spec.shape) + 1:
        raise DataError(f"{where} has samples of shape {list(a.shape[1:])}, the model expects rank "
                        f"{len(spec.shape)} {list(spec.shape)}")
    for axis, (got, d) in enumerate(zip(a.shape[1:], spec.shape)):
        if isinstance(d, int) and got != d:
            raise DataError(f"{where} has samples of shape {list(a.shape[1:])}, the model expects {list(spec.shape)} "
                            f"(axis {axis + 1} is {got}, not {d})")
    if a.dtype.kind == "f" and a.size and not np.isfinite(a).all():
        bad = int(np.flatnonzero(~np.isfinite(a.reshape(len(a), -1)).all(axis=1))[0])
        raise DataError(f"{where}: sample {bad} contains NaN or Inf; fix the data (or its preprocessing) and re-run prepare")


# -- which calibration samples, in which batches ------------------------------------------------
def calibration_indices(num_available: int, num_samples: int, seed: int) -> np.ndarray:
    """Indices of the prepared calibration samples to use, in the order they are fed.

    All of them, in file order, when ``num_samples >= num_available``; otherwise a seeded
    choice (``numpy.random.default_rng(seed)``) of ``num_samples``, kept in file order.
    """
    from calibration.errors import CalibrationError

    if num_available <= 0:
        raise CalibrationError("the calibration set is empty; prepare needs data.split.calibration > 0 "
                               "(or data.calibration_path)")
    if num_samples >= num_available:
        return np.arange(num_available)
    return np.sort(np.random.default_rng(seed).choice(num_available, size=num_samples, replace=False))


def calibration_batches(x: Union[np.ndarray, Mapping[str, np.ndarray]], indices: np.ndarray, batch_size: int,
                        source: str = "calibration data") -> Iterator[Any]:
    """Full batches of ``x[indices]`` in order (dicts name -> array for a dict ``x``, arrays
    for an array); a last partial batch is dropped, as a calibrator with a fixed batch size
    would. Fewer samples than one batch is an error naming ``source``."""
    from calibration.errors import CalibrationError

    if len(indices) < batch_size:
        raise CalibrationError(
            f"{source}: {len(indices)} calibration samples are fewer than one batch of {batch_size} "
            "(calibration.batch_size); lower calibration.batch_size or provide more calibration samples")
    if isinstance(x, np.ndarray):
        return (b["x"] for b in _iter_batches({"x": x}, np.asarray(indices), int(batch_size)))
    return _iter_batches(dict(x), np.asarray(indices), int(batch_size))


def _iter_batches(x: dict[str, np.ndarray], indices: np.ndarray, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    contiguous = bool(np.all(np.diff(indices) == 1)) if len(indices) > 1 else True
    for b in range(len(indices) // batch_size):
        sel = indices[b * batch_size:(b + 1) * batch_size]
        if contiguous:
            yield {k: np.ascontiguousarray(v[sel[0]:sel[-1] + 1]) for k, v in x.items()}
        else:
            yield {k: np.ascontiguousarray(v[sel]) for k, v in x.items()}
