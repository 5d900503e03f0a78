"""The accuracy budget of `trtpipe tune`, in the gate's terms, measured on a candidate's outputs.

`tune.budget.metric` is either

* a task metric that `evaluate.metrics` reports (`top1`, `top1_prob`, a user metric's
  name...), bounded by `min`, `max`, or `max_drop` (in the metric's own unit) against the
  same metric of the FP32 model on the same samples; `gate.lower_is_better` says which
  metrics are losses (there a drop is a rise); or
* an agreement statistic against the FP32 model, as the gate writes it: `top1_agreement`,
  `cosine`, `cosine_min`, `snr_db` (bounded by `min`), `max_abs_diff`, `mean_abs_diff`,
  `rel_l2` (bounded by `max`); `stat@output` reads one output, a bare statistic the worst
  output (as the gate checks every output).

The reference is the FP32 ONNX run by onnxruntime on the same samples (for a user metric
that takes `reference`, those FP32 outputs too). A NaN never meets a budget. `measure` takes
whole arrays (the search subsets); `BudgetSum` accumulates the same metric, and the output SQNR,
chunk by chunk (the full evaluation set, never held whole: :mod:`.fullset`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from ..config import AGREEMENT_HIGHER_BETTER, AGREEMENT_LOWER_BETTER, Config, split_agreement_key
from ..errors import ConfigError
from ..metrics import (AgreementSum, TaskMetric, agreement, compute_task_metrics, merge_task_metrics, metric_specs,
                       resolve_metrics)

Outputs = Mapping[str, np.ndarray]


@dataclass
class Budget:
    metric: str  # as configured
    bound: str  # min | max | max_drop
    value: float
    kind: str  # task | agreement
    higher_better: bool
    stat: str  # the agreement statistic, or the task metric's name
    output: Optional[str]  # the output the metric reads (None: every output, the worst counts)
    task_metrics: list[TaskMetric] = field(default_factory=list)  # kind task: the metric that gives `stat`

    @classmethod
    def resolve(cls, cfg: Config, output_names: Sequence[str], fp32: Outputs, labels: Optional[np.ndarray],
                inputs: Optional[Mapping[str, np.ndarray]] = None) -> "Budget":
        """The configured budget, checked against FP32 outputs `fp32` of some samples (`labels`,
        `inputs` theirs; tune gives the search subset's): which task metrics exist, and that the
        statistic can be computed at all."""
        if cfg.tune is None:
            raise ConfigError("the config has no tune: section; add tune.budget (e.g. {metric: top1_agreement, "
                              "min: 0.99}) to run `trtpipe tune`")
        b = cfg.tune.budget
        bound = next(k for k in ("min", "max", "max_drop") if getattr(b, k) is not None)
        value = float(getattr(b, bound))
        specs, _ = metric_specs(cfg.evaluate, list(output_names), labels is not None)
        fns = resolve_metrics(specs, list(output_names)) if specs else []
        values = [m(dict(fp32), labels, reference=dict(fp32), inputs=inputs) for m in fns]
        task, reads = merge_task_metrics(fns, values)
        if b.metric in task:
            higher = b.metric not in cfg.gate.lower_is_better
            if bound == "min" and not higher or bound == "max" and higher:
                raise ConfigError(f"tune.budget: '{b.metric}' is {'higher' if higher else 'lower'} the better; bound "
                                  f"it with {'min' if higher else 'max'} or max_drop (gate.lower_is_better lists losses)")
            owner = next(m for m, v in zip(fns, values) if b.metric in v)  # only it is measured from here on
            return cls(b.metric, bound, value, "task", higher, b.metric, reads.get(b.metric), [owner])
        _, stat, output = split_agreement_key(b.metric)
        if stat not in AGREEMENT_HIGHER_BETTER + AGREEMENT_LOWER_BETTER:
            raise ConfigError(
                f"tune.budget.metric '{b.metric}' is neither a task metric of evaluate.metrics "
                f"({', '.join(task) or 'none configured'}) nor an agreement statistic ("
                f"{', '.join(AGREEMENT_HIGHER_BETTER + AGREEMENT_LOWER_BETTER)}, optionally @<output>)")
        if bound == "max_drop":
            raise ConfigError(f"tune.budget: max_drop applies to task metrics; '{b.metric}' is an agreement statistic "
                              f"against FP32: bound it with {'min' if stat in AGREEMENT_HIGHER_BETTER else 'max'}")
        if output is not None and output not in output_names:
            raise ConfigError(f"tune.budget.metric '{b.metric}' reads output '{output}', which the model does not have "
                              f"({', '.join(output_names)})")
        budget = cls(b.metric, bound, value, "agreement", stat in AGREEMENT_HIGHER_BETTER, stat, output)
        if math.isnan(budget.measure(fp32, fp32, labels, inputs)):
            raise ConfigError(f"tune.budget.metric '{b.metric}': no output of the model has {stat} (top1_agreement "
                              f"needs an output with more than one value per sample); choose another statistic")
        return budget

    # -- measuring ----------------------------------------------------------------------------
    def measure(self, outputs: Outputs, fp32: Outputs, labels: Optional[np.ndarray],
                inputs: Optional[Mapping[str, np.ndarray]] = None) -> float:
        """The budget's metric of `outputs` (NaN when it cannot be computed)."""
        if self.kind == "task":
            values, _ = compute_task_metrics(self.task_metrics, dict(outputs), labels, reference=dict(fp32),
                                             inputs=dict(inputs) if inputs is not None else None)
            return float(values.get(self.stat, float("nan")))
        names = [self.output] if self.output else list(fp32)
        return self.worst({name: agreement(outputs[name], fp32[name], name) for name in names})

    def worst(self, stats: Mapping[str, Mapping[str, Any]]) -> float:
        """The agreement statistic over outputs' `agreement` dicts: the worst one (NaN when one is
        NaN or none has it)."""
        vals = [float(a[self.stat]) for a in stats.values() if a.get(self.stat) is not None]
        if not vals:
            return float("nan")
        if any(math.isnan(v) for v in vals):
            return float("nan")
        return min(vals) if self.higher_better else max(vals)

    def threshold(self, fp32_value: float) -> float:
        """The bound on a set whose FP32 metric is `fp32_value`."""
        if self.bound != "max_drop":
            return self.value
        return fp32_value - self.value if self.higher_better else fp32_value + self.value

    def meets(self, value: float, threshold: float) -> bool:
        if value != value or threshold != threshold:
            return False
        return value >= threshold if self.higher_better else value <= threshold

    def better(self, a: float, b: float) -> bool:
        """`a` is a better metric than `b` (NaN is never better)."""
        if a != a:
            return False
        if b != b:
            return True
        return a > b if self.higher_better else a < b

    def describe(self) -> str:
        op = {"min": ">=", "max": "<="}.get(self.bound)
        if op:
            return f"{self.metric} {op} {self.value:g}"
        return f"{self.metric} drop <= {self.value:g} vs FP32"

    def as_report(self) -> dict[str, Any]:
        return {"metric": self.metric, "bound": self.bound, "value": self.value, "kind": self.kind,
                "higher_is_better": self.higher_better, "output": self.output, "text": self.describe()}


def sqnr_db(outputs: Outputs, fp32: Outputs, output: Optional[str] = None) -> float:
    """Output SNR (dB) against FP32: of `output`, else the worst output."""
    names = [output] if output else list(fp32)
    return worst_snr({n: agreement(outputs[n], fp32[n], n) for n in names})


def worst_snr(stats: Mapping[str, Mapping[str, Any]]) -> float:
    """The lowest `snr_db` of outputs' `agreement` dicts (NaN when one is NaN)."""
    vals = [float(a["snr_db"]) for a in stats.values()]
    return float("nan") if any(v != v for v in vals) else min(vals)


class BudgetSum:
    """The budget's metric and the output SQNR of a candidate against FP32, accumulated chunk by
    chunk (rows = samples, in order): agreement statistics summed per output
    (:class:`pipeline.metrics.AgreementSum`), a task metric through its accumulator (a user
    metric's collects the chunks and is called once on the whole arrays, `inputs` given as they are).
    `metric()` and `sqnr()` are `Budget.measure` and `sqnr_db` of the concatenated chunks."""

    def __init__(self, budget: Budget, output_names: Sequence[str], sqnr_output: Optional[str] = None,
                 inputs: Any = None) -> None:
        self.budget = budget
        self.sqnr_names = [sqnr_output] if sqnr_output else list(output_names)
        self.budget_names = ([budget.output] if budget.output else list(output_names)) \
            if budget.kind == "agreement" else []
        self.agree = {n: AgreementSum(n) for n in dict.fromkeys([*self.budget_names, *self.sqnr_names])}
        self.task = [m.accumulate(inputs) for m in budget.task_metrics] if budget.kind == "task" else []

    def add(self, outputs: Outputs, fp32: Outputs, labels: Optional[np.ndarray]) -> None:
        for name, acc in self.agree.items():
            acc.add(outputs[name], fp32[name])
        for acc in self.task:
            acc.add(outputs, labels, fp32)

    def metric(self) -> float:
        b = self.budget
        if b.kind == "task":
            values, _ = merge_task_metrics(b.task_metrics, [acc.result() for acc in self.task])
            return float(values.get(b.stat, float("nan")))
        return b.worst({n: self.agree[n].result() for n in self.budget_names})

    def sqnr(self) -> float:
        return worst_snr({n: self.agree[n].result() for n in self.sqnr_names})
