"""calibrate: INT8 ranges for every activation, a TensorRT calibration cache and a Q/DQ ONNX.

Inputs: the FP32 ONNX (export; validate must have passed it) and the prepared calibration
samples (prepare's ``calib.npz``: one array per model input, already preprocessed).

1. ``calibration.num_samples`` of the N samples (all of them when N is not larger; else a
   seeded choice kept in file order, :func:`pipeline.data.calibration_indices`), cut into
   full batches of ``calibration.batch_size`` in that order (a last partial batch is
   dropped, as TensorRT's calibrator with its fixed batch would see them).
2. The FP32 ONNX runs in onnxruntime with every activation exposed; each batch streams
   into one |x| histogram per floating-point tensor (:mod:`calibration.collect`). Integer
   inputs pass through untouched. Tensors that carry ±Inf or huge sentinel values
   (attention masks; ``calibration.sentinel_abs``) and tensors matching
   ``calibration.exclude`` get no range: they stay in higher precision, and
   calibrate.json says so tensor by tensor.
3. amax per tensor by ``calibration.method`` (:mod:`calibration.algorithms`; ``mse``
   searches entropy, percentile and max|x| candidates by the quantization MSE each causes),
   under ``calibration.rules`` (:mod:`calibration.rules`); ``calibration.clip_aware`` caps
   the range of Clip/ReLU6 outputs at the Clip's bound (:mod:`calibration.ptq`).
4. ``calibration.bias_correction`` (default off): one more FP32 forward over the same
   batches averages the input of every Conv/Gemm/MatMul; the Q/DQ ONNX's biases absorb the
   mean error weight quantization causes (:mod:`calibration.ptq`). The cache is unchanged
   by it (TensorRT quantizes the weights of an implicit engine itself).
5. ``calibration.weight_rounding: gptq`` (default ``nearest``): one more FP32 forward
   gathers each quantized Conv/Gemm/MatMul's input second moments, and the Q/DQ ONNX's
   weights are rounded by GPTQ (:mod:`calibration.rounding`) on the same scales; bias
   correction then measures the error that is left. The cache is unchanged by it.

Outputs (``out_dir``, replaced atomically as a whole):

* ``ranges.json``: per tensor amax, scale (= amax/127, float32; also as hex bits),
  method, max_abs, num_bins, bin_width; the settings and rules; the excluded tensors.
* ``calibration.cache``: TensorRT's format, with the header of the TensorRT that will read
  it (``calibration.tensorrt_version``, else the installed TensorRT, else 8.6.0; TensorRT
  silently ignores a cache with another header). ``EntropyCalibration2`` for entropy and
  percentile (TensorRT has no percentile calibrator; written under EntropyCalibration2
  its scales are used as they are), ``MinMaxCalibration`` for minmax.
* ``model.qdq.onnx``: the Q/DQ model (:mod:`calibration.qdq`).
* ``ptq.npz`` (with bias correction or GPTQ on, SmoothQuant off): the rounded weights and the
  bias corrections per node (:mod:`calibration.ptq_file`), so that tune's candidates carry them.
* ``calibrate.json`` (a CalibrateReport): settings, samples, batches and their shapes,
  seconds by phase, peak RSS, the excluded tensors, a Q/DQ-vs-FP32 check on the first
  samples, and the sha256 of every input and output.
"""

from __future__ import annotations

import platform
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np

from calibration.algorithms import amax_to_scale
from calibration.cache import METHOD_ALGORITHM, cache_header, scale_to_hex, write_cache
from calibration.collect import collect_histograms
from calibration.errors import CalibrationError
from calibration.onnx_io import consumers
from calibration.ptq import clip_amax_bounds, input_means
from calibration.ptq_file import PTQ_FILE, save_ptq
from calibration.qdq import (bias_correction_inputs, bias_correction_table, gptq_weights, quantize_qdq,
                             weight_rounding_inputs)
from calibration.rules import get_rules, ranges_under

from ..backends.trt_forward import resolve_forward
from ..config import Config
from ..data import calibration_batches, calibration_indices, load_samples
from ..fileio import (CACHE_FILE, CALIBRATE_REPORT, MAXIMA_FILE, QDQ_FILE, RANGES_FILE, claim_dir, sha256_model,
                      staging_dir, write_json)
from ..reports import CalibrateReport, TensorMaxima, peak_rss_mb, write_report

DEFAULT_TRT_VERSION = "8.6.0"
OUTPUTS = (RANGES_FILE, CACHE_FILE, QDQ_FILE, MAXIMA_FILE)
CHECK_SAMPLES = 8  # Q/DQ vs FP32 sanity check on the first samples of the first batch


