"""INT8 calibration against a plain onnxruntime FP32 forward over the same samples, on this CPU.

    flock /tmp/trtpipe-heavy.lock python bench/calibration_cpu_ratio.py [--variants stage,...] [--repeats 3]
                                       [--before COMMIT] [--samples 512] [--work DIR] [--out JSON]

The goal (issue "INT8 that pays off", item 3, CPU part): calibration within 2x of a
plain onnxruntime FP32 forward over the same samples, measured in the same run.

Model and data: torchvision's ResNet-18 with ``torch.manual_seed(0)`` random weights
(nothing downloaded), exported with ``torch.onnx.export`` (opset 17, dynamic batch);
512 real photos: random crops and flips of scikit-image's sample photos, resized to
224x224 and ImageNet-normalised (``calibration_vs_ort._photo_samples``, the TensorRT
fixture's images), stored as the ``calib.npz`` prepare writes, fed in batches of 32.

Each measurement runs in its own fresh Python process (torch stays out of them), and
the kinds alternate within every repeat so that background load hits them alike:

* ``ort``: the plain FP32 forward as a user runs it: ``onnxruntime.InferenceSession``
  with the default graph optimizations (ORT_ENABLE_ALL) and default options, the same
  intra-op threads as the collector (every core), the same 16 batches from the same
  ``calib.npz`` through the same batch iterator. ``forward_s`` is the 16 ``run`` calls;
  ``session_s`` the session creation.
* ``stage``: the calibrate stage's own function (``pipeline.stages.calibrate.calibrate``)
  with the stage's default settings (entropy, ``rules: tensorrt``, 2048 bins, 512
  samples, batches of 32). ``calibration_s`` = collection (session creation,
  inference, histograms) + range search, from the stage's own timers; the stage then
  writes the cache and the Q/DQ ONNX (``qdq_s``, reported, not part of the ratio).
* ``collector:<variant>``: what the stage calls (``collect_histograms`` with the stage's
  arguments, then ``ranges_under`` with the tensorrt rules and entropy), with the
  collector options of :data:`VARIANTS`; these say where the time goes and what a
  setting changes. Each reports a SHA-256 over every histogram and over the ranges:
  every variant must equal the stage's ranges (``identical``).

``--before COMMIT`` adds ``before:stage``: the same stage worker run by the code of COMMIT
(extracted with ``git archive``, this script copied in), in the same repeats, so that before
and after are measured side by side; its ranges are the reference every other kind must
give bit for bit (``identical_ranges_to_before:stage``).

Every worker imports onnx and onnxruntime before its timers start (a process's fixed
cost, ~0.5 s for onnx on a cold start, is no part of either side).

``ratio`` = calibration_s / forward_s of the same repeat (the plain forward's session
creation is left out of its time, the calibration's is counted: the stricter reading);
the summary gives the median over repeats and the best calibration over the best
forward. The CPU's model and flags come from ``calibration.ort_session.cpu_features``.
Results: ``bench/results/calibration_cpu_ratio_resnet18_<cpu>.json``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEFAULT_WORK = Path("/tmp/trtpipe-bench-calibration-cpu-ratio")
BATCH = 32

#: collector options per variant (on top of the stage's arguments); see the module docstring.
VARIANTS: dict[str, dict[str, Any]] = {
    "default": {},
    "numpy_kernel": {"kernel": "numpy"},
    "no_derive": {"derive": False},
    "pipelined": {"pipeline": True},
    "pipelined_hist1": {"pipeline": True, "histogram_threads": 1},  # onnxruntime on every core, binning on one
    "pipelined_ort1_hist1": {"pipeline": True, "threads": 1, "histogram_threads": 1},  # one core each
    "sequential": {"pipeline": False},
    "inference_only": {"_inference_only": True},  # the exposed graph run, nothing binned
}


# -- inputs (child process) ----------------------------------------------------------------------
def prepare(folder: Path, samples: int) -> dict[str, Any]:
    import torch
    import torchvision

    from bench.calibration_vs_ort import _export, _photo_samples

    folder.mkdir(parents=True, exist_ok=True)
    calib = _photo_samples(samples, seed=0)
    np.savez(folder / "calib.npz", input=calib)
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).eval()
    _export(model, calib[:1], folder / "model.onnx")
    meta = {"model": "torchvision resnet18 (torch.manual_seed(0), weights=None)", "input_shape": [3, 224, 224],
            "samples": samples, "batch_size": BATCH, "opset": 17, "dynamic_batch": True,
            "images": "calibration_vs_ort._photo_samples(seed=0): crops/flips of skimage.data photos, 224x224, "
                      "ImageNet-normalised"}
    (folder / "meta.json").write_text(json.dumps(meta))
    return meta


def stage_config(samples: int) -> Any:
    """The digits config with ResNet-18's input and the stage's default calibration settings."""
    from pipeline.config import CalibrationConfig, TensorSpec, load_config

    cfg = load_config(ROOT / "configs" / "digits.yaml", params_path=ROOT / "no-params.yaml")
    model = cfg.model.model_copy(update={"inputs": [TensorSpec(name="input", shape=[3, 224, 224], dtype="float32")],
                                         "num_classes": 1000})
    return cfg.model_copy(update={"model": model, "calibration": CalibrationConfig(num_samples=samples,
                                                                                   batch_size=BATCH)})


def _batches(case: Path, cfg: Any) -> tuple[Any, int]:
    """The stage's batches: load_samples + calibration_indices + calibration_batches."""
    from pipeline.data import calibration_batches, calibration_indices, load_samples

    c = cfg.calibration
    samples = load_samples(case / "calib.npz", cfg.model.inputs, cfg.data.labels_key, "calibration data")
    indices = calibration_indices(len(samples), c.num_samples, c.seed)
    return calibration_batches(samples.x, indices, c.batch_size, str(case / "calib.npz")), len(indices) // c.batch_size


