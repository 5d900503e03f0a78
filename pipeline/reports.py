"""Typed reports between stages (README, "Stages and what they write"): one pydantic model per report,
shared by the stage that writes it and every stage that reads it.

Reports are strict JSON: a non-finite number (an SNR of identical outputs, a NaN metric)
is written as the string "Infinity", "-Infinity" or "NaN" and read back as a float. A
report that is missing, not JSON, from another schema version or not of its model's
shape is an error naming the file and the stage to re-run."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Literal, Optional, TypeVar, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .errors import ArtifactError, PipelineError

SCHEMA_VERSION = 2
Dim = Union[int, str, None]


class Report(BaseModel):
    """Base of every report: strict keys, non-finite floats as strings."""

    model_config = ConfigDict(extra="forbid", ser_json_inf_nan="strings", protected_namespaces=())

    schema_version: int = SCHEMA_VERSION


class _Part(BaseModel):
    model_config = ConfigDict(extra="forbid", ser_json_inf_nan="strings", protected_namespaces=())


class TensorInfo(_Part):
    name: str
    dtype: str
    shape: list[Dim]  # batch axis first; strings name dynamic axes


# -- prepare -------------------------------------------------------------------------------------
class PrepareData(_Part):
    source: str
    path: Optional[str] = None
    calibration_path: Optional[str] = None
    seed: int
    train: int
    calibration: int
    evaluation: int
    labelled: bool
    inputs: list[TensorInfo]  # as written to calib.npz / eval.npz (sample shapes)
    labels_key: str


class PrepareReport(Report):
    stage: Literal["prepare"] = "prepare"
    model: str
    weights: dict[str, Any]  # from: trained | checkpoint, and what that means
    data: PrepareData
    pytorch_eval_top1: Optional[float] = Field(None, description="percent; only for labelled classification data")
    seconds: Optional[float] = None  # run-to-run noise: in the stage's timings file, never in the report on disk (NOISE)
    sources: dict[str, Optional[str]] = Field(default_factory=dict, description="sha256 of the user's inputs")
    sha256: dict[str, str]  # model.pt, calib.npz, eval.npz


# -- export --------------------------------------------------------------------------------------
class ExportReport(Report):
    stage: Literal["export"] = "export"
    model: str
    opset: int
    inputs: list[TensorInfo]
    outputs: list[TensorInfo]
    dynamic_axes: dict[str, dict[str, str]]
    output_structure: str = ""  # what forward() returned, flattened into the outputs
    nodes: int
    torch_version: str
    onnx_version: str
    seconds: Optional[float] = None  # run-to-run noise: in the stage's timings file, never in the report on disk (NOISE)
    sha256: dict[str, str]  # checkpoint, onnx


# -- validate ------------------------------------------------------------------------------------
class Agreement(_Part):
    cosine: float
    cosine_min: float
    max_abs_diff: float
    mean_abs_diff: float
    rel_l2: float
    snr_db: float
    top1_agreement: Optional[float] = None
    nonfinite: int = 0  # NaN/Inf values in the candidate's outputs


class OutputCheck(Agreement):
    atol: float
    min_cosine: float
    passed: bool
    failures: list[str] = Field(default_factory=list)


class ValidateReport(Report):
    stage: Literal["validate"] = "validate"
    samples: int
    outputs: dict[str, OutputCheck]
    passed: bool
    reference: str
    seconds: Optional[float] = None  # run-to-run noise: in the stage's timings file, never in the report on disk (NOISE)
    sha256: dict[str, str]  # onnx, checkpoint, eval_data, reference.npz


# -- calibrate -----------------------------------------------------------------------------------
class TensorMaxima(Report):
    """maxima.json: max|x| of every floating tensor of the FP32 ONNX (graph inputs and
    activations, those left out of INT8 included) over the calibration samples; None where a
    value was not finite. Written by calibrate, read by build@fp16 (which nodes stay in FP32):
    it depends only on the ONNX and the samples, so a calibration.method edit leaves it as it is."""

    stage: Literal["calibrate"] = "calibrate"
    what: str = "max |x| over the calibration samples; null: a value was +-Inf or NaN"
    onnx_sha256: str
    samples: int
    tensors: dict[str, Optional[float]]

    @field_validator("tensors")
    @classmethod
    def _magnitudes(cls, v: dict[str, Optional[float]]) -> dict[str, Optional[float]]:
        bad = [f"{k}: {x}" for k, x in v.items() if x is not None and not (x >= 0 and x < float("inf"))]
        if bad:
            raise ValueError(f"max|x| must be a finite number >= 0 or null, got {', '.join(bad[:3])}")
        return v


class CalibrateReport(Report):
    stage: Literal["calibrate"] = "calibrate"
    method: str
    rules: str
    settings: dict[str, Any]
    samples: int
    batches: int
    batch_size: int
    samples_available: int
    samples_requested: int
    samples_dropped: int
    calibration_shapes: dict[str, list[int]]  # input -> batch shape every batch had
    tensors: int
    excluded: dict[str, str] = Field(default_factory=dict, description="tensor -> why it has no range")
    cache: dict[str, Any]
    qdq: dict[str, Any]
    collect: dict[str, Any]
    seconds: Optional[dict[str, float]] = None  # run-to-run noise: in the stage's timings file, never in the report on disk (NOISE)
    search_ms_per_tensor: Optional[dict[str, float]] = None
    peak_rss_mb: Optional[float] = None
    software: dict[str, str]
    sha256: dict[str, str]  # onnx, calib_data, ranges.json, calibration.cache, model.qdq.onnx


# -- build ---------------------------------------------------------------------------------------
class BuildReport(Report):
    stage: Literal["build"] = "build"
    model: str
    precision: Literal["fp32", "fp16", "int8"]
    backend: str
    backend_version: str
    backend_requested: str
    artifact: str
    onnx_sha256: str
    sha256: str  # of the artifact
    engine_bytes: int
    build_seconds: Optional[float] = None  # run-to-run noise: in the stage's timings file, never in the report on disk (NOISE)
    built_at: Optional[str] = None
    environment: dict[str, Any]
    flags: list[str] = Field(default_factory=list)
    profiles: Optional[list[dict[str, dict[str, list[int]]]]] = None  # input -> {min, opt, max}; None: any shape
    workspace_mb: Optional[int] = None
    calibration: Optional[dict[str, Any]] = None  # how int8 ranges came to be (source, cache header, hashes)
    kept_fp32: list[str] = Field(default_factory=list, description="nodes kept in fp32 in an fp16 variant, and why")
    details: dict[str, Any] = Field(default_factory=dict, description="backend-specific facts")
    tune: Optional[dict[str, Any]] = Field(None, description="int8: the `trtpipe tune` result applied (layers kept, route)")


# -- evaluate ------------------------------------------------------------------------------------
class LatencyStats(_Part):
    batch_size: int
    iterations: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    std_ms: float
    min_ms: float
    throughput_per_s: float


class LatencyRow(_Part):
    batch_size: int
    mode: str = "plain"  # plain | cuda_graph
    host: LatencyStats  # end to end, host clock
    gpu: Optional[LatencyStats] = None  # device time alone (CUDA events), where the backend has it
    warmup: int
    method: str


class EvalReport(Report):
    stage: Literal["evaluate"] = "evaluate"
    model: str
    precision: Literal["fp32", "fp16", "int8"]
    backend: str
    backend_version: str
    samples: int
    metrics: dict[str, float]
    metric_outputs: dict[str, Optional[str]] = Field(default_factory=dict, description="metric -> output it reads")
    reference_metrics: dict[str, dict[str, float]] = Field(default_factory=dict)
    agreement_fp32: dict[str, Agreement]
    agreement_pytorch: dict[str, Agreement]
    latency: list[LatencyRow]
    latency_config: dict[str, Any]
    latency_skipped: list[dict[str, Any]] = Field(default_factory=list)
    device: dict[str, Any]
    engine_bytes: Optional[int] = None
    build_seconds: Optional[float] = None
    flags: list[str] = Field(default_factory=list, description="numbers that cannot be trusted, and why")
    seconds: Optional[float] = None  # run-to-run noise: in the stage's timings file, never in the report on disk (NOISE)
    sha256: dict[str, str]  # artifact, fp32 artifact, eval_data, reference, onnx


# -- compare -------------------------------------------------------------------------------------
# Row keys of compare.json that are not task metrics (a user metric must not take one of these names).
RESERVED_COLUMN = re.compile(
    r"^(backend|backend_version|device|timing|engine_bytes|size_vs_fp32|build_seconds|samples|flagged"
    r"|(fp32|pytorch)_.*|b\d+_.*|.*_delta|.*_delta_pytorch)$"
)
LATENCY_COLUMN = re.compile(r"^b(\d+)_(p50|p90|p99|mean)_ms$")


class CompareReport(Report):
    stage: Literal["compare"] = "compare"
    model: str
    reference: str
    backends: list[str]
    primary_metric: Optional[str]
    metric_outputs: dict[str, Optional[str]] = Field(default_factory=dict)
    outputs: list[str]
    pytorch: dict[str, float]
    variants: dict[str, dict[str, Any]]  # flat rows (dvc metrics): see pipeline.stages.compare
    agreement: dict[str, dict[str, dict[str, dict[str, float]]]] = Field(
        default_factory=dict, description="variant -> fp32|pytorch -> output -> statistic")
    flags: dict[str, list[str]] = Field(default_factory=dict, description="variant -> reasons it is flagged")
    headline: dict[str, Any] = Field(default_factory=dict, description="which latency the tables lead with")


# -- tune ----------------------------------------------------------------------------------------
class TuneLayer(_Part):
    """A quantizable layer: its weighted ONNX node and the nodes TensorRT fuses with it."""

    name: str  # the weighted node (Conv / Gemm / MatMul ...), as in the ONNX
    op_type: str
    index: int  # topological position among the quantizable layers
    nodes: list[str]  # the node and its fused epilogue (BN, Relu/Clip, swish, the residual Add), ONNX names
    macs: int  # multiply-accumulates per sample (from the shapes of one real sample)
    forced_float: Optional[str] = None  # why the layer is never INT8 (an input left out of calibration)
    out_elements: int = 0  # output elements per sample: what an INT8 <-> float boundary after it reformats
    in_elements: int = 0  # activation input elements per sample
    weight_elements: int = 0


class LayerSensitivity(_Part):
    """What one layer does to the output: quantized alone (every other layer float) and kept
    alone in float (every other layer INT8), on the sensitivity samples."""

    layer: str
    rank: int  # 1 = most sensitive
    score: float  # error energy the layer adds alone (10^(-SQNR/10)), per estimated ns of cost with objective cost; the order
    int8_alone_sqnr_db: float
    int8_alone_metric: float
    float_alone_sqnr_db: float
    float_alone_metric: float
    float_alone_gain: float  # budget metric of 'this layer kept' minus that of full INT8 (in the better direction)
    method: str = "calibrated"  # the layer's inputs' ranges from then on: calibrated | minmax
    int8_alone_minmax_sqnr_db: Optional[float] = None  # alone in INT8 with max|x| ranges, where they differ


class TuneCandidate(_Part):
    id: int
    phase: str  # full_int8 | float | int8_alone | float_alone | search | prune | verify | bisect | first_last
    kept: list[str]  # layers kept out of INT8 (weighted node names)
    minmax: list[str] = Field(default_factory=list, description="INT8 layers whose inputs take max|x| ranges")
    metric: Optional[float] = None  # the budget's metric on the search samples
    meets: Optional[bool] = None  # on the search samples
    metric_sensitivity: Optional[float] = None  # on the sensitivity samples, when they are fewer than the search's
    metric_full: Optional[float] = None  # on the full evaluation set, where checked
    meets_full: Optional[bool] = None
    sqnr_db: float  # output SQNR against FP32 (the budget's output, else the worst) on the first samples measured
    cost: float  # estimated time (roofline, ns per sample) or measured latency (ms), see latency_kind
    latency_ms: dict[str, float] = Field(default_factory=dict, description="measured TensorRT latency per batch (bN)")
    seconds: Optional[float] = None  # run-to-run noise: in the stage's timings file, never in the report on disk (NOISE)


class TuneReport(Report):
    stage: Literal["tune"] = "tune"
    model: str
    backend: str  # what measured the candidates: onnxruntime (Q/DQ simulation) | tensorrt
    budget: dict[str, Any]  # metric, bound, kind (task | agreement), output, threshold on each set, fp32 value
    met: bool
    keep_precision: str
    strategy: str
    latency_kind: str  # estimate (CPU: MACs x relative cost) | tensorrt (measured)
    latency_model: dict[str, Any]
    samples: dict[str, int]  # search, sensitivity, full
    layers: list[TuneLayer]
    sensitivity: list[LayerSensitivity] = Field(default_factory=list)
    candidates: list[TuneCandidate]
    chosen: int  # candidate id of the result (the best point found when the budget was not met)
    kept: list[dict[str, Any]]  # {layer, nodes, why}
    layer_precisions: dict[str, str]  # build.layer_precisions that apply the result (implicit TensorRT)
    methods: dict[str, Any] = Field(default_factory=dict, description="calibration method per layer: layers, the "
                                    "tensors whose ranges changed (calibrated and tuned amax), the layers tried")
    frontier: list[int]  # candidate ids on the accuracy-cost frontier (search samples)
    reference_points: dict[str, dict[str, Any]]  # full_int8, float, chosen on the full set
    search: dict[str, Any]  # budget used, stop reason, candidates by phase
    seconds: Optional[float] = None  # run-to-run noise: in the stage's timings file, never in the report on disk (NOISE)
    sha256: dict[str, str]  # onnx, calibrate.json, ranges.json, calibration.cache, eval_data, outputs


R = TypeVar("R", bound=Report)


# Run-to-run noise (wall times, memory peaks, clock stamps): kept out of the report a stage
# writes, so that re-running a stage on the same inputs writes the same bytes and DVC does not
# re-run every stage after it. `trtpipe <stage> --timings FILE` writes them there (dvc.yaml
# declares that file `cache: false`, and no stage depends on it).
NOISE = ("seconds", "build_seconds", "built_at", "peak_rss_mb", "search_ms_per_tensor")
_NESTED_NOISE: dict[str, Any] = {"candidates": {"__all__": {"seconds"}}, "search": {"seconds"}}


def _noise_exclude(report: Report) -> dict[str, Any]:
    fields = type(report).model_fields
    out: dict[str, Any] = {k: True for k in NOISE if k in fields}
    out.update({k: v for k, v in _NESTED_NOISE.items() if k in fields})
    return out


def peak_rss_mb() -> float:
    """This process's peak resident memory in MB (ru_maxrss: KiB on Linux, bytes on macOS)."""
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (1 << 20 if sys.platform == "darwin" else 1 << 10), 1)


