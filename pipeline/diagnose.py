"""`trtpipe diagnose --precision fp16|int8`: where a reduced-precision variant leaves FP32.

Layer-wise comparison in the manner of `polygraphy run --onnxrt --trt --mark-all`: every
intermediate tensor of the FP32 ONNX and of the variant is made a graph output
(Polygraphy's ``ModifyOutputs(..., MARK_ALL)``), both run on the same few evaluation samples
through Polygraphy's runners and ``Comparator``, and each ONNX node's output is compared
by tensor name (cosine, SNR in dB, max |diff|), in topological order.

Which variant runs (the report's ``path`` says which did):

* ``onnxruntime`` (CPU): the variant ONNX through onnxruntime sessions made by
  :func:`calibration.ort_session.make_session` (exact Q/DQ semantics): int8 is the build's
  Q/DQ model (calibrate's ``model.qdq.onnx``, or the tuned one the build used), fp16 the
  onnxruntime backend's float16 model or the typed ``model.fp16.onnx`` of a TensorRT build.
  A TensorRT build diagnosed where TensorRT does not import runs this path on the same ONNX
  TensorRT would build, and says so.
* ``tensorrt`` (GPU, where TensorRT imports and the build's backend is tensorrt): an engine
  built by Polygraphy's TensorRT loaders with every layer output marked
  (``ModifyNetworkOutputs(MARK_ALL)``), run by ``TrtRunner``. Marking outputs stops some
  fusions, so the per-layer numbers are those of a less fused engine than the built one;
  the final outputs are still compared. (TensorRT 10's debug tensors, which keep fusions,
  are the better probe where the version has them; not wired here yet.) This path has not
  run in this project's CI, which has no GPU.

The reference is always the FP32 ONNX in onnxruntime. A node is *flagged* where its output's
SNR falls below ``--tolerance`` dB while none of the node's inputs was below it: the places
where the error grows past the tolerance (the first ``--first`` of them in topological
order are listed); NaN or Inf in an output is always below. With ``artifacts/tune/tune.json``
each node carries tune's layer and sensitivity rank. The JSON report (``--out``) and a plot
of SNR by node (PNG beside it) are written atomically."""

from __future__ import annotations

import io
import math
import time
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from .errors import ArtifactError, PipelineError, UsageError
from .fileio import QDQ_FILE
from .log import get_logger

DIAGNOSED = ("fp16", "int8")  # what diagnose compares against fp32
PATH_CPU = "onnxruntime"
PATH_TRT = "tensorrt"
log = get_logger(__name__)


# -- the numbers --------------------------------------------------------------------------------
def tensor_error(ref: np.ndarray, got: np.ndarray) -> dict[str, Any]:
    """cosine, SNR (dB: 10 log10(sum ref^2 / sum (ref - got)^2), inf when equal) and max |diff|."""
    a = np.asarray(ref, np.float64).ravel()
    b = np.asarray(got, np.float64).ravel()
    if a.shape != b.shape:
        return {"cosine": float("nan"), "snr_db": float("nan"), "max_abs_diff": float("nan"),
                "finite": False, "note": f"shape {np.shape(got)} != fp32 {np.shape(ref)}"}
    finite = bool(np.isfinite(b).all())
    with np.errstate(all="ignore"):
        d = a - b
        signal, noise = float(np.dot(a, a)), float(np.dot(d, d))
        na, nb = math.sqrt(signal), float(np.linalg.norm(b))
        cos = float(np.dot(a, b) / (na * nb)) if na > 0 and nb > 0 else (1.0 if na == nb == 0 else 0.0)
        if not finite or math.isnan(noise):
            snr = float("nan")
        elif noise == 0:
            snr = float("inf")
        elif signal == 0:
            snr = float("-inf")
        else:
            snr = 10 * math.log10(signal / noise)
        mad = float(np.max(np.abs(d))) if d.size else 0.0
    if not finite:
        cos = float("nan")
    return {"cosine": cos, "snr_db": snr, "max_abs_diff": mad, "finite": finite}


