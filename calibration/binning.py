"""Bin one batch of many tensors on a pool of threads, in two passes over memory.

1. :meth:`BatchBinner.ranges`: ``(min, max)`` of every tensor, each tensor cut into
   pieces that run in parallel (the kernel's ``range`` where it has one: one compiled pass
   over float32; else numpy's reductions; both release the GIL).
2. The caller turns each range into a :class:`calibration.histogram.BinPlan` (or skips
   the tensor), with the whole batch's ranges known: a NaN anywhere stops the batch
   before any histogram changes.
3. :meth:`BatchBinner.counts`: each tensor's counts under its plan, cut into pieces
   that run in parallel through the kernel (the compiled one and ``np.bincount``
   release the GIL; a device kernel takes whole tensors); the pieces' integer counts
   are summed, so the split never changes a count.

Work items hold views of the activations only while they run: an activation is freed
as soon as its last piece is binned (once the caller holds no reference to it), which
keeps memory low when onnxruntime computes the next batch meanwhile.
"""

from __future__ import annotations

import math
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Optional, Sequence

import numpy as np

from calibration.histogram import BinPlan
from calibration.kernels import abs_range

#: Elements per range piece (64 MiB of float32) and, for CPU kernels, per binning piece.
RANGE_TASK = 1 << 24
BIN_TASK = 1 << 21


def _pieces(size: int, step: int) -> list[tuple[int, int]]:
    step = max(1, int(step))
    return [(start, min(size, start + step)) for start in range(0, size, step)] or [(0, 0)]


def _combine_ranges(parts: Sequence[tuple[float, float]]) -> tuple[float, float]:
    """min of the mins, max of the maxes; NaN if any piece saw NaN (Python's min/max would
    drop it depending on the order)."""
    if any(math.isnan(lo) or math.isnan(hi) for lo, hi in parts):
        return math.nan, math.nan
    return min(lo for lo, _ in parts), max(hi for _, hi in parts)


class BatchBinner:
    """``threads`` workers (1: everything runs in the calling thread) around ``kernel``,
    an object with ``counts(flat, width, num_bins) -> int64 array`` and optionally
    ``task_elements`` (how many elements one piece may hold)."""

    def __init__(self, kernel: Any, threads: int = 1) -> None:
        self.kernel = kernel
        self.threads = max(1, int(threads))
        self._pool: Optional[ThreadPoolExecutor] = None
        if self.threads > 1:
            self._pool = ThreadPoolExecutor(max_workers=self.threads, thread_name_prefix="calib-bin")

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def __enter__(self) -> "BatchBinner":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _map(self, fn: Callable[..., Any], calls: list[tuple[Any, ...]]) -> list[Any]:
        if self._pool is None or len(calls) == 1:
            return [fn(*args) for args in calls]
        futures: list[Future] = [self._pool.submit(fn, *args) for args in calls]
        calls.clear()  # the pool's work items hold the only references now
        try:
            return [f.result() for f in futures]
        except BaseException:
            for f in futures:
                f.cancel()
            raise

    def ranges(self, arrays: Sequence[np.ndarray]) -> list[tuple[float, float]]:
        """``(min, max)`` of each 1-D array (NaN when it holds a NaN; ``(0, 0)`` if empty)."""
        calls, owner = [], []
        for k, flat in enumerate(arrays):
            for a, b in _pieces(flat.size, RANGE_TASK):
                calls.append((flat[a:b],))
                owner.append(k)
        parts: list[list[tuple[float, float]]] = [[] for _ in arrays]
        for k, r in zip(owner, self._map(getattr(self.kernel, "range", abs_range), calls)):
            parts[k].append(r)
        return [_combine_ranges(p) for p in parts]

    def counts(self, jobs: list[tuple[np.ndarray, BinPlan, bool]]) -> list[np.ndarray]:
        """Counts of each 1-D array under its plan, of ``|x|`` or, where the job's flag says
        so, of ``max(x, 0)`` (a Relu output binned from its input). Takes ownership of
        ``jobs`` (emptied, so that each array can be freed once binned)."""
        step = int(getattr(self.kernel, "task_elements", BIN_TASK))
        calls, owner, plans = [], [], []
        for k, (flat, plan, positive) in enumerate(jobs):
            plans.append(plan)
            for a, b in _pieces(flat.size, step):
                calls.append((flat[a:b], plan.width, plan.num_bins, positive))
                owner.append(k)
        jobs.clear()
        flat = None  # type: ignore[assignment]
        totals = [np.zeros(p.num_bins, dtype=np.int64) for p in plans]
        for k, c in zip(owner, self._map(self.kernel.counts, calls)):
            totals[k] += c
        return totals
