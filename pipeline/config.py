"""Typed configuration: `configs/<model>.yaml`, chosen and overridden by `params.yaml`.

params.yaml names the config file (`config:`) and may override any section with the
knobs an engineer sweeps through `dvc exp run -S calibration.method=minmax`: a section
given in params.yaml is merged key by key over the same section of the config file.
A misspelt key or a wrong type is rejected with its dotted path and what was expected.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import ConfigError

PRECISIONS = ("fp32", "fp16", "int8")
Precision = Literal["fp32", "fp16", "int8"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class InputSpec(_Strict):
    name: str = "input"
    shape: list[int] = Field(description="one sample's shape, without the batch axis (e.g. [3, 224, 224])")
    dtype: Literal["float32", "float16"] = "float32"

    @field_validator("shape")
    @classmethod
    def _positive(cls, v: list[int]) -> list[int]:
        if not v or any(d <= 0 for d in v):
            raise ValueError("every dimension must be a positive integer")
        return v


class TrainConfig(_Strict):
    """Only for the built-in `digits_cnn`: trained deterministically in `prepare`."""

    epochs: int = Field(20, ge=1)
    batch_size: int = Field(64, ge=1)
    lr: float = Field(0.003, gt=0)
    seed: int = 0


class ModelConfig(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    source: Literal["builtin", "torchvision", "factory"] = "builtin"
    arch: str = Field(description="builtin name, torchvision architecture, or module:function factory")
    checkpoint: Optional[str] = None
    num_classes: int = Field(10, ge=1)
    input: InputSpec
    output_names: list[str] = ["logits"]
    train: TrainConfig = TrainConfig()

    @model_validator(mode="after")
    def _factory_form(self) -> "ModelConfig":
        if self.source == "factory" and ":" not in self.arch:
            raise ValueError("model.arch must be 'module:function' when model.source is 'factory'")
        return self


class PreprocessConfig(_Strict):
    resize: Optional[int] = Field(None, ge=1, description="shorter side, before the centre crop")
    center_crop: Optional[int] = Field(None, ge=1)
    scale: float = Field(1.0, gt=0, description="multiply raw pixel values by this first")
    mean: Optional[list[float]] = None
    std: Optional[list[float]] = None
    channel_order: Literal["rgb", "bgr"] = "rgb"
    layout: Literal["nchw", "nhwc"] = "nchw"
    dtype: Literal["float32", "float16"] = "float32"


class SplitConfig(_Strict):
    train: float = Field(0.6, ge=0, le=1)
    calibration: float = Field(0.2, gt=0, le=1)
    evaluation: float = Field(0.2, gt=0, le=1)

    @model_validator(mode="after")
    def _sum(self) -> "SplitConfig":
        total = self.train + self.calibration + self.evaluation
        if total > 1.0 + 1e-9:
            raise ValueError(f"split fractions add up to {total:g}; they must add up to at most 1")
        return self


class DataConfig(_Strict):
    source: Literal["digits", "npz", "npy", "image_folder", "factory"] = "digits"
    path: Optional[str] = Field(None, description="file or folder for npz/npy/image_folder, module:function for factory")
    calibration_path: Optional[str] = Field(None, description="separate calibration data; else split from `path`")
    seed: int = 0
    split: SplitConfig = SplitConfig()
    preprocess: PreprocessConfig = PreprocessConfig()
    max_samples: Optional[int] = Field(None, ge=1)


class ExportConfig(_Strict):
    opset: int = Field(17, ge=11, le=21)
    dynamic_batch: bool = True


class ValidateConfig(_Strict):
    num_samples: int = Field(256, ge=1)
    atol: float = Field(1e-4, ge=0, description="largest allowed max |onnxruntime - PyTorch| per output")
    min_cosine: float = Field(0.99999, ge=-1, le=1)
    batch_size: int = Field(64, ge=1)


class CalibrationConfig(_Strict):
    method: Literal["entropy", "minmax", "percentile"] = "entropy"
    percentile: float = Field(99.99, gt=0, le=100)
    num_samples: int = Field(512, ge=1)
    batch_size: int = Field(32, ge=1)
    num_bins: int = Field(2048, ge=128)
    seed: int = 0
    rules: Literal["tensorrt", "reference"] = Field(
        "tensorrt", description="tensorrt: what TensorRT 8.6's calibrator computes; reference: DESIGN.md section 4"
    )


class ProfileConfig(_Strict):
    """Batch range of the optimization profile (dynamic batch axis)."""

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


class BuildConfig(_Strict):
    backend: Literal["auto", "tensorrt", "onnxruntime"] = "auto"
    workspace_mb: int = Field(1024, ge=16)
    profile: ProfileConfig = ProfileConfig()
    timing_cache: Optional[str] = "artifacts/timing.cache"
    int8_route: Literal["implicit", "explicit"] = "implicit"
    tf32: bool = Field(True, description="let FP32 layers use TF32 tensor cores (TensorRT's default; trtexec --noTF32)")
    int8_calibrator: Literal["entropy2", "minmax"] = "entropy2"
    calibration_source: Literal["tensorrt", "cache"] = Field(
        "tensorrt", description="implicit INT8: calibrate with TensorRT, or reuse the calibrate stage's cache"
    )
    layer_precisions: dict[str, Literal["fp32", "fp16"]] = Field(
        default_factory=dict, description="layer-name glob -> precision pinned in the engine"
    )
    builder_optimization_level: Optional[int] = Field(
        None, ge=0, le=5, description="TensorRT's builder optimization level 0-5 (trtexec --builderOptimizationLevel); "
        "null: TensorRT's default (3)"
    )
    preview_features: dict[str, bool] = Field(
        default_factory=dict, description="TensorRT preview features turned on/off by name, e.g. "
        "{faster_dynamic_shapes_0805: false} (trtexec --preview=-fasterDynamicShapes0805)"
    )


class LatencyConfig(_Strict):
    warmup: int = Field(10, ge=0)
    iterations: int = Field(100, ge=1)
    batch_sizes: list[int] = [1, 32]


_TOPK = re.compile(r"^top[1-9][0-9]*$")


class MetricSpec(_Strict):
    """A user task metric: `module:function` called as fn(outputs, labels, **kwargs) -> {name: float}.

    `outputs` maps each output name to the variant's numpy outputs over the evaluation
    set; `labels` is the `y` array of eval.npz (None without labels). A function that
    declares a `reference` or `inputs` parameter also gets the PyTorch outputs (same
    form as `outputs`) or the evaluation inputs."""

    function: str = Field(pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$", description="module:function")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="extra keyword arguments for the function")


class EvaluateConfig(_Strict):
    batch_size: int = Field(64, ge=1)
    latency: LatencyConfig = LatencyConfig()
    metrics: list[str | MetricSpec] = Field(
        default_factory=lambda: ["top1", "top5"],
        description="built-in topK (top1, top5, ...) or 'module:function' (or {function, kwargs}) user metrics",
    )
    primary_metric: Optional[str] = Field(None, description="accuracy axis of tradeoff.png (default: the first metric)")

    @field_validator("metrics")
    @classmethod
    def _known(cls, v: list[Any]) -> list[Any]:
        out = []
        for m in v:
            if isinstance(m, str) and not _TOPK.match(m):
                if ":" not in m:
                    raise ValueError(f"'{m}' is neither a built-in metric (top1, top5, topK) nor a 'module:function'")
                m = MetricSpec(function=m)
            out.append(m)
        return out


# Agreement statistics (pipeline.metrics.agreement) by direction; the gate checks the first
# group with `min_agreement` and the second with `max_divergence`.
AGREEMENT_HIGHER_BETTER = ("cosine", "cosine_min", "top1_agreement", "snr_db")
AGREEMENT_LOWER_BETTER = ("max_abs_diff", "mean_abs_diff", "rel_l2")
AGREEMENT_REFERENCES = ("fp32", "pytorch")


def _agreement_keys(keys: Any, allowed: tuple[str, ...], where: str) -> None:
    for k in keys:
        base = k.split("_", 1)[1] if k.split("_", 1)[0] in AGREEMENT_REFERENCES else k
        if base not in allowed:
            raise ValueError(
                f"{where}: '{k}' is not one of {', '.join(allowed)} "
                "(optionally prefixed fp32_ or pytorch_; without a prefix it is measured against fp32)"
            )


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
    registry: str = "artifacts/registry"
    precisions: list[Precision] = list(PRECISIONS)


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

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

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
        else:
            got = err.get("input")
            got_s = "" if isinstance(got, (dict, list)) else f", got {got!r}"
            parts.append(f"'{loc}': {err['msg']}{got_s}")
    return f"{source}: " + "; ".join(parts)


def _read_yaml(path: Path) -> dict[str, Any]:
    import yaml

    if not path.is_file():
        raise ConfigError(f"{path}: config file not found; create it or point params.yaml 'config:' at an existing one")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level, got {type(data).__name__}")
    return data


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


PARAMS_META_KEYS = {"config", "precisions"}


def load_config(config_path: str | Path | None = None, params_path: str | Path = "params.yaml") -> Config:
    """Load the config named by params.yaml (or `config_path`), with params.yaml's sections merged over it."""
    params: dict[str, Any] = {}
    params_path = Path(params_path)
    if params_path.is_file():
        params = _read_yaml(params_path)
    if config_path is None:
        config_path = params.get("config")
        if not config_path:
            raise ConfigError(f"{params_path}: no 'config:' key naming a configs/<model>.yaml (or pass --config)")
    config_path = Path(config_path)
    data = _read_yaml(config_path)
    overrides = {k: v for k, v in params.items() if k not in PARAMS_META_KEYS}
    source = f"{config_path}" + (f" (+ overrides from {params_path})" if overrides else "")
    try:
        return Config.model_validate(_merge(data, overrides))
    except ValidationError as e:
        raise ConfigError(_format_errors(source, e)) from None
