"""Which layers to keep out of INT8: the sensitivity passes and the search strategies.

A *candidate* is a set of kept layers; a runner (:mod:`.ort_candidates` on a CPU,
:mod:`.trt_candidates` on a GPU) gives its outputs and its cost, and the budget
(:mod:`.budget`) its metric against the FP32 model's outputs on the same samples. Three
sample sets: the *full* evaluation set (the final check; the stage measures it chunk by
chunk, :mod:`.fullset`), the *search* subset (a seeded `tune.search_samples` of it, where
the search runs) and the *sensitivity* subset (the first `tune.sensitivity_samples` of the
search subset), both held in memory with their FP32 outputs.

Every strategy first measures full INT8 and all layers kept, on the full set: when full
INT8 meets the budget nothing is kept; when even keeping every layer does not, the budget
cannot be met, and the best point found is reported.

`sensitivity` (default):
1. per layer, two candidates on the sensitivity samples: the layer alone in INT8 (every
   other layer float) and the layer alone kept float (every other layer INT8). The order is
   by the output's error energy the layer adds alone, 10^(-SQNR/10) (noise of independent
   layers adds up, to first order), ties by the gain of keeping it alone; with
   `tune.objective: cost`, by that energy per unit of cost that keeping the layer adds
   (the estimated time keeping it adds, `.cost`), and the result is the cheapest candidate
   that meets the budget rather than the one with the fewest layers kept;
2. the shortest prefix of that order that meets the budget on the search samples, found by
   bisection (log2 N candidates, the metric being near-monotone in the prefix);
3. pruning: each kept layer, least sensitive first, is dropped when the budget still holds
   without it (this finds the planted layer alone where the order is imperfect);
4. the result is checked on the full set; if the search samples were too lenient, steps 2
   and 3 run again with every candidate measured on the full set, from where they stopped.
5. with `tune.objective: cost`, contiguity: the short INT8 runs (at most MAX_GAP layers) between
   two float layers are kept too, shortest first, while that makes the result cheaper and the
   budget holds on the full set (the cost counts each INT8 <-> float reformat: `.cost`, or is
   the engine's measured latency): fewer, longer float regions (`fill_gaps`).
`bisect` is Polygraphy's `debug precision --mode bisect --direction forward`: the
shortest prefix of the layers in graph order kept float, by bisection, no pruning.
`first_last` is the common heuristic: the first and the last layer kept.

The search stops at `tune.max_candidates` distinct candidates or `tune.max_seconds`; the
result is then the cheapest candidate that met the budget on the full set (all layers kept,
measured first, when it can be met at all).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np

from .budget import Budget, sqnr_db
from .layers import Layer


#: Longest INT8 run between float layers that fill_gaps tries keeping (objective: cost).
MAX_GAP = 4


class OutOfBudget(Exception):
    """The search budget (candidates or seconds) is spent."""


@dataclass
class SampleSet:
    x: dict[str, np.ndarray]
    y: Optional[np.ndarray]
    fp32: dict[str, np.ndarray]
    index: Optional[np.ndarray] = None  # positions in the full set (None: the full set)
    fp32_metric: float = float("nan")
    threshold: float = float("nan")

    def __len__(self) -> int:
        return int(len(next(iter(self.x.values()))))

    def take(self, outputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """This set's rows of outputs over the full set."""
        return {k: v[self.index] for k, v in outputs.items()} if self.index is not None else dict(outputs)

    def fp32_value(self, budget: Budget) -> float:
        """The budget's metric of the FP32 model itself on this set."""
        return budget.measure(self.fp32, self.fp32, self.y, self.x)

    def score(self, budget: Budget, run: Callable[[dict[str, np.ndarray]], Mapping[str, np.ndarray]],
              sqnr_output: Optional[str] = None, sub: Optional["SampleSet"] = None) -> tuple[float, float, Optional[float]]:
        """(the budget's metric, the output SQNR, the budget's metric on `sub`'s rows: a subset
        whose `index` points into this set; None without one) of the outputs `run` gives on this set.
        The full evaluation set is measured chunk by chunk instead (:class:`.fullset.StreamedSet`)."""
        outputs = run(self.x)
        metric = budget.measure(outputs, self.fp32, self.y, self.x)
        sub_metric = None if sub is None else budget.measure(sub.take(outputs), sub.fp32, sub.y, sub.x)
        return metric, sqnr_db(outputs, self.fp32, sqnr_output), sub_metric


