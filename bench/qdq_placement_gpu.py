"""INT8 routes on a GPU: implicit (calibration cache) against explicit Q/DQ placements, with FP16 for reference.

For one FP32 ONNX, builds with TensorRT (8.6; 10.x works too, where the implicit route still exists):

* ``fp16`` (and ``fp32`` if asked): the FP32 ONNX with BuilderFlag.FP16;
* ``implicit``: the FP32 ONNX, BuilderFlag.INT8, an IInt8EntropyCalibrator2 that hands
  TensorRT the calibration cache (no calibration data: a cache TensorRT rejects is an error);
* ``explicit:<label>``: each ``--qdq <label>=<file>`` Q/DQ ONNX with BuilderFlag.INT8 (8.x;
  on TensorRT >= 10 a strongly typed network);
* ``<variant>+fp16``: the same with BuilderFlag.FP16 added (layers left out of INT8 run in FP16);

then, per variant and batch size: the engine inspector's layers (precision of every
layer, and for an explicit variant whose placement summary is given with ``--placement
<label>=<file>``, whether each Conv / Gemm / residual Add / pool runs with the INT8 inputs
the placement asked for), GPU latency (CUDA events around each ``execute_async_v3`` on
one stream after a warm-up, and around CUDA-graph replays of it: median, mean, p90,
min; throughput), and with ``--eval-inputs/--eval-logits`` the agreement of the engine's
output with the FP32 onnxruntime logits.

Everything goes into one JSON (``<out>/<name>.qdq_gpu.json``), rewritten after every
step, so a call cut short keeps what it measured; a master copy lives in ``--work`` and
later calls (while the machine is warm) add their variants to it. Engines and the timing
cache stay in ``--work`` and are reused when their inputs and settings match. Each build
and each measurement is in its own try block: one failing variant does not stop the others.

Runs on the GPU kit's Python (3.10, numpy 1.26; tensorrt, cuda-python; onnx optional):

    $KITPY bench/qdq_placement_gpu.py --name resnet50 --prepared /tmp/qdqbench/resnet50 \\
        --variants implicit --out $OUT/qdq --work /tmp/qdqwork

(``--prepared`` takes the files bench/qdq_prepare.py wrote; ``--fp32 / --cache / --qdq LABEL=
/ --placement LABEL= / --eval-inputs / --eval-logits`` give or override them one by one.)
A ResNet-50 build can take minutes (explicit Q/DQ longest): run one variant per call
(``--variants implicit``, then ``explicit:new``, ...) while the machine stays warm; each
call adds its variant to the master JSON in ``--work`` and writes the whole of it to ``--out``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

T0 = time.monotonic()
SCHEMA = 1


def log(msg: str) -> None:
    print(f"[qdq_gpu {time.monotonic() - T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    os.replace(tmp, path)


def err_text(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e)[:2000]}"


# -- CUDA through cuda-python's runtime API ---------------------------------------------------
class Cuda:
    """The few CUDA runtime calls this bench needs, checked (the primary context, device 0)."""

    def __init__(self) -> None:
        try:
            from cuda.bindings import runtime as rt  # cuda-python >= 12.6
        except ImportError:
            try:
                from cuda import cudart as rt  # type: ignore[no-redef]
            except ImportError as e:
                raise SystemExit(f"cuda-python is needed for device memory and events ({e})") from None
        self.rt = rt
        self("cudaSetDevice", 0)

    def __call__(self, fn: str, *args: Any) -> Any:
        result = getattr(self.rt, fn)(*args)
        err = result[0] if isinstance(result, tuple) else result
        if int(err) != 0:
            raise RuntimeError(f"CUDA {fn} failed ({int(err)})")
        if isinstance(result, tuple):
            rest = result[1:]
            return rest[0] if len(rest) == 1 else (rest or None)
        return None

    def malloc(self, nbytes: int) -> int:
        return int(self("cudaMalloc", max(int(nbytes), 1)))

    def free(self, ptr: int) -> None:
        self("cudaFree", ptr)

    def stream(self) -> int:
        return int(self("cudaStreamCreateWithFlags", self.rt.cudaStreamNonBlocking))

    def event(self) -> Any:
        return self("cudaEventCreate")

    def record(self, event: Any, stream: int) -> None:
        self("cudaEventRecord", event, stream)

    def elapsed_ms(self, start: Any, end: Any) -> float:
        self("cudaEventSynchronize", end)
        return float(self("cudaEventElapsedTime", start, end))

    def destroy_event(self, event: Any) -> None:
        self("cudaEventDestroy", event)

    def destroy_stream(self, stream: int) -> None:
        self("cudaStreamDestroy", stream)

    def sync(self, stream: int) -> None:
        self("cudaStreamSynchronize", stream)

    def htod(self, ptr: int, array: np.ndarray) -> None:
        array = np.ascontiguousarray(array)
        self("cudaMemcpy", ptr, array.ctypes.data, array.nbytes, self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice)

    def dtoh(self, array: np.ndarray, ptr: int) -> None:
        self("cudaMemcpy", array.ctypes.data, ptr, array.nbytes, self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost)

    def capture(self, stream: int, enqueue: Callable[[], None]) -> tuple[Any, Any]:
        """A CUDA graph of what ``enqueue`` puts on ``stream``: ``(graph, exec)``."""
        self("cudaStreamBeginCapture", stream, self.rt.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal)
        try:
            enqueue()
        finally:
            graph = self("cudaStreamEndCapture", stream)
        return graph, self("cudaGraphInstantiate", graph, 0)

    def launch(self, gexec: Any, stream: int) -> None:
        self("cudaGraphLaunch", gexec, stream)

    def release_graph(self, graph: Any, gexec: Any) -> None:
        self("cudaGraphExecDestroy", gexec)
        self("cudaGraphDestroy", graph)

    def device(self) -> dict[str, Any]:
        props = self("cudaGetDeviceProperties", 0)
        name = props.name.decode(errors="replace").rstrip("\x00") if isinstance(props.name, bytes) else str(props.name)
        info = {"gpu": name, "compute_capability": f"{props.major}.{props.minor}",
                "multiprocessors": int(props.multiProcessorCount), "memory_bytes": int(props.totalGlobalMem)}
        try:
            info["driver"] = int(self("cudaDriverGetVersion"))
            info["runtime"] = int(self("cudaRuntimeGetVersion"))
        except Exception:
            pass
        return info


# -- TensorRT -------------------------------------------------------------------------------
def trt_version_int(version: str) -> int:
    """The number in a calibration cache header: 8.6.0 -> 8600 (8.x), 10.3.0 -> 100300 (10.x)."""
    parts = [int(p) for p in re.findall(r"\d+", version)[:3]] + [0, 0, 0]
    major, minor, patch = parts[:3]
    return major * 1000 + minor * 100 + patch if major < 10 else major * 10000 + minor * 100 + patch


def make_logger(trt: Any) -> Any:
    class Logger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.messages: list[str] = []

        def log(self, severity: Any, msg: str) -> None:
            name = getattr(severity, "name", str(severity)).split(".")[-1]
            if name in ("INTERNAL_ERROR", "ERROR", "WARNING"):
                self.messages.append(f"{name}: {msg}")
                if name != "WARNING":
                    print(f"[TensorRT] {msg}", file=sys.stderr, flush=True)

        def take(self) -> list[str]:
            out, self.messages = self.messages, []
            return out

    return Logger()


def cache_calibrator(trt: Any, cache: bytes, batch: int) -> Any:
    """An IInt8EntropyCalibrator2 that only hands TensorRT ``cache`` (no data to calibrate on)."""

    class CacheCalibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self) -> None:
            trt.IInt8EntropyCalibrator2.__init__(self)
            self.cache, self.batch, self.reads, self.get_batch_calls = cache, batch, 0, 0

        def get_batch_size(self) -> int:
            return self.batch

        def get_batch(self, names: Any, *unused: Any) -> None:
            self.get_batch_calls += 1  # TensorRT rejected the cache and wants data: the build fails
            return None

        def read_calibration_cache(self, *unused: Any) -> bytes:
            self.reads += 1
            return self.cache

        def write_calibration_cache(self, cache: Any, *unused: Any) -> None:
            pass

    return CacheCalibrator()


def prepare_cache(path: Path, trt_version: str) -> tuple[bytes, dict[str, Any]]:
    """The cache bytes with a header TensorRT accepts: the version number of the running
    TensorRT (a cache written for 8.6.0 is read by 8.6.1 only if its header says 8601)."""
    lines = path.read_text().splitlines()
    header = lines[0].strip() if lines else ""
    m = re.fullmatch(r"TRT-(\d+)-(\w+)", header)
    if not m:
        raise ValueError(f"{path}: not a TensorRT calibration cache (first line {header!r})")
    want = f"TRT-{trt_version_int(trt_version)}-{m.group(2)}"
    info = {"file": str(path), "header": header, "tensors": len(lines) - 1, "sha256": sha256(path)}
    if m.group(2) != "EntropyCalibration2":
        raise ValueError(f"{path}: cache algorithm {m.group(2)}; this bench's calibrator is EntropyCalibration2")
    if header != want:
        info["header_rewritten_to"] = want
        lines[0] = want
    return ("\n".join(lines) + "\n").encode(), info


class Variant:
    """One engine to build: ``fp32``, ``fp16``, ``implicit``, ``explicit:<label>``, with ``+fp16``."""

    def __init__(self, spec: str, qdq: dict[str, Path], fp32: Path) -> None:
        self.spec = spec
        base, _, extra = spec.partition("+")
        if extra not in ("", "fp16"):
            raise ValueError(f"variant {spec!r}: only '+fp16' may follow a variant")
        self.fp16 = base == "fp16" or extra == "fp16"
        self.int8 = base == "implicit" or base.startswith("explicit:")
        self.implicit = base == "implicit"
        self.label = base.split(":", 1)[1] if base.startswith("explicit:") else None
        if base not in ("fp32", "fp16", "implicit") and self.label is None:
            raise ValueError(f"variant {spec!r}: use fp32, fp16, implicit or explicit:<label>[+fp16]")
        if self.label is not None and self.label not in qdq:
            raise ValueError(f"variant {spec!r}: no --qdq {self.label}=<file> given")
        self.onnx = qdq[self.label] if self.label is not None else fp32

    def flags(self) -> list[str]:
        return [f for f, on in (("INT8", self.int8), ("FP16", self.fp16)) if on]


def batch_dims(network: Any) -> dict[str, list[int]]:
    """Each network input's dims with the batch axis as -1 (only the batch may be dynamic)."""
    out = {}
    for i in range(network.num_inputs):
        t = network.get_input(i)
        dims = list(t.shape)
        if any(d < 0 for d in dims[1:]):
            raise ValueError(f"input {t.name} has dynamic non-batch dims {dims}; this bench varies the batch only")
        out[t.name] = dims
    return out


