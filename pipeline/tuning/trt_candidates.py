"""A candidate measured on a GPU: a TensorRT engine per candidate, its outputs and its latency.

Each candidate is built through the project's TensorRTBackend on the INT8 route build@int8
takes on this TensorRT (`build.int8_route`, `auto` by default). Explicit (TensorRT 11, or
asked for): the candidate's Q/DQ ONNX (`methods.write_candidate_qdq`: the kept layers left
float, the same model onnxruntime simulates), built strongly typed. Implicit (8.6, 10),
exactly as build@int8 would make it: INT8 with the calibrate stage's ranges (`calibration_source:
cache`, its cache completed for the tensors TensorRT's parser adds; `auto` when the cache
was written for another TensorRT), the kept layers pinned to `tune.keep_precision` by
`build.layer_precisions` (every node of each layer group, :mod:`.layers`), the user's own
`build.layer_precisions` first, and `build.timing_cache` shared by every build so that a
rebuild reuses the kernels timed before (only the pinned layers change between candidates).

Latency: `pipeline.runtime.trt_runner.TrtRunner.time` at each of `evaluate.latency.batch_sizes`
(warm-up and iterations from there), the median of the device-clock times (CUDA events
around execute_async_v3); a candidate's `cost` is the median at the largest batch size.
Nothing here runs without TensorRT and a GPU; the search logic it feeds is the same as on
the CPU.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional

import numpy as np

from ..config import Config
from ..fileio import CACHE_FILE
from .layers import Layer, layer_precisions

ENGINE = "model.engine"


def batch_of(x: Mapping[str, np.ndarray], bs: int) -> dict[str, np.ndarray]:
    n = len(next(iter(x.values())))
    reps = int(np.ceil(bs / n))
    return {k: np.ascontiguousarray(np.concatenate([v] * reps)[:bs] if reps > 1 else v[:bs]) for k, v in x.items()}


class TrtCandidates:
    backend = "tensorrt"
    latency_kind = "tensorrt"

    def __init__(self, cfg: Config, onnx_path: Path, calib_dir: Path, layers: list[Layer], keep_precision: str,
                 calib_data: Optional[Path] = None, always_float: Iterable[str] = (), progress: bool = True,
                 alternatives: Optional[Mapping[str, Mapping[str, float]]] = None,
                 amax: Optional[Mapping[str, float]] = None, ptq: Any = None) -> None:
        self.cfg = cfg
        self.ptq = ptq  # calibrate's weight-side PTQ (methods.WeightPTQ): explicit-route candidates carry it
        self.onnx_path = Path(onnx_path)
        self.calib_dir = Path(calib_dir)
        self.calib_data = Path(calib_data) if calib_data else None
        self.layers = {layer.name: layer for layer in layers}
        self.keep_precision = keep_precision
        self.always_float = sorted(set(always_float))
        self.progress = progress
        self.alternatives = dict(alternatives or {})  # layer -> {input tensor: max|x|} (pipeline.tuning.methods)
        self.amax = dict(amax or {})  # the calibrate stage's ranges: the explicit route's candidate Q/DQ models
        self._route: Optional[tuple[str, str]] = None
        lat = cfg.evaluate.latency
        self.batch_sizes, self.warmup, self.iterations = list(lat.batch_sizes), lat.warmup, lat.iterations
        self._tmp = tempfile.TemporaryDirectory(prefix="trtpipe-tune-trt-")
        self._key: Optional[tuple[frozenset[str], frozenset[str]]] = None
        self._runner: Any = None
        self._latency: dict[tuple[frozenset[str], frozenset[str]], dict[str, float]] = {}
        self.builds: list[dict[str, Any]] = []

    # -- one engine per candidate ----------------------------------------------------------------
    def route(self) -> tuple[str, str]:
        """("implicit" | "explicit", why): build@int8's route on this TensorRT (build.int8_route)."""
        if self._route is None:
            from ..backends.trt_build import resolve_int8_route, trt_api
            from ..runtime.trt_common import require_tensorrt

            self._route = resolve_int8_route(trt_api(require_tensorrt()), self.cfg.build.int8_route)
        return self._route

    def request_for(self, kept: frozenset[str], minmax: frozenset[str], out: Path) -> Any:
        """The BuildRequest of this candidate's engine, into `out`, on build@int8's route."""
        from ..backends.base import BuildRequest

        if self.route()[0] == "explicit":
            if not self.amax:
                from ..errors import BackendError

                raise BackendError("tune on the explicit INT8 route needs the calibrate stage's ranges (amax) to write "
                                   "each candidate's Q/DQ ONNX")
            from ..fileio import QDQ_FILE
            from .methods import write_candidate_qdq

            d = Path(self._tmp.name) / "candidate-qdq"
            d.mkdir(exist_ok=True)
            write_candidate_qdq(self.onnx_path, d / QDQ_FILE, self.amax, self.alternatives, kept, self.always_float,
                                minmax, self.ptq)
            build = self.cfg.build.model_copy(update={"int8_route": "explicit"})
            cfg = self.cfg.model_copy(update={"build": build})
            typed = self._typed_int8(cfg, d / QDQ_FILE, kept)
            return BuildRequest("int8", self.onnx_path, out, cfg, calib_dir=d, calib_data=self.calib_data,
                                qdq_onnx=Path(typed.pop("path")) if typed else None, typed_onnx=typed)
        return BuildRequest("int8", self.onnx_path, out, self.config_for(kept), calib_dir=self._calib_dir_for(minmax),
                            calib_data=self.calib_data)

    def _typed_int8(self, cfg: Config, qdq: Path, kept: frozenset[str]) -> Optional[dict[str, Any]]:
        """On a strongly typed build with int8_float_fallback: fp16, the candidate's typed INT8 ONNX as build@int8
        writes it (trt_typed.plan_int8_typed; the kept layers' nodes FP32 when keep_precision is fp32); else None."""
        from ..backends.tensorrt_backend import TensorRTBackend

        why = TensorRTBackend(progress=False).int8_typed(cfg)
        if not why:
            return None
        from ..backends.trt_typed import plan_int8_typed

        fp32 = {n: "tune keeps its layer in fp32" for k in (set(kept) | set(self.always_float)) if self.keep_precision == "fp32"
                for n in self.layers[k].nodes}
        info = plan_int8_typed(self.onnx_path, qdq, cfg, qdq.parent, self.calib_dir, self.calib_data, fp32)
        return {**info, "why": why}

    def config_for(self, kept: Iterable[str]) -> Config:
        """The config build@int8 would use for this candidate on the implicit route (kept layers pinned)."""
        names = sorted(set(kept) | set(self.always_float), key=lambda n: self.layers[n].index)
        pins = dict(self.cfg.build.layer_precisions)
        for pat, prec in layer_precisions([self.layers[n] for n in names], self.keep_precision).items():
            pins.setdefault(pat, prec)
        build = self.cfg.build.model_copy(update={"layer_precisions": pins, "int8_route": "implicit"})
        return self.cfg.model_copy(update={"build": build})

    def _calib_dir_for(self, minmax: frozenset[str]) -> Path:
        """calibrate's folder, or one whose cache has the inputs of the `minmax` layers at max|x|."""
        if not minmax:
            return self.calib_dir
        from .methods import tuned_amax, write_tuned_cache

        d = Path(self._tmp.name) / "calib"
        d.mkdir(exist_ok=True)
        write_tuned_cache(self.calib_dir / CACHE_FILE, d / CACHE_FILE,
                          tuned_amax({}, self.alternatives, minmax))
        return d

    def _runner_for(self, kept: frozenset[str], minmax: frozenset[str] = frozenset()) -> Any:
        from ..backends.tensorrt_backend import TensorRTBackend
        from ..runtime.trt_runner import TrtRunner

        if self._key == (kept, minmax):
            return self._runner
        self.close_runner()
        out = Path(self._tmp.name) / "candidate"
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        backend = TensorRTBackend(progress=self.progress)
        result = backend.build(self.request_for(kept, minmax, out))
        details = result.details or {}
        tc = details.get("timing_cache") if isinstance(details.get("timing_cache"), dict) else {}
        self.builds.append({"kept": sorted(kept), "minmax": sorted(minmax), "route": self.route()[0],
                            "builder_seconds": details.get("builder_seconds"),
                            "timing_cache_warm": tc.get("warm"), "timing_cache_keys_after": tc.get("keys_after"),
                            "pinned": len(((details.get("layer_precisions") or {}).get("pinned") or {}))})
        self._runner = TrtRunner(out / result.artifact)
        self._key = (kept, minmax)
        return self._runner

    def close_runner(self) -> None:
        if self._runner is not None:
            self._runner.close()
        self._runner, self._key = None, None

    def close(self) -> None:
        self.close_runner()
        self._tmp.cleanup()

    # -- what the search asks --------------------------------------------------------------------
    def run(self, kept: frozenset[str], x: Mapping[str, np.ndarray],
            minmax: frozenset[str] = frozenset()) -> dict[str, np.ndarray]:
        from ..profiles import max_batch

        runner = self._runner_for(kept, minmax)
        bs = min(self.cfg.evaluate.batch_size, max_batch(runner.profiles or []) or self.cfg.evaluate.batch_size)
        n = len(next(iter(x.values())))
        parts: dict[str, list[np.ndarray]] = {k: [] for k in runner.output_names}
        for i in range(0, n, bs):
            for k, v in runner.infer({name: a[i:i + bs] for name, a in x.items()}).items():
                parts[k].append(np.array(v))
        if (kept, minmax) not in self._latency:
            self._latency[(kept, minmax)] = self._time(runner, x)
        return {k: np.concatenate(v) for k, v in parts.items()}

    def _time(self, runner: Any, x: Mapping[str, np.ndarray]) -> dict[str, float]:
        from ..profiles import fits

        out: dict[str, float] = {}
        for bs in self.batch_sizes:
            batch = batch_of(x, bs)
            shapes = {k: list(v.shape) for k, v in batch.items()}
            if runner.profiles and not any(fits(p, shapes) for p in runner.profiles):
                continue
            res = runner.time(batch, self.warmup, self.iterations)
            times = res.get("gpu_times_ms") or res["times_ms"]
            out[f"b{bs}"] = round(float(np.median(times)), 4)
        return out

    def cost(self, kept: Iterable[str], minmax: Iterable[str] = ()) -> tuple[float, dict[str, float]]:
        key = (frozenset(kept), frozenset(minmax))
        lat = self._latency.get(key, {})
        if not lat:
            return float("nan"), lat
        largest = max(lat, key=lambda b: int(b[1:]))
        return lat[largest], dict(lat)

    def describe(self) -> dict[str, Any]:
        return {"kind": "tensorrt", "unit": "ms, median device time at the largest batch size",
                "batch_sizes": self.batch_sizes, "warmup": self.warmup, "iterations": self.iterations,
                "kept_layers_run_in": self.keep_precision, "timing_cache": self.cfg.build.timing_cache,
                "builds": self.builds}