def timings(report: Report) -> dict[str, Any]:
    """The noise `write_report` leaves out of `report` (what `--timings` writes)."""
    data = report.model_dump(mode="json", include=_noise_exclude(report))
    return {"stage": getattr(report, "stage", None), **{k: v for k, v in data.items() if v not in (None, {}, [])}}


def write_report(path: Union[str, Path], report: Report) -> Path:
    """Write `report` as strict JSON, atomically, without its run-to-run noise (NOISE)."""
    from .fileio import write_text

    return write_text(path, report.model_dump_json(indent=2, exclude=_noise_exclude(report)) + "\n")


def read_report(path: Union[str, Path], cls: type[R], what: str, stage: str,
                error: type[PipelineError] = ArtifactError) -> R:
    """Read a report of type `cls`; `stage` is the stage to re-run when it is missing or unusable."""
    path = Path(path)
    from .fileio import not_a_folder

    not_a_folder(path, what, error)
    if not path.is_file():
        raise error(f"{path}: {what} not found; run the {stage} stage first (dvc repro {stage})")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise error(f"{path}: {what} is not valid JSON ({getattr(e, 'msg', e)}); re-run {stage}") from None
    if not isinstance(data, dict):
        raise error(f"{path}: {what} is not a JSON object; re-run {stage}")
    if data.get("schema_version") != SCHEMA_VERSION:
        raise error(f"{path}: {what} has schema_version {data.get('schema_version')!r}, this trtpipe reads "
                    f"{SCHEMA_VERSION}; re-run {stage} with this version")
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        loc = ".".join(str(p) for p in first["loc"]) or "(top level)"
        raise error(f"{path}: {what} does not have the expected form ({loc}: {first['msg']}); it was edited or "
                    f"written by another trtpipe: re-run {stage}") from None
