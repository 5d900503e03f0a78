"""Typed configuration: `configs/<model>.yaml`, chosen and overridden by `params.yaml`.

params.yaml names the config file (`config:`) and holds the knobs an engineer sweeps
through `dvc exp run -S calibration.method=minmax`: a section given in params.yaml is
merged key by key over the same section of the config file, and every value params.yaml
changes is printed as a note, so an override is never silent. A misspelt key, a wrong
type or a non-finite number (`.inf`, `.nan`) is rejected with its dotted path.

A model is described by its tensors (README, "Your own model"): `model.inputs`, a list of
{name, shape, dtype} where `shape` is one sample's shape without the batch axis and a
string entry names a dynamic axis (`[seq]`, `[3, height, width]`); `model.input` is the
one-input shorthand. `model.outputs` names the outputs (and optionally their shapes);
`model.output_names` is its shorthand.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import ConfigError

PRECISIONS = ("fp32", "fp16", "int8")  # the build variants (build@p, evaluate@p); layer pins: backends.trt_layers.LAYER_PRECISIONS
Precision = Literal["fp32", "fp16", "int8"]
DType = Literal["float32", "float16", "int64", "int32", "bool"]
FLOAT_DTYPES = ("float32", "float16")
BATCH_AXIS = "batch"
_AXIS = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
Dim = Union[int, str]


class _Strict(BaseModel):
    # allow_inf_nan=False: a NaN or Inf anywhere in the config is an error naming the key.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


def _check_dims(dims: list[Any], where: str) -> list[Dim]:
    out: list[Dim] = []
    for d in dims:
        if isinstance(d, bool):
            raise ValueError(f"{where}: {d!r} is not a dimension")
        if isinstance(d, int):
            if d <= 0:
                raise ValueError(f"{where}: every fixed dimension must be a positive integer, got {d}")
        elif isinstance(d, str):
            if not _AXIS.match(d):
                raise ValueError(f"{where}: dynamic axis name {d!r} must be an identifier (letters, digits, _)")
            if d == BATCH_AXIS:
                raise ValueError(f"{where}: '{BATCH_AXIS}' is the leading batch axis, which the shape leaves out")
        else:
            raise ValueError(f"{where}: {d!r} is neither a positive integer nor a dynamic axis name")
        out.append(d)
    return out


def _strip_batch(v: Any) -> Any:
    """`[batch, seq]` and `[seq]` mean the same: the batch axis is always first and implicit."""
    if isinstance(v, list) and v and v[0] == BATCH_AXIS:
        return v[1:]
    return v


class TensorSpec(_Strict):
    """One model input: name, dtype and one sample's shape (no batch axis; strings name dynamic axes)."""

    name: str = Field("input", min_length=1)
    shape: list[Dim] = Field(description="one sample's shape, without the batch axis (e.g. [3, 224, 224] or [seq])")
    dtype: DType = "float32"

    @field_validator("shape", mode="before")
    @classmethod
    def _batch(cls, v: Any) -> Any:
        return _strip_batch(v)

    @field_validator("shape")
    @classmethod
    def _dims(cls, v: list[Any]) -> list[Dim]:
        return _check_dims(v, "shape")

    @property
    def is_float(self) -> bool:
        return self.dtype in FLOAT_DTYPES

    @property
    def dynamic_axes(self) -> dict[int, str]:
        """Axis index (in the batched tensor, batch = 0) -> name, for every named axis."""
        return {i + 1: d for i, d in enumerate(self.shape) if isinstance(d, str)}


InputSpec = TensorSpec  # the name the one-input shorthand (`model.input`) had


class OutputSpec(_Strict):
    """One model output: its name and, optionally, one sample's shape (strings name dynamic axes)."""

    name: str = Field(min_length=1)
    shape: Optional[list[Dim]] = None

    @field_validator("shape", mode="before")
    @classmethod
    def _batch(cls, v: Any) -> Any:
        return _strip_batch(v)

    @field_validator("shape")
    @classmethod
    def _dims(cls, v: Optional[list[Any]]) -> Optional[list[Dim]]:
        return None if v is None else _check_dims(v, "shape")

    @property
    def dynamic_axes(self) -> dict[int, str]:
        return {i + 1: d for i, d in enumerate(self.shape or []) if isinstance(d, str)}


class TrainConfig(_Strict):
    """Only for the built-in `digits_cnn`: trained deterministically in `prepare`."""

    epochs: int = Field(20, ge=1)
    batch_size: int = Field(64, ge=1)
    lr: float = Field(0.003, gt=0, le=10)
    seed: int = 0