def build(trt: Any, logger: Any, variant: Variant, profiles: list[tuple[int, int, int]], cache: Optional[bytes],
          args: argparse.Namespace, timing_cache: Path) -> tuple[bytes, dict[str, Any]]:
    major = int(trt.__version__.split(".")[0])
    builder = trt.Builder(logger)
    flag = 0
    if hasattr(trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH"):
        flag |= 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    strongly_typed = variant.label is not None and major >= 10 and hasattr(trt.NetworkDefinitionCreationFlag,
                                                                           "STRONGLY_TYPED")
    if strongly_typed:
        flag |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flag)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(variant.onnx)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise RuntimeError(f"ONNX parser failed on {variant.onnx}: {errors[:5]}")
    inputs = batch_dims(network)
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(args.workspace_mb) << 20)
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    if args.opt_level is not None:
        config.builder_optimization_level = int(args.opt_level)
    if not strongly_typed:
        if variant.fp16:
            config.set_flag(trt.BuilderFlag.FP16)
        if variant.int8:
            config.set_flag(trt.BuilderFlag.INT8)
    for lo, opt, hi in profiles:
        profile = builder.create_optimization_profile()
        for name, dims in inputs.items():
            profile.set_shape(name, [lo, *dims[1:]], [opt, *dims[1:]], [hi, *dims[1:]])
        config.add_optimization_profile(profile)
    calibrator = None
    if variant.implicit:
        calibrator = cache_calibrator(trt, cache or b"", args.calib_batch)
        config.int8_calibrator = calibrator
        cal = builder.create_optimization_profile()
        for name, dims in inputs.items():
            shape = [args.calib_batch, *dims[1:]]
            cal.set_shape(name, shape, shape, shape)
        config.set_calibration_profile(cal)
    tc_bytes = timing_cache.read_bytes() if timing_cache.is_file() else b""
    tcache = config.create_timing_cache(tc_bytes)
    config.set_timing_cache(tcache, ignore_mismatch=True)
    logger.take()
    t0 = time.monotonic()
    serialized = builder.build_serialized_network(network, config)
    seconds = time.monotonic() - t0
    messages = logger.take()
    if serialized is None:
        raise RuntimeError(f"TensorRT could not build {variant.spec}: {[m for m in messages if 'ERROR' in m][:5]}")
    data = bytes(memoryview(serialized))
    try:
        timing_cache.write_bytes(bytes(config.get_timing_cache().serialize()))
    except Exception as e:
        log(f"timing cache not saved: {err_text(e)}")
    info = {"onnx": str(variant.onnx), "onnx_sha256": sha256(variant.onnx), "flags": variant.flags(),
            "strongly_typed": strongly_typed, "profiles": [list(p) for p in profiles],
            "build_seconds": round(seconds, 1), "engine_bytes": len(data), "timing_cache_bytes_in": len(tc_bytes),
            "warnings": len(messages), "missing_scale_warnings": sum("Missing scale" in m for m in messages),
            "warning_sample": messages[:20]}
    if calibrator is not None:
        info["calibration"] = {"cache_reads": calibrator.reads, "get_batch_calls": calibrator.get_batch_calls}
        if calibrator.get_batch_calls:
            raise RuntimeError("TensorRT rejected the calibration cache and asked for calibration data "
                               f"({calibrator.get_batch_calls} get_batch calls); check the cache header and names")
    return data, info


