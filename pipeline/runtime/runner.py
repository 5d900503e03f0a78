"""The Runner interface every loaded artifact implements (a TensorRT engine, an
onnxruntime model): named inputs in, named outputs out, and latency measurement. It
lives below both the runtime and the backends, so neither imports the other."""

from __future__ import annotations

import abc
from typing import Any, Mapping, Optional

import numpy as np

PLAIN = "plain"  # one enqueue per request
CUDA_GRAPH = "cuda_graph"  # a captured CUDA graph replayed per request


class Runner(abc.ABC):
    """A loaded model/engine. Use as a context manager; `infer` takes and returns numpy."""

    backend: str = ""
    input_names: list[str]
    output_names: list[str]
    #: optimization profiles, input -> {min, opt, max}; None: any shape runs
    profiles: Optional[list[dict[str, dict[str, list[int]]]]] = None
    #: latency modes `time` can measure
    time_modes: tuple[str, ...] = (PLAIN,)

    @abc.abstractmethod
    def infer(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one batch (any shape inside a profile) and return host arrays by output name."""

    @abc.abstractmethod
    def time(self, feeds: Mapping[str, np.ndarray], warmup: int, iterations: int, mode: str = PLAIN) -> dict[str, Any]:
        """Latency of `feeds`: per-iteration milliseconds under `times_ms` (host clock, end to
        end) and, where the backend measures it, `gpu_times_ms` (device time alone), plus
        `method` naming how they were taken."""

    def device(self) -> dict[str, Any]:
        return {}

    def close(self) -> None:
        pass

    def __enter__(self) -> "Runner":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
