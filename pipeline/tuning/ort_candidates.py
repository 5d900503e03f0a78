"""A candidate measured on a CPU: the Q/DQ ONNX with the kept layers left float, run by
onnxruntime (TensorRT's INT8 numerics simulated), and the estimated cost of :mod:`.cost`.

Every candidate is a real Q/DQ model written by `calibration.qdq.quantize_qdq(...,
exclude_nodes=kept)` from the calibrate stage's ranges, the same code that writes the model
build@int8 runs. Kept layers run in FP32 here; TensorRT runs them in `tune.keep_precision`
(FP16's rounding is small next to INT8's, and a GPU run measures it)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional

import numpy as np

from .cost import estimated_cost, model_description
from .layers import Layer


class OrtCandidates:
    backend = "onnxruntime"
    latency_kind = "estimate"

    def __init__(self, onnx_path: Path, amax: Mapping[str, float], layers: list[Layer], keep_precision: str,
                 always_float: Iterable[str] = (), batch_size: int = 64, threads: Optional[int] = None,
                 alternatives: Optional[Mapping[str, Mapping[str, float]]] = None, ptq: Any = None) -> None:
        self.onnx_path = Path(onnx_path)
        self.ptq = ptq  # calibrate's weight-side PTQ (methods.WeightPTQ) carried into every candidate
        self.amax = dict(amax)
        self.alternatives = dict(alternatives or {})  # layer -> {input tensor: max|x|} (pipeline.tuning.methods)
        self.layers = layers
        self.keep_precision = keep_precision
        self.always_float = sorted(set(always_float))
        self.batch_size = batch_size
        self.threads = threads
        self._tmp = tempfile.TemporaryDirectory(prefix="trtpipe-tune-")
        self._key: Optional[tuple[frozenset[str], frozenset[str]]] = None
        self._session: Any = None

    def close(self) -> None:
        self._session = None
        self._tmp.cleanup()

    def write_qdq(self, kept: Iterable[str], path: Path, minmax: Iterable[str] = ()) -> dict[str, Any]:
        """The Q/DQ ONNX of this candidate at `path` (the inputs of the `minmax` layers at
        max|x|); returns quantize_qdq's placement summary."""
        from .methods import write_candidate_qdq

        return write_candidate_qdq(self.onnx_path, path, self.amax, self.alternatives, kept, self.always_float, minmax,
                                   self.ptq)

    def _session_for(self, kept: frozenset[str], minmax: frozenset[str]) -> Any:
        from ..onnx_utils import ort_session

        if self._key != (kept, minmax):
            self._session = None
            path = Path(self._tmp.name) / "candidate.qdq.onnx"
            self.write_qdq(kept, path, minmax)
            self._session = ort_session(path, threads=self.threads)
            os.unlink(path)
            self._key = (kept, minmax)
        return self._session

    def run(self, kept: frozenset[str], x: Mapping[str, np.ndarray],
            minmax: frozenset[str] = frozenset()) -> dict[str, np.ndarray]:
        from ..onnx_utils import run_batched

        return run_batched(self._session_for(kept, minmax), dict(x), self.batch_size)

    def cost(self, kept: Iterable[str], minmax: Iterable[str] = ()) -> tuple[float, dict[str, float]]:
        return estimated_cost(self.layers, kept, self.keep_precision), {}

    def describe(self) -> dict[str, Any]:
        return model_description(self.keep_precision)
