"""The compiled histogram kernel: two C functions, built with the system C compiler on first
use and loaded with ctypes (no new Python dependency, nothing to install).

``trtpipe_bin_f32`` computes exactly what :func:`calibration.kernels.bin_counts_numpy`
computes for a contiguous float32 array (of ``|x|``, or of ``max(x, 0)`` for a Relu output
binned from its input), in one pass instead of five: ``|x|`` widened to double, one
IEEE division by the width, clamp to the last bin, truncation (a vectorized loop per block
of 2048 values), and a count into four interleaved sub-histograms (summed at the end, so
repeated bins do not serialise the increments). Histograms of up to 4096 bins count into
16-bit sub-histograms that stay in the L1 cache and are flushed into the 64-bit counts
before any counter can overflow. It is compiled without ``-ffast-math`` and with
``-ffp-contract=off``, so the compiler may neither turn the division into a multiplication
nor fuse operations; on x86-64 it carries AVX-512, AVX2 and baseline clones picked at load
time by the CPU.

``trtpipe_range_f32`` gives ``(min, max)`` of a float32 array and whether it holds a NaN in
one pass (numpy's ``min()`` and ``max()`` take two), comparing the floats' bits as
order-preserving integers.

``load()`` compiles into ``$TRTPIPE_KERNEL_DIR`` (default ``$XDG_CACHE_HOME/trtpipe`` or
``~/.cache/trtpipe``), keyed by a hash of the source, the flags, the compiler's version
and the platform, then checks the result against the numpy kernel on edge values (bin
edges, the top, zeros, subnormals, growth-sized ranges; for the range: +-0, +-Inf, NaN,
the largest floats). Any failure (no compiler, a read-only cache, a mismatch) returns
``None`` and the reason; callers fall back to numpy. ``TRTPIPE_NATIVE=0`` turns it off.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Optional

import numpy as np

SOURCE = r"""
#include <stdint.h>
#include <string.h>
#include <math.h>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(TRTPIPE_NO_CLONES)
#define TRTPIPE_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define TRTPIPE_CLONES
#endif

#define TRTPIPE_BLOCK 2048
/* Histograms of at most this many bins count into 16-bit sub-histograms (32 KiB: they stay in
   the L1 cache, where 4 x 64-bit ones of 2048 bins do not; 1.4x faster binning), flushed into
   the 64-bit counts every TRTPIPE_FLUSH_BLOCKS blocks, before any counter can reach 2^16. */
#define TRTPIPE_SMALL_BINS 4096
#define TRTPIPE_FLUSH_BLOCKS 31 /* 31 * 2048 = 63488 < 65536 values */

/* idx[i] = min(trunc((double)v / width), nb - 1) for the m values at p: v = |x|, or with
   positive != 0 v = max(x, 0) (= |Relu(x)|). */
static inline __attribute__((always_inline)) void trtpipe_index(const float *p, int64_t m, double width,
                                                                double last, int32_t positive, int32_t *idx) {
    if (positive) {
        /* max(x, 0) as a mask on the bits (+0 where x <= 0, -0 and NaN included): the same value
           as (x > 0 ? x : 0), without the branch that kept compilers from vectorizing the loop. */
        for (int64_t i = 0; i < m; i++) {
            const float v = p[i];
            uint32_t bits;
            float r;
            memcpy(&bits, &v, sizeof bits);
            bits &= -(uint32_t)(v > 0.0f);
            memcpy(&r, &bits, sizeof r);
            const double q = (double)r / width;
            idx[i] = (int32_t)(q < last ? q : last);
        }
    } else {
        for (int64_t i = 0; i < m; i++) {
            const double q = (double)fabsf(p[i]) / width;
            idx[i] = (int32_t)(q < last ? q : last); /* trunc(min(q, last)) == min(trunc(q), last) */
        }
    }
}

/* sub[k] (4 interleaved histograms of nb bins, zeroed by the caller) counts the i with
   min(trunc((double)v / width), nb - 1) == k, where v = |x[i]|, or with positive != 0
   v = max(x[i], 0) (= |Relu(x[i])|). x holds no NaN (checked before). */