def _digest(items: Any) -> str:
    h = hashlib.sha256()
    for item in items:
        h.update(repr(item).encode() if not isinstance(item, np.ndarray) else item.tobytes())
    return h.hexdigest()[:16]


def histogram_digest(histograms: dict[str, Any]) -> str:
    return _digest(x for n in sorted(histograms) for x in (
        n, histograms[n].counts, histograms[n].bin_width, histograms[n].max_abs, histograms[n].num_samples))


def ranges_digest(amax: dict[str, float]) -> str:
    return _digest((n, float(amax[n]).hex()) for n in sorted(amax))


# -- measured workers (child processes) ---------------------------------------------------------
def worker_ort(case: Path, samples: int) -> dict[str, Any]:
    import onnxruntime as ort

    from calibration.collect import available_cores

    cfg = stage_config(samples)
    batches, n = _batches(case, cfg)
    so = ort.SessionOptions()  # defaults: ORT_ENABLE_ALL, arena and memory pattern on, spinning on
    so.intra_op_num_threads = available_cores()  # the collector's threads
    t0 = time.perf_counter()
    session = ort.InferenceSession(str(case / "model.onnx"), so, providers=["CPUExecutionProvider"])
    t1 = time.perf_counter()
    per_batch = []
    for batch in batches:
        b0 = time.perf_counter()
        session.run(None, batch)
        per_batch.append(time.perf_counter() - b0)
    t2 = time.perf_counter()
    return {"session_s": round(t1 - t0, 3), "forward_s": round(t2 - t1, 3), "batches": n,
            "first_batch_s": round(per_batch[0], 3), "median_batch_s": round(statistics.median(per_batch), 4),
            "intra_op_threads": so.intra_op_num_threads,
            "graph_optimization_level": str(so.graph_optimization_level)}


def worker_stage(case: Path, samples: int) -> dict[str, Any]:
    from pipeline.stages import calibrate

    cfg = stage_config(samples)
    out = case / f"stage_out_{ROOT.name}"  # the --before tree's stage writes elsewhere
    t0 = time.perf_counter()
    report = calibrate.calibrate(cfg, case / "model.onnx", case / "calib.npz", out, progress=False)
    wall = time.perf_counter() - t0
    s = report.seconds
    ranges = json.loads((out / "ranges.json").read_text())
    amax = {n: v["amax"] for n, v in ranges["tensors"].items()}
    return {"calibration_s": round(s["collect"] + s["search"], 3), "session_s": s["session"],
            "inference_s": s["inference"], "histogram_s": s["histogram"], "search_s": s["search"],
            "collect_s": s["collect"], "qdq_s": s["qdq"], "stage_total_s": s["total"], "stage_wall_s": round(wall, 3),
            "tensors": report.tensors, "samples": report.samples, "batches": report.batches,
            "collect": report.collect, "settings": {k: report.settings[k] for k in (
                "method", "rules", "histogram_growth", "amax_bin_offset", "num_bins", "batch_size")},
            "peak_rss_mb_self": report.peak_rss_mb, "ranges_digest": ranges_digest(amax)}


