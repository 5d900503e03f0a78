"""calibrate: INT8 ranges for every activation, a TensorRT calibration cache and a Q/DQ ONNX.

Inputs: the FP32 ONNX (export) and the prepared calibration samples (prepare's
``calib.npy``: float, ``(N, *model.input.shape)``, already preprocessed).

1. ``calibration.num_samples`` of the N samples (all of them when N is not larger; else a
   seeded choice kept in file order, :func:`pipeline.datasets.calibration_indices`),
   cut into full batches of ``calibration.batch_size`` in that order (a last partial
   batch is dropped, as TensorRT's calibrator with its fixed batch would see them).
2. The FP32 ONNX runs in onnxruntime with every activation exposed; each batch streams
   into one |x| histogram per tensor (:mod:`calibration.collect`).
3. amax per tensor by ``calibration.method`` (:mod:`calibration.algorithms`), under
   ``calibration.rules`` (:mod:`calibration.rules`): ``tensorrt`` (default) reproduces
   what TensorRT 8.6's IInt8EntropyCalibrator2 computes (doubling histogram, amax at the
   bin centre, MaxPool outputs with their input's range); ``reference`` is DESIGN.md
   section 4 as written.

Outputs (``out_dir``, replaced atomically as a whole):

* ``ranges.json``: per tensor amax, scale (= amax/127, float32; also as hex bits),
  method, max_abs, num_bins, bin_width (and ``range_from`` where a MaxPool output took
  its input's range); plus the settings and rules that produced them.
* ``calibration.cache``: TensorRT's format. Header ``TRT-8600-EntropyCalibration2`` for
  ``entropy``, ``TRT-8600-MinMaxCalibration`` for ``minmax``. TensorRT has no percentile
  calibrator: ``percentile`` ranges are written under ``EntropyCalibration2`` (the
  calibrator the implicit route uses by default), which makes TensorRT use them as they
  are; ranges.json and calibrate.json record the real method.
* ``model.qdq.onnx``: the Q/DQ model (:mod:`calibration.qdq`).
* ``calibrate.json``: method, samples, batches, seconds (by phase), peak RSS, entropy
  search time per tensor, tensors, a Q/DQ-vs-FP32 check on the first samples, and the
  sha256 of every input and output.
"""

from __future__ import annotations

import platform
import resource
import sys
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np

from calibration.algorithms import amax_to_scale
from calibration.cache import cache_header, scale_to_hex, write_cache
from calibration.collect import collect_histograms
from pipeline.datasets import calibration_batches, calibration_indices, load_calibration_samples
from calibration.errors import CalibrationError
from calibration.qdq import quantize_qdq
from calibration.rules import get_rules, ranges_under

from ..config import Config
from ..fileio import sha256_file, staging_dir, write_json

DEFAULT_TRT_VERSION = "8.6.0"
CACHE_ALGORITHM = {"entropy": "EntropyCalibration2", "minmax": "MinMaxCalibration", "percentile": "EntropyCalibration2"}
OUTPUTS = ("ranges.json", "calibration.cache", "model.qdq.onnx")
CHECK_SAMPLES = 8  # Q/DQ vs FP32 sanity check on the first samples of the first batch


def _peak_rss_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (1 << 20 if sys.platform == "darwin" else 1 << 10), 1)


def _qdq_check(qdq_path: Path, feeds: dict[str, np.ndarray], reference: np.ndarray) -> dict[str, float]:
    """Run the Q/DQ model on a few calibration samples and compare with the FP32 outputs
    recorded during collection: the model must load in onnxruntime and stay close."""
    from pipeline.onnx_utils import ort_session

    try:
        got = ort_session(qdq_path).run(None, feeds)[0]
    except Exception as e:  # a Q/DQ model onnxruntime cannot run is a bug in the export
        raise CalibrationError(f"{qdq_path}: onnxruntime cannot run the Q/DQ model ({e})") from None
    n = len(reference)
    ref = reference.reshape(n, -1).astype(np.float64)
    got = np.asarray(got).reshape(n, -1).astype(np.float64)
    denom = np.linalg.norm(ref, axis=1) * np.linalg.norm(got, axis=1)
    cos = np.where(denom > 0, (ref * got).sum(axis=1) / np.where(denom > 0, denom, 1), 1.0)
    out = {"samples": int(n), "cosine_mean": float(cos.mean()), "cosine_min": float(cos.min())}
    if ref.shape[1] > 1:
        out["top1_agreement"] = float((ref.argmax(1) == got.argmax(1)).mean())
    return out


