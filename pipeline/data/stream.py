"""Streamed image samples: a split of an image folder kept as an index of its files, decoded
batch by batch, never held whole.

`prepare` writes a streamed split as the same `calib.npz` / `eval.npz` it writes for an
in-memory one, holding instead of the pixels the index: every file (as prepare found it),
its sha256, the labels, and the preprocessing that turns a file into a sample. Reading it
gives a `Samples` whose input is an :class:`ImageStream`: numpy-like (``len``, ``shape``,
``dtype``, slices and index arrays along the sample axis), so every stage's batch loop
works unchanged, but a slice decodes just those files, in a thread pool, and the next
slice of the same size is decoded in the background while the model runs (a bounded
prefetch of one batch). A file whose bytes changed since prepare indexed it is an error
naming the file; decoding hashes the bytes it reads anyway.

`data.stream` decides: `true` streams every image-folder split, `false` none, `auto` (the
default) the splits that would take more than `STREAM_ABOVE_MB` as float32 arrays. Small
datasets stay arrays, as fast as before."""

from __future__ import annotations

import hashlib
import io
import json
import os
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from ..config import PreprocessConfig, TensorSpec
from ..errors import DataError

STREAM_ABOVE_MB = 512  # data.stream: auto streams a split larger than this as float32
INDEX_KEY = "__stream__"  # the npz member that marks a streamed split (JSON: input, preprocessing, files, sha256)


def default_threads() -> int:
    from calibration.collect import available_cores

    return max(1, available_cores())


def should_stream(setting: Any, num: int, spec: TensorSpec) -> bool:
    """Whether a split of `num` images of input `spec` streams under `data.stream`."""
    if setting is True or setting is False:
        return bool(setting)
    nbytes = num * int(np.prod([d for d in spec.shape if isinstance(d, int)])) * np.dtype(spec.dtype).itemsize
    return nbytes > STREAM_ABOVE_MB * (1 << 20)


def _decode_bytes(data: bytes, path: str, spec: TensorSpec, p: PreprocessConfig) -> np.ndarray:
    from .images import decode_sample

    return decode_sample(io.BytesIO(data), path, spec, p)


class ImageStream:
    """(N, *sample shape) samples of image files, decoded on demand (see the module docstring)."""

    def __init__(self, files: Sequence[str], sha256: Optional[Sequence[str]], spec: TensorSpec, preprocess: PreprocessConfig,
                 threads: Optional[int] = None) -> None:
        from .images import image_geometry

        self.files = list(files)
        self.sha256 = list(sha256) if sha256 is not None else None
        self.spec = spec
        self.preprocess = preprocess
        image_geometry(spec, preprocess, "a streamed image split")  # a fixed 3-D shape, in the layout's order
        self.shape = (len(self.files), *spec.shape)
        self.dtype = np.dtype(spec.dtype)
        self.ndim = 4
        self.threads = threads or default_threads()
        self._pool: Optional[ThreadPoolExecutor] = None  # decodes the files of a request
        self._prefetch: Optional[ThreadPoolExecutor] = None  # one worker: asks the pool for the next batch
        self._ahead: Optional[tuple[tuple[int, int], Future]] = None  # only the consumer's thread touches it

    def __len__(self) -> int:
        return len(self.files)

    def __repr__(self) -> str:
        return f"ImageStream({len(self)} files, sample shape {list(self.shape[1:])}, {self.dtype})"

    # -- decoding ----------------------------------------------------------------------------------
    def _one(self, i: int) -> np.ndarray:
        path = self.files[i]
        try:
            data = Path(path).read_bytes()
        except OSError as e:
            raise DataError(f"{path}: cannot read this image ({e.strerror or e}); it was indexed by prepare: restore it "
                            "or re-run prepare (dvc repro prepare)") from None
        if self.sha256 is not None and hashlib.sha256(data).hexdigest() != self.sha256[i]:
            raise DataError(f"{path}: changed since prepare indexed it (sha256 differs); re-run prepare "
                            "(dvc repro prepare)")
        x = _decode_bytes(data, path, self.spec, self.preprocess)
        if self.dtype.kind == "f" and not np.isfinite(x).all():
            raise DataError(f"{path} (input '{self.spec.name}') contains NaN or Inf after preprocessing")
        return x

    def _decode(self, idx: np.ndarray) -> np.ndarray:
        out = np.empty((len(idx), *self.shape[1:]), dtype=self.dtype)
        if len(idx) == 0:
            return out
        pool = self._executor()
        for k, x in enumerate(pool.map(self._one, (int(i) for i in idx))):
            out[k] = x
        return out

    def _executor(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=self.threads, thread_name_prefix="trtpipe-decode")
        return self._pool

    def _slice(self, start: int, stop: int) -> np.ndarray:
        """Samples start..stop-1; the next slice of the same size starts decoding in the background."""
        ahead, self._ahead = self._ahead, None
        if ahead is not None and ahead[0] == (start, stop):
            out = ahead[1].result()
        else:
            if ahead is not None:
                ahead[1].cancel()
            out = self._decode(np.arange(start, stop))
        nxt = (stop, min(len(self), stop + (stop - start)))
        if nxt[1] > nxt[0]:
            if self._prefetch is None:  # its own worker: a decode pool thread waiting on the pool could deadlock it
                self._prefetch = ThreadPoolExecutor(max_workers=1, thread_name_prefix="trtpipe-prefetch")
            self._ahead = (nxt, self._prefetch.submit(self._decode, np.arange(*nxt)))
        return out

    def close(self) -> None:
        if self._ahead is not None:
            self._ahead[1].cancel()
            self._ahead = None
        for pool in (self._prefetch, self._pool):  # the prefetch first: it feeds the decode pool
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
        self._prefetch = self._pool = None

    # -- numpy-like access -------------------------------------------------------------------------
    def __getitem__(self, key: Any) -> np.ndarray:
        n = len(self)
        if isinstance(key, (int, np.integer)):
            i = int(key) + (n if key < 0 else 0)
            if not 0 <= i < n:
                raise IndexError(f"index {key} is out of bounds for {n} samples")
            return self._decode(np.array([i]))[0]
        if isinstance(key, slice):
            start, stop, step = key.indices(n)
            if step == 1:
                return self._slice(start, max(start, stop))
            return self._decode(np.arange(start, stop, step))
        idx = np.asarray(key)
        if idx.dtype == bool:
            idx = np.flatnonzero(idx)
        if idx.ndim != 1 or idx.dtype.kind not in "iu":
            raise TypeError(f"a streamed image split is indexed along its samples only (int, slice or index array), "
                            f"got {key!r}")
        return self._decode(np.where(idx < 0, idx + n, idx))

    def subset(self, idx: Any) -> "ImageStream":
        """The samples at `idx`, still streamed."""
        idx = np.asarray(idx, dtype=np.int64)
        return ImageStream([self.files[i] for i in idx], None if self.sha256 is None else [self.sha256[i] for i in idx],
                           self.spec, self.preprocess, self.threads)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        """Every sample at once: what streaming avoids; logged, so a caller that does it is found."""
        from ..log import get_logger

        get_logger().warning(f"decoding all {len(self)} streamed samples into one array "
                             f"({np.prod(self.shape) * self.dtype.itemsize / 2**20:.0f} MiB)")
        out = self._decode(np.arange(len(self)))
        return out if dtype is None else out.astype(dtype, copy=False)

    # -- the index on disk -------------------------------------------------------------------------
    def index(self) -> dict[str, Any]:
        return {"schema": 1, "input": self.spec.model_dump(mode="json"), "preprocess": self.preprocess.model_dump(mode="json"),
                "files": self.files, "sha256": self.sha256}


