"""Time the vectorised EntropyCalibration2 search per tensor.

    python bench/entropy_speed.py [OUT_JSON]     (default bench/results/entropy_speed.json)

Histograms are realistic |x| shapes (Gaussian, Laplace, ReLU with its zero spike) at
2048 bins, plus histograms grown past 2048 bins by later batches. For each, the best
and median of several repeats of ``entropy_amax`` are reported in milliseconds, with the
Python, numpy and CPU that measured them. DESIGN.md asks for well under 50 ms per tensor
at 2048 bins (the naive O(bins^2) loop takes about 100 ms).
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from calibration.algorithms import entropy_amax  # noqa: E402
from calibration.histogram import AbsHistogram  # noqa: E402

REPEATS = 20
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "entropy_speed.json"


def _cases(rng: np.random.Generator) -> dict[str, AbsHistogram]:
    def hist(*batches: np.ndarray) -> AbsHistogram:
        h = AbsHistogram()
        for b in batches:
            h.update(b)
        return h

    n = 1_000_000
    return {
        "gaussian_2048": hist(rng.normal(0, 1, n)),
        "laplace_2048": hist(rng.laplace(0, 1, n)),
        "relu_2048": hist(np.maximum(rng.normal(0.1, 1, n), 0)),
        "grown_x1.5": hist(rng.normal(0, 1, n), rng.normal(0, 1.5, n)),
        "grown_x4": hist(rng.normal(0, 1, n), rng.normal(0, 4, n)),
    }


def _time(hist: AbsHistogram) -> dict[str, float]:
    entropy_amax(hist.counts, hist.bin_width)  # warm-up
    times = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        entropy_amax(hist.counts, hist.bin_width)
        times.append((time.perf_counter() - start) * 1e3)
    return {"bins": hist.num_bins, "best_ms": min(times), "median_ms": float(np.median(times))}


def main(argv: list[str]) -> int:
    out = Path(argv[1]) if len(argv) > 1 else DEFAULT_OUT
    results = {name: _time(h) for name, h in _cases(np.random.default_rng(0)).items()}
    report = {
        "benchmark": "calibration.algorithms.entropy_amax per tensor",
        "repeats": REPEATS,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "results": results,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(tmp, out)
    for name, r in results.items():
        print(f"{name:15s} bins={r['bins']:5d}  best {r['best_ms']:6.2f} ms  median {r['median_ms']:6.2f} ms")
    print("wrote", out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
