"""Calibration throughput: histogram collection variants, each in a fresh process.

    python bench/calibration_speed.py [--models resnet18] [--variants a,b] [--repeats 2]
                                      [--samples 512] [--with-ort] [--append] [--out JSON]

Models are built in code: torchvision's ResNet-18 / ResNet-50 with ``torch.manual_seed(0)``
random weights (``weights=None``, nothing downloaded), exported to ONNX (opset 17,
dynamic batch). Inputs are real photos: random crops and flips of scikit-image's sample
images, resized to 224x224 and ImageNet-normalized (``calibration_vs_ort._photo_samples``;
for ResNet-18 the very images of the TensorRT fixture). Batches of 32, in file order,
from a memory-mapped ``calib.npy``, as the calibrate stage feeds them.

Each variant runs the collection (``collect_histograms``, then the entropy search under
both rule sets, as the calibrate stage does after collecting) in its own Python process; the parent
measures wall time and the child's peak RSS (``os.wait4``), the child reports its CPU
time and where the time went, and a SHA-256 over every histogram (counts, width,
max|x|, values seen, top edge). ``before`` is the implementation of commit 9b9dfe4
(its ``collect.py`` and ``histogram.py`` taken from git), the reference the others must
equal bit for bit (``identical_to_before``), under both growth rules.

Variants (``--variants``; see VARIANTS): kernel numpy vs the compiled one, 1 vs all
cores binning, sequential vs pipelined (onnxruntime on the next batch while this one is
binned), binning in worker processes through shared memory (the parent's CPU time only:
the workers are not its children), Relu outputs fetched instead of derived, onnxruntime's
arena and thread spinning. ``--with-ort`` also runs onnxruntime's ``quantize_static``
(entropy) through ``bench/calibration_vs_ort.py``'s worker, for the speed ratio.
Results: ``bench/results/calibration_speed_cpu.json`` (``--append`` merges into it).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEFAULT_OUT = ROOT / "bench" / "results" / "calibration_speed_cpu.json"
DEFAULT_WORK = Path("/tmp/trtpipe-bench-calibration-speed")
BEFORE_COMMIT = "9b9dfe4"
BATCH = 32
MODELS = ("resnet18", "resnet50")

# name -> collector options (None: the commit-9b9dfe4 implementation with its defaults).
VARIANTS: dict[str, Any] = {
    "before": None,
    "numpy_1thread": {"kernel": "numpy", "histogram_threads": 1},
    "numpy_threads": {"kernel": "numpy"},
    "native_1thread": {"kernel": "native", "histogram_threads": 1},
    "native_threads": {"kernel": "native"},  # the defaults: sequential, every core for each phase
    "native_threads_no_derive": {"kernel": "native", "derive": False},  # Relu outputs fetched from onnxruntime
    "native_threads_pipelined": {"kernel": "native", "pipeline": True},
    "native_1thread_pipelined_ort_cores-1": {"kernel": "native", "pipeline": True, "histogram_threads": 1,
                                             "threads": "cores-1"},
    "native_threads_ort_spinning": {"kernel": "native", "ort_options": {"session.intra_op.allow_spinning": "1"}},
    "native_threads_ort_arena_off": {"kernel": "native", "ort_options": {"enable_cpu_mem_arena": False}},
    # The floor: onnxruntime alone on the plain model (nothing exposed, nothing binned).
    "ort_inference_only": {"inference_only": True},
    "numpy_processes": {"kernel": "numpy", "processes": True},
    "native_processes": {"kernel": "native", "processes": True},
}
DEFAULT_VARIANTS = [v for v in VARIANTS]


# -- inputs (child process: torch stays out of the measured processes) ------------------------------
def prepare(model_name: str, folder: Path, samples: int) -> dict[str, Any]:
    import torch
    import torchvision

    from bench.calibration_vs_ort import _photo_samples

    folder.mkdir(parents=True, exist_ok=True)
    calib = _photo_samples(samples, seed=0)
    np.save(folder / "calib.npy", calib)
    torch.manual_seed(0)
    model = getattr(torchvision.models, model_name)(weights=None).eval()
    torch.onnx.export(model, torch.from_numpy(calib[:1]), str(folder / "model.onnx"), input_names=["input"],
                      output_names=["logits"], dynamic_axes={"input": {0: "b"}, "logits": {0: "b"}},
                      opset_version=17, dynamo=False)
    meta = {"model": model_name, "input_shape": [3, 224, 224], "calibration": samples}
    (folder / "meta.json").write_text(json.dumps(meta))
    return meta


def before_tree(work: Path) -> Path:
    """A folder holding a ``calibration`` package: the working tree's, with ``collect.py``
    and ``histogram.py`` as they were at BEFORE_COMMIT."""
    folder = work / f"before-{BEFORE_COMMIT}"
    if not (folder / "calibration" / "collect.py").is_file():
        tmp = work / "before.partial"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(ROOT / "calibration", tmp / "calibration",
                        ignore=shutil.ignore_patterns("__pycache__"))
        for name in ("collect.py", "histogram.py"):
            text = subprocess.run(["git", "show", f"{BEFORE_COMMIT}:calibration/{name}"], cwd=ROOT, check=True,
                                  capture_output=True, text=True).stdout
            (tmp / "calibration" / name).write_text(text)
        shutil.rmtree(folder, ignore_errors=True)
        tmp.rename(folder)
    return folder


# -- binning in worker processes (measured variant, not part of the library) --------------------------
class ProcessBinner:
    """The BatchBinner interface with the counts computed in worker processes: each batch's
    activations are copied into one shared-memory block, pieces are binned by the workers."""

    def __init__(self, kernel_name: str, processes: int) -> None:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        from calibration.binning import BatchBinner
        from calibration.kernels import CpuKernel

        self._ranges = BatchBinner(CpuKernel(kernel_name), processes)  # ranges: threads (cheap)
        self._pool = ProcessPoolExecutor(processes, mp_context=mp.get_context("forkserver"),
                                         initializer=_worker_init, initargs=(kernel_name,))
        self._shm: Any = None
        self.copy_seconds = 0.0

    def ranges(self, arrays: list[np.ndarray]) -> list[tuple[float, float]]:
        return self._ranges.ranges(arrays)

    def counts(self, jobs: list[tuple[np.ndarray, Any, bool]]) -> list[np.ndarray]:
        from multiprocessing import shared_memory

        from calibration.binning import BIN_TASK, _pieces

        unique = {id(flat): flat for flat, _, _ in jobs}  # a Relu output is binned from its input's array
        total = sum(flat.nbytes for flat in unique.values())
        if self._shm is None or self._shm.size < total:
            if self._shm is not None:
                self._shm.close()
                self._shm.unlink()
            self._shm = shared_memory.SharedMemory(create=True, size=max(total, 1))
        t0 = time.perf_counter()
        offsets, offset = {}, 0
        for key, flat in unique.items():
            np.frombuffer(self._shm.buf, dtype=flat.dtype, count=flat.size, offset=offset)[:] = flat
            offsets[key] = offset
            offset += flat.nbytes
        calls, owner, plans = [], [], []
        for k, (flat, plan, positive) in enumerate(jobs):
            for a, b in _pieces(flat.size, BIN_TASK):
                calls.append((self._shm.name, offsets[id(flat)] + a * flat.itemsize, b - a, flat.dtype.str, plan.width,
                              plan.num_bins, positive))
                owner.append(k)
            plans.append(plan)
        jobs.clear()
        unique.clear()
        self.copy_seconds += time.perf_counter() - t0
        totals = [np.zeros(p.num_bins, np.int64) for p in plans]
        for k, c in zip(owner, self._pool.map(_worker_counts, calls, chunksize=4)):
            totals[k] += c
        return totals

    def __enter__(self) -> "ProcessBinner":
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def shutdown(self) -> None:
        self._pool.shutdown()
        self._ranges.close()
        if self._shm is not None:
            self._shm.close()
            self._shm.unlink()


_WORKER: dict[str, Any] = {}


def _worker_init(kernel_name: str) -> None:
    from calibration.kernels import CpuKernel

    _WORKER["kernel"] = CpuKernel(kernel_name)
    _WORKER["shm"] = {}


def _worker_counts(args: tuple[str, int, int, str, float, int, bool]) -> np.ndarray:
    from multiprocessing import resource_tracker, shared_memory

    name, offset, count, dtype, width, num_bins, positive = args
    shm = _WORKER["shm"].get(name)
    if shm is None:
        shm = _WORKER["shm"][name] = shared_memory.SharedMemory(name=name)
        try:  # the parent owns the block
            resource_tracker.unregister(shm._name, "shared_memory")  # type: ignore[attr-defined]
        except Exception:
            pass
    flat = np.frombuffer(shm.buf, dtype=np.dtype(dtype), count=count, offset=offset)
    return _WORKER["kernel"].counts(flat, width, num_bins, positive)


# -- the measured worker ------------------------------------------------------------------------------
def histogram_digest(histograms: dict[str, Any]) -> str:
    h = hashlib.sha256()
    for name in sorted(histograms):
        hist = histograms[name]
        h.update(name.encode())
        h.update(np.ascontiguousarray(hist.counts, dtype=np.int64).tobytes())
        h.update(np.array([hist.bin_width, hist.max_abs, float(hist.edges[-1]) if hist.num_bins else 0.0],
                          np.float64).tobytes())
        h.update(str(int(hist.num_samples)).encode())
    return h.hexdigest()


def worker(case_dir: Path, variant: str, growth: str, samples: int) -> dict[str, Any]:
    options = VARIANTS[variant]
    if options is None:
        sys.path.insert(0, str(before_tree(case_dir.parent)))
    import calibration.collect as collect_mod
    from calibration.rules import RULES, ranges_under

    t_start = time.perf_counter()
    cpu_start = time.process_time()
    x = np.load(case_dir / "calib.npy", mmap_mode="r")
    n = (min(samples, len(x)) // BATCH) * BATCH
    batches = (np.ascontiguousarray(x[i:i + BATCH]) for i in range(0, n, BATCH))
    if options is not None and options.get("inference_only"):
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = collect_mod.available_cores()
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        session = ort.InferenceSession(str(case_dir / "model.onnx"), so, providers=["CPUExecutionProvider"])
        t_run = time.perf_counter()
        for batch in batches:
            session.run(None, {"input": batch})
        t_end = time.perf_counter()
        return {"variant": variant, "growth": growth, "options": options,
                "seconds_in_process": round(t_end - t_start, 3), "seconds_inference": round(t_end - t_run, 3),
                "cpu_seconds": round(time.process_time() - cpu_start, 3),
                "seconds_histogram": 0.0, "batches": n // BATCH, "digest": None}
    kwargs: dict[str, Any] = {"growth": growth, "progress": False, "total": n // BATCH, "source": "calib.npy"}
    binner = None
    if options is not None:
        kwargs.update({k: v for k, v in options.items() if k != "processes"})
        if kwargs.get("threads") == "cores-1":
            kwargs["threads"] = max(1, collect_mod.available_cores() - 1)
        if options.get("processes"):
            binner = ProcessBinner(options["kernel"], collect_mod.available_cores())
            real = collect_mod.ActivationCollector._binner
            collect_mod.ActivationCollector._binner = lambda self: binner  # type: ignore[method-assign]
    collector = collect_mod.collect_histograms(case_dir / "model.onnx", batches, **kwargs)
    t_collect = time.perf_counter()
    rules = next(r for r in RULES.values() if r.growth == growth)
    ranges_under(rules, collector.histograms, "entropy", collector.node_ops)
    t_end = time.perf_counter()
    stats = collector.stats
    out = {"variant": variant, "growth": growth, "options": options,
           "seconds_in_process": round(t_end - t_start, 3), "seconds_collect": round(t_collect - t_start, 3),
           "seconds_search": round(t_end - t_collect, 3), "cpu_seconds": round(time.process_time() - cpu_start, 3),
           "seconds_session": round(stats.seconds_session, 3),
           "seconds_inference_wait": round(stats.seconds_inference, 3),
           "seconds_histogram": round(stats.seconds_histogram, 3), "batches": stats.batches, "samples": stats.samples,
           "tensors": len(collector.histograms),
           "values": int(sum(h.num_samples for h in collector.histograms.values())),
           "intra_op_threads": stats.intra_op_threads, "pipelined": stats.pipelined,
           "histogram_threads": getattr(stats, "histogram_threads", 1), "kernel": getattr(stats, "kernel", "numpy"),
           "digest": histogram_digest(collector.histograms)}
    if binner is not None:
        out["seconds_copy_to_shared_memory"] = round(binner.copy_seconds, 3)
        binner.shutdown()
        collect_mod.ActivationCollector._binner = real  # type: ignore[method-assign]
    return out


# -- driver ---------------------------------------------------------------------------------------------
def run_child(args: list[str], log: Path) -> dict[str, Any]:
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), *args], stdout=fh,
                                stderr=subprocess.STDOUT, cwd=ROOT)
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(args)} failed; see {log}:\n{log.read_text()[-3000:]}")
    return {"wall_s": round(wall, 3), "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),
            "child_cpu_s": round(usage.ru_utime + usage.ru_stime, 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="resnet18")
    ap.add_argument("--variants", default=",".join(DEFAULT_VARIANTS))
    ap.add_argument("--growth", default="append,double")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--samples", type=int, default=512)
    ap.add_argument("--work", type=Path, default=DEFAULT_WORK)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--with-ort", action="store_true")
    ap.add_argument("--append", action="store_true", help="merge into an existing --out instead of replacing it")
    ap.add_argument("--prepare", choices=MODELS)
    ap.add_argument("--worker")
    ap.add_argument("--ort", action="store_true")
    ap.add_argument("--case-dir", type=Path)
    ap.add_argument("--result", type=Path)
    a = ap.parse_args()

    if a.prepare:
        prepare(a.prepare, a.case_dir, a.samples)
        return
    if a.worker:
        variant, growth = a.worker.rsplit("@", 1)
        a.result.write_text(json.dumps(worker(a.case_dir, variant, growth, a.samples)))
        return
    if a.ort:
        from bench.calibration_vs_ort import worker_ort

        a.result.write_text(json.dumps(worker_ort(a.case_dir, a.case_dir / "ort")))
        return

    import onnxruntime

    results: dict[str, Any] = json.loads(a.out.read_text()) if a.append and a.out.is_file() else {}
    results.update({
        "what": "histogram collection for INT8 calibration (collect_histograms + entropy search), each variant "
                "in a fresh process; wall and peak RSS measured by the parent (os.wait4), batches of 32",
        "machine": {"cpu": _cpu_name(), "cores": os.cpu_count(), "python": platform.python_version(),
                    "numpy": np.__version__, "onnxruntime": onnxruntime.__version__},
        "notes": [
            "wall_s and peak_rss_mb: the child process as its parent saw it (os.wait4); child_cpu_s its user+sys "
            "CPU time; load_average_1min_at_start says how busy the machine was (other jobs share its cores: "
            "when they do, wall_s approaches child_cpu_s, since one core does the work of two)",
            "seconds_histogram: binning (ranges and counts) as the collector timed it; "
            "seconds_inference_wait: waiting for onnxruntime (all of its time when not pipelined)",
            "*_processes variants: child_cpu_s excludes the worker processes (they are not the child's children)",
            "ort_quantize_static: onnxruntime's whole quantize_static (calibration and its Q/DQ model) against our "
            "collection plus entropy search (the calibrate stage adds its Q/DQ export, ~0.6 s for ResNet-18)",
            "ort_inference_only: the plain model in onnxruntime, nothing exposed or binned: the floor for any "
            "collection that runs the FP32 model on the CPU",
        ],
    })
    results.setdefault("models", {})
    for model in a.models.split(","):
        case = a.work / model
        if not (case / "meta.json").is_file():
            print(f"[{model}] preparing ...", flush=True)
            run_child(["--prepare", model, "--case-dir", str(case), "--samples", str(a.samples)],
                      a.work / f"{model}-prepare.log")
        entry = results["models"].setdefault(model, {"variants": {}})
        entry["meta"] = json.loads((case / "meta.json").read_text())
        entry["samples"] = a.samples
        for variant in [v for v in a.variants.split(",") if v]:  # --variants "" with --with-ort: onnxruntime only
            for growth in a.growth.split(","):
                runs = []
                for r in range(a.repeats):
                    result = case / f"{variant}@{growth}.json"
                    load = os.getloadavg()[0]
                    measured = run_child(["--worker", f"{variant}@{growth}", "--case-dir", str(case),
                                          "--samples", str(a.samples), "--result", str(result)],
                                         a.work / f"{model}-{variant}-{growth}.log")
                    inner = json.loads(result.read_text())
                    runs.append({**measured, "load_average_1min_at_start": round(load, 2), **inner})
                    print(f"[{model}] {variant}@{growth} run {r + 1}: wall {measured['wall_s']} s, "
                          f"peak {measured['peak_rss_mb']} MB, cpu {measured['child_cpu_s']} s, "
                          f"histogram {inner['seconds_histogram']} s", flush=True)
                best = min(runs, key=lambda m: m["wall_s"])
                entry["variants"][f"{variant}@{growth}"] = {**best, "runs": [
                    {k: m[k] for k in ("wall_s", "peak_rss_mb", "child_cpu_s", "load_average_1min_at_start",
                                       "seconds_histogram")} for m in runs]}
                a.out.parent.mkdir(parents=True, exist_ok=True)
                a.out.write_text(json.dumps(results, indent=2) + "\n")
        digests = {k: v["digest"] for k, v in entry["variants"].items()}
        for key, v in entry["variants"].items():
            ref = digests.get(f"before@{v['growth']}")
            v["identical_to_before"] = None if ref is None or v["digest"] is None else v["digest"] == ref
        if a.with_ort:
            measured = run_child(["--ort", "--case-dir", str(case), "--result", str(case / "ort.json")],
                                 a.work / f"{model}-ort.log")
            entry["ort_quantize_static"] = {**measured, **json.loads((case / "ort.json").read_text())}
            print(f"[{model}] onnxruntime quantize_static: {measured}", flush=True)
        a.out.write_text(json.dumps(results, indent=2) + "\n")
    results["summary"] = summarize(results)
    a.out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results["summary"], indent=2))
    print("wrote", a.out)


def summarize(results: dict[str, Any]) -> dict[str, Any]:
    """Per model and growth rule: the commit-9b9dfe4 implementation against the defaults
    (``native_threads``), the onnxruntime-only floor, and whether every variant's
    histograms equal the old ones."""
    out: dict[str, Any] = {}
    for model, entry in results.get("models", {}).items():
        variants = entry.get("variants", {})
        floor = variants.get("ort_inference_only@append")
        for growth in ("append", "double"):
            before, after = variants.get(f"before@{growth}"), variants.get(f"native_threads@{growth}")
            if not (before and after):
                continue
            row = {"before_wall_s": before["wall_s"], "after_wall_s": after["wall_s"],
                   "before_cpu_s": before["child_cpu_s"], "after_cpu_s": after["child_cpu_s"],
                   "before_peak_rss_mb": before["peak_rss_mb"], "after_peak_rss_mb": after["peak_rss_mb"],
                   "before_histogram_s": before["seconds_histogram"], "after_histogram_s": after["seconds_histogram"],
                   "speedup_wall": round(before["wall_s"] / after["wall_s"], 2),
                   "all_variants_identical_to_before": all(
                       v.get("identical_to_before") in (True, None) for k, v in variants.items()
                       if k.endswith("@" + growth)),
                   "variants_compared": sorted(k for k, v in variants.items()
                                               if k.endswith("@" + growth) and v.get("identical_to_before"))}
            if floor:
                row["onnxruntime_alone_wall_s"] = floor["wall_s"]
                row["onnxruntime_alone_cpu_s"] = floor["child_cpu_s"]
            ort = entry.get("ort_quantize_static")
            if ort:
                row["ort_quantize_static_wall_s"] = ort["wall_s"]
                row["ort_quantize_static_peak_rss_mb"] = ort["peak_rss_mb"]
                row["speedup_vs_ort_quantize_static"] = round(ort["wall_s"] / after["wall_s"], 2)
            out[f"{model}@{growth}"] = row
    return out


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


if __name__ == "__main__":
    main()
