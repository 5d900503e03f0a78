"""tune: the fastest INT8 variant that stays within the user's accuracy budget.

Inputs (each checked as its producer wrote it): the FP32 ONNX validate passed; calibrate's
outputs made from that ONNX (`ranges.json` amax per tensor, `calibrate.json`, and on a GPU
`calibration.cache`); prepare's `eval.npz`. Config: `tune:` (see pipeline.config.TuneConfig).

1. The samples are split deterministically (`tune.seed`): a permutation of the evaluation
   set whose first `tune.search_samples` are the search samples, whose first
   `tune.sensitivity_samples` the sensitivity samples; the final check uses all of them.
2. The FP32 ONNX runs on every evaluation sample (onnxruntime), batch by batch: the
   reference. Its outputs go to a temporary `.npz` beside `out_dir` (removed when the stage
   ends, however it ends), read back by rows whenever a candidate is checked on the full set,
   chunk by chunk (:mod:`pipeline.tuning.fullset`); the search and sensitivity samples' rows
   stay in memory. The budget (:mod:`pipeline.tuning.budget`) is resolved on the search
   samples' outputs: a task metric of `evaluate.metrics` or an agreement statistic,
   `@output` for one output.
3. The quantizable layers (:mod:`pipeline.tuning.layers`) come from the fully quantized Q/DQ
   model's placement; a layer reading a tensor calibrate left without a range is always float.
4. Candidates are measured by `tune.backend`: the onnxruntime Q/DQ simulation with the
   estimated cost of :mod:`pipeline.tuning.cost` on a CPU, or a TensorRT engine per candidate
   with its measured latency on a GPU (then the per-layer sensitivity still comes from the
   simulation: 2 engines per layer would cost more than the search). The strategy
   (`tune.strategy`) is in :mod:`pipeline.tuning.search`; with `sensitivity`, a layer whose
   inputs do better with max|x| ranges than with calibrate's keeps INT8 with those.

Outputs (`out_dir`, replaced atomically):
* ``tune.json`` (a TuneReport): the budget and its threshold on each sample set, the layers
  (ONNX node names, as Netron shows them) with their fused nodes and MACs, the sensitivity
  table, every candidate tried with its metric and cost, the frontier, the chosen layers
  and why, and the sha256 of every input and output;
* ``tune.png``: the frontier (:mod:`pipeline.tuning.plot`);
* ``model.qdq.onnx``: the Q/DQ model without Q/DQ on the kept layers, with the tuned
  ranges (explicit route and the onnxruntime int8 variant);
* ``layer_precisions.json``: the `build.layer_precisions` that keep them (implicit route);
* ``calibration.cache``: calibrate's cache with the scales of the tensors whose layers took
  max|x| ranges (`tune.calibration_methods`, :mod:`pipeline.tuning.methods`) replaced; the
  implicit route reads it when there are any.

When the budget cannot be met (or the search budget ran out before a candidate met it on
the full set) everything is still written, describing the best point found, and the stage
then fails with one line naming it.
"""

from __future__ import annotations

import collections
import json
import math
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np

from ..config import Config
from ..errors import ConfigError, PipelineError
from ..fileio import (CACHE_FILE, CALIBRATE_REPORT, QDQ_FILE, RANGES_FILE, claim_dir, sha256_model,
                      staging_dir, write_json)
from ..reports import LayerSensitivity, TuneCandidate, TuneLayer, TuneReport, write_report

OUTPUTS = (QDQ_FILE, "layer_precisions.json", "tune.png", CACHE_FILE)


class TuneBudgetError(PipelineError):
    """The accuracy budget cannot be met (tune.json describes the best point found)."""


