"""Calibration binning on the GPU, where the TensorRT calibration forward leaves the activations.

`CudaBinner` is the collector's binner (``ranges`` then ``counts`` for one batch, as
:class:`calibration.binning.BatchBinner`) for :class:`DeviceTensor` values: the engine's output
buffers, never copied to the host. Three kernels (``kernels/binning.cu``, shipped as PTX the driver
compiles on first use; ``make ptx`` rebuilds it): per-block (min, max, NaN count) partials that the
host reduces, and the counts of the edge-table binning of :mod:`calibration.kernels` (the bin of a
value is how many float32 thresholds are ``<= |x|``; the thresholds are the CPU's, computed with its
float64 division), in shared memory while ``num_bins`` fits there, else in global memory. Nothing
rounds on the device, so the counts equal the CPU kernels' bit for bit. Every tensor of a batch is
launched on the engine's stream, then one copy brings back all partials (or all counts).

What the device does not take goes to the CPU kernel on a host copy: arrays already on the host
(the fed inputs), dtypes other than float32, plans whose bin width is subnormal (see
:mod:`calibration.gpu_histogram`) and one-bin plans.
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np

PTX_FILE = Path(__file__).with_name("kernels") / "binning.ptx"
SIGNATURES = {"range_f32": "PQPPP", "bin_f32_shared": "PQPiiP", "bin_f32_global": "PQPiiP"}
BLOCK = 256  # kernels/binning.cu's BLOCK
MAX_GRID = 2048
#: Dynamic shared memory without an opt-in: num_bins 32-bit counters and num_bins - 1 thresholds.
SHARED_BYTES = 48 * 1024
MAX_SHARED_BINS = (SHARED_BYTES + 4) // 8
F32 = np.dtype(np.float32)


class DeviceTensor:
    """A tensor in a device buffer (valid until its runner's next batch): ``ptr``, ``shape``,
    ``size``, ``dtype``, and ``host()``, a host view of it (copied once, on demand)."""

    def __init__(self, ptr: int, shape: tuple[int, ...], dtype: Any, to_host: Callable[[], np.ndarray]) -> None:
        self.ptr = int(ptr)
        self.shape = tuple(int(d) for d in shape)
        self.dtype = np.dtype(dtype)
        self.size = int(math.prod(self.shape))
        self._to_host = to_host
        self._host: Optional[np.ndarray] = None

    def host(self) -> np.ndarray:
        if self._host is None:
            self._host = self._to_host().reshape(self.shape)
        return self._host

    def __repr__(self) -> str:
        return f"DeviceTensor({self.shape}, {self.dtype})"


def _grid(n: int) -> int:
    # enough blocks to fill the GPU, few enough that a block's 32-bit counters cannot wrap
    return max(1, min(MAX_GRID, -(-n // (BLOCK * 16))), -(-n // (1 << 31)))


def host_values(x: Any) -> np.ndarray:
    """``x`` (a DeviceTensor or an array) as a flat, contiguous host array."""
    return np.ascontiguousarray(x.host() if isinstance(x, DeviceTensor) else x).reshape(-1)


class CudaBinner:
    """Ranges and counts of one batch's tensors on the device (see the module). ``memory`` and
    ``stream`` are the runner's (:mod:`pipeline.runtime.cuda_memory`); ``cpu`` is the CPU kernel
    (:class:`calibration.kernels.CpuKernel`) for what stays on the host. Raises BackendError when
    the kernels do not load (the caller falls back to host binning)."""

    name = "cuda (PTX, edge tables)"

    def __init__(self, memory: Any, stream: Any, cpu: Any) -> None:
        self._mem, self._stream, self.cpu = memory, stream, cpu
        self._kernels = memory.load_kernels(PTX_FILE.read_bytes(), SIGNATURES)
        self._buffers: dict[str, tuple[Any, Any]] = {}  # role -> (device, pinned host)
        self._tables: dict[tuple[float, int], Any] = {}
        self.device_tensors = 0
        self.launched: Counter[str] = Counter()  # kernel name -> launches

    # -- buffers -------------------------------------------------------------------------------
    def _buffer(self, role: str, nbytes: int) -> tuple[Any, Any]:
        have = self._buffers.get(role)
        if have is None or have[0].nbytes < nbytes:
            if have is not None:
                self._mem.synchronize(self._stream)
                have[0].free()
                have[1].free()
            nbytes = max(int(nbytes), 1 << 16)
            have = self._buffers[role] = (self._mem.alloc_device(nbytes), self._mem.alloc_host(nbytes))
        return have

    def _table(self, width: float, num_bins: int) -> Any:
        from calibration.kernels import threshold_table

        key = (float(width), int(num_bins))
        table = self._tables.get(key)
        if table is None:
            if len(self._tables) > 256:  # plans change only when a histogram grows
                self._mem.synchronize(self._stream)
                for t in self._tables.values():
                    t.free()
                self._tables.clear()
            values = threshold_table(width, num_bins)
            table = self._mem.alloc_device(max(values.nbytes, 4))
            self._mem.htod(table.ptr, values)
            self._tables[key] = table
        return table

    @staticmethod
    def _on_device(x: Any) -> bool:
        return isinstance(x, DeviceTensor) and x.dtype == F32 and x.size > 0

    # -- the collector's binner interface --------------------------------------------------------
    def ranges(self, arrays: Sequence[Any]) -> list[tuple[float, float]]:
        """``(min, max)`` of each tensor (NaN when it holds a NaN; ``(0, 0)`` if empty)."""
        out: list[Optional[tuple[float, float]]] = [None] * len(arrays)
        slots: list[tuple[int, int, int]] = []  # (index, offset, grid)
        total = 0
        for k, x in enumerate(arrays):
            if self._on_device(x):
                g = _grid(x.size)
                slots.append((k, total, g))
                total += g
            else:
                out[k] = self.cpu.range(host_values(x))
        if slots:
            with self._mem.activate():
                dev, host = self._buffer("ranges", total * 12)
                lo, hi, nan = dev.ptr, dev.ptr + total * 4, dev.ptr + total * 8
                for k, offset, g in slots:
                    x = arrays[k]
                    self._kernels.launch("range_f32", g, BLOCK, self._stream,
                                         (x.ptr, x.size, lo + offset * 4, hi + offset * 4, nan + offset * 4))
                    self.launched["range_f32"] += 1
                view = host.view((total * 3,), np.float32)
                self._mem.dtoh_async(view, dev.ptr, self._stream)
                self._mem.synchronize(self._stream)
                los, his = view[:total], view[total:2 * total]
                nans = view[2 * total:].view(np.uint32)
                for k, offset, g in slots:
                    if nans[offset:offset + g].any():
                        out[k] = (math.nan, math.nan)
                    else:
                        out[k] = (float(los[offset:offset + g].min()), float(his[offset:offset + g].max()))
                self.device_tensors += len(slots)
        return out  # type: ignore[return-value]

    def counts(self, jobs: list[tuple[Any, Any, bool]]) -> list[np.ndarray]:
        """Counts of each tensor under its plan (of ``max(x, 0)`` where the job says so).
        Takes ownership of ``jobs`` (emptied)."""
        from calibration.gpu_histogram import _subnormal_plan

        out: list[Optional[np.ndarray]] = [None] * len(jobs)
        slots: list[tuple[int, int, int]] = []  # (index, offset in counts, num_bins)
        launches = []
        total = 0
        for k, (x, plan, positive) in enumerate(jobs):
            n = int(plan.num_bins)
            if self._on_device(x) and n > 1 and not _subnormal_plan(plan.width):
                slots.append((k, total, n))
                launches.append((x, plan, positive, total))
                total += n
            else:
                out[k] = self.cpu.counts(host_values(x), plan.width, n, positive)
        jobs.clear()
        if slots:
            with self._mem.activate():
                dev, host = self._buffer("counts", total * 8)
                self._mem.memset_async(dev.ptr, total * 8, self._stream)
                for x, plan, positive, offset in launches:
                    n = int(plan.num_bins)
                    table = self._table(plan.width, n)
                    args = (x.ptr, x.size, table.ptr, n, 1 if positive else 0, dev.ptr + offset * 8)
                    kernel = "bin_f32_shared" if n <= MAX_SHARED_BINS else "bin_f32_global"
                    self._kernels.launch(kernel, _grid(x.size), BLOCK, self._stream, args,
                                         shared_bytes=n * 8 - 4 if kernel == "bin_f32_shared" else 0)
                    self.launched[kernel] += 1
                launches.clear()
                view = host.view((total,), np.int64)
                self._mem.dtoh_async(view, dev.ptr, self._stream)
                self._mem.synchronize(self._stream)
                for k, offset, n in slots:
                    out[k] = view[offset:offset + n].copy()
        return out  # type: ignore[return-value]

    def self_check(self) -> Optional[str]:
        """:func:`calibration.gpu_histogram.self_check` through these kernels (values on and beside
        bin edges, at zero and at the top, |x| and max(x, 0)): ``None`` when every count equals the
        numpy kernel's, else what differed."""
        from calibration.gpu_histogram import self_check

        binner = self

        class _Upload:  # self_check's ops interface: host values in, counts out
            def counts(self, values: np.ndarray, width: float, num_bins: int, positive: bool = False) -> np.ndarray:
                from calibration.histogram import BinPlan

                values = np.ascontiguousarray(values, dtype=np.float32)
                buf = binner._mem.alloc_device(max(values.nbytes, 4))
                try:
                    with binner._mem.activate():
                        binner._mem.htod(buf.ptr, values)
                    x = DeviceTensor(buf.ptr, values.shape, values.dtype, lambda: values)
                    return binner.counts([(x, BinPlan(width, num_bins), positive)])[0]
                finally:
                    binner._mem.synchronize(binner._stream)
                    buf.free()

        return self_check(_Upload())

    def close(self) -> None:
        if self._buffers or self._tables:
            with self._mem.activate():
                self._mem.synchronize(self._stream)
                for d, h in self._buffers.values():
                    d.free()
                    h.free()
                for t in self._tables.values():
                    t.free()
        self._buffers.clear()
        self._tables.clear()
