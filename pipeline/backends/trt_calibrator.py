"""TensorRT's own INT8 calibrators for the implicit INT8 route: `IInt8EntropyCalibrator2`
and `IInt8MinMaxCalibrator`, sharing one mixin.

tensorrt is imported only inside `make_calibrator`, so this module imports on a CPU
machine without it. A calibrator is fed prepared batches (a numpy array of samples
cut into batches, or an iterable of batches), copies each batch to device buffers
through `pipeline.runtime.cuda_memory` and hands TensorRT the device pointers.

Cache handling: `read_cache_from` (optional) is offered to TensorRT only when its header
matches this TensorRT version and the calibrator's algorithm (checked with
`calibration.cache.read_cache`); otherwise the calibrator says which header it found and
what was expected, and TensorRT calibrates with the data. Whatever cache TensorRT writes
goes to `cache_path`. Counters (`get_batch_calls`, `cache_reads`, `num_samples`) let
callers and tests see whether calibration ran.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional, Union

import numpy as np

from calibration.cache import CALIBRATOR_ALGORITHM
from calibration.errors import CalibrationError

from ..log import get_logger as trtpipe_logger

Batch = Union[np.ndarray, Mapping[str, np.ndarray]]


def split_batches(samples: np.ndarray, batch_size: int) -> tuple[list[np.ndarray], int]:
    """Cut `samples` (N, ...) into full batches of `batch_size` (TensorRT's calibration
    profile has one fixed batch size). Returns (batches, samples left out). With fewer
    than `batch_size` samples, one batch of all of them; the caller must then use
    len(samples) as the calibration batch size."""
    if batch_size < 1:
        raise CalibrationError(f"calibration batch size must be >= 1, got {batch_size}")
    n = int(samples.shape[0])
    if n == 0:
        raise CalibrationError("no calibration samples: the calibration set is empty")
    if n < batch_size:
        return [samples], 0
    full = n // batch_size
    return [samples[i * batch_size:(i + 1) * batch_size] for i in range(full)], n - full * batch_size


class _CalibratorMixin:
    """State and behaviour shared by both calibrator classes (TensorRT base comes second)."""

    def _setup(self, kind: str, batches: Iterable[Batch], batch_size: int, cache_path: Optional[Path],
               read_cache_from: Optional[Path], memory: str, progress: bool, log: Callable[[str], None],
               trt_version: str, num_batches: Optional[int], dtypes: Optional[Mapping[str, Any]] = None) -> None:
        from ..runtime.cuda_memory import open_memory

        self.kind = kind
        self.algorithm = CALIBRATOR_ALGORITHM[kind]
        self.batch_size = int(batch_size)
        self.cache_path = Path(cache_path) if cache_path else None
        self.read_cache_from = Path(read_cache_from) if read_cache_from else None
        self.trt_version = trt_version
        self.log = log
        self.progress = progress
        self.num_batches = num_batches
        self.dtypes = {k: np.dtype(v) for k, v in (dtypes or {}).items()}
        self.get_batch_calls = 0
        self.batches_fed = 0
        self.num_samples = 0
        self.cache_reads = 0
        self.cache_used: Optional[str] = None  # header of the cache handed to TensorRT
        self.cache_rejected: Optional[str] = None  # why read_cache_from was not used
        self.cache_written: Optional[Path] = None
        self.cache_bytes: Optional[bytes] = None
        self.error: Optional[BaseException] = None
        self._iter = iter(batches)
        self._mem = open_memory(memory)
        self._buffers: dict[str, Any] = {}
        self._bar: Any = None

    # -- TensorRT's interface ---------------------------------------------------------------
    def get_batch_size(self) -> int:
        return self.batch_size

    def get_batch(self, names: list[str], *unused: Any) -> Optional[list[int]]:
        self.get_batch_calls += 1
        try:
            batch = next(self._iter)
        except StopIteration:
            self._close_bar()
            return None
        except BaseException as e:  # an error in the caller's iterator: TensorRT would swallow it
            self.error = e
            return None
        try:
            return self._to_device(names, batch)
        except BaseException as e:
            self.error = e
            return None

    def read_calibration_cache(self, *unused: Any) -> Optional[bytes]:
        from calibration.cache import read_cache
        from calibration.errors import CacheMismatchError

        self.cache_reads += 1
        path = self.read_cache_from
        if path is None:
            return None
        if not path.is_file():
            self._reject(f"calibration cache {path} does not exist")
            return None
        try:
            cache = read_cache(path, expect_version=self.trt_version, expect_algorithm=self.algorithm)
        except CacheMismatchError as e:
            self._reject(str(e))
            return None
        except CalibrationError as e:
            self._reject(f"calibration cache {path} is unreadable: {e}")
            return None
        if self.cache_used is None:
            self.log(f"calibration: using cache {path} ({cache.header}, {len(cache.scales)} tensors); "
                     "TensorRT skips calibration")
        self.cache_used = cache.header
        return path.read_bytes()

    def write_calibration_cache(self, cache: Any, *unused: Any) -> None:
        data = cache.tobytes() if hasattr(cache, "tobytes") else bytes(cache)
        self.cache_bytes = data
        if self.cache_path is not None:
            from ..fileio import write_bytes

            write_bytes(self.cache_path, data)
            self.cache_written = self.cache_path

    # -- helpers -------------------------------------------------------------------------------
    def _reject(self, why: str) -> None:
        if self.cache_rejected is None:
            self.log(f"calibration: not using the given cache, calibrating with the dataset instead: {why}")
        self.cache_rejected = why

    def _to_device(self, names: list[str], batch: Batch) -> list[int]:
        if isinstance(batch, Mapping):
            feeds = batch
        elif len(names) == 1:
            feeds = {names[0]: batch}
        else:
            raise CalibrationError(f"the network has {len(names)} inputs {names}; feed calibration batches as "
                                   "{input name: array} mappings")
        ptrs = []
        n = None
        for name in names:
            if name not in feeds:
                raise CalibrationError(f"calibration batch has no array for network input '{name}' (has {list(feeds)})")
            a = np.ascontiguousarray(feeds[name], dtype=self.dtypes.get(name, np.float32))
            if a.shape[0] != self.batch_size:
                raise CalibrationError(f"calibration batch for '{name}' has {a.shape[0]} samples; "
                                       f"the calibrator's batch size is {self.batch_size}")
            buf = self._buffers.get(name)
            if buf is None or buf.nbytes < a.nbytes:
                if buf is not None:
                    buf.free()
                buf = self._buffers[name] = self._mem.alloc_device(a.nbytes)
            with self._mem.activate():
                self._mem.htod(buf.ptr, a)
            ptrs.append(buf.ptr)
            n = a.shape[0]
        self.batches_fed += 1
        self.num_samples += int(n or 0)
        if self.progress:
            if self._bar is None:
                from ..log import progress_bar

                self._bar = progress_bar(total=self.num_batches, desc=f"calibrating ({self.algorithm})", unit="batch")
            self._bar.update(1)
        return ptrs

    def _close_bar(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def info(self) -> dict[str, Any]:
        return {
            "algorithm": self.algorithm,
            "calibrator": self.kind,
            "batch_size": self.batch_size,
            "get_batch_calls": self.get_batch_calls,
            "batches_fed": self.batches_fed,
            "num_samples": self.num_samples,
            "cache_reads": self.cache_reads,
            "cache_used": self.cache_used,
            "cache_rejected": self.cache_rejected,
            "cache_written": str(self.cache_written) if self.cache_written else None,
        }

    def raise_if_failed(self) -> None:
        """Re-raise an error that happened inside get_batch (TensorRT only sees 'no more batches')."""
        if self.error is not None:
            err, self.error = self.error, None
            raise err

    def free(self) -> None:
        self._close_bar()
        for buf in self._buffers.values():
            buf.free()
        self._buffers.clear()
        mem, self._mem = getattr(self, "_mem", None), None
        if mem is not None:
            mem.close()


_CLASSES: dict[str, type] = {}


def _calibrator_class(kind: str) -> type:
    if kind not in CALIBRATOR_ALGORITHM:
        raise CalibrationError(f"unknown TensorRT calibrator {kind!r}; choose one of {', '.join(CALIBRATOR_ALGORITHM)} "
                               "(build.int8_calibrator)")
    if kind not in _CLASSES:
        from ..runtime.trt_common import require_tensorrt

        trt = require_tensorrt()
        base = trt.IInt8EntropyCalibrator2 if kind == "entropy2" else trt.IInt8MinMaxCalibrator

        class _Calibrator(_CalibratorMixin, base):  # type: ignore[misc, valid-type]
            def __init__(self, **kw: Any) -> None:
                base.__init__(self)
                self._setup(**kw)

        _Calibrator.__name__ = _Calibrator.__qualname__ = (
            "EntropyCalibrator2" if kind == "entropy2" else "MinMaxCalibrator")
        _CLASSES[kind] = _Calibrator
    return _CLASSES[kind]


def make_calibrator(
    kind: str,
    batches: Union[np.ndarray, Iterable[Batch]],
    cache_path: Optional[Union[str, Path]] = None,
    *,
    batch_size: Optional[int] = None,
    read_cache_from: Optional[Union[str, Path]] = None,
    memory: str = "auto",
    progress: bool = True,
    log: Optional[Callable[[str], None]] = None,
    dtypes: Optional[Mapping[str, Any]] = None,
    num_batches: Optional[int] = None,
) -> Any:
    """A TensorRT calibrator ("entropy2" -> IInt8EntropyCalibrator2, "minmax" ->
    IInt8MinMaxCalibrator). `batches`: an array of samples (cut into `batch_size`
    batches; default 32), or an iterable of batches (arrays or {input: array}) of
    `batch_size` samples each. `dtypes`: the network's input dtypes (input -> numpy
    dtype; default float32): integer inputs are fed as integers. Call `.free()` after the build."""
    cls = _calibrator_class(kind)
    from ..runtime.trt_common import require_tensorrt

    trt = require_tensorrt()
    if isinstance(batches, np.ndarray):
        batches, dropped = split_batches(batches, batch_size or 32)
        batch_size = int(batches[0].shape[0])
        num_batches = len(batches)
        if dropped and log:
            log(f"calibration: {dropped} samples left out (not a full batch of {batch_size})")
    else:
        if isinstance(batches, (list, tuple)):
            num_batches = len(batches)
            if batch_size is None and batches:
                first = batches[0]
                batch_size = int(next(iter(first.values())).shape[0] if isinstance(first, Mapping) else first.shape[0])
        if batch_size is None:
            raise CalibrationError("make_calibrator needs batch_size when batches is an iterator")
    return cls(kind=kind, batches=batches, batch_size=batch_size, cache_path=cache_path,
               read_cache_from=read_cache_from, memory=memory, progress=progress,
               log=log or trtpipe_logger(__name__).info, trt_version=trt.__version__,
               num_batches=num_batches, dtypes=dtypes)