def run(cfg: Config, onnx_path: Path, calib_dir: Path, eval_data: Path, out_dir: Path, *,
        validation: Optional[Path] = None, calib_data: Optional[Path] = None, progress: bool = True,
        threads: Optional[int] = None) -> TuneReport:
    """Check the inputs against their producers, then tune (see the module docstring)."""
    claim_dir(out_dir, "tune", inputs=(onnx_path, calib_dir, eval_data, validation, calib_data))  # only into an output it owns (fileio.claim_dir)
    from ..onnx_utils import load_onnx
    from ..provenance import calibrated, prepared, sha256_of, validated

    if cfg.tune is None:
        raise ConfigError("the config has no tune: section; add one with tune.budget (e.g. {metric: top1_agreement, "
                          "min: 0.99}) to run `trtpipe tune`")
    onnx_path, calib_dir, eval_data = Path(onnx_path), Path(calib_dir), Path(eval_data)
    load_onnx(onnx_path, check=False)
    validated(onnx_path, validation or Path("artifacts", "validate", "validate.json"))
    backend = _backend(cfg)
    files = (RANGES_FILE, CACHE_FILE) if backend == "tensorrt" else (RANGES_FILE,)
    calibrated(calib_dir, sha256_of(onnx_path), files)
    if (eval_data.parent / "prepare.json").is_file():
        prepared(eval_data, "eval.npz")
    if calib_data is not None and Path(calib_data).is_file() and (Path(calib_data).parent / "prepare.json").is_file():
        prepared(calib_data, "calib.npz")
    return tune(cfg, onnx_path, calib_dir, eval_data, out_dir, calib_data=calib_data, progress=progress,
                threads=threads, backend=backend)


def _backend(cfg: Config) -> str:
    from ..backends import resolve_backend_name, tensorrt_usable

    assert cfg.tune is not None
    want = cfg.tune.backend
    if want == "auto":
        return "tensorrt" if resolve_backend_name(cfg.build.backend) == "tensorrt" else "onnxruntime"
    if want == "tensorrt":
        ok, why = tensorrt_usable()
        if not ok:
            raise ConfigError(f"tune.backend is 'tensorrt' but {why}; set tune.backend: onnxruntime (or auto)")
    return want


def _split(n: int, search: int, sensitivity: Optional[int], seed: int) -> tuple[np.ndarray, np.ndarray]:
    perm = np.random.default_rng(seed).permutation(n)
    s = min(search, n)
    k = min(sensitivity or s, s)
    return np.sort(perm[:s]), np.sort(perm[:k])


def _forced_float(onnx_path: Path, excluded: dict[str, str], op_types: list[str]) -> dict[str, str]:
    """Weighted nodes that read a tensor calibrate left without a range (always float)."""
    if not excluded:
        return {}
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    out = {}
    for n in model.graph.node:
        hit = [t for t in n.input if t in excluded]
        if n.name and hit and n.op_type in op_types:
            out[n.name] = f"reads {hit[0]!r}, left out of calibration ({excluded[hit[0]]})"
    return out


def _sample_sets(cfg: Config, onnx_path: Path, samples: Any, reference: Path, search_idx: np.ndarray,
                 sens_idx: np.ndarray, threads: Optional[int]) -> tuple[Any, dict[str, Any]]:
    """The budget and the three sample sets. The FP32 ONNX runs once over the evaluation set,
    batch by batch, its outputs written to `reference` (an .npz the full set reads back by rows)
    and the search subset's rows kept; the budget is resolved on those."""
    from ..data.chunks import chunk_rows
    from ..data.npz_rows import npz_shapes
    from ..onnx_utils import ort_session
    from ..tuning.budget import Budget
    from ..tuning.fullset import StreamedSet, write_reference
    from ..tuning.search import SampleSet

    session = ort_session(onnx_path, threads=threads)
    names = [o.name for o in session.get_outputs()]
    bs = cfg.evaluate.batch_size
    fp32 = write_reference(session, samples.x, bs, reference, search_idx)
    del session

    def subset(idx: np.ndarray, rows: np.ndarray) -> SampleSet:
        return SampleSet({k: v[idx] for k, v in samples.x.items()}, None if samples.y is None else samples.y[idx],
                         {k: v[rows] for k, v in fp32.items()}, index=idx)

    search = subset(search_idx, np.arange(len(search_idx)))
    sensitivity = subset(sens_idx, np.searchsorted(search_idx, sens_idx))  # a subset of the search samples
    sensitivity.index = None  # measured on its own, never sliced out of a full run
    budget = Budget.resolve(cfg, names, search.fp32, search.y, search.x)
    shapes = {k: shape for k, (shape, _) in npz_shapes(reference).items()}
    full = StreamedSet(dict(samples.x), samples.y, reference, names, chunk_rows(shapes, samples.x, bs))
    return budget, {"full": full, "search": search, "sensitivity": sensitivity}