@dataclass
class Tuner:
    layers: list[Layer]
    budget: Budget
    runner: Any
    sets: dict[str, Any]  # full (a SampleSet, or a fullset.StreamedSet), search, sensitivity (SampleSets)
    max_candidates: int
    max_seconds: float
    sqnr_output: Optional[str] = None
    progress: bool = True
    alternatives: set[str] = field(default_factory=set)  # layers whose inputs have a minmax range to try
    objective: str = "layers"  # layers: fewest kept | cost: cheapest (estimated or measured) that meets
    minmax_layers: set[str] = field(default_factory=set)  # layers whose inputs take it (chosen by sensitivity)
    candidates: list[dict[str, Any]] = field(default_factory=list)
    why: dict[str, list[str]] = field(default_factory=dict)
    stop_reason: str = "search finished"
    _by_key: dict[tuple[frozenset, frozenset], dict[str, Any]] = field(default_factory=dict)
    _start: float = field(default_factory=time.monotonic)
    _bar: Any = None

    def __post_init__(self) -> None:
        for s in self.sets.values():
            s.fp32_metric = s.fp32_value(self.budget)
            s.threshold = self.budget.threshold(s.fp32_metric)
        if self.progress:
            from ..log import progress_bar

            self._bar = progress_bar(desc="tune", unit="candidate")

    @property
    def searchable(self) -> list[Layer]:
        return [layer for layer in self.layers if layer.forced_float is None]

    # -- measuring --------------------------------------------------------------------------------
    def _new(self, key: tuple[frozenset, frozenset], phase: str) -> dict[str, Any]:
        if len(self.candidates) >= self.max_candidates:
            raise OutOfBudget(f"tune.max_candidates ({self.max_candidates}) reached")
        if time.monotonic() - self._start > self.max_seconds:
            raise OutOfBudget(f"tune.max_seconds ({self.max_seconds:g}) reached")
        order = {layer.name: layer.index for layer in self.layers}
        c = {"id": len(self.candidates), "phase": phase, "kept": sorted(key[0], key=order.__getitem__),
             "minmax": sorted(key[1], key=order.__getitem__), "metric": None, "meets": None,
             "metric_sensitivity": None, "metric_full": None, "meets_full": None,
             "sqnr_db": float("nan"), "cost": float("nan"), "latency_ms": {}, "seconds": 0.0}
        self.candidates.append(c)
        self._by_key[key] = c
        return c

    def measure(self, kept: Sequence[str], phase: str, on: str = "search",
                minmax: Optional[Sequence[str]] = None) -> dict[str, Any]:
        """The candidate keeping `kept`, measured on `on` (search | sensitivity | full; a full
        measurement also fills the search one). `minmax`: the INT8 layers whose inputs take
        max|x| ranges (default: the chosen ones, `minmax_layers`, that are not kept)."""
        mm = frozenset(self.minmax_layers - set(kept)) if minmax is None else frozenset(minmax)
        key = (frozenset(kept), mm)
        c = self._by_key.get(key) or self._new(key, phase)
        field_of = {"search": "metric", "sensitivity": "metric_sensitivity", "full": "metric_full"}
        if on == "sensitivity" and len(self.sets["sensitivity"]) == len(self.sets["search"]):
            on = "search"
        if c[field_of[on]] is not None and (on != "full" or c["metric"] is not None):
            return c
        t0 = time.monotonic()
        if self._bar is not None:
            self._bar.set_postfix_str(f"{phase}, {len(key[0])} kept", refresh=False)
        s = self.sets[on]
        sub = self.sets["search"] if on == "full" and c["metric"] is None else None
        metric, sq, sub_metric = s.score(self.budget, self._run_of(key), self.sqnr_output, sub)
        if math.isnan(c["sqnr_db"]):
            c["sqnr_db"] = sq
        if on == "full":
            c["metric_full"], c["meets_full"] = metric, self.budget.meets(metric, s.threshold)
            if sub is not None:
                c["metric"], c["meets"] = sub_metric, self.budget.meets(sub_metric, sub.threshold)
        elif on == "search":
            c["metric"], c["meets"] = metric, self.budget.meets(metric, s.threshold)
        else:
            c["metric_sensitivity"] = metric
        c["cost"], c["latency_ms"] = self.runner.cost(key[0], key[1]) if key[1] else self.runner.cost(key[0])
        c["seconds"] = round(c["seconds"] + time.monotonic() - t0, 3)
        if self._bar is not None:
            self._bar.update(1)
        return c

    def _run_of(self, key: tuple[frozenset, frozenset]) -> Callable[[dict[str, Any]], Mapping[str, np.ndarray]]:
        """The runner's outputs of the candidate `key` on some inputs (the full set calls it per chunk)."""
        kept, minmax = key
        return (lambda x: self.runner.run(kept, x, minmax)) if minmax else (lambda x: self.runner.run(kept, x))

    def ok(self, c: dict[str, Any], on: str) -> bool:
        return bool(c["meets_full"] if on == "full" else c["meets"])

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    # -- sensitivity ----------------------------------------------------------------------------
    def sensitivity(self) -> list[dict[str, Any]]:
        """Per searchable layer, on the sensitivity samples: alone in INT8 (with its calibrated
        ranges, and with max|x| ranges where those differ: the better one is the layer's
        method from then on) and alone kept out of INT8 (every other layer INT8 by its method)."""
        names = [layer.name for layer in self.searchable]
        on = "sensitivity"
        base = self.measure([], "full_int8", on, minmax=())
        key = "metric_sensitivity" if base["metric_sensitivity"] is not None else "metric"
        alone: dict[str, tuple[dict[str, Any], Optional[dict[str, Any]]]] = {}
        for layer in self.searchable:
            others = [n for n in names if n != layer.name]
            a = self.measure(others, "int8_alone", on, minmax=())
            b = self.measure(others, "int8_alone_minmax", on, minmax=[layer.name]) \
                if layer.name in self.alternatives else None
            alone[layer.name] = (a, b)
            if b is not None and _better_db(b["sqnr_db"], a["sqnr_db"]):
                self.minmax_layers.add(layer.name)
        ref = self.measure([], "full_int8_tuned_ranges", on) if self.minmax_layers else base
        rows = []
        sign = 1.0 if self.budget.higher_better else -1.0
        for layer in self.searchable:
            a, b = alone[layer.name]
            chosen = b if layer.name in self.minmax_layers else a
            kept = self.measure([layer.name], "float_alone", on)
            sq = chosen["sqnr_db"]
            score = 0.0 if sq == float("inf") else (float("inf") if sq != sq else 10 ** (-sq / 10))
            gain = sign * (kept[key] - ref[key])
            rows.append({"layer": layer.name, "score": score, "method": "minmax" if chosen is b else "calibrated",
                         "int8_alone_sqnr_db": a["sqnr_db"], "int8_alone_metric": a[key],
                         "int8_alone_minmax_sqnr_db": None if b is None else b["sqnr_db"],
                         "float_alone_sqnr_db": kept["sqnr_db"],
                         "float_alone_metric": kept[key], "float_alone_gain": gain if gain == gain else -math.inf,
                         "_index": layer.index})
        if self.objective == "cost":  # error energy removed per unit of cost added by keeping the layer
            from .cost import layer_seconds

            keep = getattr(self.runner, "keep_precision", "fp16")
            extra = {x.name: layer_seconds(x, keep) - layer_seconds(x, "int8") for x in self.searchable}
            for r in rows:
                r["score"] = r["score"] / max(extra[r["layer"]] * 1e9, 1e-9)  # per estimated ns
        rows.sort(key=lambda r: (-r["score"], -r["float_alone_gain"], r["_index"]))
        for rank, r in enumerate(rows, 1):
            r["rank"] = rank
            r.pop("_index")
        return rows

    # -- building blocks ------------------------------------------------------------------------
    def shortest_prefix(self, order: Sequence[str], lo: int, hi: int, on: str, phase: str) -> int:
        """The shortest prefix of `order` that meets the budget on `on`, knowing that prefix
        `lo` does not and prefix `hi` does (bisection)."""
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if self.ok(self.measure(order[:mid], phase, on), on):
                hi = mid
            else:
                lo = mid
        return hi

    def prune(self, kept: list[str], rank: Mapping[str, int], on: str) -> list[str]:
        """Drop each kept layer, least sensitive first, when the budget holds without it."""
        kept = list(kept)
        for name in sorted(kept, key=lambda n: -rank.get(n, 0)):
            trial = [n for n in kept if n != name]
            c = self.measure(trial, "prune", on)
            value = c["metric_full"] if on == "full" else c["metric"]
            if self.ok(c, on):
                kept = trial
                self.why.setdefault(name, []).append(f"dropped: the budget holds without it ({self.budget.stat} "
                                                     f"{value:.6g} on the {on} samples)")
            else:
                self.why.setdefault(name, []).append(
                    f"needed: without it {self.budget.stat} is {value:.6g} on the {on} samples "
                    f"(candidate {c['id']}), short of {self.sets[on].threshold:.6g}")
        return kept

    def _prefix_search(self, order: list[str], rank: Mapping[str, int], prune: bool, phase: str) -> dict[str, Any]:
        """Steps 2-4 of the module docstring for `order`."""
        n = len(order)
        base = self.measure([], "full_int8_tuned_ranges" if self.minmax_layers else "full_int8", "search")
        k = 0 if self.ok(base, "search") else (
            n if not self.ok(self.measure(order, "float", "search"), "search")
            else self.shortest_prefix(order, 0, n, "search", phase))
        for name in order[:k]:
            self.why.setdefault(name, []).append(f"in the shortest {'sensitivity-ordered' if prune else 'graph-order'} "
                                                 f"prefix that meets the budget on the search samples ({k} of {n})")
        kept = self.prune(order[:k], rank, "search") if prune else order[:k]
        final = self.measure(kept, "verify", "full")
        if final["meets_full"]:
            return final
        self.why.setdefault("_search", []).append(
            f"candidate {final['id']} met the budget on the search samples but not on the full set "
            f"({self.budget.stat} {final['metric_full']:.6g}); searching again on the full set")
        lo_c = self.measure(order[:k], phase, "full")
        k2 = k if lo_c["meets_full"] else self.shortest_prefix(order, k, n, "full", phase)
        for name in order[k:k2]:
            self.why.setdefault(name, []).append(f"added when checking on the full set (prefix of {k2})")
        kept = self.prune(order[:k2], rank, "full") if prune else order[:k2]
        return self.measure(kept, "verify", "full")

    # -- contiguity (objective: cost) ---------------------------------------------------------------
    def fill_gaps(self, start: dict[str, Any], max_gap: int = MAX_GAP) -> dict[str, Any]:
        """Keep the short INT8 runs between two float layers too, shortest first, while that makes the
        candidate cheaper (the cost counts each INT8 <-> float reformat, or is a measured latency) and
        the budget still holds on the full set: fewer, longer float regions."""
        order = [x.name for x in sorted(self.layers, key=lambda x: x.index)]
        forced = {x.name for x in self.layers if x.forced_float is not None}
        current = start
        tried: set[frozenset] = set()
        while True:
            floaty = set(current["kept"]) | forced
            runs, run = [], []
            seen_float = False
            for name in order:
                if name in floaty:
                    if run and seen_float and len(run) <= max_gap:
                        runs.append(run)
                    run, seen_float = [], True
                else:
                    run.append(name)
            better = None
            for run in sorted(runs, key=len):
                trial = sorted(set(current["kept"]) | set(run))
                if frozenset(trial) in tried:
                    continue
                tried.add(frozenset(trial))
                c = self.measure(trial, "contiguous", "full")
                if c["meets_full"] and _num(c["cost"]) < _num(current["cost"]):
                    better = c
                    for name in run:
                        self.why.setdefault(name, []).append(
                            f"kept with its neighbours: the INT8 run of {len(run)} between float layers cost more "
                            f"than keeping it (cost {_num(current['cost']):.6g} -> {_num(c['cost']):.6g})")
                    break
            if better is None:
                return current
            current = better

    # -- strategies -----------------------------------------------------------------------------
    def run(self, strategy: str, table: Optional[list[dict[str, Any]]] = None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """(the chosen candidate, the sensitivity table). A `table` given (measured by another
        runner: the CPU simulation when engines measure the search) orders the search."""
        names = [layer.name for layer in self.searchable]
        table = list(table or [])
        found: Optional[dict[str, Any]] = None
        self.minmax_layers |= {r["layer"] for r in table if r.get("method") == "minmax"}
        try:
            base = self.measure([], "full_int8", "full", minmax=())
            top = self.measure(names, "float", "full")
            if base["meets_full"]:
                self.stop_reason = "full INT8 meets the budget: nothing kept"
            elif not top["meets_full"]:
                self.stop_reason = ("the budget cannot be met: even with every layer kept out of INT8 it does not "
                                    "hold on the full evaluation set")
            elif strategy == "sensitivity":
                table = table or self.sensitivity()
                rank = {r["layer"]: r["rank"] for r in table}
                found = self._prefix_search([r["layer"] for r in table], rank, prune=True, phase="search")
            elif strategy == "bisect":
                found = self._prefix_search(names, {n: i for i, n in enumerate(names)}, prune=False, phase="bisect")
            elif strategy == "first_last":
                kept = list(dict.fromkeys([names[0], names[-1]]))
                for name in kept:
                    self.why.setdefault(name, []).append("first or last layer (the first/last heuristic)")
                if not self.measure(kept, "first_last", "full")["meets_full"]:
                    self.stop_reason = "the first/last heuristic does not meet the budget"
            else:
                raise ValueError(f"unknown strategy {strategy!r}")
            if self.objective == "cost" and found is not None and found["meets_full"]:
                self.fill_gaps(found)  # the search's result, made contiguous where that is cheaper
        except OutOfBudget as e:
            self.stop_reason = f"stopped early: {e}"
        finally:
            self.close()
        return self.choose(strategy), table

    def choose(self, strategy: str) -> dict[str, Any]:
        """The cheapest candidate that met the budget on the full set; else the best point found."""
        full = [c for c in self.candidates if c["metric_full"] is not None]
        if strategy == "first_last":
            fl = [c for c in full if c["phase"] == "first_last"]
            if fl:
                return fl[0]
        met = [c for c in full if c["meets_full"]]
        if met and self.objective == "cost":
            return min(met, key=lambda c: (_num(c["cost"]), len(c["kept"]), c["id"]))
        if met:
            return min(met, key=lambda c: (len(c["kept"]), _num(c["cost"]), c["id"]))
        best = full[0] if full else self.candidates[0]
        for c in full[1:]:
            if self.budget.better(c["metric_full"], best["metric_full"]) or (
                    c["metric_full"] == best["metric_full"] and _num(c["cost"]) < _num(best["cost"])):
                best = c
        return best


def _better_db(a: float, b: float, margin: float = 0.5) -> bool:
    """SQNR `a` beats `b` by more than `margin` dB (NaN never does)."""
    if a != a:
        return False
    return b != b or a > b + margin


def _num(v: float) -> float:
    return math.inf if v != v else v


def frontier(candidates: Sequence[Mapping[str, Any]], higher_better: bool) -> list[int]:
    """Ids of the candidates no other beats in both metric (search samples) and cost."""
    pts = [c for c in candidates if c.get("metric") is not None and c["metric"] == c["metric"]
           and c["cost"] == c["cost"]]
    sign = 1.0 if higher_better else -1.0
    pts.sort(key=lambda c: (c["cost"], -sign * c["metric"]))
    out, best = [], -math.inf
    for c in pts:
        if sign * c["metric"] > best:
            out.append(c["id"])
            best = sign * c["metric"]
    return out
