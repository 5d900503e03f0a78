"""Agreement and task metrics, numpy only (runs on the GPU side without torch).

Task metrics are pluggable: see `resolve_metrics` below."""

from __future__ import annotations

import inspect
import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional

import numpy as np

from .errors import ConfigError
from .plugins import load_callable


def agreement(candidate: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    """How closely `candidate` follows `reference` (same shape; row = sample)."""
    a = candidate.astype(np.float64).reshape(len(candidate), -1)
    b = reference.astype(np.float64).reshape(len(reference), -1)
    diff = a - b
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    denom = np.maximum(na * nb, np.finfo(np.float64).tiny)
    cos = (a * b).sum(axis=1) / denom
    ref_energy = float((b**2).sum())
    err_energy = float((diff**2).sum())
    out = {
        "cosine": float(cos.mean()),
        "cosine_min": float(cos.min()),
        "max_abs_diff": float(np.abs(diff).max()),
        "mean_abs_diff": float(np.abs(diff).mean()),
        "rel_l2": float(np.sqrt(err_energy / ref_energy)) if ref_energy > 0 else float("inf"),
        "snr_db": float(10 * np.log10(ref_energy / err_energy)) if err_energy > 0 else float("inf"),
    }
    if a.shape[1] > 1:
        out["top1_agreement"] = float((a.argmax(1) == b.argmax(1)).mean())
    return out


def topk(logits: np.ndarray, labels: Optional[np.ndarray], ks: tuple[int, ...] = (1, 5)) -> dict[str, Any]:
    """Top-k accuracy in percent (None without labels)."""
    if labels is None:
        return {}
    order = np.argsort(-logits.reshape(len(logits), -1), axis=1)
    out = {}
    for k in ks:
        if k <= order.shape[1]:
            out[f"top{k}"] = float(100.0 * (order[:, :k] == labels[:, None]).any(axis=1).mean())
    return out


# --- pluggable task metrics -------------------------------------------------------------
#
# `evaluate.metrics` lists built-ins (`top1`, `top5`, any `topK`: on the first output) and
# user metrics given as 'module:function' (or {function, kwargs}). A user metric is called
#     fn(outputs: dict[str, np.ndarray], labels: np.ndarray | None, **kwargs) -> dict[str, float]
# over the whole evaluation set; a function that declares `reference` or `inputs` also gets
# the PyTorch outputs (same form as `outputs`) or the evaluation inputs. Examples, detection
# mAP and embedding retrieval among them: pipeline/examples/task_metrics.py.

_TOPK = re.compile(r"^top([1-9][0-9]*)$")


@dataclass(frozen=True)
class TaskMetric:
    name: str  # 'top1' or 'module:function'
    fn: Callable[..., Mapping[str, Any]]
    kwargs: dict[str, Any] = field(default_factory=dict)
    wants: frozenset[str] = frozenset()  # optional arguments the function declares

    def __call__(
        self,
        outputs: dict[str, np.ndarray],
        labels: Optional[np.ndarray],
        reference: Optional[dict[str, np.ndarray]] = None,
        inputs: Optional[np.ndarray] = None,
    ) -> dict[str, float]:
        extra = dict(self.kwargs)
        if "reference" in self.wants:
            extra["reference"] = reference
        if "inputs" in self.wants:
            extra["inputs"] = inputs
        res = self.fn(outputs, labels, **extra)
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


def _topk_metric(k: int) -> Callable[..., dict[str, float]]:
    def fn(outputs: dict[str, np.ndarray], labels: Optional[np.ndarray]) -> dict[str, float]:
        return topk(next(iter(outputs.values())), labels, (k,))

    return fn


def resolve_metrics(specs: list[Any]) -> list[TaskMetric]:
    """Config entries (a str or a MetricSpec-like object with .function/.kwargs) -> callables."""
    out = []
    for spec in specs:
        name = spec if isinstance(spec, str) else spec.function
        kwargs = {} if isinstance(spec, str) else dict(spec.kwargs)
        m = _TOPK.match(name)
        if m:
            out.append(TaskMetric(name, _topk_metric(int(m.group(1)))))
            continue
        if ":" not in name:
            raise ConfigError(f"evaluate.metrics '{name}': neither a built-in (top1, top5, topK) nor 'module:function'")
        fn = _import_function(name)
        try:
            params = inspect.signature(fn).parameters
        except (TypeError, ValueError):
            params = {}
        var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        wants = frozenset(a for a in ("reference", "inputs") if a in params or var_kw)
        out.append(TaskMetric(name, fn, kwargs, wants))
    return out


def compute_task_metrics(
    metrics: list[TaskMetric],
    outputs: dict[str, np.ndarray],
    labels: Optional[np.ndarray],
    reference: Optional[dict[str, np.ndarray]] = None,
    inputs: Optional[np.ndarray] = None,
) -> dict[str, float]:
    """Every metric's values merged into one flat dict; two metrics giving the same name is an error."""
    result: dict[str, float] = {}
    origin: dict[str, str] = {}
    for m in metrics:
        for k, v in m(outputs, labels, reference=reference, inputs=inputs).items():
            if k in result:
                raise ConfigError(f"evaluate.metrics: '{m.name}' and '{origin[k]}' both report a metric named '{k}'; rename one")
            result[k], origin[k] = v, m.name
    return result


def json_number(v: Any) -> Any:
    """Floats that JSON cannot carry (inf, nan) as the strings 'inf', '-inf', 'nan'."""
    if isinstance(v, float) and not math.isfinite(v):
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")
    return v


def as_float(v: Any) -> Optional[float]:
    """A report value back as a float ('inf' strings included); None for anything else."""
    if isinstance(v, bool):
        return None
    if isinstance(v, (int, float)):
        return float(v)
    if isinstance(v, str) and v in ("inf", "-inf", "nan"):
        return float(v)
    return None
