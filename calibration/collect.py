"""Collect per-tensor |x| histograms by running the FP32 ONNX in onnxruntime.

The model is augmented once: every tensor to calibrate becomes an extra graph output,
and each batch runs through one onnxruntime session. The activations of that batch
stream into one :class:`calibration.histogram.AbsHistogram` per tensor (growing by the
rule ``growth`` names: TensorRT's doubling or DESIGN.md's appending) and are dropped
before the next batch runs, so memory holds one batch of activations at most, whatever
the dataset size.

Which tensors: TensorRT's calibrator records a scale for nearly every tensor of the
network (graph inputs, Conv outputs, ReLU outputs, Add, pooling, Flatten, Gemm
outputs; see ``shared/fixtures/trt86-resnet18-entropy2``), so by default
(``scope="all"``) every floating-point tensor that a node computes from the graph
inputs is collected, plus the float graph inputs. Tensors computed from constants only
(weights, shape arithmetic) are left out: TensorRT writes them with scale 0 or names
them ``(Unnamed Layer* N)``, and they need no calibration. ``scope="quantizable"``
collects only what a Q/DQ model needs: the activation inputs of
:data:`QUANTIZABLE_OP_TYPES` and the graph inputs.

No torch import here: this module also runs in the GPU kit (Python 3.10, numpy 1.26,
onnxruntime 1.20).
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

import numpy as np

from calibration.errors import CalibrationError
from calibration.histogram import DEFAULT_NUM_BINS, AbsHistogram

#: Ops whose activation inputs TensorRT runs in INT8 (and the Q/DQ model quantizes).
QUANTIZABLE_OP_TYPES = ("Conv", "ConvTranspose", "Gemm", "MatMul")
SCOPES = ("all", "quantizable")

# onnx.TensorProto element types: FLOAT, FLOAT16, DOUBLE, BFLOAT16.
_FLOAT_TYPES = frozenset({1, 10, 11, 16})
# A serialized proto must stay below 2 GiB; above this, the augmented model goes to a file.
_INLINE_MODEL_LIMIT = 1_800_000_000

Feeds = Union[np.ndarray, Mapping[str, np.ndarray]]


# -- which tensors ------------------------------------------------------------------------
def _element_types(model: Any) -> dict[str, int]:
    """Element type of every named tensor onnx's shape inference can type."""
    import onnx

    try:
        inferred = onnx.shape_inference.infer_shapes(model, check_type=False, strict_mode=False)
    except Exception:  # inference is best effort: fall back to what the file declares
        inferred = model
    graph = inferred.graph
    types: dict[str, int] = {}
    for vi in list(graph.input) + list(graph.value_info) + list(graph.output):
        if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type:
            types[vi.name] = vi.type.tensor_type.elem_type
    for init in graph.initializer:
        types[init.name] = init.data_type
    return types


def _constant_tensors(model: Any) -> set[str]:
    """Tensors whose value does not depend on any graph input (weights, folded shapes)."""
    graph = model.graph
    const = {init.name for init in graph.initializer}
    const |= {init.values.name for init in graph.sparse_initializer}
    graph_inputs = {i.name for i in graph.input} - const
    for node in graph.node:  # ONNX requires topological order
        ins = [n for n in node.input if n]
        has_subgraph = any(a.type in (5, 10) for a in node.attribute)  # GRAPH, GRAPHS
        if not has_subgraph and all(n in const for n in ins) and not graph_inputs.intersection(ins):
            const.update(o for o in node.output if o)
    return const


def calibration_tensors(model: Any, scope: str = "all", types: Optional[Mapping[str, int]] = None) -> list[str]:
    """Names of the tensors to calibrate, graph inputs first, then in node order.

    ``scope="all"``: every float tensor computed from the graph inputs (what TensorRT's
    cache holds). ``scope="quantizable"``: the float activation inputs of
    :data:`QUANTIZABLE_OP_TYPES` plus the graph inputs.
    """
    if scope not in SCOPES:
        raise CalibrationError(f"unknown tensor scope {scope!r}; use one of {', '.join(SCOPES)}")
    graph = model.graph
    types = _element_types(model) if types is None else types
    const = _constant_tensors(model)

    def wanted(name: str) -> bool:
        return bool(name) and name not in const and types.get(name) in _FLOAT_TYPES

    names: list[str] = [i.name for i in graph.input if wanted(i.name)]
    seen = set(names)
    for node in graph.node:
        if scope == "all":
            candidates = list(node.output)
        elif node.op_type in QUANTIZABLE_OP_TYPES:
            # Conv/ConvTranspose/Gemm: input 0 (and 1 when it is an activation); bias never.
            candidates = list(node.input[:2])
        else:
            continue
        for name in candidates:
            if name not in seen and wanted(name):
                seen.add(name)
                names.append(name)
    return names


