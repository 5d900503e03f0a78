"""Agreement and task metrics, numpy only (runs on the GPU side without torch).

Task metrics are pluggable: see `resolve_metrics` below."""

from __future__ import annotations

import inspect
import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional

import numpy as np

from .errors import ConfigError, DataError, PipelineError
from .plugins import load_callable


AGREEMENT_ROWS = 2048  # samples per chunk: the float64 temporaries stay a few MB whatever the number of samples
CHUNK_ELEMENTS = 1 << 23  # and values per chunk: a wide output (a per-pixel head) takes fewer rows at a time


def chunk_rows(x: Any) -> int:
    """Rows of `x` per chunk: AGREEMENT_ROWS, fewer when a row is wide (float64 temporaries <= 64 MB)."""
    return max(1, min(AGREEMENT_ROWS, CHUNK_ELEMENTS // max(_row_size(x), 1)))


def agreement(candidate: np.ndarray, reference: np.ndarray, name: str = "output") -> dict[str, Any]:
    """How closely `candidate` follows `reference` (same shape; row = sample). A NaN or Inf
    in the candidate is counted (`nonfinite`) and makes the statistics NaN, so it can
    never pass a threshold. Accumulated over chunks of AGREEMENT_ROWS samples (per-sample
    cosines kept, energies and absolute differences summed), so memory does not grow with
    the evaluation set beyond one float per sample."""
    if np.shape(candidate) != np.shape(reference):
        raise DataError(f"output '{name}' has shape {list(np.shape(candidate))}, the reference has "
                        f"{list(np.shape(reference))}; they must match to be compared")
    acc = AgreementSum(name)
    acc.add(candidate, reference)
    return acc.result()


class AgreementSum:
    """`agreement` accumulated chunk by chunk (rows = samples, in order): what evaluate uses
    when the outputs of the evaluation set are never held whole."""

    def __init__(self, name: str = "output") -> None:
        self.name = name
        self.cos: list[np.ndarray] = []
        self.row_shape: Optional[tuple[int, ...]] = None
        self.nonfinite = self.same_top1 = self.size = self.width = self.n = 0
        self.ref_energy = self.err_energy = self.abs_sum = self.abs_max = 0.0

    def add(self, candidate: Any, reference: Any) -> None:
        shape_a, shape_b = tuple(np.shape(candidate)), tuple(np.shape(reference))
        if shape_a[:1] != shape_b[:1]:
            raise DataError(f"output '{self.name}': {shape_a[0] if shape_a else 0} samples against "
                            f"{shape_b[0] if shape_b else 0} of the reference; they must match to be compared")
        if shape_a[1:] != shape_b[1:] or (self.row_shape is not None and shape_a[1:] != self.row_shape):
            raise DataError(f"output '{self.name}' has samples of shape {list(shape_a[1:])}, the reference "
                            f"{list(shape_b[1:])}; they must match to be compared")
        self.row_shape = shape_a[1:]
        step = chunk_rows(candidate)
        with np.errstate(all="ignore"):
            for lo in range(0, len(candidate), step):
                self._add(np.asarray(candidate[lo:lo + step]), np.asarray(reference[lo:lo + step]))

    def _add(self, candidate: np.ndarray, reference: np.ndarray) -> None:
        a = candidate.astype(np.float64).reshape(len(candidate), -1) if len(candidate) else np.zeros((0, 1))
        b = reference.astype(np.float64).reshape(len(reference), -1) if len(reference) else np.zeros((0, 1))
        self.n += len(a)
        self.width = a.shape[1]
        self.nonfinite += int(a.size - np.count_nonzero(np.isfinite(a)))
        diff = a - b
        na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
        denom = np.maximum(na * nb, np.finfo(np.float64).tiny)
        both_zero = (na == 0) & (nb == 0)
        self.cos.append(np.where(both_zero, 1.0, (a * b).sum(axis=1) / denom))
        self.ref_energy += float((b**2).sum())
        self.err_energy += float((diff**2).sum())
        if diff.size:
            ad = np.abs(diff)
            self.abs_sum += float(ad.sum())
            self.abs_max = max(self.abs_max, float(ad.max()))
            self.size += diff.size
        if self.width > 1:
            self.same_top1 += int((a.argmax(1) == b.argmax(1)).sum())

    def result(self) -> dict[str, Any]:
        cos = np.concatenate(self.cos) if self.cos else np.zeros(0)
        size, ref_energy, err_energy = self.size, self.ref_energy, self.err_energy
        with np.errstate(all="ignore"):
            out: dict[str, Any] = {
                "cosine": float(cos.mean()) if cos.size else float("nan"),
                "cosine_min": float(cos.min()) if cos.size else float("nan"),
                "max_abs_diff": self.abs_max if size else 0.0,
                "mean_abs_diff": self.abs_sum / size if size else 0.0,
                "rel_l2": float(np.sqrt(err_energy / ref_energy)) if ref_energy > 0 else (0.0 if err_energy == 0 else float("inf")),
                "snr_db": float(10 * np.log10(ref_energy / err_energy)) if err_energy > 0 else float("inf"),
            }
        if self.nonfinite:
            out.update({k: float("nan") for k in ("cosine", "cosine_min", "max_abs_diff", "mean_abs_diff", "rel_l2",
                                                   "snr_db")})
        if self.width > 1:
            out["top1_agreement"] = self.same_top1 / self.n if not self.nonfinite and self.n else float("nan")
        out["nonfinite"] = self.nonfinite
        return out


def _row_size(x: Any) -> int:
    shape = np.shape(x)
    return int(np.prod(shape[1:])) if len(shape) > 1 else 1


def topk(logits: np.ndarray, labels: Optional[np.ndarray], ks: tuple[int, ...] = (1, 5),
         output: str = "output") -> dict[str, Any]:
    """Top-k accuracy in percent (empty without labels). Labels must be one class index per
    sample inside the output's width; a NaN in the logits makes the metric NaN."""
    acc = TopKSum(ks, output)
    acc.add(logits, labels)
    return acc.result()


class TopKSum:
    """Top-k hits counted chunk by chunk; `result` is `topk`'s dict."""

    def __init__(self, ks: tuple[int, ...], output: str = "output") -> None:
        self.ks, self.output = ks, output
        self.hits: Optional[dict[int, int]] = None
        self.n, self.nonfinite = 0, False

    def add(self, logits: Any, labels: Optional[np.ndarray]) -> None:
        if labels is None:
            return
        scores = np.asarray(logits).reshape(len(logits), -1)
        labels = np.asarray(labels)
        if labels.ndim != 1 or labels.dtype.kind not in "iu" or len(labels) != len(scores):
            raise DataError(f"top-k on output '{self.output}' needs one integer class index per sample; the labels have "
                            f"shape {list(labels.shape)} and dtype {labels.dtype} for {len(scores)} samples")
        if labels.size and (labels.min() < 0 or labels.max() >= scores.shape[1]):
            bad = int(labels.min()) if labels.min() < 0 else int(labels.max())
            raise DataError(f"top-k on output '{self.output}': label {bad} is outside 0..{scores.shape[1] - 1} (the output "
                            f"has {scores.shape[1]} classes); fix the labels or name the right output")
        if self.hits is None:
            self.hits = {k: 0 for k in self.ks if k <= scores.shape[1]}
        self.nonfinite = self.nonfinite or not np.isfinite(scores).all()
        step = chunk_rows(scores)  # chunks: the sort's temporaries stay small
        for lo in range(0, len(scores), step):
            order = np.argsort(-scores[lo:lo + step], axis=1)
            for k in self.hits:
                self.hits[k] += int((order[:, :k] == labels[lo:lo + step, None]).any(axis=1).sum())
        self.n += len(scores)

    def result(self) -> dict[str, Any]:
        if self.hits is None:  # no labels given: nothing to count
            return {}
        n = self.n
        return {f"top{k}": float("nan") if self.nonfinite else float(100.0 * (h / n if n else float("nan")))
                for k, h in self.hits.items()}


# --- pluggable task metrics -------------------------------------------------------------
#
# `evaluate.metrics` lists built-ins (`top1`, `{metric: top5, output: prob}`: a top-k on one
# named output, required when the model has several) and user metrics given as
# 'module:function' (or {function, kwargs, output}). A user metric is called
#     fn(outputs: dict[str, np.ndarray], labels: np.ndarray | None, **kwargs) -> dict[str, float]
# over the whole evaluation set; a function that declares `reference` or `inputs` also gets
# the PyTorch outputs (same form as `outputs`) or the evaluation inputs (a dict by input
# name). Examples, detection mAP and embedding retrieval among them:
# pipeline/examples/task_metrics.py.

_TOPK = re.compile(r"^top([1-9][0-9]*)$")


@dataclass(frozen=True)
class TaskMetric:
    name: str  # 'top1' or 'module:function'
    fn: Callable[..., Mapping[str, Any]]
    kwargs: dict[str, Any] = field(default_factory=dict)
    wants: frozenset[str] = frozenset()  # optional arguments the function declares
    output: Optional[str] = None  # the output it reads (None: all of them)
    # built-ins: a fresh accumulator (.add(outputs chunk, labels chunk, reference chunk), .result()) so evaluate
    # need not hold the outputs of the whole evaluation set; None: a user function, called once on the whole
    # arrays (`accumulate` then collects the chunks for it)
    accumulator: Optional[Callable[[], Any]] = None

    def accumulate(self, inputs: Any = None) -> Any:
        """A fresh accumulator of this metric over chunks of samples: the built-in's own, or for a user
        function one that collects the chunks and calls it once on the whole arrays (`inputs`: the
        evaluation inputs, given as they are to a function that declares `inputs`)."""
        return self.accumulator() if self.accumulator is not None else _WholeArrays(self, inputs)

    def __call__(
        self,
        outputs: dict[str, np.ndarray],
        labels: Optional[np.ndarray],
        reference: Optional[dict[str, np.ndarray]] = None,
        inputs: Optional[dict[str, np.ndarray]] = None,
    ) -> dict[str, float]:
        extra = dict(self.kwargs)
        if "reference" in self.wants:
            extra["reference"] = reference
        if "inputs" in self.wants:
            extra["inputs"] = inputs
        try:
            res = self.fn(outputs, labels, **extra)
        except PipelineError:
            raise
        except Exception as e:  # the user's metric raised
            raise ConfigError(f"evaluate.metrics '{self.name}' raised {type(e).__name__}: "
                              f"{str(e).splitlines()[0][:200] if str(e) else ''}") from None
        if res is None:
            return {}
        if not isinstance(res, Mapping):
            raise ConfigError(
                f"evaluate.metrics '{self.name}' returned {type(res).__name__}; a metric must return a dict of name -> number"
            )
        out = {}
        for k, v in res.items():
            try:
                out[str(k)] = float(v)
            except (TypeError, ValueError):
                raise ConfigError(f"evaluate.metrics '{self.name}' returned {k}={v!r}, not a number") from None
        return out


def _import_function(spec: str) -> Callable[..., Any]:
    return load_callable(spec, "evaluate.metrics", ConfigError)


def _topk_metric(k: int, output: str, name: str) -> Callable[..., dict[str, float]]:
    def fn(outputs: dict[str, np.ndarray], labels: Optional[np.ndarray]) -> dict[str, float]:
        return {name: v for v in topk(outputs[output], labels, (k,), output).values()}

    return fn


class _WholeArrays:
    """A user metric over chunks: the outputs (and PyTorch's, for a function that reads `reference`)
    collected, the function called once on the whole arrays by result()."""

    def __init__(self, metric: TaskMetric, inputs: Any) -> None:
        self.metric, self.inputs = metric, inputs
        self.outputs: dict[str, list[np.ndarray]] = {}
        self.reference: dict[str, list[np.ndarray]] = {}
        self.labels: list[np.ndarray] = []

    def add(self, outputs: Mapping[str, np.ndarray], labels: Optional[np.ndarray],
            reference: Optional[Mapping[str, np.ndarray]] = None) -> None:
        for k, v in outputs.items():
            self.outputs.setdefault(k, []).append(np.asarray(v))
        if reference is not None and "reference" in self.metric.wants:
            for k, v in reference.items():
                self.reference.setdefault(k, []).append(np.asarray(v))
        if labels is not None:
            self.labels.append(np.asarray(labels))

    def result(self) -> dict[str, float]:
        whole = {k: np.concatenate(v) for k, v in self.outputs.items()}
        ref = {k: np.concatenate(v) for k, v in self.reference.items()} or None
        labels = np.concatenate(self.labels) if self.labels else None
        return self.metric(whole, labels, reference=ref, inputs=self.inputs)


class _TopKMetricSum:
    """A built-in top-k metric accumulated chunk by chunk (TaskMetric.accumulator)."""

    def __init__(self, k: int, output: str, name: str) -> None:
        self.acc, self.output, self.name = TopKSum((k,), output), output, name

    def add(self, outputs: Mapping[str, np.ndarray], labels: Optional[np.ndarray],
            reference: Optional[Mapping[str, np.ndarray]] = None) -> None:
        self.acc.add(outputs[self.output], labels)

    def result(self) -> dict[str, float]:
        return {self.name: v for v in self.acc.result().values()}


def _spec_output(spec: Any, output_names: list[str]) -> Optional[str]:
    """The output a metric reads (None: all of them), after checking it against the model's."""
    output = getattr(spec, "output", None)
    if output is not None and output not in output_names:
        what = getattr(spec, "metric", None) or getattr(spec, "function", "")
        raise ConfigError(f"evaluate.metrics '{what}' reads output '{output}', which the model does not have "
                          f"({', '.join(output_names)})")
    builtin = getattr(spec, "metric", None)
    if builtin is not None and output is None:
        if len(output_names) != 1:
            raise ConfigError(f"evaluate.metrics '{builtin}': the model has {len(output_names)} outputs "
                              f"({', '.join(output_names)}); say which one it reads: "
                              f"{{metric: {builtin}, output: <name>}}")
        output = output_names[0]
    return output


def _validated(specs: list[Any]) -> list[Any]:
    if any(isinstance(s, (str, dict)) for s in specs):
        from pydantic import ValidationError

        from .config import EvaluateConfig

        try:
            specs = EvaluateConfig(metrics=list(specs)).metrics
        except ValidationError as e:
            raise ConfigError(f"evaluate.metrics: {e.errors()[0]['msg'].removeprefix('Value error, ')}") from None
    return list(specs)


def resolve_metrics(specs: list[Any], output_names: list[str]) -> list[TaskMetric]:
    """Config entries (BuiltinMetric / MetricSpec, or their config forms: 'top1',
    'module:function', dicts) -> callables, checked against the model's outputs."""
    specs = _validated(specs)
    out = []
    for spec in specs:
        output = _spec_output(spec, output_names)
        builtin = getattr(spec, "metric", None)
        if builtin is not None:
            k = int(_TOPK.match(builtin).group(1))  # type: ignore[union-attr]
            name = spec.name or (builtin if len(output_names) == 1 else f"{builtin}_{output}")
            out.append(TaskMetric(name, _topk_metric(k, output, name), output=output,
                                  accumulator=lambda k=k, output=output, name=name: _TopKMetricSum(k, output, name)))
            continue
        fn = _import_function(spec.function)
        try:
            params = inspect.signature(fn).parameters
        except (TypeError, ValueError):
            params = {}
        var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        wants = frozenset(a for a in ("reference", "inputs") if a in params or var_kw)
        out.append(TaskMetric(spec.function, fn, dict(spec.kwargs), wants, output))
    return out


def metric_specs(evaluate: Any, output_names: list[str], labelled: bool) -> tuple[list[Any], Optional[str]]:
    """The task metrics evaluate computes, and a note when the config left them out and the
    default had to fit the model: `evaluate.metrics` as written, else top1 and top5 for a
    model of one output with labelled data, else none (agreement with fp32 only: without
    labels a top-k measures nothing, and with several outputs it cannot guess which one)."""
    if "metrics" in evaluate.model_fields_set:
        return list(evaluate.metrics), None
    if labelled and len(output_names) == 1:
        return list(evaluate.metrics), None
    why = "the evaluation data has no labels" if not labelled else (
        f"the model has {len(output_names)} outputs ({', '.join(output_names)})")
    return [], (f"evaluate.metrics is not set and {why}: no task metric, agreement with fp32 only (set "
                "evaluate.metrics, e.g. {metric: top1, output: <name>} or 'module:function', for a task metric)")


def check_metric_specs(specs: list[Any], output_names: list[str], labelled: bool, labels_key: str) -> None:
    """What can be known before anything runs: each metric's output exists (or one is named
    where the model has several), and a top-k has labels to count against."""
    for spec in _validated(specs):
        _spec_output(spec, output_names)
        builtin = getattr(spec, "metric", None)
        if builtin is not None and not labelled:
            raise ConfigError(f"evaluate.metrics '{builtin}' is a top-k accuracy, but the evaluation data has no labels "
                              f"(no '{labels_key}' array, data.labels_key): drop it from evaluate.metrics (agreement "
                              "with fp32 is measured anyway) or give labelled data")


def compute_task_metrics(
    metrics: list[TaskMetric],
    outputs: dict[str, np.ndarray],
    labels: Optional[np.ndarray],
    reference: Optional[dict[str, np.ndarray]] = None,
    inputs: Optional[dict[str, np.ndarray]] = None,
) -> tuple[dict[str, float], dict[str, Optional[str]]]:
    """Every metric's values merged into one flat dict, and the output each value reads; two
    metrics giving the same name is an error."""
    return merge_task_metrics(metrics, [m(outputs, labels, reference=reference, inputs=inputs) for m in metrics])


def merge_task_metrics(metrics: list[TaskMetric], values: list[Mapping[str, float]]
                       ) -> tuple[dict[str, float], dict[str, Optional[str]]]:
    """Each metric's values (in `metrics`' order) merged into one flat dict, and the output each
    value reads; two metrics giving the same name is an error."""
    result: dict[str, float] = {}
    origin: dict[str, str] = {}
    reads: dict[str, Optional[str]] = {}
    for m, res in zip(metrics, values):
        for k, v in res.items():
            if k in result:
                raise ConfigError(f"evaluate.metrics: '{m.name}' and '{origin[k]}' both report a metric named '{k}'; rename one")
            result[k], origin[k], reads[k] = v, m.name, m.output
    return result, reads


def json_number(v: Any) -> Any:
    """Floats that JSON cannot carry as the strings 'Infinity', '-Infinity', 'NaN' (as the reports write them)."""
    if isinstance(v, float) and not math.isfinite(v):
        return "NaN" if math.isnan(v) else ("Infinity" if v > 0 else "-Infinity")
    return v


def as_float(v: Any) -> Optional[float]:
    """A report value back as a float ('inf' strings included); None for anything else."""
    if isinstance(v, bool):
        return None
    if isinstance(v, (int, float)):
        return float(v)
    if isinstance(v, str) and v in ("inf", "-inf", "nan", "Infinity", "-Infinity", "NaN"):
        return float(v.lower().replace("infinity", "inf"))
    return None