def target_tensorrt(cfg: Config) -> tuple[str, str]:
    """(version the cache is written for, why that one)."""
    from ..runtime.trt_common import installed_version

    if cfg.calibration.tensorrt_version:
        return cfg.calibration.tensorrt_version, "calibration.tensorrt_version"
    here = installed_version()
    if here:
        return here, "the installed TensorRT"
    return DEFAULT_TRT_VERSION, (f"no TensorRT here: written for {DEFAULT_TRT_VERSION}; set calibration.tensorrt_version "
                                 "to the TensorRT that will build the engine")


def _qdq_check(qdq_path: Path, feeds: dict[str, np.ndarray], reference: dict[str, np.ndarray]) -> dict[str, Any]:
    """Run the Q/DQ model on a few calibration samples and compare each output with the FP32
    outputs recorded during collection: the model must load in onnxruntime and stay close."""
    from ..metrics import agreement
    from ..onnx_utils import ort_session

    session = ort_session(qdq_path)
    try:
        got = session.run(None, feeds)
    except Exception as e:  # a Q/DQ model onnxruntime cannot run is a bug in the export
        raise CalibrationError(f"{qdq_path}: onnxruntime cannot run the Q/DQ model ({str(e).splitlines()[0][:200]})") from None
    names = [o.name for o in session.get_outputs()]
    out: dict[str, Any] = {"samples": int(len(next(iter(feeds.values()))))}
    for name, value in zip(names, got):
        if name in reference:
            a = agreement(np.asarray(value), reference[name], name)
            out[name] = {k: a[k] for k in ("cosine", "cosine_min", "top1_agreement") if k in a}
    return out


def run(cfg: Config, onnx_path: Path, calib_data: Path, out_dir: Path, *, validation: Optional[Path] = None,
        progress: bool = True, threads: Optional[int] = None) -> CalibrateReport:
    """Calibrate ``onnx_path`` on ``calib_data``, after checking both are what validate and
    prepare made of them; write ranges, cache, Q/DQ model and calibrate.json into
    ``out_dir`` (replaced atomically)."""
    claim_dir(out_dir, "calibrate", inputs=(onnx_path, calib_data, validation))  # only into an output it owns (fileio.claim_dir)
    from ..onnx_utils import load_onnx
    from ..provenance import prepared, validated

    onnx_path, calib_data = Path(onnx_path), Path(calib_data)
    load_onnx(onnx_path)
    validated(onnx_path, validation or Path("artifacts", "validate", "validate.json"))
    if (calib_data.parent / "prepare.json").is_file():
        prepared(calib_data, "calib.npz")
    return calibrate(cfg, onnx_path, calib_data, out_dir, progress=progress, threads=threads)


def calibrate(cfg: Config, onnx_path: Path, calib_data: Path, out_dir: Path, *, progress: bool = True,
              threads: Optional[int] = None) -> CalibrateReport:
    """The stage's work, without its input checks (benchmarks call it on any ONNX). With
    calibration.smooth_quant the ranges and the Q/DQ model are those of the smoothed FP32 model
    (calibration.smooth), written to a temporary folder first."""
    import shutil
    import tempfile

    start = time.perf_counter()
    c = cfg.calibration
    samples = load_samples(calib_data, cfg.model.inputs, cfg.data.labels_key, "calibration data")
    indices = calibration_indices(len(samples), c.num_samples, c.seed)
    if not c.smooth_quant:
        return _calibrate(cfg, Path(onnx_path), Path(onnx_path), None, calib_data, samples, indices, out_dir,
                          progress, threads, start)
    tmp = Path(tempfile.mkdtemp(prefix="trtpipe-smooth-"))
    try:
        t0 = time.perf_counter()
        smoothed, smoothing = _smooth(cfg, Path(onnx_path), Path(calib_data), samples, indices, tmp, threads)
        smoothing["seconds"] = round(time.perf_counter() - t0, 3)
        return _calibrate(cfg, Path(onnx_path), smoothed, smoothing, calib_data, samples, indices, out_dir,
                          progress, threads, start)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _smooth(cfg: Config, onnx_path: Path, calib_data: Path, samples: Any, indices: np.ndarray, tmp: Path,
            threads: Optional[int]) -> tuple[Path, dict[str, Any]]:
    """(the ONNX to calibrate, what SmoothQuant did): the migration strength (or none) whose INT8 model
    has the smallest output error on calibration batches it was not calibrated on (calibration.smooth.search)."""
    from calibration import smooth

    c = cfg.calibration
    return smooth.search(onnx_path, lambda: calibration_batches(samples.x, indices, c.batch_size, str(calib_data)), tmp,
                         method=c.method, rules=c.rules, percentile=c.percentile, threads=threads,
                         collect_options={"num_bins": c.num_bins, "exclude": c.exclude,
                                          "sentinel_abs": c.sentinel_abs, "threads": threads})