def _unique(names: list[str], what: str) -> None:
    seen = set()
    for n in names:
        if n in seen:
            raise ValueError(f"{what} names '{n}' twice; every name must be unique")
        seen.add(n)


class ModelConfig(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    source: Literal["builtin", "torchvision", "factory"] = "builtin"
    arch: str = Field(description="builtin name, torchvision architecture, or module:function factory")
    checkpoint: Optional[str] = Field(None, min_length=1)
    num_classes: int = Field(10, ge=1)
    inputs: list[TensorSpec] = Field(min_length=1, description="the model's inputs, in the order forward() takes them")
    outputs: Optional[list[OutputSpec]] = Field(
        None, description="names (and optional shapes) of the flattened outputs; default: the model's dict keys, "
        "'logits' for a single tensor, output_0.. for a tuple")
    train: TrainConfig = TrainConfig()

    @model_validator(mode="before")
    @classmethod
    def _shorthands(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        if "input" in data:
            if "inputs" in data:
                raise ValueError("give either model.input (one input) or model.inputs (a list), not both")
            data["inputs"] = [data.pop("input")]
        if "output_names" in data:
            if "outputs" in data:
                raise ValueError("give either model.output_names or model.outputs, not both")
            names = data.pop("output_names")
            data["outputs"] = [{"name": n} for n in names] if isinstance(names, list) else names
        return data

    @model_validator(mode="after")
    def _checks(self) -> "ModelConfig":
        if self.source == "factory" and ":" not in self.arch:
            raise ValueError("model.arch must be 'module:function' when model.source is 'factory'")
        _unique([i.name for i in self.inputs], "model.inputs")
        if self.outputs is not None:
            if not self.outputs:
                raise ValueError("model.outputs is empty; name at least one output or leave it out")
            _unique([o.name for o in self.outputs], "model.outputs")
            clash = {i.name for i in self.inputs} & {o.name for o in self.outputs}
            if clash:
                raise ValueError(f"'{sorted(clash)[0]}' is both an input and an output name")
        return self

    @property
    def input(self) -> TensorSpec:
        """The only input of a one-input model (errors for several)."""
        if len(self.inputs) != 1:
            raise ConfigError(f"model '{self.name}' has {len(self.inputs)} inputs "
                              f"({', '.join(self.input_names)}); this step needs exactly one")
        return self.inputs[0]

    @property
    def input_names(self) -> list[str]:
        return [i.name for i in self.inputs]

    @property
    def output_names(self) -> Optional[list[str]]:
        return None if self.outputs is None else [o.name for o in self.outputs]


class PreprocessConfig(_Strict):
    resize: Optional[int] = Field(None, ge=1, description="shorter side, before the centre crop")
    center_crop: Optional[int] = Field(None, ge=1)
    scale: float = Field(1.0, gt=0, description="multiply raw pixel values by this first")
    mean: Optional[list[float]] = None
    std: Optional[list[float]] = None
    channel_order: Literal["rgb", "bgr"] = "rgb"
    layout: Literal["nchw", "nhwc"] = "nchw"
    dtype: Literal["float32", "float16"] = "float32"
    inputs: Optional[list[str]] = Field(
        None, description="the float inputs preprocessing applies to (default: every float input); integer inputs "
        "are never normalized")


class SplitConfig(_Strict):
    train: float = Field(0.6, ge=0, le=1)
    calibration: float = Field(0.2, ge=0, le=1)
    evaluation: float = Field(0.2, gt=0, le=1)

    @model_validator(mode="after")
    def _sum(self) -> "SplitConfig":
        total = self.train + self.calibration + self.evaluation
        if total > 1.0 + 1e-9:
            raise ValueError(f"split fractions add up to {total:g}; they must add up to at most 1")
        return self


class DataConfig(_Strict):
    source: Literal["digits", "npz", "npy", "image_folder", "factory"] = "digits"
    path: Optional[str] = Field(None, min_length=1,
                                description="file or folder for npz/npy/image_folder, module:function for factory")
    calibration_path: Optional[str] = Field(
        None, min_length=1, description="separate calibration data; then data.path is all evaluation data unless "
        "data.split says otherwise")
    labels_key: str = Field("y", min_length=1, description="the npz key (or factory dict key) holding the labels")
    seed: int = 0
    split: SplitConfig = SplitConfig()
    preprocess: PreprocessConfig = PreprocessConfig()
    max_samples: Optional[int] = Field(None, ge=1)
    pad_to: dict[str, int] = Field(
        default_factory=dict, description="dynamic axis name -> length every sample is padded (or cut) to; "
        "default: the longest sample")
    pad_value: dict[str, float] = Field(default_factory=dict, description="input name -> padding value (default 0)")
    stream: Union[bool, Literal["auto"]] = Field(
        "auto", description="image folders: keep a split as an index of its files, decoded batch by batch while the "
        "model runs (true), decode it into memory (false), or stream the splits larger than 512 MiB as float32 (auto)")

    @field_validator("pad_to")
    @classmethod
    def _positive(cls, v: dict[str, int]) -> dict[str, int]:
        for k, n in v.items():
            if n < 1:
                raise ValueError(f"pad_to.{k} must be >= 1, got {n}")
        return v

    @property
    def split_is_explicit(self) -> bool:
        return "split" in self.model_fields_set

    @model_validator(mode="after")
    def _stream_images_only(self) -> "DataConfig":
        if self.stream is True and self.source != "image_folder":
            raise ValueError(f"stream: true streams image folders only; data.source {self.source!r} is read into memory "
                             "(set stream: auto or false, or write the data as an image folder)")
        return self


class ExportConfig(_Strict):
    opset: int = Field(17, ge=11, le=21)
    dynamic_batch: bool = True


class OutputTolerance(_Strict):
    atol: Optional[float] = Field(None, ge=0)
    min_cosine: Optional[float] = Field(None, ge=-1, le=1)


class ValidateConfig(_Strict):
    num_samples: int = Field(256, ge=1)
    atol: float = Field(1e-4, ge=0, description="largest allowed max |onnxruntime - PyTorch| per output")
    min_cosine: float = Field(0.99999, ge=-1, le=1)
    batch_size: int = Field(64, ge=1)
    outputs: dict[str, OutputTolerance] = Field(default_factory=dict, description="per-output tolerances")


class CalibrationConfig(_Strict):
    method: Literal["entropy", "minmax", "percentile", "mse"] = Field(
        "entropy", description="entropy: TensorRT's EntropyCalibration2 (what its own calibrator's cache holds); "
        "mse: per tensor the candidate (entropy, percentiles, max|x|, a grid) whose quantization MSE is smallest")
    percentile: float = Field(99.99, gt=0, le=100)
    clip_aware: bool = Field(False, description="cap the range of a Clip/ReLU6 output (and of what passes it on "
                             "unchanged, e.g. a zero Pad) at the Clip's bound")
    bias_correction: bool = Field(False, description="subtract from each quantized Conv/Gemm/MatMul's bias in the "
                                  "Q/DQ ONNX the mean error its weight quantization causes on the calibration "
                                  "data (one more FP32 forward; measured: bench/results/ptq_methods_cpu.json). Off by "
                                  "default: implicit engines (FP32 ONNX + cache) cannot carry it; tune's candidates "
                                  "do, except on the implicit route")
    weight_rounding: Literal["nearest", "gptq"] = Field(
        "nearest", description="how the Q/DQ ONNX rounds weights to INT8 (same per-channel scales either way): "
        "nearest, what TensorRT does with float weights; gptq, each row rounded one weight at a time, the rest "
        "moved to undo the error on the calibration inputs (GPTQ; one more FP32 forward). The Q/DQ ONNX "
        "(explicit route) and tune's candidates carry it, implicit engines do not (measured: "
        "bench/results/ptq_methods_efficientnet_lite1_cpu.json)")
    smooth_quant: bool = Field(False, description="SmoothQuant: move the activation outliers of every MatMul/Gemm "
                               "input into its weight (a Mul by 1/s before it, the weight's rows times s), one "
                               "migration strength for the model chosen on the calibration data by the INT8 output "
                               "error on batches it was not calibrated on; the Q/DQ ONNX (explicit route) carries "
                               "it, implicit engines and tune's candidates do not (measured: "
                               "bench/results/ptq_methods_minilm_cpu.json)")
    num_samples: int = Field(512, ge=1)
    batch_size: int = Field(32, ge=1)
    num_bins: int = Field(2048, ge=128)
    seed: int = 0
    rules: Literal["tensorrt", "reference"] = Field(
        "tensorrt", description="tensorrt: what TensorRT 8.6's calibrator computes; reference: the public reference")
    exclude: list[str] = Field(default_factory=list, description="tensor-name globs left out of calibration "
                               "(kept in higher precision)")
    sentinel_abs: float = Field(1e30, gt=0, description="a tensor with |x| >= this (or ±Inf) carries sentinel "
                                "values (attention masks) and is left in higher precision")
    tensorrt_version: Optional[str] = Field(
        None, pattern=r"^\d+\.\d+(\.\d+)*$", description="the TensorRT the cache is written for "
        "(default: the installed one, else 8.6.0)")
    forward: Literal["auto", "onnxruntime", "tensorrt"] = Field(
        "auto", description="who runs the FP32 model whose activations are binned: onnxruntime on the CPU, or "
        "tensorrt (an FP32 engine with every calibrated tensor an output, on the GPU; needs TensorRT and a GPU). "
        "auto: onnxruntime")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="where the activations are binned (the same counts everywhere): auto bins where the "
        "forward leaves them (the CPU after onnxruntime, the GPU after tensorrt); cpu always on the CPU; cuda on a "
        "GPU (the tensorrt forward's kernels, else torch or CuPy), or a one-line error")


class ProfileConfig(_Strict):
    """Batch range of the optimization profile (dynamic batch axis): the one-profile shorthand."""

    min_batch: int = Field(1, ge=1)
    opt_batch: int = Field(32, ge=1)
    max_batch: int = Field(64, ge=1)

    @model_validator(mode="after")
    def _ordered(self) -> "ProfileConfig":
        if not self.min_batch <= self.opt_batch <= self.max_batch:
            raise ValueError(
                f"need min_batch <= opt_batch <= max_batch, got {self.min_batch} / {self.opt_batch} / {self.max_batch}"
            )
        return self


class ShapeRange(_Strict):
    min: list[int]
    opt: list[int]
    max: list[int]


# A profile maps a dynamic axis name to [min, opt, max], or an input name to full shapes.
ProfileSpec = dict[str, Union[list[int], ShapeRange]]


class FP16Config(_Strict):
    keep_fp32_ops: list[str] = Field(
        default_factory=lambda: ["Softmax", "LayerNormalization", "ReduceMean", "ReduceSum", "Pow", "Sqrt", "Erf"],
        description="op types kept in fp32 in fp16 variants (reductions that overflow in fp16)")
    keep_fp32_nodes: list[str] = Field(default_factory=list, description="node-name globs kept in fp32")
    range_check: bool = Field(True, description="keep in fp32 every node whose activations leave fp16's range on the "
                              "calibration samples (the max|x| the calibrate stage measured: maxima.json)")
    source: Literal["auto", "typed_onnx", "flag"] = Field(
        "auto", description="TensorRT fp16 from 'typed_onnx' (FP16 initializers and Casts, the kept nodes in FP32; "
        "built strongly typed on TensorRT >= 10, with the FP16 flag and FP32 pins on 8.6) or from the 'flag' "
        "(BuilderFlag.FP16 on the FP32 ONNX; TensorRT < 11); 'auto': typed_onnx where builds are strongly typed "
        "(>= 10), the flag on 8.6")


class BuildConfig(_Strict):
    backend: Literal["auto", "tensorrt", "onnxruntime"] = "auto"
    workspace_mb: int = Field(1024, ge=16)
    profile: ProfileConfig = ProfileConfig()
    profiles: Optional[list[ProfileSpec]] = Field(
        None, description="optimization profiles: [{batch: [1, 8, 32], seq: [16, 128, 256]}, ...] "
        "(axis -> [min, opt, max]) or {input: {min: [...], opt: [...], max: [...]}}")
    timing_cache: Optional[str] = Field("artifacts/timing.cache", min_length=1)
    int8_route: Literal["auto", "implicit", "explicit"] = Field(
        "auto", description="TensorRT INT8: 'implicit' (IInt8EntropyCalibrator2 or the calibrate stage's cache; "
        "TensorRT < 11), 'explicit' (the calibrate stage's Q/DQ ONNX), 'auto' (implicit where TensorRT has it, "
        "else explicit; build.json says which and why)")
    tf32: bool = Field(True, description="let FP32 layers use TF32 tensor cores (TensorRT's default; trtexec --noTF32)")
    int8_calibrator: Literal["entropy2", "minmax"] = "entropy2"
    int8_float_fallback: Literal["fp16", "fp32"] = Field(
        "fp16", description="precision of the layers an int8 engine cannot run in int8 (trtexec --int8 --fp16)")
    calibration_source: Literal["auto", "tensorrt", "cache"] = Field(
        "auto", description="implicit INT8: 'cache' reuses the calibrate stage's cache, 'tensorrt' runs TensorRT's "
        "calibrator, 'auto' takes the cache when it was written for this TensorRT")
    layer_precisions: dict[str, Literal["fp32", "fp16"]] = Field(
        default_factory=dict, description="layer-name glob -> precision pinned in the engine"
    )
    int8_from_tune: bool = Field(
        False, description="build@int8 applies `trtpipe tune`'s result (--tune-dir): its layer precisions on the "
        "implicit route, its Q/DQ ONNX on the explicit route and on onnxruntime")
    fp16: FP16Config = FP16Config()
    builder_optimization_level: Optional[int] = Field(
        None, ge=0, le=5, description="TensorRT's builder optimization level 0-5 (trtexec --builderOptimizationLevel); "
        "null: TensorRT's default (3)"
    )
    preview_features: dict[str, bool] = Field(
        default_factory=dict, description="TensorRT preview features turned on/off by name, e.g. "
        "{faster_dynamic_shapes_0805: false} (trtexec --preview=-fasterDynamicShapes0805)"
    )
    hardware_compatibility: Literal["none", "ampere_plus"] = Field(
        "none", description="TensorRT engines: 'none' runs on the building GPU's compute capability only; "
        "'ampere_plus' (TensorRT >= 8.6, trtexec --hardwareCompatibilityLevel=ampere+) on every GPU of compute "
        "capability 8.0 and later, with the same TensorRT"
    )

    @model_validator(mode="after")
    def _one_profile_form(self) -> "BuildConfig":
        if self.profiles is not None:
            if "profile" in self.model_fields_set:
                raise ValueError("give either build.profile (batch only) or build.profiles, not both")
            if not self.profiles:
                raise ValueError("build.profiles is empty; give at least one profile or leave it out")
        return self

    @property
    def profile_specs(self) -> list[dict[str, Any]]:
        """Every profile in the axis/input form (`build.profile` becomes one batch-axis profile)."""
        if self.profiles is not None:
            return [{k: (v.model_dump() if isinstance(v, ShapeRange) else list(v)) for k, v in p.items()}
                    for p in self.profiles]
        p = self.profile
        return [{BATCH_AXIS: [p.min_batch, p.opt_batch, p.max_batch]}]


class LatencyConfig(_Strict):
    warmup: int = Field(10, ge=0)
    iterations: int = Field(100, ge=1)
    batch_sizes: list[int] = [1, 32]

    @field_validator("batch_sizes")
    @classmethod
    def _positive(cls, v: list[int]) -> list[int]:
        if not v or any(b < 1 for b in v):
            raise ValueError("batch sizes must be positive integers")
        return v


_TOPK = re.compile(r"^top[1-9][0-9]*$")
_METRIC_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]*$")