# -- the engine inspector ------------------------------------------------------------------
def _formats(entries: Any) -> list[str]:
    return [str(e.get("Format/Datatype", "")) for e in entries or [] if isinstance(e, dict)]


def _kind(fmt: str) -> str:
    low = fmt.lower()
    for needle, kind in (("int8", "INT8"), ("fp16", "FP16"), ("half", "FP16"), ("fp32", "FP32"), ("float", "FP32"),
                         ("int32", "INT32"), ("bool", "BOOL")):
        if needle in low:
            return kind
    return "other"


def layer_rows(info: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for layer in info.get("Layers", []):
        if not isinstance(layer, dict):
            rows.append({"name": str(layer), "type": "?", "inputs": [], "outputs": []})
            continue
        rows.append({"name": str(layer.get("Name", "")), "type": str(layer.get("LayerType", "")),
                     "inputs": [_kind(f) for f in _formats(layer.get("Inputs"))],
                     "outputs": [_kind(f) for f in _formats(layer.get("Outputs"))],
                     "tactic": str(layer.get("TacticName", ""))[:120]})
    return rows


def layer_summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    by_out: dict[str, int] = {}
    by_type: dict[str, int] = {}
    for r in rows:
        k = r["outputs"][0] if r["outputs"] else "other"
        by_out[k] = by_out.get(k, 0) + 1
        by_type[r["type"]] = by_type.get(r["type"], 0) + 1
    conv = [r for r in rows if any(k in r["type"].lower() for k in ("convolution", "gemm", "matrixmultiply"))]
    conv_io: dict[str, int] = {}
    for r in conv:
        key = f"{r['inputs'][0] if r['inputs'] else '?'}->{r['outputs'][0] if r['outputs'] else '?'}"
        conv_io[key] = conv_io.get(key, 0) + 1
    return {"layers": len(rows), "by_output_type": by_out, "by_layer_type": by_type,
            "reformat_layers": sum(1 for r in rows if r["type"] == "Reformat" or "Reformat" in r["name"]),
            "conv_layers_in_to_out": conv_io}


def onnx_ops(path: Path) -> dict[str, str]:
    """ONNX node name -> op type (empty without the onnx package)."""
    try:
        import onnx

        model = onnx.load(str(path), load_external_data=False)
        return {n.name: n.op_type for n in model.graph.node}
    except Exception as e:
        log(f"cannot read node types from {path}: {err_text(e)}")
        return {}


CHECKED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul", "Add", "AveragePool", "GlobalAveragePool", "MaxPool", "Concat")


def placement_check(rows: list[dict[str, Any]], placement: dict[str, Any], ops: dict[str, str]) -> dict[str, Any]:
    """Does each Conv / Gemm / Add / pool / Concat run with INT8 inputs exactly where the
    placement expects? A node's engine layer is the layer whose name lists it (fused layers
    join names with ' + '). Weighted ops and pools are judged by their first input, an Add
    (fused into a Conv: the Conv input and the residual) by all inputs. MaxPool and Concat
    commute with Q/DQ: TensorRT moving a consumer's Q ahead of them makes them INT8 with no
    Q/DQ of their own (counted as ``int8_by_propagation``, not as a mismatch)."""
    tokens = [(r, set(t for t in re.split(r"[\s()+|,\[\]]+", r["name"]) if t)) for r in rows]
    expected = placement.get("expected_precision", {})
    per_op: dict[str, dict[str, Any]] = {}
    for node, want in expected.items():
        op = ops.get(node, "?")
        if op not in CHECKED_OPS:
            continue
        hits = [r for r, tok in tokens if node in tok and r["type"] != "Reformat"]
        stats = per_op.setdefault(op, {"expected_int8": 0, "observed_int8": 0, "agree": 0, "absent": 0,
                                       "int8_by_propagation": 0, "mismatches": []})
        stats["expected_int8"] += want == "int8"
        if not hits:
            stats["absent"] += 1
            continue
        ins = hits[0]["inputs"]
        if op == "Add":
            observed = "int8" if ins and all(k == "INT8" for k in ins) else "float"
        else:
            observed = "int8" if ins and ins[0] == "INT8" else "float"
        stats["observed_int8"] += observed == "int8"
        if observed == want:
            stats["agree"] += 1
        elif op in ("MaxPool", "Concat") and observed == "int8":  # Q moved across an op that commutes with it
            stats["int8_by_propagation"] += 1
        elif len(stats["mismatches"]) < 25:
            stats["mismatches"].append({"node": node, "expected": want, "observed": observed, "layer": hits[0]["name"],
                                        "layer_inputs": ins, "layer_outputs": hits[0]["outputs"]})
    return per_op


# -- timing -----------------------------------------------------------------------------------
def stats_ms(times: list[float], batch: int) -> dict[str, Any]:
    t = np.sort(np.asarray(times, np.float64))
    median = float(np.median(t))
    return {"iterations": int(len(t)), "median_ms": round(median, 4), "mean_ms": round(float(t.mean()), 4),
            "p90_ms": round(float(np.percentile(t, 90)), 4), "min_ms": round(float(t[0]), 4),
            "max_ms": round(float(t[-1]), 4), "throughput_per_s": round(batch / median * 1e3, 1)}


class Bound:
    """An execution context of one optimization profile with its buffers at one batch size."""

    def __init__(self, trt: Any, cuda: Cuda, engine: Any, profile: int, batch: int, stream: int) -> None:
        self.cuda, self.stream, self.batch = cuda, stream, batch
        self.context = engine.create_execution_context()
        if self.context is None:
            raise RuntimeError("TensorRT could not create an execution context (device memory?)")
        if engine.num_optimization_profiles > 1:
            self.context.set_optimization_profile_async(profile, stream)
            cuda.sync(stream)
        self.inputs, self.outputs, self.ptrs = {}, {}, []
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        for name in names:
            if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
                shape = [batch, *list(engine.get_tensor_shape(name))[1:]]
                if not self.context.set_input_shape(name, shape):
                    raise RuntimeError(f"input {name}: shape {shape} is outside profile {profile}")
                self.inputs[name] = (tuple(shape), np.dtype(trt.nptype(engine.get_tensor_dtype(name))))
        for name in names:
            if engine.get_tensor_mode(name) != trt.TensorIOMode.INPUT:
                shape = tuple(self.context.get_tensor_shape(name))
                self.outputs[name] = (shape, np.dtype(trt.nptype(engine.get_tensor_dtype(name))))
        rng = np.random.default_rng(0)
        self.addr = {}
        for name, (shape, dtype) in {**self.inputs, **self.outputs}.items():
            ptr = cuda.malloc(int(np.prod(shape)) * dtype.itemsize)
            self.ptrs.append(ptr)
            self.addr[name] = ptr
            self.context.set_tensor_address(name, ptr)
            if name in self.inputs:
                cuda.htod(ptr, rng.standard_normal(shape).astype(dtype))

    def enqueue(self) -> None:
        if not self.context.execute_async_v3(self.stream):
            raise RuntimeError("execute_async_v3 returned False")

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        for name, array in feeds.items():
            self.cuda.htod(self.addr[name], array.astype(self.inputs[name][1]))
        self.enqueue()
        self.cuda.sync(self.stream)
        out = {}
        for name, (shape, dtype) in self.outputs.items():
            out[name] = np.empty(shape, dtype)
            self.cuda.dtoh(out[name], self.addr[name])
        return out

    def close(self) -> None:
        for ptr in self.ptrs:
            self.cuda.free(ptr)
        self.ptrs = []
        self.context = None


def time_it(cuda: Cuda, stream: int, step: Callable[[], None], batch: int, args: argparse.Namespace,
            events: list[Any]) -> dict[str, Any]:
    """Warm up for ``--warmup-ms`` (at least 10 runs), then time back-to-back runs, each
    between two CUDA events on the stream, for about ``--measure-ms``."""
    for _ in range(3):
        step()
    cuda.sync(stream)
    t0, n = time.perf_counter(), 0
    while n < 10 or (time.perf_counter() - t0) * 1e3 < args.warmup_ms:
        step()
        n += 1
        if n % 10 == 0:
            cuda.sync(stream)
    cuda.sync(stream)
    per_ms = (time.perf_counter() - t0) * 1e3 / n
    iters = int(min(max(args.measure_ms / max(per_ms, 1e-3), args.min_iters), args.max_iters, len(events) // 2))
    for k in range(iters):
        cuda.record(events[2 * k], stream)
        step()
        cuda.record(events[2 * k + 1], stream)
    cuda.sync(stream)
    times = [cuda.elapsed_ms(events[2 * k], events[2 * k + 1]) for k in range(iters)]
    out = stats_ms(times, batch)
    # first start to last end over the runs: the rate the stream sustains, gaps included
    out["span_ms_per_iteration"] = round(cuda.elapsed_ms(events[0], events[2 * iters - 1]) / iters, 4)
    return out


def accuracy(bound: Bound, x: np.ndarray, ref: np.ndarray) -> dict[str, Any]:
    name = next(iter(bound.inputs))
    out_name = next(iter(bound.outputs))
    b = bound.batch
    if tuple(x.shape[1:]) != tuple(bound.inputs[name][0][1:]):
        raise ValueError(f"eval inputs are {x.shape[1:]} per sample, the engine's {name} is {bound.inputs[name][0][1:]}")
    got = []
    for k in range(0, len(x), b):
        chunk = x[k:k + b].astype(np.float32)
        n = len(chunk)
        if n < b:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], b - n, axis=0)])
        got.append(bound.run({name: chunk})[out_name][:n])
    got = np.concatenate(got).reshape(len(x), -1).astype(np.float64)
    ref = ref.reshape(len(ref), -1).astype(np.float64)[: len(got)]
    cos = (got * ref).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(ref, axis=1) + 1e-30)
    return {"samples": int(len(got)), "batch": b, "cosine_mean": float(cos.mean()), "cosine_min": float(cos.min()),
            "top1_agreement_vs_fp32_onnxruntime": float((got.argmax(1) == ref.argmax(1)).mean()),
            "max_abs_diff": float(np.abs(got - ref).max())}


