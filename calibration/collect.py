"""Collect per-tensor |x| histograms by running the FP32 ONNX in onnxruntime.

The model is augmented once: every tensor to calibrate becomes an extra graph output
(except those binned from another one: a Relu output from its input, see
:func:`derivable_tensors`), and each batch runs through one onnxruntime session. The
activations of that batch stream into one :class:`calibration.histogram.AbsHistogram`
per tensor (growing by the rule ``growth`` names: TensorRT's doubling or the reference
rules' appending) and are dropped before the next batch runs, so memory holds one batch of
activations at most, whatever the dataset size.

Binning (:mod:`calibration.binning`) runs on every core: the ranges of all tensors of a
batch first, then the counts, through the compiled kernel (:mod:`calibration.native`),
numpy, or a CUDA device (:mod:`calibration.gpu_histogram`); all give the same counts,
bit for bit. Tensors carrying mask sentinels (+-Inf, ``|x| >= sentinel_abs``) and those
the ``exclude`` globs name are left out and listed in ``excluded`` with the reason.

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
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence, Union

import numpy as np

from calibration.errors import CalibrationError
from calibration.histogram import DEFAULT_NUM_BINS, AbsHistogram

#: Ops whose activation inputs TensorRT runs in INT8 (and the Q/DQ model quantizes).
QUANTIZABLE_OP_TYPES = ("Conv", "ConvTranspose", "Gemm", "MatMul")
SCOPES = ("all", "quantizable")

# onnx.TensorProto element types: FLOAT, FLOAT16, DOUBLE, BFLOAT16.
_FLOAT_TYPES = frozenset({1, 10, 11, 16})

Feeds = Union[np.ndarray, Mapping[str, np.ndarray]]


# -- which tensors ------------------------------------------------------------------------
#: Initializers with more elements than this go to shape inference without their values
#: (name, type and dims kept): no op computes a shape from a weight, and serializing the
#: weights there and back was most of the time inference took (0.12 s of ResNet-18's 0.13 s).
TYPING_KEEP_ELEMENTS = 4096
_PROTOBUF_LIMIT = (1 << 31) - 1


def _typing_copy(model: Any) -> Any:
    """A copy of ``model`` for shape inference: the raw data of initializers larger than
    :data:`TYPING_KEEP_ELEMENTS` left out. Small ones (Reshape's shape, Resize's scales,
    Slice's starts: the values shape inference reads) stay whole. ``model`` itself when the
    whole model would not serialize (protobuf's 2 GiB), so that inference fails there as it
    always did and the declared types are used."""
    import onnx

    light = onnx.ModelProto()
    light.CopyFrom(model)
    stripped = 0
    for init in light.graph.initializer:
        if init.HasField("raw_data") and int(np.prod(init.dims, dtype=np.int64)) > TYPING_KEEP_ELEMENTS:
            stripped += len(init.raw_data) + 16  # the bytes and, at most, their field header
            init.ClearField("raw_data")
    if stripped and light.ByteSize() + stripped >= _PROTOBUF_LIMIT:
        return model
    return light


def _element_types(model: Any) -> dict[str, int]:
    """Element type of every named tensor onnx's shape inference can type."""
    import onnx

    try:
        inferred = onnx.shape_inference.infer_shapes(_typing_copy(model), check_type=False, strict_mode=False)
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


#: Ops whose output holds exactly the values of their (first) input, rearranged.
SAME_VALUE_OP_TYPES = ("Identity", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose")


def derivable_tensors(model: Any, names: Sequence[str], keep: Sequence[str] = ()) -> dict[str, tuple[str, bool]]:
    """``{tensor: (source, positive)}`` for tensors in ``names`` whose histogram can be
    computed from another tensor of ``names`` without onnxruntime handing them over: the
    output of a ``Relu`` holds ``max(x, 0)`` of its input (``positive``), the output of a
    :data:`SAME_VALUE_OP_TYPES` op the very values of its input. Chains resolve to a
    tensor that is fetched (Relu of a Reshape of ``x``: ``(x, True)``). ``keep`` (the
    model's outputs) are never derived. A histogram depends only on the values of each
    batch, so a derived one is the histogram of the tensor itself, bit for bit: onnxruntime
    computes Relu as ``max(x, 0)`` of the very ``x`` it hands over (no fusion applies to a
    tensor that is a graph output), which tests/calibration/test_collect_identity.py checks
    against fetching every tensor."""
    wanted, kept = set(names), set(keep)
    derived: dict[str, tuple[str, bool]] = {}
    for node in model.graph.node:
        if not node.input or len(node.output) != 1:
            continue
        out, src = node.output[0], node.input[0]
        if out not in wanted or out in kept or src not in wanted:
            continue
        if node.op_type == "Relu":
            positive = True
        elif node.op_type in SAME_VALUE_OP_TYPES:
            positive = False
        else:
            continue
        root, root_positive = derived.get(src, (src, False))
        derived[out] = (root, positive or root_positive)  # Relu(Relu(x)) = Relu(x)
    return derived


def _on_device(value: Any) -> bool:
    """A forward's device array (``pipeline.runtime.cuda_binning.DeviceTensor``): flat, with
    ``size``, ``dtype`` and ``host()``; its binner knows where it lives."""
    return hasattr(value, "host") and hasattr(value, "ptr")


def _host(value: Any) -> Any:
    return value.host() if _on_device(value) else value


# -- the collector --------------------------------------------------------------------------
#: Default ``sentinel_abs``: a tensor holding a value this large (or +-Inf) carries a mask
#: sentinel (HF's torch.finfo(float32).min = -3.4e38), not a distribution to calibrate.
DEFAULT_SENTINEL_ABS = 1e30


@dataclass
class CollectStats:
    """What a collection did: counts and where the time went (``seconds_inference`` is the
    time spent waiting for onnxruntime, which overlaps binning when pipelined;
    ``seconds_histogram`` the time spent binning, ranges included). ``kernel`` names the
    binning kernel (``native``, ``numpy``, ``torch:cuda:0``, ``cupy``) and ``device_note``
    why it was chosen."""

    batches: int = 0
    samples: int = 0
    seconds_session: float = 0.0
    seconds_inference: float = 0.0
    seconds_histogram: float = 0.0
    batch_sizes: list[int] = field(default_factory=list)
    intra_op_threads: int = 0
    pipelined: bool = False
    histogram_threads: int = 0
    kernel: str = ""
    device: str = "cpu"
    device_note: str = ""
    forward: str = "onnxruntime"
    forward_details: dict[str, Any] = field(default_factory=dict)


def available_cores() -> int:
    """CPU cores this process may use (affinity-aware where the platform says)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def match_excludes(names: Sequence[str], globs: Sequence[str], what: str) -> dict[str, str]:
    """``{tensor: the first glob that matches it}`` for fnmatch ``globs`` (case-sensitive)
    over ``names``. A glob that matches nothing is a typo: CalibrationError naming it and
    a few tensor names (``what`` says where they come from)."""
    from fnmatch import fnmatchcase

    if isinstance(globs, str):
        globs = [globs]
    matched: dict[str, str] = {}
    for glob in globs:
        hits = [n for n in names if fnmatchcase(n, glob)]
        if not hits:
            sample = ", ".join(repr(n) for n in list(names)[:4])
            raise CalibrationError(f"calibration.exclude {glob!r} matches no calibrated tensor of {what} "
                                   f"(names look like {sample}{', ...' if len(names) > 4 else ''}); "
                                   "fix the glob or drop it")
        for n in hits:
            matched.setdefault(n, glob)
    return matched


def sentinel_reason(lo: float, hi: float, sentinel_abs: float, batch: int) -> str:
    """Why a tensor whose batch spans ``[lo, hi]`` is left out of calibration."""
    infs = [s for s, hit in (("+inf", hi == np.inf), ("-inf", lo == -np.inf)) if hit]
    if infs:
        what = " and ".join(infs)
    else:
        what = f"{lo if -lo >= hi else hi:.4g} (|x| >= sentinel_abs {sentinel_abs:.3g})"
    return f"carries {what} in batch {batch} (a mask sentinel): kept in higher precision"


class OrtForward:
    """The default calibration forward: an onnxruntime CPU session of the augmented model."""

    name = "onnxruntime"
    reuses_buffers = False

    def __init__(self, session: Any) -> None:
        self._session = session

    def run(self, names: Sequence[str], feeds: Mapping[str, np.ndarray]) -> list[Any]:
        return self._session.run(list(names), dict(feeds))

    def describe(self) -> dict[str, Any]:
        return {"device": "cpu"}

    def close(self) -> None:
        self._session = None


class ActivationCollector:
    """One augmented onnxruntime session; batches stream into per-tensor histograms.

    ``onnx_path`` is the FP32 model. ``tensors`` overrides the tensor list (default:
    :func:`calibration_tensors` with ``scope``). ``threads``: onnxruntime's intra-op
    threads (default: every core). ``optimize`` runs onnxruntime's graph optimizations
    (exposed tensors are kept, so values are the FP32 graph's to float rounding).
    ``source`` names the data in error messages.

    Binning (:mod:`calibration.binning`): ``histogram_threads`` workers (default: every
    core) with the kernel ``kernel`` picks (:class:`calibration.kernels.CpuKernel`:
    "auto" = the compiled one where it builds, else numpy), or on a GPU when ``device``
    is "cuda" (torch or cupy; :mod:`calibration.gpu_histogram`; "auto" stays on the CPU,
    where the forward leaves the activations). Every kernel gives the same counts, bit for bit.

    ``pipeline``: onnxruntime computes batch ``b + 1`` in a worker thread while batch
    ``b`` is binned (two batches of activations alive); off by default, since on few
    cores the two only compete and memory doubles.

    ``derive``: Relu outputs (and Reshape/Flatten/Transpose/... outputs) are binned from
    the tensor they are computed from (:func:`derivable_tensors`) instead of being fetched
    from onnxruntime: the same counts, with ~40% less activation memory on a ResNet.
    ``ort_options``: extra onnxruntime SessionOptions attributes, or config entries for
    keys with a dot (``"session.intra_op.allow_spinning": "1"`` turns spinning back on).

    ``forward``: who runs the model, a factory called with the augmented ONNX (every fetched
    tensor a graph output) that returns an object with ``run(names, feeds) -> list of arrays``,
    ``close()``, ``name`` and ``describe() -> dict``, such as trtpipe's TensorRT FP32 engine on
    a GPU (``pipeline.backends.trt_forward``); default: onnxruntime on the CPU. A forward whose
    ``reuses_buffers`` is true hands out arrays it overwrites on the next run, so it cannot be
    pipelined.

    Tensors left out of calibration (kept in higher precision) are in :attr:`excluded`
    (name -> reason): those the ``exclude`` globs (fnmatch) match, and those whose values
    reach +-Inf or ``|x| >= sentinel_abs`` in some batch (mask sentinels; their largest
    ``|x|`` is in :attr:`excluded_max_abs`). NaN stays an error naming tensor and batch.
    Integer and bool tensors are never collected.

    :meth:`add_batch` runs and bins one batch; :meth:`add_batches` runs them all.
    """

    def __init__(self, onnx_path: Union[str, Path], *, tensors: Optional[Sequence[str]] = None,
                 scope: str = "all", num_bins: int = DEFAULT_NUM_BINS, growth: str = "append",
                 threads: Optional[int] = None, optimize: bool = True, pipeline: bool = False,
                 source: str = "calibration data", device: str = "auto", kernel: str = "auto",
                 histogram_threads: Optional[int] = None, sentinel_abs: Optional[float] = DEFAULT_SENTINEL_ABS,
                 exclude: Sequence[str] = (), derive: bool = True,
                 ort_options: Optional[Mapping[str, Any]] = None,
                 forward: Optional[Callable[[Any], Any]] = None) -> None:
        from calibration.gpu_histogram import resolve_device
        from calibration.kernels import CpuKernel
        from calibration.onnx_io import load_model

        start = time.perf_counter()
        self.onnx_path = Path(onnx_path)
        self.source = source
        self.pipeline = bool(pipeline)
        self.stats = CollectStats(pipelined=self.pipeline)
        self.sentinel_abs = float(sentinel_abs) if sentinel_abs is not None else float("inf")
        if not self.sentinel_abs > 0:
            raise CalibrationError(f"sentinel_abs must be > 0 (or None for Inf only), got {sentinel_abs!r}")
        # A forward that bins where it leaves the activations (its ``binner``) takes "auto" and
        # "cuda"; resolve_device decides for onnxruntime's forward (and for "cpu", any forward):
        # here, or once the forward is made and has no binner.
        self._device, self._cpu_kernel = str(device), CpuKernel(kernel)
        forward_may_bin = forward is not None and self._device in ("auto", "cuda")
        self._kernel = self._cpu_kernel
        if not forward_may_bin:
            self._kernel, self.stats.device, self.stats.device_note = resolve_device(device, self._cpu_kernel)
        self.stats.kernel = self._kernel.name
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
        #: Tensors left out of calibration (kept in higher precision): name -> reason.
        self.excluded: dict[str, str] = {}
        #: max|x| of the tensors excluded for carrying sentinels (Inf for +-Inf).
        self.excluded_max_abs: dict[str, float] = {}
        self._order = list(names)  # graph order, the excluded ones included (maxima())
        exclude = [exclude] if isinstance(exclude, str) else list(exclude)
        for name, glob in match_excludes(names, exclude, str(self.onnx_path)).items():
            self.excluded[name] = f"excluded by calibration.exclude {glob!r}"
        names = [n for n in names if n not in self.excluded]
        #: Excluded by a glob: fetched for their max|x| only (:meth:`maxima`), never binned.
        self._max_only = [n for n in self.excluded]
        self._max_only_set = set(self._max_only)
        if not names:
            raise CalibrationError(f"{self.onnx_path}: calibration.exclude {exclude} leaves no tensor to "
                                   "calibrate; exclude fewer tensors")
        self.input_names = graph_inputs
        self.output_names = [o.name for o in model.graph.output]
        self.tensor_names = names
        #: (op_type, inputs, outputs) of every node, for rules that follow the graph.
        self.node_ops = [(n.op_type, list(n.input), list(n.output)) for n in model.graph.node]
        #: tensor -> (the tensor whose values it is binned from, whether through Relu).
        self.derived = derivable_tensors(model, names + list(self.excluded), self.output_names) if derive else {}
        self.derived = {n: d for n, d in self.derived.items() if n in names}
        sources = [n for n in list(dict.fromkeys(names + [r for r, _ in self.derived.values()] + self._max_only))
                   if n not in self.derived]
        self._fed = [n for n in sources if n in graph_inputs]  # histogrammed from the feeds directly
        exposed = [n for n in sources if n not in graph_inputs]
        # The model's own outputs are fetched too: the first batch's are kept as a reference.
        self._outputs = exposed + [n for n in self.output_names if n not in exposed]
        self._sources = set(sources)
        self.first_outputs: dict[str, np.ndarray] = {}
        self.histograms: dict[str, AbsHistogram] = {n: AbsHistogram(num_bins, name=n, growth=growth)
                                                       for n in names}
        cores = available_cores()
        threads = cores if threads is None else threads
        self.histogram_threads = max(1, int(histogram_threads if histogram_threads is not None else cores))
        self.stats.intra_op_threads = int(threads or 0)
        self.stats.histogram_threads = self.histogram_threads
        augmented = augment(model, exposed, types)
        del model
        if forward is None:
            self._session = OrtForward(self._make_session(augmented, threads, optimize, ort_options or {}))
        else:
            self._session = forward(augmented)
            if self.pipeline and getattr(self._session, "reuses_buffers", False):
                raise CalibrationError(f"{self.onnx_path}: the {self._session.name} forward reuses its output "
                                       "buffers, so it cannot be pipelined; collect with pipeline=False")
            self.stats.intra_op_threads = 0
        self.stats.forward = str(getattr(self._session, "name", "custom"))
        self._device_binning = forward_may_bin and hasattr(self._session, "binner")
        if forward_may_bin and not self._device_binning:
            self._kernel, self.stats.device, self.stats.device_note = resolve_device(device, self._cpu_kernel)
            self.stats.kernel = self._kernel.name
        del augmented
        self.stats.seconds_session = time.perf_counter() - start

    def _make_session(self, model: Any, threads: Optional[int], optimize: bool, extra: Mapping[str, Any]) -> Any:
        from .ort_session import make_session

        # With every activation a graph output, the memory pattern planned on the first run
        # holds a second copy of a batch's activations (measured: +0.9 GiB on ResNet-18).
        # onnxruntime's idle threads spin between runs, taking the cores the binning threads
        # need right then (and any core another process needs); blocking costs nothing here.
        config = {"enable_mem_pattern": False, "session.intra_op.allow_spinning": "0", **extra}
        return make_session(model, threads=threads, level="all" if optimize else "disable", config=config,
                            what=str(self.onnx_path), error=CalibrationError,
                            failure="onnxruntime cannot run the model with its activations exposed for calibration")

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

    def close(self) -> None:
        """Release the forward (onnxruntime's session, or the engine) and the memory it holds
        (a batch of activations); the histograms and everything else stay."""
        if self._session is not None:
            self.stats.forward_details = dict(self._session.describe())
            self._session.close()
        self._session = None

    def _run(self, feeds: dict[str, np.ndarray], where: str) -> tuple[list[Any], float]:
        """The forward on one batch; returns the exposed values and the seconds it took."""
        if self._session is None:
            raise CalibrationError(f"{self.onnx_path}: this collector is closed; make a new one to add batches")
        t0 = time.perf_counter()
        try:
            values = self._session.run(self._outputs, feeds)
        except Exception as e:
            msg = str(e).strip().splitlines()[0][:300]
            raise CalibrationError(f"{self.onnx_path}: {self.stats.forward} failed on {where}: {msg}") from None
        return values, time.perf_counter() - t0

    def _binner(self) -> Any:
        from calibration.binning import BatchBinner

        if self._device_binning and self._session is not None:
            return self._session.binner(self._cpu_kernel, required=self._device == "cuda",
                                        threads=self.histogram_threads)
        return BatchBinner(self._kernel, self.histogram_threads)

    def _binned_by(self, binner: Any) -> None:
        describe = getattr(binner, "describe", None)
        if describe is not None:
            self.stats.kernel, self.stats.device, self.stats.device_note = describe()

    def _bin(self, binner: Any, feeds: dict[str, np.ndarray], values: list[Any], where: str) -> None:
        """Add one batch to the histograms: the ranges of every fetched tensor first (a NaN
        stops the batch before any histogram changes; sentinels exclude their tensor),
        then the counts. Each activation is dropped once binned."""
        t0 = time.perf_counter()
        index = self.stats.batches
        if not self.first_outputs:
            self.first_outputs = {n: np.array(_host(values[self._outputs.index(n)])) for n in self.output_names}
        arrays: dict[str, np.ndarray] = {n: self._flat(n, feeds[n], where) for n in self._fed}
        for i, name in enumerate(self._outputs):
            if name in self._sources:
                arrays[name] = self._flat(name, values[i], where)
            values[i] = None
        ranges = dict(zip(arrays, binner.ranges(list(arrays.values()))))
        for name in self._max_only:  # a NaN there is not calibration's concern: inf (not finite) in maxima()
            lo, hi = ranges[name]
            m = float(max(hi, -lo)) if not (np.isnan(lo) or np.isnan(hi)) else float("inf")
            self.excluded_max_abs[name] = max(self.excluded_max_abs.get(name, 0.0), m)
        for name, (lo, hi) in ranges.items():
            if (np.isnan(lo) or np.isnan(hi)) and name not in self._max_only_set:
                flat = _host(arrays[name])
                n_nan, n_inf = int(np.count_nonzero(np.isnan(flat))), int(np.count_nonzero(np.isinf(flat)))
                raise CalibrationError(
                    f"{where}: calibration batch for tensor {name!r} has {n_nan} NaN and {n_inf} Inf values out of "
                    f"{flat.size}; an INT8 range cannot be calibrated from them. Check the calibration data "
                    "(normalisation, corrupt files) and that the FP32 model is finite on it")
        jobs, owners = [], []
        for name in self.tensor_names:
            if name not in self.histograms:
                continue
            source, positive = self.derived.get(name, (name, False))
            lo, hi = ranges[source]
            batch_max = max(hi, 0.0) if positive else max(hi, -lo, 0.0)  # max|Relu(x)| = max(max(x), 0)
            if batch_max == np.inf or batch_max >= self.sentinel_abs:
                self.excluded[name] = sentinel_reason(max(lo, 0.0) if positive else lo, hi, self.sentinel_abs, index)
                self.excluded_max_abs[name] = max(float(batch_max), self.histograms.pop(name).max_abs)
                continue
            try:
                plan = self.histograms[name].begin_batch(batch_max, int(arrays[source].size))
            except CalibrationError as e:
                raise CalibrationError(f"{where}: {e}") from None
            if plan is not None:
                jobs.append((arrays[source], plan, positive))
                owners.append((self.histograms[name], plan))
        arrays.clear()
        for (hist, plan), counts in zip(owners, binner.counts(jobs)):
            hist.add_counts(plan, counts)
        size = int(next(iter(feeds.values())).shape[0])
        self.stats.seconds_histogram += time.perf_counter() - t0
        self.stats.batches += 1
        self.stats.samples += size
        self.stats.batch_sizes.append(size)

    def maxima(self) -> dict[str, float]:
        """max|x| over every batch so far of every collected floating tensor (graph inputs and
        activations, the excluded ones included; inf where a value was not finite), in graph
        order: what an FP16 build needs to know which tensors leave FP16's range."""
        seen = {n: h.max_abs for n, h in self.histograms.items()}
        seen.update(self.excluded_max_abs)
        return {n: float(seen[n]) for n in self._order if n in seen}

    @staticmethod
    def _flat(name: str, value: Any, where: str) -> np.ndarray:
        arr = value if _on_device(value) else np.asarray(value)
        if arr.dtype.kind not in "fiub":
            raise CalibrationError(f"{where}: calibration data for tensor {name!r} has dtype {arr.dtype}; histograms "
                                   "need real numbers: pass the activation as a float array")
        return arr if _on_device(arr) else arr.reshape(-1)

    def _prepared(self, batch: Feeds, index: int, first: int) -> tuple[dict[str, np.ndarray], str]:
        feeds = self._feeds(batch)
        size = int(next(iter(feeds.values())).shape[0])
        return feeds, self._where(index, first, size)

    def add_batch(self, batch: Feeds) -> None:
        """Run one batch and add every collected tensor to its histogram.

        Raises CalibrationError naming the tensor and the batch when an activation is NaN,
        or when onnxruntime rejects the batch.
        """
        self.add_batches([batch])

    def add_batches(self, batches: Iterable[Feeds]) -> None:
        """All ``batches`` in order; pipelined (see the class) when ``pipeline=True``."""
        with self._binner() as binner:
            try:
                if self.pipeline:
                    self._add_pipelined(binner, batches)
                    return
                for batch in batches:
                    feeds, where = self._prepared(batch, self.stats.batches, self.stats.samples)
                    values, seconds = self._run(feeds, where)
                    self.stats.seconds_inference += seconds
                    self._bin(binner, feeds, values, where)
                    del values, feeds
            finally:
                self._binned_by(binner)

    def _add_pipelined(self, binner: Any, batches: Iterable[Feeds]) -> None:
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
                    self._bin(binner, feeds, values, where)
                except BaseException:
                    if pending is not None:
                        pending[0].cancel()
                    raise
                del values, feeds


def collect_histograms(onnx_path: Union[str, Path], batches: Iterable[Feeds], *, total: Optional[int] = None,
                       progress: bool = True, **options: Any) -> ActivationCollector:
    """Stream ``batches`` through :class:`ActivationCollector` (options go to it) with a
    tqdm progress bar; returns the collector (``.histograms``, ``.stats``, ``.excluded``),
    closed: its onnxruntime session and that session's memory are released."""
    collector = ActivationCollector(onnx_path, **options)
    iterator: Iterable[Feeds] = batches
    bar = None
    if progress:
        from pipeline.log import progress_bar

        bar = progress_bar(batches, total=total, desc="calibrate", unit="batch")
        iterator = bar
    try:
        collector.add_batches(iterator)
    finally:
        if bar is not None:
            bar.close()
    collector.close()
    if collector.stats.batches == 0:
        raise CalibrationError(f"{collector.source}: no calibration batches; at least one full batch is needed")
    return collector