TRTPIPE_CLONES
void trtpipe_bin_f32(const float *x, int64_t n, double width, int64_t nb, int64_t *sub, int32_t positive) {
    int32_t idx[TRTPIPE_BLOCK];
    const double last = (double)(nb - 1);
    if (nb <= TRTPIPE_SMALL_BINS) {
        uint16_t small[4 * TRTPIPE_SMALL_BINS];
        uint16_t *s0 = small, *s1 = small + nb, *s2 = small + 2 * nb, *s3 = small + 3 * nb;
        memset(small, 0, sizeof(uint16_t) * 4 * (size_t)nb);
        int blocks = 0;
        for (int64_t start = 0; start < n; start += TRTPIPE_BLOCK) {
            const int64_t m = n - start < TRTPIPE_BLOCK ? n - start : TRTPIPE_BLOCK;
            trtpipe_index(x + start, m, width, last, positive, idx);
            int64_t i = 0;
            for (; i + 4 <= m; i += 4) {
                s0[idx[i]]++; s1[idx[i + 1]]++; s2[idx[i + 2]]++; s3[idx[i + 3]]++;
            }
            for (; i < m; i++) s0[idx[i]]++;
            if (++blocks == TRTPIPE_FLUSH_BLOCKS || start + m >= n) {
                for (int64_t k = 0; k < 4 * nb; k++) sub[k] += small[k];
                memset(small, 0, sizeof(uint16_t) * 4 * (size_t)nb);
                blocks = 0;
            }
        }
        return;
    }
    int64_t *c0 = sub, *c1 = sub + nb, *c2 = sub + 2 * nb, *c3 = sub + 3 * nb;
    for (int64_t start = 0; start < n; start += TRTPIPE_BLOCK) {
        const int64_t m = n - start < TRTPIPE_BLOCK ? n - start : TRTPIPE_BLOCK;
        trtpipe_index(x + start, m, width, last, positive, idx);
        int64_t i = 0;
        for (; i + 4 <= m; i += 4) {
            c0[idx[i]]++; c1[idx[i + 1]]++; c2[idx[i + 2]]++; c3[idx[i + 3]]++;
        }
        for (; i < m; i++) c0[idx[i]]++;
    }
}

/* out[0], out[1] = min and max of x[0..n) (n >= 1) in one pass; returns 1 if x holds a NaN
   (then out is meaningless). Compared as integers: the bits of a float mapped to an int32
   whose order is the floats' order (-0.0 just below +0.0), which vectorizes without any
   floating-point comparison. */