# -- one variant -------------------------------------------------------------------------------
def engine_key(variant: Variant, profiles: list[tuple[int, int, int]], args: argparse.Namespace, trt_version: str,
               cache_sha: Optional[str]) -> dict[str, Any]:
    return {"variant": variant.spec, "onnx_sha256": sha256(variant.onnx), "profiles": [list(p) for p in profiles],
            "flags": variant.flags(), "tensorrt": trt_version, "workspace_mb": args.workspace_mb,
            "opt_level": args.opt_level, "cache_sha256": cache_sha if variant.implicit else None}


def run_variant(trt: Any, cuda: Cuda, logger: Any, variant: Variant, args: argparse.Namespace,
                result: dict[str, Any], save: Callable[[], None], extras: dict[str, Any]) -> None:
    res: dict[str, Any] = {"spec": variant.spec, "onnx": str(variant.onnx), "flags": variant.flags(), "errors": [],
                           "layers": {}, "latency": {}, "latency_cuda_graph": {}}
    result["variants"][variant.spec] = res
    profiles = extras["profiles"]
    safe = re.sub(r"[^A-Za-z0-9_.+-]", "_", variant.spec)
    engine_path = args.work / f"{args.name}.{safe}.engine"
    meta_path = engine_path.with_suffix(".meta.json")
    key = engine_key(variant, profiles, args, trt.__version__, extras.get("cache_sha"))
    data = None
    if args.reuse and engine_path.is_file() and meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        if meta.get("key") == key:
            data = engine_path.read_bytes()
            res["build"] = {**meta.get("build", {}), "reused_engine": str(engine_path)}
            log(f"{variant.spec}: reusing {engine_path}")
    if data is None:
        res["build"] = {"status": "building", "started_at_s": round(time.monotonic() - T0, 1)}
        save()
        log(f"{variant.spec}: building from {variant.onnx} ({'+'.join(variant.flags()) or 'FP32'}, profiles {profiles})")
        try:
            data, info = build(trt, logger, variant, profiles, extras.get("cache"), args, args.work / "timing.cache")
        except Exception as e:
            res["build"] = {"status": "failed"}
            res["errors"].append({"step": "build", "error": err_text(e), "trace": traceback.format_exc()[-3000:]})
            log(f"{variant.spec}: build failed: {err_text(e)}")
            save()
            return
        res["build"] = {"status": "built", **info}
        engine_path.write_bytes(data)
        write_json(meta_path, {"key": key, "build": res["build"]})
        log(f"{variant.spec}: built in {info['build_seconds']} s ({info['engine_bytes'] >> 20} MiB)")
    save()

    runtime = trt.Runtime(logger)
    engine = runtime.deserialize_cuda_engine(data)
    if engine is None:
        res["errors"].append({"step": "deserialize", "error": "deserialize_cuda_engine returned None"})
        save()
        return
    stream = cuda.stream()
    events = [cuda.event() for _ in range(2 * args.max_iters)]
    placement = extras["placements"].get(variant.label) if variant.label else None
    for batch in args.batches:
        profile = next(k for k, (lo, _, hi) in enumerate(profiles) if lo <= batch <= hi)
        bound = None
        try:
            bound = Bound(trt, cuda, engine, profile, batch, stream)
        except Exception as e:
            res["errors"].append({"step": f"context b{batch}", "error": err_text(e)})
            save()
            continue
        try:
            inspector = engine.create_engine_inspector()
            inspector.execution_context = bound.context
            info = json.loads(inspector.get_engine_information(trt.LayerInformationFormat.JSON), strict=False)
            rows = layer_rows(info)
            summary = layer_summary(rows)
            write_json(args.out / "layers" / f"{args.name}.{safe}.b{batch}.json", {"rows": rows, "raw": info})
            if placement is not None:
                summary["placement_check"] = placement_check(rows, placement, extras["ops"])
            elif variant.implicit and extras["placements"]:
                summary["against_placements"] = {label: placement_check(rows, p, extras["ops"])
                                                 for label, p in extras["placements"].items()}
            res["layers"][str(batch)] = summary
        except Exception as e:
            res["errors"].append({"step": f"inspect b{batch}", "error": err_text(e)})
        save()
        try:
            res["latency"][str(batch)] = time_it(cuda, stream, bound.enqueue, batch, args, events)
            log(f"{variant.spec} b{batch}: median {res['latency'][str(batch)]['median_ms']} ms")
        except Exception as e:
            res["errors"].append({"step": f"time b{batch}", "error": err_text(e)})
        save()
        if args.cuda_graph:
            graph = None
            try:
                bound.enqueue()
                cuda.sync(stream)
                graph, gexec = cuda.capture(stream, bound.enqueue)
                res["latency_cuda_graph"][str(batch)] = time_it(cuda, stream, lambda: cuda.launch(gexec, stream),
                                                                batch, args, events)
                cuda.release_graph(graph, gexec)
            except Exception as e:
                res["errors"].append({"step": f"cuda graph b{batch}", "error": err_text(e)})
            save()
        if extras.get("eval") is not None and batch == args.eval_batch:
            try:
                res["accuracy"] = accuracy(bound, *extras["eval"])
                log(f"{variant.spec}: accuracy {res['accuracy']}")
            except Exception as e:
                res["errors"].append({"step": "accuracy", "error": err_text(e)})
            save()
        bound.close()
    for event in events:
        cuda.destroy_event(event)
    cuda.destroy_stream(stream)
    del engine, runtime