def worker_collector(case: Path, samples: int, variant: str) -> dict[str, Any]:
    from calibration.collect import collect_histograms
    from calibration.rules import get_rules, ranges_under

    options = dict(VARIANTS[variant])
    cfg = stage_config(samples)
    c = cfg.calibration
    rules = get_rules(c.rules)
    batches, n = _batches(case, cfg)
    if options.pop("_inference_only", False):  # the exposed session alone: inference, nothing binned
        from calibration.collect import ActivationCollector

        t0 = time.perf_counter()
        col = ActivationCollector(case / "model.onnx", num_bins=c.num_bins, growth=rules.growth)
        t1 = time.perf_counter()
        for batch in batches:
            col._run(col._feeds(batch), "")
        t2 = time.perf_counter()
        return {"calibration_s": round(t2 - t0, 3), "session_s": round(t1 - t0, 3), "inference_s": round(t2 - t1, 3),
                "histogram_s": 0.0, "search_s": 0.0, "exposed": len(col._outputs)}
    t0 = time.perf_counter()
    col = collect_histograms(case / "model.onnx", batches, total=n, progress=False, num_bins=c.num_bins,
                             growth=rules.growth, source=str(case / "calib.npz"), exclude=c.exclude,
                             sentinel_abs=c.sentinel_abs, **{"threads": None, **options})
    t1 = time.perf_counter()
    amax, _, _ = ranges_under(rules, col.histograms, c.method, col.node_ops, c.percentile, bounds={})
    t2 = time.perf_counter()
    st = col.stats
    return {"calibration_s": round(t2 - t0, 3), "collect_s": round(t1 - t0, 3),
            "session_s": round(st.seconds_session, 3), "inference_s": round(st.seconds_inference, 3),
            "histogram_s": round(st.seconds_histogram, 3), "search_s": round(t2 - t1, 3),
            "tensors": len(col.histograms), "samples": st.samples, "pipelined": st.pipelined,
            "intra_op_threads": st.intra_op_threads, "histogram_threads": st.histogram_threads, "kernel": st.kernel,
            "histogram_digest": histogram_digest(col.histograms), "ranges_digest": ranges_digest(amax)}


# -- driver ----------------------------------------------------------------------------------------
def run_child(args: list[str], log: Path, root: Path = ROOT) -> dict[str, Any]:
    """This script (its copy under ``root``: another tree's code) as a child process."""
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.Popen([sys.executable, str(root / "bench" / Path(__file__).name), *args], stdout=fh,
                                stderr=subprocess.STDOUT, cwd=root)
        _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(args)} failed; see {log}:\n{log.read_text()[-3000:]}")
    return {"process_wall_s": round(time.perf_counter() - t0, 3), "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),
            "process_cpu_s": round(usage.ru_utime + usage.ru_stime, 3)}


def before_tree(commit: str, work: Path) -> Path:
    """The repository's files at ``commit`` (git archive) with this script copied in."""
    import shutil

    sha = subprocess.run(["git", "rev-parse", "--short", commit], cwd=ROOT, check=True, capture_output=True,
                         text=True).stdout.strip()
    folder = work / f"before-{sha}"
    if not (folder / "calibration").is_dir():
        partial = work / f"before-{sha}.partial"
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        archive = subprocess.run(["git", "archive", sha], cwd=ROOT, check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(partial)], input=archive, check=True)
        partial.rename(folder)
    (folder / "bench").mkdir(exist_ok=True)
    shutil.copy2(Path(__file__).resolve(), folder / "bench" / Path(__file__).name)
    return folder