def run(cfg: Config, onnx_path: Path, calib_data: Path, out_dir: Path, *,
        trt_version: str = DEFAULT_TRT_VERSION, progress: bool = True, threads: Optional[int] = None) -> dict[str, Any]:
    """Calibrate ``onnx_path`` on ``calib_data``; write ranges, cache, Q/DQ model and
    calibrate.json into ``out_dir`` (replaced atomically). Returns the calibrate.json dict."""
    start = time.perf_counter()
    c = cfg.calibration
    rules = get_rules(c.rules)
    onnx_path, calib_data, out_dir = Path(onnx_path), Path(calib_data), Path(out_dir)
    x = load_calibration_samples(calib_data, cfg.model.input.shape)
    indices = calibration_indices(int(x.shape[0]), c.num_samples, c.seed)
    num_batches = len(indices) // c.batch_size
    dtype = np.dtype(cfg.model.input.dtype)
    batches = (b.astype(dtype, copy=False) for b in calibration_batches(x, indices, c.batch_size, str(calib_data)))

    t_collect = time.perf_counter()
    collector = collect_histograms(onnx_path, batches, total=num_batches, progress=progress,
                                   num_bins=c.num_bins, growth=rules.growth, threads=threads,
                                   source=str(calib_data))
    t_search = time.perf_counter()
    amax, range_from, search_ms = ranges_under(rules, collector.histograms, c.method, collector.node_ops,
                                               c.percentile)
    t_write = time.perf_counter()

    algorithm = CACHE_ALGORITHM[c.method]
    tensors: dict[str, dict[str, Any]] = {}
    scales: dict[str, np.float32] = {}
    for name, hist in collector.histograms.items():
        scale = amax_to_scale(amax[name])
        scales[name] = scale
        tensors[name] = {"amax": amax[name], "scale": float(scale), "scale_hex": scale_to_hex(scale),
                         "method": c.method, "max_abs": float(hist.max_abs), "num_bins": int(hist.num_bins),
                         "bin_width": float(hist.bin_width), "values": int(hist.num_samples)}
        if name in range_from:
            tensors[name]["range_from"] = range_from[name]
    settings = {"method": c.method, **rules.describe(), "percentile": c.percentile if c.method == "percentile" else None,
                "num_bins": c.num_bins, "batch_size": c.batch_size, "batches": collector.stats.batches,
                "samples": collector.stats.samples, "seed": c.seed}

    with staging_dir(out_dir) as tmp:
        write_json(tmp / "ranges.json", {"schema": 1, **settings, "tensors": tensors})
        write_cache(tmp / "calibration.cache", scales, trt_version, algorithm)
        t_qdq = time.perf_counter()
        qdq = quantize_qdq(onnx_path, tmp / "model.qdq.onnx", amax)
        n_check = min(CHECK_SAMPLES, c.batch_size)
        first = np.ascontiguousarray(x[indices[:n_check]]).astype(dtype, copy=False)
        reference = collector.first_outputs[collector.output_names[0]][:n_check]
        check = _qdq_check(tmp / "model.qdq.onnx", {collector.input_names[0]: first}, reference)
        t_end = time.perf_counter()
        report = {
            "stage": "calibrate",
            **settings,
            "samples_available": int(x.shape[0]),
            "samples_requested": c.num_samples,
            "samples_dropped": int(len(indices) - collector.stats.samples),
            "tensors": len(tensors),
            "cache": {"file": "calibration.cache", "header": cache_header(trt_version, algorithm),
                      "tensorrt_version": trt_version,
                      "note": None if c.method != "percentile" else
                      "TensorRT has no percentile calibrator: percentile scales are written under "
                      "EntropyCalibration2 so that IInt8EntropyCalibrator2 reads and uses them as they are"},
            "qdq": {"file": "model.qdq.onnx", "activations": len(qdq["activations"]), "op_types": qdq["op_types"],
                    "q_nodes": qdq["q_nodes"], "dq_nodes": qdq["dq_nodes"], "check_first_samples": check},
            "collect": {"pipelined": collector.stats.pipelined,
                        "intra_op_threads": collector.stats.intra_op_threads},
            "seconds": {
                "total": round(t_end - start, 3),
                "session": round(collector.stats.seconds_session, 3),
                "inference": round(collector.stats.seconds_inference, 3),
                "histogram": round(collector.stats.seconds_histogram, 3),
                "collect": round(t_search - t_collect, 3),
                "search": round(t_write - t_search, 3),
                "qdq": round(t_end - t_qdq, 3),
            },
            "search_ms_per_tensor": {"mean": round(float(np.mean(search_ms)), 3),
                                     "median": round(float(np.median(search_ms)), 3),
                                     "max": round(float(np.max(search_ms)), 3)},
            "peak_rss_mb": _peak_rss_mb(),
            "software": _versions(),
            "sha256": {"onnx": sha256_file(onnx_path), "calib_data": sha256_file(calib_data),
                       **{name: sha256_file(tmp / name) for name in OUTPUTS}},
        }
        write_json(tmp / "calibrate.json", report)
    return report


def _versions() -> dict[str, str]:
    import onnx
    import onnxruntime

    return {"python": platform.python_version(), "numpy": np.__version__, "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__}