def hash_files(files: Sequence[str], threads: Optional[int] = None) -> list[str]:
    """sha256 of every file (fileio.sha256_file), in a thread pool."""
    from ..fileio import sha256_file

    with ThreadPoolExecutor(max_workers=threads or default_threads()) as pool:
        return list(pool.map(sha256_file, files))


def stream_arrays(stream: ImageStream) -> dict[str, np.ndarray]:
    """The npz members of a streamed split (the labels are added by the caller)."""
    index = stream.index()
    return {INDEX_KEY: np.frombuffer(json.dumps(index, sort_keys=True).encode(), dtype=np.uint8)}


def stream_from_npz(member: np.ndarray, where: str, spec: TensorSpec) -> ImageStream:
    """The ImageStream an npz's INDEX_KEY member describes, checked against the model's input."""
    try:
        index = json.loads(bytes(np.asarray(member, dtype=np.uint8)).decode())
        files, sha = list(index["files"]), index.get("sha256")
        written = TensorSpec.model_validate(index["input"])
        preprocess = PreprocessConfig.model_validate(index["preprocess"])
    except Exception as e:
        raise DataError(f"{where}: its index of streamed images cannot be read ({type(e).__name__}); re-run prepare") \
            from None
    if written.name != spec.name or list(written.shape) != list(spec.shape) or written.dtype != spec.dtype:
        raise DataError(f"{where}: indexes images for input '{written.name}' {list(written.shape)} {written.dtype}, the "
                        f"model takes '{spec.name}' {list(spec.shape)} {spec.dtype}; re-run prepare with this config")
    if sha is not None and len(sha) != len(files):
        raise DataError(f"{where}: its index lists {len(files)} files and {len(sha)} checksums; re-run prepare")
    missing = [f for f in files[:1000] if not os.path.isfile(f)]
    if missing:
        raise DataError(f"{where}: indexed image {missing[0]} is gone ({len(missing)} of the first "
                        f"{min(len(files), 1000)} missing); restore the data or re-run prepare")
    return ImageStream(files, sha, spec, preprocess)


__all__ = ["ImageStream", "should_stream", "hash_files", "stream_arrays", "stream_from_npz", "INDEX_KEY",
           "STREAM_ABOVE_MB"]