class BuiltinMetric(_Strict):
    """A built-in top-k accuracy (percent) on one output: `{metric: top1, output: prob}`."""

    metric: str = Field(pattern=r"^top[1-9][0-9]*$")
    output: Optional[str] = Field(None, description="the output it reads (needed when the model has several)")
    name: Optional[str] = Field(None, pattern=r"^[A-Za-z_][A-Za-z0-9_.-]*$",
                                description="column name in the reports (default: top1, or top1_<output>)")


class MetricSpec(_Strict):
    """A user task metric: `module:function` called as fn(outputs, labels, **kwargs) -> {name: float}.

    `outputs` maps each output name to the variant's numpy outputs over the evaluation
    set; `labels` is the label array of eval.npz (None without labels). A function that
    declares a `reference` or `inputs` parameter also gets the PyTorch outputs (same
    form as `outputs`) or the evaluation inputs (a dict name -> array). `output` names
    the output the metric is about (recorded in the reports)."""

    function: str = Field(pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$", description="module:function")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="extra keyword arguments for the function")
    output: Optional[str] = None


AGREEMENT_HIGHER_BETTER = ("cosine", "cosine_min", "top1_agreement", "snr_db")
AGREEMENT_LOWER_BETTER = ("max_abs_diff", "mean_abs_diff", "rel_l2")
AGREEMENT_REFERENCES = ("fp32", "pytorch")


def split_agreement_key(key: str) -> tuple[Optional[str], str, Optional[str]]:
    """'pytorch_cosine@boxes' -> ('pytorch', 'cosine', 'boxes'); 'cosine' -> (None, 'cosine', None)."""
    base, _, output = key.partition("@")
    ref, _, stat = base.partition("_")
    if ref in AGREEMENT_REFERENCES and stat:
        return ref, stat, output or None
    return None, base, output or None


def _agreement_keys(keys: Any, allowed: tuple[str, ...], where: str) -> None:
    for k in keys:
        _, stat, _ = split_agreement_key(k)
        if stat not in allowed:
            raise ValueError(
                f"{where}: '{k}' is not one of {', '.join(allowed)} (optionally prefixed fp32_ or pytorch_, and "
                "suffixed @<output> for one output; without a prefix it is measured against fp32, without a suffix "
                "on every output)"
            )


class EvaluateConfig(_Strict):
    batch_size: int = Field(64, ge=1)
    latency: LatencyConfig = LatencyConfig()
    metrics: list[Union[BuiltinMetric, MetricSpec]] = Field(
        default_factory=lambda: ["top1", "top5"], validate_default=True,
        description="built-in topK (top1, {metric: top1, output: prob}) or 'module:function' "
        "(or {function, kwargs, output}) user metrics",
    )
    primary_metric: Optional[str] = Field(None, description="accuracy axis of tradeoff.png (default: the first metric)")
    agreement_floor: dict[str, float] = Field(
        default_factory=lambda: {"cosine": 0.95},
        description="least agreement with fp32 on every output ({cosine: 0.95}, cosine@boxes, ...); a variant "
        "below it is flagged in compare and fails the gate")

    @field_validator("metrics", mode="before")
    @classmethod
    def _forms(cls, v: Any) -> Any:
        if not isinstance(v, list):
            return v
        out = []
        for m in v:
            if isinstance(m, str):
                if _TOPK.match(m):
                    m = {"metric": m}
                elif ":" in m:
                    m = {"function": m}
                else:
                    raise ValueError(f"'{m}' is neither a built-in metric (top1, top5, topK) nor a 'module:function'")
            out.append(m)
        return out

    @field_validator("agreement_floor")
    @classmethod
    def _floor(cls, v: dict[str, float]) -> dict[str, float]:
        _agreement_keys(v, AGREEMENT_HIGHER_BETTER, "evaluate.agreement_floor")
        return v


class GateThresholds(_Strict):
    """Per precision. A drop is measured in the metric's own unit (top-k: percentage points)."""

    max_drop: dict[str, float] = Field(default_factory=dict, description="metric -> largest drop vs fp32 (points)")
    max_drop_vs_pytorch: dict[str, float] = Field(default_factory=dict, description="metric -> largest drop vs PyTorch")
    max_drop_vs_baseline: dict[str, float] = Field(
        default_factory=dict, description="metric -> largest drop vs the same variant in the --baseline report"
    )
    min_agreement: dict[str, float] = Field(default_factory=dict, description="agreement metric -> least value")
    max_divergence: dict[str, float] = Field(
        default_factory=dict, description="max_abs_diff / mean_abs_diff / rel_l2 (vs fp32, or pytorch_...) -> largest value"
    )
    max_latency_regression: Optional[float] = Field(None, ge=0, description="fraction vs baseline, e.g. 0.2")
    min_speedup: Optional[float] = Field(None, gt=0, description="least latency speedup vs fp32 (fp32 p / this p)")

    @field_validator("min_agreement")
    @classmethod
    def _higher(cls, v: dict[str, float]) -> dict[str, float]:
        _agreement_keys(v, AGREEMENT_HIGHER_BETTER, "min_agreement")
        return v

    @field_validator("max_divergence")
    @classmethod
    def _lower(cls, v: dict[str, float]) -> dict[str, float]:
        _agreement_keys(v, AGREEMENT_LOWER_BETTER, "max_divergence")
        return v


class GateLatency(_Strict):
    percentile: Literal["p50", "p90", "p99", "mean"] = "p50"
    batch_sizes: Optional[list[int]] = Field(None, description="batch sizes to check (default: every one in both reports)")
    slack_ms: float = Field(0.0, ge=0, description="ignore a regression smaller than this many ms (timer noise)")


class GateConfig(_Strict):
    thresholds: dict[Precision, GateThresholds] = Field(default_factory=dict)
    lower_is_better: list[str] = Field(default_factory=list, description="task metrics where smaller is better (a loss)")
    latency: GateLatency = GateLatency()


class PublishConfig(_Strict):
    registry: str = Field("artifacts/registry", min_length=1)
    precisions: list[Precision] = list(PRECISIONS)

    @field_validator("precisions")
    @classmethod
    def _some_and_once_each(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("is empty: publish would publish nothing; name the precisions to publish "
                             f"(e.g. [{', '.join(PRECISIONS)}]) or do not run the publish stage")
        twice = sorted({p for p in v if v.count(p) > 1})
        if twice:
            raise ValueError(f"names {', '.join(twice)} more than once; list each precision once")
        return v


class TuneBudget(_Strict):
    """The accuracy the tuned INT8 variant must keep, in the gate's terms: a task metric of
    evaluate.metrics (`min`, `max`, or `max_drop` against the FP32 model), or an agreement
    statistic against FP32 (`top1_agreement`, `cosine@boxes`, `snr_db`...; `min` for the
    higher-is-better ones, `max` for max_abs_diff / mean_abs_diff / rel_l2)."""

    metric: str = Field(min_length=1)
    min: Optional[float] = None
    max: Optional[float] = None
    max_drop: Optional[float] = Field(None, ge=0)

    @model_validator(mode="after")
    def _one_bound(self) -> "TuneBudget":
        given = [k for k in ("min", "max", "max_drop") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"tune.budget needs exactly one of min, max, max_drop for '{self.metric}', got "
                             f"{', '.join(given) or 'none'}")
        ref, stat, _ = split_agreement_key(self.metric)
        if ref == "pytorch":
            raise ValueError(f"tune.budget.metric '{self.metric}': tune measures agreement against the FP32 model; "
                             "drop the pytorch_ prefix")
        if stat in AGREEMENT_HIGHER_BETTER + AGREEMENT_LOWER_BETTER:
            want = "min" if stat in AGREEMENT_HIGHER_BETTER else "max"
            if given[0] != want:
                raise ValueError(f"tune.budget: '{self.metric}' is an agreement statistic "
                                 f"({'higher' if want == 'min' else 'lower'} is better); bound it with {want}")
        return self


class TuneConfig(_Strict):
    """`trtpipe tune`: the fewest layers kept out of INT8 so that `budget` holds."""

    budget: TuneBudget
    keep_precision: Literal["fp16", "fp32"] = Field("fp16", description="precision of the kept layers in TensorRT")
    strategy: Literal["sensitivity", "bisect", "first_last"] = Field(
        "sensitivity", description="sensitivity: by per-layer sensitivity, fewest kept (default); bisect: "
        "Polygraphy-style contiguous bisection; first_last: the first and last layer kept")
    search_samples: int = Field(128, ge=1, description="evaluation samples the search runs on (a seeded subset); "
                                "the final check runs on all of them")
    sensitivity_samples: Optional[int] = Field(None, ge=1, description="samples of the per-layer sensitivity passes "
                                               "(default: search_samples)")
    seed: int = 0
    max_candidates: int = Field(300, ge=1, description="search budget: candidates evaluated, sensitivity included")
    max_seconds: float = Field(3600.0, gt=0, description="search budget: wall seconds")
    backend: Literal["auto", "onnxruntime", "tensorrt"] = Field(
        "auto", description="what measures a candidate: onnxruntime (Q/DQ simulation, estimated latency) or "
        "tensorrt (an engine per candidate, measured latency); auto: tensorrt on a GPU")
    op_types: list[str] = Field(default_factory=lambda: ["Conv", "ConvTranspose", "Gemm", "MatMul"],
                                description="op types of the layers the search may keep out of INT8")
    objective: Literal["layers", "cost"] = Field(
        "layers", description="layers: the fewest layers kept; cost: the cheapest candidate (estimated on a CPU, "
        "measured on a GPU) that meets the budget")
    calibration_methods: list[Literal["minmax"]] = Field(
        default_factory=lambda: ["minmax"], description="other ranges a layer's inputs may take instead of being kept "
        "out of INT8 (minmax: max|x|, recorded by calibrate; [] to search precisions alone)")


class Config(_Strict):
    model: ModelConfig
    data: DataConfig = DataConfig()
    export: ExportConfig = ExportConfig()
    validate_: ValidateConfig = Field(ValidateConfig(), alias="validate")
    calibration: CalibrationConfig = CalibrationConfig()
    build: BuildConfig = BuildConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    gate: GateConfig = GateConfig()
    publish: PublishConfig = PublishConfig()
    tune: Optional[TuneConfig] = None

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True, allow_inf_nan=False)

    @model_validator(mode="after")
    def _cross(self) -> "Config":
        names = set(self.model.input_names)
        if self.data.labels_key in names:
            raise ValueError(f"data.labels_key '{self.data.labels_key}' is also an input name; set data.labels_key to "
                             "another key")
        for what, keys in (("data.pad_value", self.data.pad_value), ("data.preprocess.inputs",
                                                                     self.data.preprocess.inputs or [])):
            unknown = [k for k in keys if k not in names]
            if unknown:
                raise ValueError(f"{what} names '{unknown[0]}', which is not a model input "
                                 f"({', '.join(self.model.input_names)})")
        pre = self.data.preprocess
        if "dtype" in pre.model_fields_set:
            for spec in self.model.inputs:
                if spec.is_float and (pre.inputs is None or spec.name in pre.inputs) and spec.dtype != pre.dtype:
                    raise ValueError(f"data.preprocess.dtype is {pre.dtype} but input '{spec.name}' is {spec.dtype}; "
                                     "samples take the input's dtype: drop data.preprocess.dtype")
        axes = {d for i in self.model.inputs for d in i.shape if isinstance(d, str)}
        unknown = [k for k in self.data.pad_to if k not in axes]
        if unknown:
            raise ValueError(f"data.pad_to names axis '{unknown[0]}', which no model input has "
                             f"(dynamic axes: {', '.join(sorted(axes)) or 'none'})")
        return self

    def raw(self) -> dict[str, Any]:
        """The resolved config as plain data (for manifests and hashes)."""
        return self.model_dump(mode="json", by_alias=True)


def _format_errors(source: str, exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join("validate" if p == "validate_" else str(p) for p in err["loc"]) or "(top level)"
        if err["type"] == "extra_forbidden":
            parts.append(f"unknown key '{loc}' (check its spelling)")
        elif err["type"] == "missing":
            parts.append(f"missing key '{loc}'")
        elif err["type"] == "finite_number":
            parts.append(f"'{loc}': {err.get('input')!r} is not a finite number; give a finite value")
        else:
            got = err.get("input")
            got_s = "" if isinstance(got, (dict, list)) else f", got {got!r}"
            msg = err["msg"].removeprefix("Value error, ")
            parts.append(f"'{loc}': {msg}{got_s}")
    # Union types report one error per member: keep the messages distinct.
    return f"{source}: " + "; ".join(dict.fromkeys(parts))


def _read_yaml(path: Path) -> dict[str, Any]:
    from .yamlio import load_yaml

    if not path.exists():
        raise ConfigError(f"{path}: config file not found; create it or point params.yaml 'config:' at an existing one")
    data = load_yaml(path, "config file") or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level, got {type(data).__name__}")
    return data


def _merge(base: dict[str, Any], over: dict[str, Any], path: str = "", changed: Optional[list[str]] = None) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        key = f"{path}{k}"
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v, key + ".", changed)
        else:
            if changed is not None and k in out and out[k] != v:
                changed.append(f"{key} {out[k]!r} -> {v!r}")
            out[k] = v
    return out


PARAMS_META_KEYS = {"config", "precisions", "override"}


def _conflicts(base: dict[str, Any], over: dict[str, Any], path: str = "") -> list[tuple[str, Any, Any]]:
    """(key, config value, params value) for each key both files set, to different values."""
    out: list[tuple[str, Any, Any]] = []
    for k, v in over.items():
        if k not in base:
            continue
        if isinstance(v, dict) and isinstance(base[k], dict):
            out += _conflicts(base[k], v, f"{path}{k}.")
        elif base[k] != v:
            out.append((f"{path}{k}", base[k], v))
    return out


def load_config(config_path: str | Path | None = None, params_path: str | Path = "params.yaml",
                quiet: bool = False) -> Config:
    """Load the config named by params.yaml (or `config_path`), with params.yaml's sections
    merged over it. Every config value params.yaml changes is noted on stderr."""
    params: dict[str, Any] = {}
    params_path = Path(params_path)
    if params_path.exists():  # a folder of that name is an error, not "no params file"
        params = _read_yaml(params_path)
    if config_path is None:
        config_path = params.get("config")
        if not config_path:
            raise ConfigError(f"{params_path}: no 'config:' key naming a configs/<model>.yaml (or pass --config)")
        if not isinstance(config_path, str):
            raise ConfigError(f"{params_path}: 'config' must be a path string, got {config_path!r}")
    config_path = Path(config_path)
    data = _read_yaml(config_path)
    overrides = {k: v for k, v in params.items() if k not in PARAMS_META_KEYS}
    # One source of settings: a key params.yaml and the config both set, to different values, is
    # an error unless params.yaml says `override: true` (its values win, each change noted).
    if not isinstance(params.get("override", False), bool):
        raise ConfigError(f"{params_path}: 'override' must be true or false, got {params.get('override')!r}")
    conflicts = [] if params.get("override") else _conflicts(data, overrides)
    if conflicts:
        key, mine, theirs = conflicts[0]
        more = f" ({len(conflicts) - 1} more key(s) differ)" if len(conflicts) > 1 else ""
        raise ConfigError(
            f"{params_path} sets {key} to {theirs!r} but {config_path} sets it to {mine!r}{more}: a setting lives in "
            f"one file; remove it from one of them (sweep a config key with `dvc exp run -S {config_path}:{key}=...`), "
            f"or add `override: true` to {params_path} to let its values win on purpose")
    source = f"{config_path}" + (f" (+ overrides from {params_path})" if overrides else "")
    changed: list[str] = []
    try:
        cfg = Config.model_validate(_merge(data, overrides, changed=changed))
    except ValidationError as e:
        raise ConfigError(_format_errors(source, e)) from None
    from .log import get_logger

    if changed and not quiet:
        get_logger(__name__).info(f"{params_path} overrides {config_path}: " + "; ".join(changed))
    get_logger(__name__).debug(f"config: {source}; model {cfg.model.name}, backend {cfg.build.backend}")
    return cfg