def _below(snr: float, tolerance: float) -> bool:
    return not (snr >= tolerance)  # NaN is below every tolerance


# -- models and runs ----------------------------------------------------------------------------
def _mark_all(onnx_path: Path) -> Any:
    """The ONNX with every intermediate tensor also a graph output (Polygraphy's mark-all)."""
    from polygraphy import constants
    from polygraphy.backend.onnx import ModifyOutputs, OnnxFromPath

    _quiet_polygraphy()
    try:
        with _polygraphy_to_stderr():
            return ModifyOutputs(OnnxFromPath(str(onnx_path)), outputs=constants.MARK_ALL)()
    except Exception as e:
        raise ArtifactError(f"{onnx_path}: cannot mark its tensors as outputs ({type(e).__name__}: "
                            f"{str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}); is it a valid ONNX?") from None


def ort_runner(onnx_path: Path, name: str) -> Any:
    """Polygraphy's OnnxrtRunner over a session of the marked-all model, made by make_session."""
    from polygraphy.backend.onnxrt import OnnxrtRunner

    from calibration.ort_session import make_session

    model = _mark_all(onnx_path)
    return OnnxrtRunner(lambda: make_session(model, what=str(onnx_path), error=ArtifactError), name=name)


def trt_runner(onnx_path: Path, precision: str, feeds: Mapping[str, np.ndarray], name: str,
               skip: Sequence[str] = ()) -> Any:  # pragma: no cover - GPU
    """Polygraphy's TrtRunner on an engine of `onnx_path` with every layer output marked but
    `skip` (the Q/DQ nodes' outputs). int8 is the Q/DQ ONNX (explicit quantization: no
    calibrator), fp16 the FP32 ONNX with the fp16 flag, or a typed fp16 ONNX built strongly
    typed. Imports TensorRT lazily."""
    from polygraphy import constants
    from polygraphy.backend.trt import (CreateConfig, EngineFromNetwork, ModifyNetworkOutputs, NetworkFromOnnxPath,
                                        Profile, TrtRunner)

    _quiet_polygraphy()
    typed = onnx_path.name.endswith(".fp16.onnx")
    parsed = NetworkFromOnnxPath(str(onnx_path), strongly_typed=True) if typed else NetworkFromOnnxPath(str(onnx_path))
    network = ModifyNetworkOutputs(parsed, outputs=constants.MARK_ALL, exclude_outputs=list(skip) or None)
    profile = Profile()
    for k, v in feeds.items():
        profile.add(k, min=v.shape, opt=v.shape, max=v.shape)
    flags: dict[str, Any] = {} if typed else {"fp16": precision == "fp16", "int8": precision == "int8"}
    engine = EngineFromNetwork(network, CreateConfig(profiles=[profile], **flags))
    return TrtRunner(engine, name=name)


def _polygraphy_to_stderr() -> Any:
    """Polygraphy prints its log on stdout, which is for a command's result: sent to stderr."""
    import contextlib
    import sys

    return contextlib.redirect_stdout(sys.stderr)


def _quiet_polygraphy() -> None:
    import logging

    from polygraphy.logger import G_LOGGER

    G_LOGGER.module_severity = G_LOGGER.INFO if log.isEnabledFor(logging.DEBUG) else G_LOGGER.ERROR