def augment(model: Any, names: Sequence[str], types: Optional[Mapping[str, int]] = None) -> Any:
    """A copy of ``model`` with ``names`` added as graph outputs (typed from inference)."""
    import onnx

    types = _element_types(model) if types is None else types
    augmented = onnx.ModelProto()
    augmented.CopyFrom(model)
    present = {o.name for o in augmented.graph.output} | {i.name for i in augmented.graph.input}
    for name in names:
        if name not in present:
            augmented.graph.output.append(onnx.helper.make_tensor_value_info(name, types.get(name, 1), None))
    return augmented


# -- the collector --------------------------------------------------------------------------
@dataclass
class CollectStats:
    """What a collection did: counts and where the time went (``seconds_inference`` is the
    time spent waiting for onnxruntime, which overlaps binning when pipelined)."""

    batches: int = 0
    samples: int = 0
    seconds_session: float = 0.0
    seconds_inference: float = 0.0
    seconds_histogram: float = 0.0
    batch_sizes: list[int] = field(default_factory=list)
    intra_op_threads: int = 0
    pipelined: bool = False


def available_cores() -> int:
    """CPU cores this process may use (affinity-aware where the platform says)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


class ActivationCollector:
    """One augmented onnxruntime session; batches stream into per-tensor histograms.

    ``onnx_path`` is the FP32 model. ``tensors`` overrides the tensor list (default:
    :func:`calibration_tensors` with ``scope``). ``threads``: onnxruntime's intra-op
    threads (default: all cores but one when pipelined, which keeps one core binning;
    onnxruntime's own default otherwise). ``optimize`` runs onnxruntime's graph
    optimizations (exposed tensors are kept, so values are the FP32 graph's to float
    rounding). ``source`` names the data in error messages.

    :meth:`add_batch` runs and bins one batch; :meth:`add_batches` pipelines: onnxruntime
    computes batch ``b + 1`` in a worker thread (it releases the GIL) while this thread
    bins batch ``b``, so at most two batches of activations are alive.
    """

    def __init__(self, onnx_path: Union[str, Path], *, tensors: Optional[Sequence[str]] = None,
                 scope: str = "all", num_bins: int = DEFAULT_NUM_BINS, growth: str = "append",
                 threads: Optional[int] = None,
                 optimize: bool = True, pipeline: bool = True, source: str = "calibration data") -> None:
        from calibration.onnx_io import load_model

        start = time.perf_counter()
        self.onnx_path = Path(onnx_path)
        self.source = source
        self.pipeline = bool(pipeline)
        self.stats = CollectStats(pipelined=self.pipeline)
        model = load_model(self.onnx_path)
        initializers = {t.name for t in model.graph.initializer}
        graph_inputs = [i.name for i in model.graph.input if i.name not in initializers]
        types = _element_types(model)
        if tensors is None:
            names = calibration_tensors(model, scope, types)
        else:
            names = list(dict.fromkeys(tensors))
            known = set(graph_inputs) | {o for node in model.graph.node for o in node.output}
            missing = [n for n in names if n not in known]
            if missing:
                raise CalibrationError(f"{self.onnx_path}: tensors {missing[:5]} are neither graph inputs nor "
                                       "node outputs of this model; calibrate tensors the model computes")
        if not names:
            raise CalibrationError(f"{self.onnx_path}: no floating-point activations to calibrate (scope={scope!r})")
        self.input_names = graph_inputs
        self.output_names = [o.name for o in model.graph.output]
        self.tensor_names = names
        #: (op_type, inputs, outputs) of every node, for rules that follow the graph.
        self.node_ops = [(n.op_type, list(n.input), list(n.output)) for n in model.graph.node]
        self._fed = [n for n in names if n in graph_inputs]  # histogrammed from the feeds directly
        exposed = [n for n in names if n not in graph_inputs]
        # The model's own outputs are fetched too: the first batch's are kept as a reference.
        self._outputs = exposed + [n for n in self.output_names if n not in exposed]
        self.first_outputs: dict[str, np.ndarray] = {}
        self.histograms: dict[str, AbsHistogram] = {n: AbsHistogram(num_bins, name=n, growth=growth)
                                                       for n in names}
        if threads is None and self.pipeline:
            threads = max(1, available_cores() - 1)
        self.stats.intra_op_threads = int(threads or 0)
        self._session = self._make_session(augment(model, exposed, types), threads, optimize)
        del model
        self.stats.seconds_session = time.perf_counter() - start

    def _make_session(self, model: Any, threads: Optional[int], optimize: bool) -> Any:
        import onnx
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                            else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
        if threads:
            options.intra_op_num_threads = int(threads)
        try:
            if model.ByteSize() < _INLINE_MODEL_LIMIT:
                return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
            with tempfile.TemporaryDirectory(prefix="trtpipe-calib-") as tmp:  # > 2 GiB: external data
                path = Path(tmp) / "augmented.onnx"
                onnx.save_model(model, str(path), save_as_external_data=True, location="augmented.onnx.data")
                return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as e:
            msg = str(e).strip().splitlines()[0][:300]
            raise CalibrationError(f"{self.onnx_path}: onnxruntime cannot run the model with its activations "
                                   f"exposed for calibration ({msg})") from None

    def _feeds(self, batch: Feeds) -> dict[str, np.ndarray]:
        if isinstance(batch, Mapping):
            feeds = {k: np.ascontiguousarray(v) for k, v in batch.items()}
        else:
            if len(self.input_names) != 1:
                raise CalibrationError(f"{self.onnx_path}: the model has inputs {self.input_names}; "
                                       "pass each batch as a dict of name -> array")
            feeds = {self.input_names[0]: np.ascontiguousarray(batch)}
        missing = [n for n in self.input_names if n not in feeds]
        if missing:
            raise CalibrationError(f"{self.source}: batch lacks model input(s) {missing}")
        return feeds

    def _where(self, index: int, first: int, size: int) -> str:
        return f"batch {index} (samples {first}..{first + size - 1} of {self.source})"

    def _run(self, feeds: dict[str, np.ndarray], where: str) -> tuple[list[Any], float]:
        """onnxruntime on one batch; returns the exposed values and the seconds it took."""
        t0 = time.perf_counter()
        try:
            values = self._session.run(self._outputs, feeds)
        except Exception as e:
            msg = str(e).strip().splitlines()[0][:300]
            raise CalibrationError(f"{self.onnx_path}: onnxruntime failed on {where}: {msg}") from None
        return values, time.perf_counter() - t0

    def _bin(self, feeds: dict[str, np.ndarray], values: list[Any], where: str) -> None:
        """Add one batch to the histograms, dropping each activation once it is binned."""
        t0 = time.perf_counter()
        if not self.first_outputs:
            self.first_outputs = {n: np.array(values[self._outputs.index(n)]) for n in self.output_names}
        try:
            for name in self._fed:
                self.histograms[name].update(feeds[name])
            for i, name in enumerate(self._outputs):
                if name in self.histograms:
                    self.histograms[name].update(values[i])
                values[i] = None
        except CalibrationError as e:
            raise CalibrationError(f"{where}: {e}") from None
        size = int(next(iter(feeds.values())).shape[0])
        self.stats.seconds_histogram += time.perf_counter() - t0
        self.stats.batches += 1
        self.stats.samples += size
        self.stats.batch_sizes.append(size)

    def _prepared(self, batch: Feeds, index: int, first: int) -> tuple[dict[str, np.ndarray], str]:
        feeds = self._feeds(batch)
        size = int(next(iter(feeds.values())).shape[0])
        return feeds, self._where(index, first, size)

    def add_batch(self, batch: Feeds) -> None:
        """Run one batch and add every collected tensor to its histogram.

        Raises CalibrationError naming the tensor and the batch when an activation is NaN
        or Inf, or when onnxruntime rejects the batch.
        """
        feeds, where = self._prepared(batch, self.stats.batches, self.stats.samples)
        values, seconds = self._run(feeds, where)
        self.stats.seconds_inference += seconds
        self._bin(feeds, values, where)

    def add_batches(self, batches: Iterable[Feeds]) -> None:
        """All ``batches`` in order; pipelined (see the class) unless ``pipeline=False``."""
        if not self.pipeline:
            for batch in batches:
                self.add_batch(batch)
            return
        from concurrent.futures import ThreadPoolExecutor

        iterator = iter(batches)
        index, first = self.stats.batches, self.stats.samples

        def submit(pool: ThreadPoolExecutor) -> Optional[tuple[Any, dict[str, np.ndarray], str]]:
            nonlocal index, first
            batch = next(iterator, None)
            if batch is None:
                return None
            feeds, where = self._prepared(batch, index, first)
            index += 1
            first += int(next(iter(feeds.values())).shape[0])
            return pool.submit(self._run, feeds, where), feeds, where

        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="calib-ort") as pool:
            pending = submit(pool)
            while pending is not None:
                future, feeds, where = pending
                t0 = time.perf_counter()
                values, _ = future.result()
                self.stats.seconds_inference += time.perf_counter() - t0  # time waited for onnxruntime
                pending = submit(pool)  # the next batch runs while this one is binned
                try:
                    self._bin(feeds, values, where)
                except BaseException:
                    if pending is not None:
                        pending[0].cancel()
                    raise
                del values, feeds


def collect_histograms(onnx_path: Union[str, Path], batches: Iterable[Feeds], *, total: Optional[int] = None,
                       progress: bool = True, **options: Any) -> ActivationCollector:
    """Stream ``batches`` through :class:`ActivationCollector` (options go to it) with a
    tqdm progress bar; returns the collector (``.histograms``, ``.stats``)."""
    collector = ActivationCollector(onnx_path, **options)
    iterator: Iterable[Feeds] = batches
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(batches, total=total, desc="calibrate", unit="batch", leave=False)
        iterator = bar
    try:
        collector.add_batches(iterator)
    finally:
        if bar is not None:
            bar.close()
    if collector.stats.batches == 0:
        raise CalibrationError(f"{collector.source}: no calibration batches; at least one full batch is needed")
    return collector