def _carried_ptq(cal: Any, calib_dir: Path) -> Any:
    """Calibrate's weight-side PTQ (GPTQ's rounded weights, bias corrections) that every
    candidate and the result carry, read from its ``ptq.npz``."""
    from calibration.ptq_file import load_ptq

    from ..tuning.methods import WeightPTQ

    settings = cal.settings or {}
    if not (settings.get("bias_correction") or settings.get("weight_rounding") == "gptq"):
        return WeightPTQ()
    qdq = cal.qdq or {}
    if "ptq_file" not in qdq:
        return WeightPTQ(note="calibrate's output predates ptq.npz (an older trtpipe): tune's candidates round to "
                              "nearest, uncorrected; re-run calibrate to carry its weight-side PTQ")
    name = qdq["ptq_file"]
    if not name:
        return WeightPTQ(note="calibrate smoothed the model (calibration.smooth_quant): its bias correction and "
                              "weight rounding are of the smoothed copy, which tune's candidates are not; they "
                              "round to nearest, uncorrected")
    if not (Path(calib_dir) / name).is_file():
        raise ConfigError(f"{Path(calib_dir) / name}: calibrate's report names it but it is missing; re-run calibrate")
    from ..provenance import sha256_of

    path = Path(calib_dir) / name
    want = (cal.sha256 or {}).get(name)
    if want and sha256_of(path) != want:
        raise ConfigError(f"{path}: changed since calibrate wrote it (sha256 differs from calibrate.json's); "
                          "re-run calibrate")
    rounded, corrections = load_ptq(path)
    return WeightPTQ(rounded=rounded, corrections=corrections)


