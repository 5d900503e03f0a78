"""Peak memory of `trtpipe evaluate` (and `validate`) on a model with large outputs: streamed vs whole arrays.

A dense-prediction model (the kind whose outputs, not inputs, dominate memory: a per-pixel
head, 32 x 64 x 64 float32 = 512 KiB per sample) on 3,000 photo crops of scikit-image's
images (64 x 64, real pixels), through prepare, export, validate and build@fp32 by the command
line (onnxruntime backend, this CPU). Then evaluate@fp32, each in a fresh process, twice:

* streamed: no task metric (agreement only), so evaluate scores chunk by chunk;
* whole: the same with a trivial user metric (`module:function`, called once on whole arrays),
  which makes evaluate hold every output of the evaluation set, as it did for every model before.

Writes each run's peak RSS (the stage's --timings file), wall time and whether the two reports'
agreement statistics are the same (they must be). validate's peak RSS is recorded too, and with
`--before REV` validate also runs with the code of git revision REV (a worktree) on the same
inputs: its peak RSS, and whether its report's statistics and reference.npz are the same.

    python bench/evaluate_memory.py --work /tmp/evalmem --out bench/results/evaluate_memory_cpu.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]

MODEL = '''
import torch


class DenseHead(torch.nn.Module):
    """A small per-pixel network: 3x64x64 in, 32x64x64 features out."""

    def __init__(self):
        super().__init__()
        self.body = torch.nn.Sequential(
            torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU(),
            torch.nn.Conv2d(16, 32, 3, padding=1), torch.nn.ReLU(),
            torch.nn.Conv2d(32, 32, 1))

    def forward(self, x):
        return self.body(x)


def make():
    torch.manual_seed(0)
    return DenseHead().eval()


def nothing(outputs, labels):
    """A user metric that reads nothing: its presence makes evaluate hold whole arrays."""
    return {}
'''


def crops(n: int) -> np.ndarray:
    from skimage import data as skd

    names = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "retina", "colorwheel", "coins")
    photos = []
    for name in names:
        a = getattr(skd, name)()
        photos.append(np.stack([a] * 3, -1) if a.ndim == 2 else a[..., :3])
    rng = np.random.default_rng(0)
    out = np.empty((n, 3, 64, 64), np.float32)
    for i in range(n):
        p = photos[i % len(photos)]
        s = int(min(p.shape[:2]) * rng.uniform(0.2, 0.9))
        y0, x0 = int(rng.integers(0, p.shape[0] - s + 1)), int(rng.integers(0, p.shape[1] - s + 1))
        idx = np.linspace(0, s - 1, 64).astype(int)
        out[i] = p[y0 + idx][:, x0 + idx].transpose(2, 0, 1) / 255.0
    return out


@contextlib.contextmanager
def worktree_at(rev: str, path: Path) -> Iterator[tuple[str, Path]]:
    """A git worktree of this repository at `rev` (its short hash, fixed now: HEAD may move while a
    bench runs) in `path`, removed on the way out: the "before" code a bench runs side by side."""
    short = subprocess.run(["git", "rev-parse", "--short", rev], cwd=ROOT, check=True, capture_output=True,
                           text=True).stdout.strip()
    subprocess.run(["git", "worktree", "add", "-f", "--detach", str(path), short], cwd=ROOT, check=True,
                   capture_output=True)
    try:
        yield short, path
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(path)], cwd=ROOT, check=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/trtpipe_evaluate_memory"))
    ap.add_argument("--samples", type=int, default=3000)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "evaluate_memory_cpu.json")
    ap.add_argument("--before", help="a git revision whose validate runs on the same inputs (peak RSS, same numbers)")
    a = ap.parse_args()
    out_path, work = a.out.resolve(), a.work.resolve()
    if work.exists():
        shutil.rmtree(work)
    (work / "configs").mkdir(parents=True)
    (work / "dense_head.py").write_text(MODEL)
    np.savez(work / "data.npz", image=crops(a.samples))  # nothing large stays in this process: a child's ru_maxrss
    # counts the pages of the parent it was forked from
    config = {
        "model": {"name": "dense-head", "source": "factory", "arch": "dense_head:make", "checkpoint": "weights.pt",
                  "inputs": [{"name": "image", "shape": [3, 64, 64]}], "outputs": [{"name": "features"}]},
        "data": {"source": "npz", "path": "data.npz", "split": {"train": 0.0, "calibration": 0.1, "evaluation": 0.9}},
        "validate": {"num_samples": 64},
        "build": {"backend": "onnxruntime"},
        "evaluate": {"batch_size": 32, "latency": {"warmup": 1, "iterations": 5, "batch_sizes": [1]}},
    }
    (work / "configs" / "model.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    whole = json.loads(json.dumps(config))
    whole["evaluate"]["metrics"] = ["dense_head:nothing"]
    (work / "configs" / "whole.yaml").write_text(yaml.safe_dump(whole, sort_keys=False))
    (work / "params.yaml").write_text("config: configs/model.yaml\n")
    (work / "params-whole.yaml").write_text("config: configs/whole.yaml\n")
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{work}"}

    def trtpipe(*args: str, code: Path = ROOT) -> float:
        t0 = time.monotonic()
        subprocess.run([sys.executable, "-m", "pipeline", "-q", *args], cwd=work, check=True,
                       env={**env, "PYTHONPATH": f"{code}{os.pathsep}{work}"})
        return time.monotonic() - t0

    subprocess.run([sys.executable, "-c", "import torch, dense_head; torch.save(dense_head.make().state_dict(), "
                    "'weights.pt')"], cwd=work, env=env, check=True)
    for step in (("prepare",), ("export",), ("validate", "--timings", "timings-validate.json"),
                 ("build", "--precision", "fp32")):
        trtpipe(*step)
    sys.path.insert(0, str(ROOT))  # this checkout's pipeline/ and calibration/ for the checks below
    validate_runs = {"streamed": {"peak_rss_mb": json.loads((work / "timings-validate.json").read_text())["peak_rss_mb"]}}
    if a.before:
        with worktree_at(a.before, work / "before") as (a.before, tree):
            trtpipe("validate", "--out", "validate-before", "--timings", "timings-validate-before.json", code=tree)
        new_rep = json.loads((work / "artifacts" / "validate" / "validate.json").read_text())
        old_rep = json.loads((work / "validate-before" / "validate.json").read_text())
        from pipeline.data.npz_rows import npz_row_chunks  # chunk by chunk: this process stays small (see above)

        same_ref = all(np.array_equal(x["features"], y["features"]) for x, y in zip(
            npz_row_chunks(work / "artifacts" / "validate" / "reference.npz", ["features"], 64),
            npz_row_chunks(work / "validate-before" / "reference.npz", ["features"], 64)))
        validate_runs[f"before ({a.before})"] = {
            "peak_rss_mb": json.loads((work / "timings-validate-before.json").read_text())["peak_rss_mb"]}
        validate_runs["same_statistics"] = new_rep["outputs"] == old_rep["outputs"]
        validate_runs["same_reference_arrays"] = same_ref
    from calibration.ort_session import cpu_summary
    from pipeline.data.npz_rows import npz_shapes

    shape, dtype = npz_shapes(work / "artifacts" / "validate" / "reference.npz")["features"]
    result: dict = {"cpu": cpu_summary(), "python": platform.python_version(), "samples_evaluated": shape[0],
                    "output_shape": list(shape[1:]),
                    "output_bytes_per_array_mb": round(int(np.prod(shape)) * dtype.itemsize / 2**20, 1),
                    "validate": validate_runs, "runs": {}}
    for name, params in (("streamed", "params.yaml"), ("whole", "params-whole.yaml")):
        timings = work / f"timings-{name}.json"
        if timings.exists():
            timings.unlink()
        wall = trtpipe("evaluate", "--precision", "fp32", "--params", params, "--out", f"eval-{name}.json",
                       "--timings", str(timings))
        t = json.loads(timings.read_text())
        rep = json.loads((work / f"eval-{name}.json").read_text())
        result["runs"][name] = {"peak_rss_mb": t.get("peak_rss_mb"), "wall_seconds": round(wall, 2),
                                "agreement_pytorch": rep["agreement_pytorch"]}
        print(f"{name}: peak RSS {t.get('peak_rss_mb')} MB, {wall:.1f} s", flush=True)
    s, w = (result["runs"][k]["agreement_pytorch"]["features"] for k in ("streamed", "whole"))
    result["same_agreement"] = all(np.isclose(s[k], w[k], rtol=1e-12, atol=0) or s[k] == w[k] for k in s)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=2))


if __name__ == "__main__":
    main()
