"""Latency statistics shared by every backend and benchmark."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np


def summarize(times_ms: Sequence[float], batch_size: int) -> dict[str, Any]:
    """p50/p90/p99/mean/std in milliseconds and throughput in samples per second (from the mean)."""
    t = np.asarray(times_ms, dtype=np.float64)
    if t.size == 0:
        raise ValueError("no timings to summarize")
    mean = float(t.mean())
    return {
        "batch_size": int(batch_size),
        "iterations": int(t.size),
        "p50_ms": float(np.percentile(t, 50)),
        "p90_ms": float(np.percentile(t, 90)),
        "p99_ms": float(np.percentile(t, 99)),
        "mean_ms": mean,
        "std_ms": float(t.std()),
        "min_ms": float(t.min()),
        "throughput_per_s": float(batch_size * 1000.0 / mean) if mean > 0 else float("inf"),
    }