def _calibrate(cfg: Config, onnx_path: Path, model_path: Path, smoothing: Optional[dict[str, Any]], calib_data: Path,
               samples: Any, indices: np.ndarray, out_dir: Path, progress: bool, threads: Optional[int],
               start: float) -> CalibrateReport:
    """Calibrate ``model_path`` (the exported ``onnx_path``, or its smoothed copy) into ``out_dir``."""
    from ..provenance import sha256_of

    c = cfg.calibration
    rules = get_rules(c.rules)
    onnx_path, calib_data, out_dir = Path(onnx_path), Path(calib_data), Path(out_dir)
    num_batches = len(indices) // c.batch_size
    batches = calibration_batches(samples.x, indices, c.batch_size, str(calib_data))
    trt_target, trt_why = target_tensorrt(cfg)

    forward, forward_why = resolve_forward(c.forward, what=str(onnx_path))

    t_collect = time.perf_counter()
    collector = collect_histograms(model_path, batches, total=num_batches, progress=progress,
                                   num_bins=c.num_bins, growth=rules.growth, threads=threads,
                                   source=str(calib_data), exclude=c.exclude, sentinel_abs=c.sentinel_abs,
                                   forward=forward, device=c.device)
    t_search = time.perf_counter()
    bounds = _clip_bounds(model_path) if c.clip_aware else {}
    amax, range_from, search_ms = ranges_under(rules, collector.histograms, c.method, collector.node_ops,
                                               c.percentile, bounds=bounds)
    t_write = time.perf_counter()
    means = None
    if c.bias_correction:
        from calibration.onnx_io import load_model

        means = input_means(load_model(model_path), _bar(calibration_batches(samples.x, indices, c.batch_size,
                                                                            str(calib_data)),
                                                         num_batches, "bias correction", progress),
                            bias_correction_inputs(model_path), threads=threads)
    t_means = time.perf_counter()
    moments = None
    if c.weight_rounding == "gptq":
        from calibration.rounding import second_moments

        rounding_model, rounding_nodes = weight_rounding_inputs(model_path)
        moments = second_moments(rounding_model, _bar(calibration_batches(samples.x, indices, c.batch_size,
                                                                          str(calib_data)),
                                                      num_batches, "weight rounding", progress),
                                 rounding_nodes, threads=threads)
    rounded = gptq_weights(model_path, moments) if moments is not None else None
    t_moments = time.perf_counter()
    excluded = dict(collector.excluded)
    if not collector.histograms:
        raise CalibrationError(f"{onnx_path}: every floating-point tensor was excluded from calibration "
                               f"({len(excluded)}: {', '.join(list(excluded)[:3])}...); check calibration.exclude")

    algorithm = METHOD_ALGORITHM[c.method]
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
        if name in bounds:
            tensors[name]["clip_bound"] = bounds[name]
    settings = {"method": c.method, **rules.describe(), "percentile": c.percentile if c.method == "percentile" else None,
                "num_bins": c.num_bins, "batch_size": c.batch_size, "seed": c.seed, "exclude": list(c.exclude),
                "sentinel_abs": c.sentinel_abs, "clip_aware": c.clip_aware, "bias_correction": c.bias_correction,
                "weight_rounding": c.weight_rounding, "smooth_quant": c.smooth_quant}
    n_check = min(CHECK_SAMPLES, c.batch_size)
    first = {k: np.ascontiguousarray(v[indices[:n_check]]) for k, v in samples.x.items()}
    reference = {n: v[:n_check] for n, v in collector.first_outputs.items()}
    shapes = {k: [c.batch_size, *v.shape[1:]] for k, v in samples.x.items()}

    with staging_dir(out_dir) as tmp:
        write_json(tmp / RANGES_FILE, {"schema": 1, **settings, "tensors": tensors, "excluded": excluded})
        write_cache(tmp / CACHE_FILE, _exported_only(scales, onnx_path) if smoothing else scales, trt_target, algorithm)
        maxima = {n: (m if np.isfinite(m) else None) for n, m in collector.maxima().items()}
        write_report(tmp / MAXIMA_FILE, TensorMaxima(onnx_sha256=sha256_of(onnx_path), samples=collector.stats.samples,
                                                     tensors=maxima))
        t_qdq = time.perf_counter()
        qdq = quantize_qdq(model_path, tmp / QDQ_FILE, amax, exclude_nodes=consumers(model_path, excluded),
                           bias_means=means, rounded=rounded)
        # tune writes its candidates from the exported ONNX: it can carry the weight-side PTQ of
        # that model (not of a smoothed copy, whose weights and inputs are other tensors)
        ptq_file = PTQ_FILE if (means is not None or rounded is not None) and smoothing is None else None
        if ptq_file:
            save_ptq(tmp / ptq_file, rounded, None if means is None else bias_correction_table(model_path, means, rounded))
        check = _qdq_check(tmp / QDQ_FILE, first, reference)
        t_end = time.perf_counter()
        report = CalibrateReport(
            method=c.method, rules=c.rules, settings=settings,
            samples=collector.stats.samples, batches=collector.stats.batches, batch_size=c.batch_size,
            samples_available=len(samples), samples_requested=c.num_samples,
            samples_dropped=int(len(indices) - collector.stats.samples),
            calibration_shapes=shapes, tensors=len(tensors), excluded=excluded,
            cache={"file": CACHE_FILE, "header": cache_header(trt_target, algorithm),
                   "tensorrt_version": trt_target, "tensorrt_version_from": trt_why,
                   "note": None if c.method not in ("percentile", "mse") else
                   f"TensorRT has no {c.method} calibrator: {c.method} scales are written under "
                   "EntropyCalibration2 so that IInt8EntropyCalibrator2 reads and uses them as they are"},
            qdq={"file": QDQ_FILE, **{k: v for k, v in qdq.items() if k not in ("activations", "bias_corrected")},
                 "weight_rounding": qdq.get("weight_rounding", {"method": "nearest"}), "ptq_file": ptq_file,
                 "bias_corrected_nodes": None if means is None else len(qdq.get("bias_corrected", {})),
                 "activations": len(qdq["activations"]), "check_first_samples": check,
                 **({} if smoothing is None else {"smooth_quant": smoothing})},
            collect={"pipelined": collector.stats.pipelined, "intra_op_threads": collector.stats.intra_op_threads,
                     "histogram_threads": collector.stats.histogram_threads, "kernel": collector.stats.kernel,
                     "device": collector.stats.device, "device_note": collector.stats.device_note,
                     "forward": collector.stats.forward, "forward_why": forward_why,
                     "forward_details": collector.stats.forward_details,
                     "excluded_max_abs": dict(collector.excluded_max_abs)},
            seconds={
                "total": round(t_end - start, 3),
                "session": round(collector.stats.seconds_session, 3),
                "inference": round(collector.stats.seconds_inference, 3),
                "histogram": round(collector.stats.seconds_histogram, 3),
                "collect": round(t_search - t_collect, 3),
                "search": round(t_write - t_search, 3),
                "bias_correction": round(t_means - t_write, 3),
                "weight_rounding": round(t_moments - t_means, 3),
                "qdq": round(t_end - t_qdq, 3),
            },
            search_ms_per_tensor={"mean": round(float(np.mean(search_ms)), 3),
                                  "median": round(float(np.median(search_ms)), 3),
                                  "max": round(float(np.max(search_ms)), 3)},
            peak_rss_mb=peak_rss_mb(),
            software=_versions(),
            sha256={"onnx": sha256_of(onnx_path), "calib_data": sha256_of(calib_data),
                    **{name: sha256_model(tmp / name) for name in OUTPUTS},
                    **({ptq_file: sha256_of(tmp / ptq_file)} if ptq_file else {})},
        )
        write_report(tmp / CALIBRATE_REPORT, report)
    return report


def _bar(batches: Any, total: int, what: str, progress: bool) -> Any:
    """``batches`` with a progress bar (one more pass over the calibration data)."""
    if not progress:
        return batches
    from ..log import progress_bar

    return progress_bar(batches, total=total, desc=what, unit="batch")


def _exported_only(scales: dict[str, Any], onnx_path: Path) -> dict[str, Any]:
    """The scales of tensors the exported ONNX has (TensorRT's calibrator reads the exported model; the
    smoothed inputs exist only in the Q/DQ ONNX)."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    known = {i.name for i in model.graph.input} | {o for n in model.graph.node for o in n.output}
    return {k: v for k, v in scales.items() if k in known}


def _clip_bounds(onnx_path: Path) -> dict[str, float]:
    """The largest amax of each tensor a Clip bounds (calibration.clip_aware)."""
    from calibration.onnx_io import load_model

    return clip_amax_bounds(load_model(onnx_path))


def _versions() -> dict[str, str]:
    import onnx
    import onnxruntime

    return {"python": platform.python_version(), "numpy": np.__version__, "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__}