def _cpu_slug(model: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", model.lower()).strip("-") or "cpu"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", default="stage", help="stage and/or collector:<name> of VARIANTS, comma-separated")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--samples", type=int, default=512)
    ap.add_argument("--work", type=Path, default=DEFAULT_WORK)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--label", default="", help="a word for what this run measures (e.g. before, after)")
    ap.add_argument("--before", default=None, metavar="COMMIT",
                    help="also measure the stage as it was at COMMIT (variant 'before:stage'): its tree is extracted "
                         "with git archive and runs this script's workers in the same repeats")
    ap.add_argument("--prepare", action="store_true")
    ap.add_argument("--worker")
    ap.add_argument("--result", type=Path)
    a = ap.parse_args()
    case = a.work / "resnet18"

    if a.prepare:
        prepare(case, a.samples)
        return
    if a.worker:
        import importlib

        for module in ("onnx", "onnxruntime"):  # before any timer, in every worker alike (a process's fixed cost)
            importlib.import_module(module)

        if a.worker == "ort":
            res = worker_ort(case, a.samples)
        elif a.worker == "stage":
            res = worker_stage(case, a.samples)
        else:
            res = worker_collector(case, a.samples, a.worker.split(":", 1)[1])
        a.result.write_text(json.dumps(res))
        return

    import onnxruntime

    from calibration.ort_session import cpu_features

    cpu = cpu_features()
    out = a.out or ROOT / "bench" / "results" / f"calibration_cpu_ratio_resnet18_{_cpu_slug(cpu['model'])}.json"
    a.work.mkdir(parents=True, exist_ok=True)
    if not (case / "meta.json").is_file():
        print("preparing ResNet-18 and the photos ...", flush=True)
        run_child(["--prepare", "--samples", str(a.samples), "--work", str(a.work)], a.work / "prepare.log")
    kinds = ["ort"] + [v for v in a.variants.split(",") if v]
    before_root = None
    if a.before:
        before_root = before_tree(a.before, a.work)
        kinds.insert(1, "before:stage")
    for k in kinds[1:]:
        if k not in ("stage", "before:stage") and not (k.startswith("collector:") and k.split(":", 1)[1] in VARIANTS):
            raise SystemExit(f"unknown variant {k!r}: use stage or collector:<{'|'.join(VARIANTS)}>")
    runs: dict[str, list[dict[str, Any]]] = {k: [] for k in kinds}
    for r in range(a.repeats):
        for kind in kinds:
            result = a.work / f"{kind.replace(':', '_')}.json"
            load = os.getloadavg()[0]
            before = kind.startswith("before:")
            measured = run_child(["--worker", kind.split(":", 1)[1] if before else kind, "--samples", str(a.samples),
                                  "--work", str(a.work), "--result", str(result)],
                                 a.work / f"{kind.replace(':', '_')}.log", before_root if before else ROOT)
            inner = json.loads(result.read_text())
            runs[kind].append({**inner, **measured, "load_average_1min_at_start": round(load, 2)})
            main_s = inner.get("forward_s", inner.get("calibration_s"))
            print(f"[run {r + 1}/{a.repeats}] {kind}: {main_s} s "
                  + " ".join(f"{k}={inner[k]}" for k in ("inference_s", "histogram_s", "search_s") if k in inner),
                  flush=True)
    forward = [m["forward_s"] for m in runs["ort"]]
    summary: dict[str, Any] = {"ort_forward_s": {"median": statistics.median(forward), "best": min(forward),
                                                 "runs": forward}}
    reference_kind = "before:stage" if "before:stage" in runs else "stage"  # the ranges every variant must give
    reference = next((m["ranges_digest"] for m in runs.get(reference_kind, [])), None)
    summary["ranges_reference"] = reference_kind
    for kind in kinds[1:]:
        cal = [m["calibration_s"] for m in runs[kind]]
        ratios = [c / f for c, f in zip(cal, forward)]
        best = min(runs[kind], key=lambda m: m["calibration_s"])
        digests = {m.get("ranges_digest") for m in runs[kind]}
        summary[kind] = {
            "calibration_s": {"median": statistics.median(cal), "best": min(cal), "runs": cal},
            "ratio_median": round(statistics.median(ratios), 3), "ratio_best": round(min(cal) / min(forward), 3),
            "ratio_runs": [round(x, 3) for x in ratios],
            "split_of_best_s": {k: best.get(k) for k in ("session_s", "inference_s", "histogram_s", "search_s")},
            "goal_ratio_le_2": statistics.median(ratios) <= 2.0,
            f"identical_ranges_to_{reference_kind}": None if reference is None or digests == {None}
            else digests == {reference},
        }
    if "before:stage" in runs and "stage" in runs:
        b, s_ = summary["before:stage"], summary["stage"]
        b_s, a_s = b["calibration_s"]["median"], s_["calibration_s"]["median"]
        summary["before_after"] = {"ratio_median": [b["ratio_median"], s_["ratio_median"]],
                                   "calibration_s_median": [b_s, a_s], "speedup_median": round(b_s / a_s, 3)}
    results = {
        "what": "INT8 calibration (the calibrate stage: collection + entropy range search, tensorrt rules) against a "
                "plain onnxruntime FP32 forward over the same 512 samples in batches of 32, on ResNet-18; each "
                "measurement in a fresh process, kinds alternating within each repeat",
        "label": a.label,
        "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                 text=True).stdout.strip(),
        "before_commit": a.before,
        "command": "flock /tmp/trtpipe-heavy.lock .venv/bin/python bench/calibration_cpu_ratio.py "
                   + shlex.join(sys.argv[1:]),
        "machine": {"cpu": cpu, "available_cores": len(os.sched_getaffinity(0)), "python": platform.python_version(),
                    "numpy": np.__version__, "onnxruntime": onnxruntime.__version__},
        "meta": json.loads((case / "meta.json").read_text()),
        "repeats": a.repeats,
        "summary": summary,
        "runs": runs,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    print("wrote", out)


if __name__ == "__main__":
    main()