TRTPIPE_CLONES
int32_t trtpipe_range_f32(const float *x, int64_t n, float *out) {
    const int32_t *b = (const int32_t *)x;
    int32_t lo = INT32_MAX, hi = INT32_MIN;
    uint32_t nan = 0;
    for (int64_t i = 0; i < n; i++) {
        const int32_t v = b[i];
        const int32_t key = v ^ (int32_t)((uint32_t)(v >> 31) & 0x7fffffffu);
        lo = key < lo ? key : lo;
        hi = key > hi ? key : hi;
        nan |= (uint32_t)((v & 0x7fffffff) > 0x7f800000);
    }
    const int32_t r[2] = {lo ^ (int32_t)((uint32_t)(lo >> 31) & 0x7fffffffu),
                          hi ^ (int32_t)((uint32_t)(hi >> 31) & 0x7fffffffu)};
    memcpy(out, r, sizeof r);
    return (int32_t)(nan != 0);
}
"""

FLAGS = ["-O3", "-shared", "-fPIC", "-fno-fast-math", "-fno-math-errno", "-ffp-contract=off",
         "-fno-unsafe-math-optimizations"]

_lock = threading.Lock()
_loaded: Optional[tuple[Optional["NativeKernel"], Optional[str]]] = None


class NativeKernel:
    """ctypes wrapper of the compiled ``trtpipe_bin_f32`` and ``trtpipe_range_f32`` (both
    release the GIL)."""

    def __init__(self, lib: ctypes.CDLL, path: Path) -> None:
        self.path = path
        self._fn = lib.trtpipe_bin_f32
        self._fn.restype = None
        self._fn.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_double, ctypes.c_int64, ctypes.c_void_p,
                             ctypes.c_int32]
        self._range = lib.trtpipe_range_f32
        self._range.restype = ctypes.c_int32
        self._range.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p]

    def range_f32(self, flat: np.ndarray) -> tuple[float, float]:
        """``(min, max)`` of a contiguous float32 array in one pass, as
        :func:`calibration.kernels.abs_range` gives them (NaN, NaN when it holds a NaN; (0, 0)
        when empty), except that a zero bound may carry the other sign than numpy's
        (``-0.0`` for ``0.0``): the collector uses ``max(hi, -lo, 0)``, which is 0 either way."""
        if flat.dtype != np.float32 or not flat.flags.c_contiguous:
            raise TypeError("trtpipe_range_f32 takes a contiguous float32 array")
        if flat.size == 0:
            return 0.0, 0.0
        out = np.empty(2, dtype=np.float32)
        if self._range(flat.ctypes.data, int(flat.size), out.ctypes.data):
            return float("nan"), float("nan")
        return float(out[0]), float(out[1])

    def bin_f32(self, flat: np.ndarray, width: float, num_bins: int, positive: bool = False) -> np.ndarray:
        """Counts (int64, ``num_bins``) for a contiguous float32 array; see the module."""
        if flat.dtype != np.float32 or not flat.flags.c_contiguous:
            raise TypeError("trtpipe_bin_f32 takes a contiguous float32 array")
        sub = np.zeros((4, int(num_bins)), dtype=np.int64)
        if flat.size:
            self._fn(flat.ctypes.data, int(flat.size), float(width), int(num_bins), sub.ctypes.data,
                     int(bool(positive)))
        return sub.sum(axis=0)


def _compiler() -> Optional[str]:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def cache_home() -> Path:
    """trtpipe's per-user cache folder: ``$XDG_CACHE_HOME/trtpipe``, else ``~/.cache/trtpipe``."""
    return Path(os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")) / "trtpipe"


def _cache_dir() -> Path:
    explicit = os.environ.get("TRTPIPE_KERNEL_DIR")
    return Path(explicit) if explicit else cache_home()


def _compile(cc: str, out: Path, extra: list[str]) -> Optional[str]:
    """Compile SOURCE to ``out`` (atomically); the compiler's complaint on failure."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".build-") as tmp:
        src = Path(tmp) / "trtpipe_hist.c"
        src.write_text(SOURCE)
        target = Path(tmp) / out.name
        proc = subprocess.run([cc, *FLAGS, *extra, str(src), "-o", str(target)], capture_output=True, text=True,
                              timeout=120)
        if proc.returncode != 0:
            return (proc.stderr.strip().splitlines() or ["no message"])[-1][:200]
        os.replace(target, out)
    return None


def _self_check(kernel: NativeKernel) -> Optional[str]:
    """The compiled kernel against the numpy kernel on values that sit on bin edges, at the
    top, at zero (both signs), subnormal, and over growth-sized ranges."""
    from calibration.kernels import abs_range, bin_counts_numpy

    rng = np.random.default_rng(0)
    cases = []
    for num_bins, top in ((2048, 3.7), (2048, 1e-38), (301, 1.0), (5000, 6.0e4), (1, 2.5)):
        width = top / num_bins
        edges = (np.arange(num_bins + 1) * width).astype(np.float32)
        values = np.concatenate([edges, -edges, np.nextafter(edges, np.float32(0)),
                                 np.nextafter(edges, np.float32(np.inf)),
                                 rng.uniform(-top, top, 20_000).astype(np.float32),
                                 np.array([0.0, -0.0, top, -top, 1e-45, -1e-45], np.float32)]).astype(np.float32)
        values = values[np.abs(values.astype(np.float64)) <= top]
        cases.append((values, width, num_bins))
    for values, width, num_bins in cases:
        for positive in (False, True):
            if not np.array_equal(kernel.bin_f32(values, width, num_bins, positive),
                                  bin_counts_numpy(values, width, num_bins, positive=positive)):
                return f"self-check failed for {num_bins} bins of width {width!r} (positive={positive})"
    specials = np.array([0.0, -0.0, 1e-45, -1e-45, 3.4e38, -3.4e38, np.inf, -np.inf, 1.5, -2.5], np.float32)
    arrays = [values for values, _, _ in cases] + [specials[k:k + 3] for k in range(specials.size - 2)]
    arrays += [np.append(a, np.float32(np.nan)) for a in arrays[-3:]] + [np.array([np.nan], np.float32)]
    for values in arrays:
        got, want = kernel.range_f32(values), abs_range(values)
        same = all((np.isnan(g) and np.isnan(w)) or g == w for g, w in zip(got, want))
        if not same:
            return f"range self-check failed: {got} for {want} (numpy)"
    return None


def _build_and_load() -> tuple[Optional[NativeKernel], Optional[str]]:
    if os.environ.get("TRTPIPE_NATIVE", "1").strip().lower() in ("0", "no", "off", "false"):
        return None, "turned off by TRTPIPE_NATIVE=0"
    cc = _compiler()
    if cc is None:
        return None, "no C compiler (cc, gcc or clang) on PATH"
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as e:
        return None, f"{cc} --version failed ({type(e).__name__})"
    problems = []
    for extra in ([], ["-DTRTPIPE_NO_CLONES"]):
        key = hashlib.sha256("\0".join([SOURCE, *FLAGS, *extra, version, platform.machine(), sys.platform])
                             .encode()).hexdigest()[:20]
        user = os.getuid() if hasattr(os, "getuid") else 0
        for folder in (_cache_dir(), Path(tempfile.gettempdir()) / f"trtpipe-{user}"):
            path = folder / f"hist-{key}.so"
            try:
                if not path.is_file():
                    problem = _compile(cc, path, extra)
                    if problem:
                        problems.append(problem)
                        break  # the same flags fail in any folder
                kernel = NativeKernel(ctypes.CDLL(str(path)), path)
            except (OSError, subprocess.SubprocessError) as e:
                problems.append(f"{type(e).__name__}: {str(e)[:160]}")
                continue
            problem = _self_check(kernel)
            if problem:
                return None, problem
            return kernel, None
    return None, "; ".join(problems) or "could not build the kernel"


def load() -> tuple[Optional[NativeKernel], Optional[str]]:
    """``(kernel, None)``, or ``(None, why not)``; built and checked once per process."""
    global _loaded
    with _lock:
        if _loaded is None:
            try:
                _loaded = _build_and_load()
            except Exception as e:  # never let the fast path break calibration
                _loaded = (None, f"{type(e).__name__}: {str(e)[:200]}")
        return _loaded