def tune(cfg: Config, onnx_path: Path, calib_dir: Path, eval_data: Path, out_dir: Path, *,
         calib_data: Optional[Path] = None, progress: bool = True, threads: Optional[int] = None,
         backend: str = "onnxruntime") -> TuneReport:
    """The stage's work, without its input checks."""
    from calibration.qdq import quantize_qdq

    from ..data import load_samples
    from ..provenance import sha256_of
    from ..reports import CalibrateReport, read_report
    from ..tuning.fullset import scratch_dir
    from ..tuning.layers import find_layers, layer_precisions
    from ..tuning.methods import minmax_alternatives, overrides, tuned_amax, write_tuned_cache
    from ..tuning.ort_candidates import OrtCandidates
    from ..tuning.plot import plot_frontier
    from ..tuning.search import Tuner, frontier

    assert cfg.tune is not None
    t = cfg.tune
    start = time.perf_counter()
    samples = load_samples(eval_data, cfg.model.inputs, cfg.data.labels_key, "evaluation data")
    n = len(samples)
    cal = read_report(calib_dir / CALIBRATE_REPORT, CalibrateReport, "calibration report", "calibrate")
    try:
        ranges = json.loads((calib_dir / RANGES_FILE).read_text())
        amax = {k: float(v["amax"]) for k, v in ranges["tensors"].items()}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"{calib_dir / 'ranges.json'}: not the calibrate stage's ranges ({e}); re-run calibrate") from None

    ptq = _carried_ptq(cal, calib_dir)
    search_idx, sens_idx = _split(n, t.search_samples, t.sensitivity_samples, t.seed)
    forced = _forced_float(onnx_path, dict(cal.excluded), list(t.op_types))

    with staging_dir(out_dir) as tmp, scratch_dir(out_dir) as scratch:
        budget, sets = _sample_sets(cfg, onnx_path, samples, scratch / "fp32.npz", search_idx, sens_idx, threads)
        placement = quantize_qdq(onnx_path, tmp / QDQ_FILE, amax, exclude_nodes=sorted(forced), rounded=ptq.rounded,
                                 corrections=ptq.corrections)
        layers = find_layers(onnx_path, placement, list(t.op_types), {k: v[:1] for k, v in samples.x.items()}, forced)
        always = [layer.name for layer in layers if layer.forced_float]
        alternatives = {}
        if "minmax" in t.calibration_methods and cal.method != "minmax" and t.strategy == "sensitivity":
            alternatives = minmax_alternatives(placement, ranges["tensors"], [x.name for x in layers if not x.forced_float])
        sim = OrtCandidates(onnx_path, amax, layers, t.keep_precision, always, cfg.evaluate.batch_size, threads,
                            alternatives, ptq)
        runner: Any = sim
        if backend == "tensorrt":
            from ..tuning.trt_candidates import TrtCandidates

            runner = TrtCandidates(cfg, onnx_path, calib_dir, layers, t.keep_precision, calib_data, always, progress,
                                   alternatives, amax=amax, ptq=ptq)
        sqnr_output = budget.output
        tuner = Tuner(layers, budget, runner, sets, t.max_candidates, t.max_seconds, sqnr_output, progress,
                      set(alternatives), t.objective)
        try:
            table = None
            if backend == "tensorrt" and t.strategy == "sensitivity":
                side = Tuner(layers, budget, sim, sets, t.max_candidates, t.max_seconds, sqnr_output, progress,
                             set(alternatives), t.objective)
                table = side.sensitivity()
            chosen, table = tuner.run(t.strategy, table)
            describe = runner.describe()
        finally:
            runner.close()
            if runner is not sim:
                sim.close()

        by_layer = {layer.name: layer for layer in layers}
        rank = {r["layer"]: r for r in table}
        kept_names = [*chosen["kept"], *always]
        kept = []
        for name in kept_names:
            layer = by_layer[name]
            why = list(tuner.why.get(name, []))
            if layer.forced_float:
                why.insert(0, f"always float: {layer.forced_float}")
            r = rank.get(name)
            if r is not None:
                why.insert(0, f"sensitivity rank {r['rank']} of {len(table)}: alone in INT8 the output SQNR is "
                              f"{r['int8_alone_sqnr_db']:.2f} dB; kept alone, {budget.stat} goes "
                              f"{'up' if r['float_alone_gain'] >= 0 else 'down'} by {abs(r['float_alone_gain']):.4g}")
            kept.append({"layer": name, "nodes": list(layer.nodes), "op_type": layer.op_type, "macs": layer.macs,
                         "why": why})
        pins = layer_precisions([by_layer[k] for k in kept_names], t.keep_precision)
        minmax = list(chosen["minmax"])
        final_amax = tuned_amax(amax, alternatives, minmax)
        changed = overrides(amax, alternatives, minmax)
        summary = quantize_qdq(onnx_path, tmp / QDQ_FILE, final_amax, exclude_nodes=sorted(kept_names),
                               rounded=ptq.rounded, corrections=ptq.corrections)
        write_json(tmp / "layer_precisions.json", pins)
        if (calib_dir / CACHE_FILE).is_file():  # calibrate's cache with the tuned ranges (implicit route)
            write_tuned_cache(calib_dir / CACHE_FILE, tmp / CACHE_FILE,
                              {k: v["amax"] for k, v in changed.items()})
        methods = {"layers": {name: "minmax" for name in minmax}, "tensors": changed, "tried": sorted(alternatives),
                   "weights": ptq.describe(),
                   "why": {name: (f"alone in INT8 the output SQNR is {rank[name]['int8_alone_sqnr_db']:.2f} dB with "
                                  f"the calibrated ranges, {rank[name]['int8_alone_minmax_sqnr_db']:.2f} dB with max|x|")
                           for name in minmax if name in rank and rank[name].get("int8_alone_minmax_sqnr_db") is not None}}

        base = next(c for c in tuner.candidates if c["phase"] == "full_int8")
        top = next(c for c in tuner.candidates if c["phase"] == "float")
        float_label = "FP16 (all layers kept)" if t.keep_precision == "fp16" else "all layers kept (FP32)"
        if runner.backend == "onnxruntime":
            float_label = f"all kept ({t.keep_precision} cost; FP32 numerics in the simulation)"
        points = {"full_int8": {**base, "label": "full INT8"}, "float": {**top, "label": float_label},
                  "chosen": {**chosen, "label": "chosen"}}
        front = frontier(tuner.candidates, budget.higher_better)
        cost_label = ("estimated cost, ns per sample (a roofline estimate, not a latency)"
                      if runner.latency_kind == "estimate" else f"TensorRT latency, {describe['unit']}")
        plot_frontier(tmp / "tune.png", model=cfg.model.name, candidates=tuner.candidates, frontier=front,
                      points=points, budget_text=budget.describe(), threshold_full=sets["full"].threshold,
                      metric=budget.metric, cost_label=cost_label, backend=runner.backend)
        met = bool(chosen.get("meets_full"))
        report = TuneReport(
            model=cfg.model.name, backend=runner.backend,
            budget={**budget.as_report(),
                    **{f"fp32_{k}": s.fp32_metric for k, s in sets.items()},
                    **{f"threshold_{k}": s.threshold for k, s in sets.items()}},
            met=met, keep_precision=t.keep_precision, strategy=t.strategy, latency_kind=runner.latency_kind,
            latency_model=describe,
            samples={"full": n, "search": len(search_idx), "sensitivity": len(sens_idx)},
            layers=[TuneLayer(**layer.as_report()) for layer in layers],
            sensitivity=[LayerSensitivity(**r) for r in table],
            candidates=[TuneCandidate(**c) for c in tuner.candidates],
            chosen=chosen["id"], kept=kept, layer_precisions=pins, methods=methods, frontier=front,
            reference_points={k: {"candidate": p["id"], "label": p["label"], "kept": len(p["kept"]),
                                  "metric_full": p["metric_full"], "meets_full": p["meets_full"], "cost": p["cost"],
                                  "latency_ms": p["latency_ms"]} for k, p in points.items()},
            search={"strategy": t.strategy, "objective": t.objective, "stop_reason": tuner.stop_reason, "candidates": len(tuner.candidates),
                    "by_phase": dict(collections.Counter(c["phase"] for c in tuner.candidates)),
                    "max_candidates": t.max_candidates, "max_seconds": t.max_seconds,
                    "notes": tuner.why.get("_search", []), "qdq_nodes": {"q": summary["q_nodes"],
                                                                          "dq": summary["dq_nodes"]},
                    "seconds": round(time.perf_counter() - start, 3)},
            seconds=round(time.perf_counter() - start, 3),
            sha256={"onnx": sha256_of(onnx_path), CALIBRATE_REPORT: sha256_of(calib_dir / CALIBRATE_REPORT),
                    RANGES_FILE: sha256_of(calib_dir / RANGES_FILE),
                    **({CACHE_FILE: sha256_of(calib_dir / CACHE_FILE)}
                       if (calib_dir / CACHE_FILE).is_file() else {}),
                    "eval_data": sha256_of(eval_data),
                    **{name: sha256_model(tmp / name) for name in OUTPUTS if (tmp / name).is_file()}},
        )
        write_report(tmp / "tune.json", report)
    if not met:
        p = chosen
        value = p["metric_full"] if p["metric_full"] is not None else p["metric"]
        raise TuneBudgetError(
            f"{Path(out_dir) / 'tune.json'}: the budget {budget.describe()} is not met "
            f"({tuner.stop_reason}); best point found: candidate {p['id']} keeping {len(p['kept'])} of "
            f"{len(layers)} layers, {budget.metric} {_fmt(value)} on the full evaluation set (needs "
            f"{_fmt(sets['full'].threshold)}); loosen tune.budget or raise tune.max_candidates / tune.max_seconds")
    return report


def _fmt(v: Optional[float]) -> str:
    return "n/a" if v is None else ("NaN" if isinstance(v, float) and math.isnan(v) else f"{v:.6g}")
