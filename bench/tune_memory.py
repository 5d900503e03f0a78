"""Peak memory of `trtpipe tune` on a model with large outputs: the full set in chunks vs held whole.

The dense-prediction model of bench/evaluate_memory.py (a per-pixel head, 32 x 64 x 64 float32 =
512 KiB of output per sample) on its photo crops, through prepare, export, validate and
calibrate by the command line (onnxruntime backend, this CPU). Then `trtpipe tune` (budget: output
SNR, onnxruntime Q/DQ simulation), each run in a fresh process: with this checkout (the FP32
reference in a temporary .npz, every full-set check chunk by chunk), and with `--before REV` also
with the code of git revision REV (a worktree), which holds the FP32 outputs of the evaluation set
and each candidate's outputs whole. Writes each run's peak RSS (the stage's --timings file), wall
time, and whether the two tune.json agree (the same candidates, kept layers and chosen one; their
metrics to float rounding).

    python bench/tune_memory.py --work /tmp/tunemem --before REV --out bench/results/tune_memory_cpu.json

Two projects by default (600 and 2,000 crops: 540 and 1,800 evaluated), so that the growth with
the evaluation set shows.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from evaluate_memory import MODEL, worktree_at  # noqa: E402  (the same model; its crops() makes the same images)


def _config(budget_db: float) -> dict:
    return {
        "model": {"name": "dense-head", "source": "factory", "arch": "dense_head:make", "checkpoint": "weights.pt",
                  "inputs": [{"name": "image", "shape": [3, 64, 64]}], "outputs": [{"name": "features"}]},
        "data": {"source": "npz", "path": "data.npz", "split": {"train": 0.0, "calibration": 0.1, "evaluation": 0.9}},
        "validate": {"num_samples": 64},
        "calibration": {"num_samples": 128},
        "build": {"backend": "onnxruntime"},
        "evaluate": {"batch_size": 32, "latency": {"warmup": 1, "iterations": 5, "batch_sizes": [1]}},
        "tune": {"budget": {"metric": "snr_db", "min": budget_db}, "search_samples": 32, "max_candidates": 20},
    }


def _same_numbers(a: dict, b: dict) -> bool:
    """The same candidates (kept, phase, whether each meets) and chosen layers; metrics within 1e-9."""
    def close(x, y) -> bool:
        if isinstance(x, float) and isinstance(y, float):
            return x == y or (math.isfinite(x) and math.isclose(x, y, rel_tol=1e-9))
        return x == y

    if a["chosen"] != b["chosen"] or a["kept"] != b["kept"] or len(a["candidates"]) != len(b["candidates"]):
        return False
    keys = ("kept", "minmax", "phase", "meets", "meets_full", "metric", "metric_sensitivity", "metric_full", "sqnr_db",
            "cost")
    return all(close(p[k], q[k]) for p, q in zip(a["candidates"], b["candidates"]) for k in keys)


def _project(work: Path, samples: int, snr_db: float) -> None:
    """prepare .. calibrate of the dense head on `samples` crops in `work` (this checkout's code)."""
    (work / "configs").mkdir(parents=True)
    (work / "dense_head.py").write_text(MODEL)
    subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(ROOT / 'bench')!r}); import numpy, "
                    f"evaluate_memory as m; numpy.savez('data.npz', image=m.crops({samples}))"], cwd=work, check=True)
    # in a child: the children of this process count its peak pages in their ru_maxrss (vfork + exec)
    (work / "configs" / "model.yaml").write_text(yaml.safe_dump(_config(snr_db), sort_keys=False))
    (work / "params.yaml").write_text("config: configs/model.yaml\n")
    subprocess.run([sys.executable, "-c", "import torch, dense_head; torch.save(dense_head.make().state_dict(), "
                    "'weights.pt')"], cwd=work, env=_env(ROOT, work), check=True)
    for step in (("prepare",), ("export",), ("validate",), ("calibrate",)):
        _trtpipe(work, *step)


def _env(code: Path, work: Path) -> dict:
    return {**os.environ, "PYTHONPATH": f"{code}{os.pathsep}{work}"}


def _trtpipe(work: Path, *args: str, code: Path = ROOT) -> float:
    t0 = time.monotonic()
    subprocess.run([sys.executable, "-m", "pipeline", "-q", *args], cwd=work, check=True, env=_env(code, work))
    return time.monotonic() - t0


def _tune(work: Path, name: str, code: Path) -> tuple[dict, dict]:
    """`trtpipe tune` with the code at `code`, in a fresh process: (its numbers here, tune.json)."""
    out, timings = f"tune-{name}", work / f"timings-{name}.json"
    wall = _trtpipe(work, "tune", "--out", out, "--timings", str(timings), code=code)
    t = json.loads(timings.read_text())
    rep = json.loads((work / out / "tune.json").read_text())
    full = [c for c in rep["candidates"] if c["metric_full"] is not None]
    return {"peak_rss_mb": t.get("peak_rss_mb"), "wall_seconds": round(wall, 2), "candidates": len(rep["candidates"]),
            "full_set_checks": len(full), "kept": [k["layer"] for k in rep["kept"]],
            "chosen_snr_db_full": rep["reference_points"]["chosen"]["metric_full"]}, rep


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/trtpipe_tune_memory"))
    ap.add_argument("--samples", type=int, nargs="+", default=[600, 2000], help="crops per project (90%% evaluated)")
    ap.add_argument("--snr-db", type=float, default=45.0, help="the budget: output SNR against FP32 (dB)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "tune_memory_cpu.json")
    ap.add_argument("--before", help="a git revision whose tune runs on the same inputs (peak RSS, same numbers)")
    a = ap.parse_args()
    out_path, work = a.out.resolve(), a.work.resolve()
    if work.exists():
        shutil.rmtree(work)
    sys.path.insert(0, str(ROOT))
    from calibration.ort_session import cpu_summary
    from pipeline.data.npz_rows import npz_shapes

    codes = {"chunked": ROOT}
    result: dict = {"cpu": cpu_summary(), "python": platform.python_version(), "budget": f"snr_db >= {a.snr_db:g}",
                    "projects": []}
    with contextlib.ExitStack() as stack:
        if a.before:
            a.before, tree = stack.enter_context(worktree_at(a.before, work / "before"))
            codes[f"before ({a.before})"] = tree
        for samples in a.samples:
            project = work / f"n{samples}"
            _project(project, samples, a.snr_db)
            shape, dtype = npz_shapes(project / "artifacts" / "validate" / "reference.npz")["features"]
            row: dict = {"samples_evaluated": shape[0], "output_shape": list(shape[1:]),
                         "output_bytes_per_array_mb": round(int(np.prod(shape)) * dtype.itemsize / 2**20, 1), "runs": {}}
            reports = []
            for name, code in codes.items():
                row["runs"][name], rep = _tune(project, name.split()[0], code)
                reports.append(rep)
                print(f"{shape[0]} samples, {name}: peak RSS {row['runs'][name]['peak_rss_mb']} MB, "
                      f"{row['runs'][name]['wall_seconds']} s", flush=True)
            if len(reports) == 2:
                row["same_numbers"] = _same_numbers(*reports)
            result["projects"].append(row)
    import resource

    result["bench_process_peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