def comparison(result: dict[str, Any]) -> dict[str, Any]:
    """Median latency per batch and variant, and each INT8 variant over ``implicit``."""
    out: dict[str, Any] = {}
    variants = result.get("variants", {})
    batches = sorted({int(b) for v in variants.values() for b in v.get("latency", {})})
    for b in batches:
        row: dict[str, Any] = {}
        for kind in ("latency", "latency_cuda_graph"):
            med = {name: v[kind][str(b)]["median_ms"] for name, v in variants.items() if str(b) in v.get(kind, {})}
            ratios = {}
            for name, m in med.items():
                base = "implicit+fp16" if name.endswith("+fp16") else "implicit"
                if name != base and base in med and name.startswith("explicit:"):
                    ratios[f"{name} / {base}"] = round(m / med[base], 4)
            row[kind] = {"median_ms": med, "ratio_to_implicit": ratios}
        out[str(b)] = row
    return out


def parse_pairs(items: list[str], what: str) -> dict[str, Path]:
    out = {}
    for item in items:
        label, sep, path = item.partition("=")
        if not sep or not label or not path:
            raise SystemExit(f"{what} {item!r}: use LABEL=PATH")
        out[label] = Path(path)
    return out


def from_prepared(args: argparse.Namespace) -> None:
    """Fill the file arguments not given from a bench/qdq_prepare.py folder."""
    d, name = args.prepared, args.name
    if args.fp32 is None:
        args.fp32 = d / f"{name}.onnx"
    if args.cache is None and (d / "calibration.cache").is_file():
        args.cache = d / "calibration.cache"
    given = {item.partition("=")[0] for item in args.qdq}
    for path in sorted(d.glob(f"{name}.*.qdq.onnx")):
        label = path.name[len(name) + 1: -len(".qdq.onnx")]
        if label not in given:
            args.qdq.append(f"{label}={path}")
    given = {item.partition("=")[0] for item in args.placement}
    for path in sorted(d.glob(f"{name}.*.placement.json")):
        label = path.name[len(name) + 1: -len(".placement.json")]
        if label not in given:
            args.placement.append(f"{label}={path}")
    if args.eval_inputs is None and (d / "eval_inputs.f16.npy").is_file():
        args.eval_inputs = d / "eval_inputs.f16.npy"
    if args.eval_logits is None and (d / "eval_logits.fp32.npy").is_file():
        args.eval_logits = d / "eval_logits.fp32.npy"


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--name", default="model", help="model name in file names and the JSON")
    ap.add_argument("--prepared", type=Path, help="a folder bench/qdq_prepare.py wrote (for --name): takes "
                                                 "<name>.onnx, calibration.cache, <name>.<label>.qdq.onnx and "
                                                 ".placement.json, eval_inputs.f16.npy, eval_logits.fp32.npy from it")
    ap.add_argument("--fp32", type=Path, help="the FP32 ONNX (fp16, implicit INT8)")
    ap.add_argument("--qdq", action="append", default=[], help="LABEL=Q/DQ ONNX (explicit INT8), repeatable")
    ap.add_argument("--placement", action="append", default=[], help="LABEL=placement summary JSON, repeatable")
    ap.add_argument("--cache", type=Path, help="TensorRT calibration cache (implicit INT8)")
    ap.add_argument("--variants", default="", help="comma list (default: fp16,implicit,explicit:<each --qdq label>); "
                                                  "fp32, fp16, implicit, explicit:LABEL, each optionally +fp16")
    ap.add_argument("--batches", default="1,32,256")
    ap.add_argument("--profiles", choices=("shared", "per-batch"), default="shared",
                    help="shared: one profile min..max batch, opt --opt-batch; per-batch: one profile per batch "
                         "(tactics tuned for each, builds take longer)")
    ap.add_argument("--opt-batch", type=int, default=32)
    ap.add_argument("--workspace-mb", type=int, default=4096)
    ap.add_argument("--opt-level", type=int, default=None, help="builder optimization level (TensorRT's default: 3)")
    ap.add_argument("--calib-batch", type=int, default=32, help="batch the cache's calibrator reports")
    ap.add_argument("--warmup-ms", type=float, default=500.0)
    ap.add_argument("--measure-ms", type=float, default=2000.0)
    ap.add_argument("--min-iters", type=int, default=50)
    ap.add_argument("--max-iters", type=int, default=1000)
    ap.add_argument("--no-cuda-graph", dest="cuda_graph", action="store_false")
    ap.add_argument("--eval-inputs", type=Path, help="held-out inputs (.npy) for the accuracy check")
    ap.add_argument("--eval-logits", type=Path, help="their FP32 onnxruntime logits (.npy)")
    ap.add_argument("--eval-batch", type=int, default=32)
    ap.add_argument("--out", type=Path, required=True, help="folder for the JSON and layer dumps (e.g. $OUT/qdq)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/qdqwork"), help="engines, timing cache, master JSON")
    ap.add_argument("--no-reuse", dest="reuse", action="store_false", help="rebuild engines found in --work")
    args = ap.parse_args(argv)
    if args.prepared is not None:
        from_prepared(args)
    if args.fp32 is None:
        ap.error("give --fp32 (or --prepared)")

    args.batches = [int(b) for b in args.batches.split(",") if b]
    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    qdq = parse_pairs(args.qdq, "--qdq")
    variant_specs = [v for v in args.variants.split(",") if v] or ["fp16", "implicit", *[f"explicit:{k}" for k in qdq]]
    variants = [Variant(v, qdq, args.fp32) for v in variant_specs]
    if any(v.implicit for v in variants) and args.cache is None:
        raise SystemExit("the implicit variant needs --cache (the calibration cache)")
    if args.profiles == "shared":
        opt = min(max(args.opt_batch, min(args.batches)), max(args.batches))
        profiles = [(min(args.batches), opt, max(args.batches))]
    else:
        profiles = [(b, b, b) for b in args.batches]
    if args.eval_batch not in args.batches:
        args.eval_batch = args.batches[len(args.batches) // 2]

    import tensorrt as trt

    cuda = Cuda()
    logger = make_logger(trt)
    master = args.work / f"{args.name}.qdq_gpu.json"
    result: dict[str, Any] = json.loads(master.read_text()) if master.is_file() else {}
    if result.get("schema") != SCHEMA or result.get("model") != args.name:
        result = {"schema": SCHEMA, "model": args.name, "variants": {}}
    result.update(tensorrt=trt.__version__, python=platform.python_version(), numpy=np.__version__,
                  device=cuda.device(), host=platform.node())
    runs = result.setdefault("runs", [])
    runs.append({"argv": sys.argv[1:], "started": time.strftime("%Y-%m-%dT%H:%M:%S")})
    result["settings"] = {"batches": args.batches, "profiles": [list(p) for p in profiles], "profile_mode": args.profiles,
                          "workspace_mb": args.workspace_mb, "opt_level": args.opt_level,
                          "timing": "CUDA events around each execute_async_v3 (and each CUDA graph replay) on one "
                                    "non-blocking stream, back to back, after a warm-up; median over the iterations",
                          "warmup_ms": args.warmup_ms, "measure_ms": args.measure_ms}
    out_json = args.out / f"{args.name}.qdq_gpu.json"

    def save() -> None:
        result["comparison"] = comparison(result)
        result["elapsed_s_this_run"] = round(time.monotonic() - T0, 1)
        write_json(master, result)
        write_json(out_json, result)

    extras: dict[str, Any] = {"profiles": profiles, "placements": {}, "ops": {}}
    try:
        extras["placements"] = {k: json.loads(p.read_text()) for k, p in parse_pairs(args.placement, "--placement").items()}
        if extras["placements"]:
            extras["ops"] = onnx_ops(args.fp32)
        if args.cache is not None:
            extras["cache"], result["cache"] = prepare_cache(args.cache, trt.__version__)
            extras["cache_sha"] = result["cache"]["sha256"]
        if args.eval_inputs and args.eval_logits:
            extras["eval"] = (np.load(args.eval_inputs), np.load(args.eval_logits))
    except Exception as e:
        result.setdefault("errors", []).append({"step": "inputs", "error": err_text(e)})
        log(f"inputs: {err_text(e)}")
    result["inputs"] = {"fp32": {"path": str(args.fp32), "sha256": sha256(args.fp32)},
                        **{f"qdq:{k}": {"path": str(p), "sha256": sha256(p)} for k, p in qdq.items()}}
    save()
    for variant in variants:
        try:
            run_variant(trt, cuda, logger, variant, args, result, save, extras)
        except Exception as e:  # anything the per-step blocks did not catch
            result["variants"].setdefault(variant.spec, {}).setdefault("errors", []).append(
                {"step": "variant", "error": err_text(e), "trace": traceback.format_exc()[-3000:]})
            log(f"{variant.spec}: {err_text(e)}")
        save()
    runs[-1]["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    save()
    log(f"wrote {out_json}")
    print(json.dumps(result["comparison"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