def run_layers(reference: Any, variant: Any, feeds: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Both runners on the same feeds through Polygraphy's Comparator: (fp32 tensors, variant tensors)."""
    from polygraphy.comparator import Comparator

    _quiet_polygraphy()
    with _polygraphy_to_stderr():
        results = Comparator.run([reference, variant], data_loader=[dict(feeds)])
    ref = {k: np.asarray(v) for k, v in results[reference.name][0].items()}
    got = {k: np.asarray(v) for k, v in results[variant.name][0].items()}
    return ref, got


# -- the layer table ---------------------------------------------------------------------------
def _dq_sources(model: Any) -> dict[str, dict[str, Any]]:
    """Q/DQ model: tensor read through DequantizeLinear -> {tensor, dq_output, scale}; weights included."""
    from onnx import numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    q_of = {n.output[0]: n for n in model.graph.node if n.op_type == "QuantizeLinear"}
    out: dict[str, dict[str, Any]] = {}
    for n in model.graph.node:
        if n.op_type != "DequantizeLinear":
            continue
        scale = numpy_helper.to_array(inits[n.input[1]]) if n.input[1] in inits else None
        q = q_of.get(n.input[0])
        weight = q is None and n.input[0] in inits
        src = q.input[0] if q is not None else n.input[0]
        if weight and src.endswith("_quantized"):  # calibration.qdq_insert's name of an int8 weight
            src = src[: -len("_quantized")]
        out[n.output[0]] = {"tensor": src, "weight": weight,
                            "scale": float(scale) if scale is not None and scale.size == 1 else
                            (None if scale is None else f"per-channel ({scale.size})")}
    return out


def quantized_nodes(variant_model: Any) -> dict[str, list[dict[str, Any]]]:
    """Nodes of a Q/DQ model that read an activation or weight through DequantizeLinear."""
    dq = _dq_sources(variant_model)
    out: dict[str, list[dict[str, Any]]] = {}
    for n in variant_model.graph.node:
        if n.op_type in ("QuantizeLinear", "DequantizeLinear"):
            continue
        ins = [{"input": i, **dq[i]} for i in n.input if i in dq]
        if ins:
            out[n.name] = ins
    return out


def layer_table(fp32_model: Any, variant_model: Any, ref: Mapping[str, np.ndarray], got: Mapping[str, np.ndarray],
                tolerance: float) -> list[dict[str, Any]]:
    """One row per node of the FP32 ONNX, in its (topological) order."""
    from onnx import numpy_helper

    quantized = quantized_nodes(variant_model)
    weights = {i.name: i for i in fp32_model.graph.initializer}
    producer_row: dict[str, int] = {}
    rows: list[dict[str, Any]] = []
    for node in fp32_model.graph.node:
        if node.op_type == "Constant":
            continue
        outs = [o for o in node.output if o]
        compared = [o for o in outs if o in ref and o in got]
        row: dict[str, Any] = {"index": len(rows), "node": node.name, "op_type": node.op_type, "output": outs[0] if outs else None,
                               "compared": bool(compared)}
        if compared:
            errs = {o: tensor_error(ref[o], got[o]) for o in compared}
            worst = min(compared, key=lambda o: (errs[o]["snr_db"] if not math.isnan(errs[o]["snr_db"]) else -math.inf))
            row.update(output=worst, variant_dtype=str(np.asarray(got[worst]).dtype),
                       float_tensor=np.asarray(ref[worst]).dtype.kind == "f", **errs[worst])
        q = quantized.get(node.name, [])
        row["quantized"] = bool(q)
        if q:
            row["quantized_inputs"] = []
            for item in q:
                entry = {"tensor": item["tensor"], "weight": item["weight"], "scale": item["scale"]}
                fp32_value = (numpy_helper.to_array(weights[item["tensor"]]) if item["weight"] and item["tensor"] in weights
                              else ref.get(item["tensor"]))
                if fp32_value is not None and item["input"] in got:  # what the node reads: DQ(Q(x)) vs x
                    entry["snr_db"] = tensor_error(fp32_value, got[item["input"]])["snr_db"]
                row["quantized_inputs"].append(entry)
        inputs_snr = [rows[producer_row[i]]["snr_db"] for i in node.input if i in producer_row
                      and rows[producer_row[i]]["compared"]]
        if compared:
            row["below_tolerance"] = _below(row["snr_db"], tolerance)
            worst_in = min(inputs_snr, key=lambda s: -math.inf if math.isnan(s) else s) if inputs_snr else math.inf
            row["inputs_snr_db"] = worst_in
            row["snr_drop_db"] = (worst_in - row["snr_db"]) if math.isfinite(worst_in) and math.isfinite(row["snr_db"]) else None
            row["crossed"] = row["below_tolerance"] and not any(_below(s, tolerance) for s in inputs_snr)
        for o in outs:
            producer_row[o] = len(rows)
        rows.append(row)
    return rows


def tune_crossref(rows: list[dict[str, Any]], tune_json: Optional[Path]) -> Optional[dict[str, Any]]:
    """Each row's tune layer, sensitivity rank and whether tune kept it in float (tune.json)."""
    if tune_json is None or not Path(tune_json).is_file():
        return None
    from .fileio import read_json

    t = read_json(tune_json, "tune report")
    if not isinstance(t, dict) or t.get("stage") != "tune":
        raise ArtifactError(f"{tune_json}: is not a tune report; re-run tune or pass --tune-dir to another folder")
    layer_of = {n: layer.get("name") for layer in t.get("layers", []) for n in layer.get("nodes", [])}
    sens = {s.get("layer"): s for s in t.get("sensitivity", [])}
    kept = {k.get("layer") for k in t.get("kept", [])}
    for row in rows:
        layer = layer_of.get(row["node"])
        if layer is None:
            continue
        s = sens.get(layer, {})
        row["tune"] = {"layer": layer, "sensitivity_rank": s.get("rank"), "int8_alone_sqnr_db": s.get("int8_alone_sqnr_db"),
                       "kept_in_float": layer in kept}
    return {"report": str(tune_json), "layers": len(t.get("layers", [])), "ranked": len(sens),
            "kept": sorted(kept), "most_sensitive": [s.get("layer") for s in sorted(sens.values(), key=lambda s: s.get("rank", 0))[:5]]}


# -- the plot ----------------------------------------------------------------------------------
def plot(rows: Sequence[dict[str, Any]], tolerance: float, title: str) -> Optional[bytes]:
    """The PNG's bytes; None when matplotlib is not installed (pipeline.plots warns)."""
    from .plots import pyplot

    plt = pyplot("the diagnose plot")
    if plt is None:
        return None

    shown = [r for r in rows if r["compared"] and r.get("float_tensor", True)]  # not shape arithmetic
    finite = [r["snr_db"] for r in shown if math.isfinite(r["snr_db"])]
    top = (max(finite) if finite else tolerance) + 10
    y = [r["snr_db"] if math.isfinite(r["snr_db"]) else (top if r["snr_db"] > 0 else 0.0) for r in shown]
    x = list(range(len(shown)))
    fig, ax = plt.subplots(figsize=(max(6.0, min(24.0, 0.35 * len(shown) + 3)), 4.5))
    ax.plot(x, y, "-", color="0.6", lw=1)
    colors = ["tab:red" if r.get("below_tolerance") else ("tab:orange" if r.get("quantized") else "tab:blue") for r in shown]
    ax.scatter(x, y, c=colors, s=18, zorder=3)
    for i, r in enumerate(shown):
        if r.get("crossed"):
            ax.annotate(r["node"], (i, y[i]), textcoords="offset points", xytext=(4, -12), fontsize=7, color="tab:red")
    ax.axhline(tolerance, color="tab:red", ls="--", lw=1, label=f"tolerance {tolerance:g} dB")
    ax.scatter([], [], c="tab:orange", s=18, label="reads INT8 (Q/DQ) inputs")
    ax.scatter([], [], c="tab:red", s=18, label="below tolerance")
    step = max(1, len(shown) // 40)
    ax.set_xticks(x[::step])
    ax.set_xticklabels([r["node"] for r in shown][::step], rotation=90, fontsize=6)
    ax.set_ylabel("SNR vs FP32 (dB)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


# -- the command -------------------------------------------------------------------------------
def _variant(precision: str, build_dir: Path, onnx_sha: str,
             variant: Optional[Path]) -> tuple[Optional[Path], str, dict[str, Any]]:
    """(the variant ONNX, the path that runs it, the build report) from build_dir/build.json; the
    ONNX is None where the caller finds it (a TensorRT int8 build: calibrate's Q/DQ ONNX)."""
    from .provenance import ProvenanceError
    from .reports import BuildReport, read_report

    info = read_report(build_dir / "build.json", BuildReport, f"build report of {precision}", f"build@{precision}")
    if info.precision != precision:
        raise ArtifactError(f"{build_dir}/build.json: is a {info.precision} build, not {precision}; pass "
                            f"--build-dir artifacts/build/{precision} or run build --precision {precision}")
    if info.onnx_sha256 != onnx_sha:
        raise ProvenanceError(f"{build_dir}/build.json: built from another ONNX than the one given (--onnx); "
                              f"re-run build --precision {precision} (dvc repro)")
    if variant is not None:
        if not Path(variant).is_file():
            raise ArtifactError(f"{variant}: variant ONNX not found (--variant)")
        return Path(variant), PATH_CPU, info.model_dump()
    trt_here = False
    if info.backend == "tensorrt":
        try:
            import tensorrt  # noqa: F401

            trt_here = True
        except Exception:
            trt_here = False
    path: Optional[Path] = None
    if info.backend == "onnxruntime":
        path = build_dir / info.artifact
    elif precision == "fp16":
        from .backends.trt_typed import FP16_ONNX

        path = build_dir / FP16_ONNX if (build_dir / FP16_ONNX).is_file() else None
    else:
        path = None
    return path, PATH_TRT if trt_here else PATH_CPU, info.model_dump()


def _tuned_qdq(tuned: Mapping[str, Any], tune_dir: Path, build_dir: Path) -> Path:
    """The Q/DQ ONNX of a build that applied `trtpipe tune` (kept layers without Q/DQ), checked by sha256: the
    explicit route records it in build.json; for the implicit route it is tune's own, whose tune.json must be
    the one the build applied."""
    from .provenance import ProvenanceError, sha256_of

    if tuned.get("qdq_onnx"):
        path, expected = Path(tuned["qdq_onnx"]), tuned.get("qdq_sha256")
    else:
        path, report = tune_dir / QDQ_FILE, tune_dir / "tune.json"
        if not report.is_file() or sha256_of(report) != tuned.get("tune_json_sha256"):
            raise ProvenanceError(f"{build_dir}/build.json: applied a tune.json that {tune_dir} does not hold; pass "
                                  "--tune-dir with the tune folder the build used, or re-run build")
        from .reports import TuneReport, read_report

        expected = read_report(report, TuneReport, "tune report", "tune", ProvenanceError).sha256.get(QDQ_FILE)
    if not path.is_file():
        raise ArtifactError(f"{path}: the tuned Q/DQ ONNX the int8 build used is missing; re-run tune and build "
                            "(dvc repro)")
    if expected and sha256_of(path) != expected:
        raise ProvenanceError(f"{path}: changed since the int8 build used it (sha256); re-run build (dvc repro)")
    return path


def run(cfg: Any, precision: str, onnx_path: Path, build_dir: Path, calib_dir: Path, eval_data: Path, out_path: Path, *,
        samples: int = 8, tolerance: float = 30.0, first: int = 3, tune_dir: Optional[Path] = None,
        variant: Optional[Path] = None) -> dict[str, Any]:
    from .data import load_samples
    from .fileio import claim_file, json_report_of, write_bytes, write_json
    from .onnx_utils import load_onnx
    from .provenance import sha256_of

    if precision not in DIAGNOSED:
        raise UsageError(f"--precision {precision}: diagnose compares fp16 or int8 against fp32")
    if samples < 1:
        raise UsageError(f"--samples {samples}: give at least 1")
    if not math.isfinite(tolerance):
        raise UsageError(f"--tolerance {tolerance}: give a finite SNR in dB (e.g. 30)")
    out_path = Path(out_path)
    png = out_path.with_suffix(".png")
    for p, kind in ((out_path, f"diagnose report of {precision}"), (png, "plot")):
        claim_file(p, "diagnose", inputs=(onnx_path, build_dir, calib_dir, eval_data, variant),
                   recognise=json_report_of("diagnose", precision=precision) if p == out_path else
                   (lambda b: b.startswith(b"\x89PNG")), kind=kind)
    start = time.perf_counter()
    onnx_path, build_dir, calib_dir = Path(onnx_path), Path(build_dir), Path(calib_dir)
    fp32_model = load_onnx(onnx_path)
    onnx_sha = sha256_of(onnx_path)
    variant_path, path, info = _variant(precision, build_dir, onnx_sha, variant)
    why = []
    tuned = info.get("tune") or {}
    if variant_path is None:
        if precision == "int8" and tuned.get("applied"):
            variant_path = _tuned_qdq(tuned, Path(tune_dir or Path("artifacts", "tune")), build_dir)
        elif precision == "int8":
            variant_path = calib_dir / QDQ_FILE
            if not variant_path.is_file():
                raise ArtifactError(f"{variant_path}: the Q/DQ ONNX of the int8 variant is missing; run calibrate "
                                    "(or pass --calib-dir)")
        else:
            variant_path = onnx_path  # TensorRT's fp16: its flag on the FP32 ONNX (no typed ONNX was written)
            if path == PATH_CPU:
                raise ArtifactError(f"{build_dir}: a TensorRT fp16 build without a typed model.fp16.onnx, and TensorRT "
                                    "does not import here; run diagnose on a GPU machine, or build fp16 with "
                                    "build.backend: onnxruntime to diagnose it on the CPU")
    if path == PATH_TRT:
        what = ("explicit Q/DQ: " + ("tune's Q/DQ ONNX, the layers the build kept without Q/DQ" if tuned.get("applied")
                                     else "the same ranges as the build")) if precision == "int8" else "fp16"
        why.append(f"an engine of {variant_path.name} built for this comparison with every layer output marked "
                   f"({what}), not the "
                   f"build's own engine; marked outputs stop some of TensorRT's fusions")
    if info["backend"] == "tensorrt" and path == PATH_CPU and variant is None:
        why.append(f"the build is a TensorRT {precision} engine and TensorRT does not import here: compared its ONNX "
                   f"({variant_path.name}) in onnxruntime (exact Q/DQ semantics), TensorRT's numerics simulated")
    try:
        variant_model = load_onnx(variant_path, check=False)
    except PipelineError as e:
        if variant is None:
            raise
        m = str(e)
        why = m[m.find("(") + 1:m.rfind(")")] if "(" in m else m
        raise ArtifactError(f"--variant {variant}: not an ONNX model onnx can read ({why}); give the {precision} "
                            "ONNX to diagnose") from None
    ops = {n.op_type for n in variant_model.graph.node}
    if precision == "int8" and "DequantizeLinear" not in ops:
        raise ArtifactError(f"{variant_path}: has no QuantizeLinear/DequantizeLinear nodes, so it is not an int8 "
                            "variant; give calibrate's model.qdq.onnx (or a Q/DQ ONNX of this model)")
    if precision == "fp16" and path == PATH_CPU and not _has_float16(variant_model):
        raise ArtifactError(f"{variant_path}: holds no float16 tensor, so it is not an fp16 variant; give the fp16 "
                            "build's model (build --precision fp16)")
    data = load_samples(Path(eval_data), cfg.model.inputs, cfg.data.labels_key, "evaluation data")
    n = min(samples, len(data))
    feeds = {k: np.ascontiguousarray(v[:n]) for k, v in data.x.items()}
    log.debug(f"diagnose@{precision}: {n} samples of {eval_data}; fp32 {onnx_path} vs {variant_path} ({path})")
    reference = ort_runner(onnx_path, "fp32")
    if path == PATH_CPU:
        runner = ort_runner(variant_path, precision)
    else:
        qdq = [o for n in variant_model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear") for o in n.output]
        runner = trt_runner(variant_path, precision, feeds, precision, skip=qdq)
    ref, got = run_layers(reference, runner, feeds)
    missing = [o.name for o in fp32_model.graph.output if o.name not in got]
    if missing:
        raise ArtifactError(f"{variant_path}: has no output {missing[0]!r} of the FP32 ONNX; is it a variant of {onnx_path}?")
    rows = layer_table(fp32_model, variant_model, {**feeds, **ref}, got, tolerance)
    tune_json = Path(tune_dir or Path("artifacts", "tune")) / "tune.json"
    tune = tune_crossref(rows, tune_json if tune_json.is_file() else None)
    flagged = [r for r in rows if r.get("crossed")][:max(0, first)]
    drops = sorted((r for r in rows if r.get("snr_drop_db") is not None), key=lambda r: -r["snr_drop_db"])[:max(0, first)]
    below = [r for r in rows if r.get("below_tolerance")]
    final = {o.name: tensor_error(ref[o.name], got[o.name]) for o in fp32_model.graph.output}
    report = {
        "stage": "diagnose", "schema": 1, "model": cfg.model.name, "precision": precision, "path": path,
        "path_detail": (f"TensorRT {_trt_version()} engine with every layer output marked (Polygraphy TrtRunner); "
                        "reference: onnxruntime FP32") if path == PATH_TRT else
                       "onnxruntime CPU sessions (calibration.ort_session.make_session, exact Q/DQ semantics) through "
                       "Polygraphy's OnnxrtRunner, every tensor marked as an output",
        "notes": why, "build": {"backend": info["backend"], "backend_version": info["backend_version"], "dir": str(build_dir)},
        "reference_onnx": str(onnx_path), "variant_onnx": str(variant_path), "eval_data": str(eval_data),
        "samples": n, "tolerance_snr_db": tolerance, "first": first,
        "compared": sum(1 for r in rows if r["compared"]), "nodes": len(rows),
        "quantized_nodes": [r["node"] for r in rows if r["quantized"]],
        "below_tolerance": len(below),
        "first_diverging": flagged[0]["node"] if flagged else None,
        "flagged": [{k: r.get(k) for k in ("node", "op_type", "output", "snr_db", "cosine", "max_abs_diff",
                                          "inputs_snr_db", "snr_drop_db", "quantized_inputs", "tune") if k in r}
                    for r in flagged],
        "largest_drops": [{"node": r["node"], "op_type": r["op_type"], "snr_db": r["snr_db"],
                           "snr_drop_db": r["snr_drop_db"]} for r in drops],
        "outputs": final, "tune": tune, "layers": rows, "plot": None,
        "sha256": {"onnx": onnx_sha, "variant": sha256_of(variant_path), "eval_data": sha256_of(eval_data)},
    }
    title = (f"{cfg.model.name} {precision} vs fp32 ({path}, {n} samples): "
             + (f"first diverging {report['first_diverging']}" if flagged else f"no node below {tolerance:g} dB"))
    picture = plot(rows, tolerance, title)
    if picture is not None:
        write_bytes(png, picture)
        report["plot"] = png.name
    write_json(out_path, report)
    log.debug(f"diagnose@{precision}: {time.perf_counter() - start:.1f} s")
    return report


def _has_float16(model: Any) -> bool:
    from onnx import TensorProto

    f16 = TensorProto.FLOAT16
    if any(i.data_type == f16 for i in model.graph.initializer):
        return True
    return any(a.name == "to" and a.i == f16 for n in model.graph.node if n.op_type == "Cast" for a in n.attribute)


def _trt_version() -> str:  # pragma: no cover - GPU
    import tensorrt

    return str(tensorrt.__version__)


def summary(r: Mapping[str, Any], out: Path) -> str:
    def fmt(x: Any) -> str:
        return "n/a" if x is None else (f"{x:.1f}" if isinstance(x, float) and math.isfinite(x) else str(x))

    head = (f"diagnose@{r['precision']}: {r['path']} on {r['samples']} samples; {r['compared']} of {r['nodes']} nodes "
            f"compared, {r['below_tolerance']} below {r['tolerance_snr_db']:g} dB SNR")
    if r["flagged"]:
        parts = []
        for f in r["flagged"]:
            t = f.get("tune")
            rank = f", tune rank {t['sensitivity_rank']}" if t and t.get("sensitivity_rank") else ""
            parts.append(f"{f['node']} ({f['op_type']}, SNR {fmt(f['snr_db'])} dB from {fmt(f.get('inputs_snr_db'))} dB"
                         f", cos {f['cosine']:.4f}{rank})")
        head += "; first diverging: " + "; ".join(parts)
    else:
        drops = ", ".join(f"{d['node']} ({fmt(d['snr_db'])} dB, -{fmt(d['snr_drop_db'])} dB)" for d in r["largest_drops"])
        head += f"; no node's error grows past the tolerance; largest drops: {drops or 'none'}"
    worst = min(r["outputs"].items(), key=lambda kv: kv[1]["snr_db"] if not math.isnan(kv[1]["snr_db"]) else -math.inf)
    head += f"; output {worst[0]} SNR {fmt(worst[1]['snr_db'])} dB"
    return head + f" -> {out}" + (f" (+ {r['plot']})" if r.get("plot") else "")


# -- CLI ---------------------------------------------------------------------------------------
def cmd_diagnose(a: Any) -> None:
    import json

    from .cli import A, _cfg, _out

    out = _out(a.out or Path(A, "diagnose", f"{a.precision}.json"))
    build_dir = a.build_dir or Path(A, "build", a.precision)
    r = run(_cfg(a), a.precision, a.onnx, build_dir, a.calib_dir, a.eval_data, out, samples=a.samples,
            tolerance=a.tolerance, first=a.first, tune_dir=a.tune_dir, variant=a.variant)
    if a.json:
        from .fileio import finite_json

        print(json.dumps(finite_json({k: v for k, v in r.items() if k != "layers"}), indent=2, default=str))
    else:
        print(summary(r, out))


def register(subparsers: Any) -> None:
    from .cli import A, _add_common
    from .cli_args import path_arg

    help = "layer-wise comparison of the fp16 or int8 variant against FP32: where the error grows (Polygraphy)"
    p = subparsers.add_parser("diagnose", help=help, description=help)
    _add_common(p)
    p.add_argument("--precision", required=True, choices=list(DIAGNOSED))
    p.add_argument("--samples", type=int, default=8, help="evaluation samples run through both (default 8)")
    p.add_argument("--tolerance", type=float, default=30.0,
                   help="SNR in dB below which a node's output has diverged (default 30)")
    p.add_argument("--first", type=int, default=3, help="how many of the first diverging nodes to name (default 3)")
    p.add_argument("--onnx", type=path_arg, default=Path(A, "export", "model.onnx"), help="the FP32 ONNX")
    p.add_argument("--build-dir", type=path_arg, default=None, help="default: artifacts/build/<precision>")
    p.add_argument("--calib-dir", type=path_arg, default=Path(A, "calibrate"),
                   help="calibrate's folder (int8 of a TensorRT build: its model.qdq.onnx)")
    p.add_argument("--eval-data", type=path_arg, default=Path(A, "prepare", "eval.npz"))
    p.add_argument("--tune-dir", type=path_arg, default=None, help="tune's folder for its sensitivity (default: "
                   "artifacts/tune, when tune.json is there)")
    p.add_argument("--variant", type=path_arg, default=None,
                   help="an ONNX to diagnose instead of the build's (e.g. a hand-edited Q/DQ model), on the CPU")
    p.add_argument("--out", type=path_arg, default=None, help="default: artifacts/diagnose/<precision>.json "
                   "(the plot beside it, .png)")
    p.set_defaults(func=cmd_diagnose)


__all__ = ["run", "tensor_error", "layer_table", "quantized_nodes", "tune_crossref", "plot", "summary", "register"]
