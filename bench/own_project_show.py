"""Issue 19's show, in a project of the user's own outside this repository (CPU, onnxruntime
backend): trtpipe "installed" (this repository's pipeline/ and calibration/ on PYTHONPATH,
not in the project), `trtpipe init`, the three-output detector of tests/models/digit_detector.py
with trained weights, `dvc repro`; then which stages `dvc status` lists after an edit of one key
of each config section; a tune budget through `dvc exp run -S` and publish (two versions);
`dvc exp show`; `wc -l dvc.yaml`; `trtpipe dvc --check` on a module outside the project.

    python bench/own_project_show.py --out bench/results/own_project_cpu.json --md bench/results/own_project_cpu.md
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
EDITS = [  # one key of each section of the user's config
    ("model.checkpoint", "weights2.pt"),
    ("data.seed", 1),
    ("export.opset", 18),
    ("validate.atol", 2.0e-4),
    ("calibration.num_samples", 96),
    ("build.profile.max_batch", 64),
    ("build.int8_route", "explicit"),
    ("evaluate.batch_size", 64),
    ("tune.max_candidates", 11),
    ("gate.latency.slack_ms", 0.2),
    ("publish.precisions", ["fp32", "int8"]),
]


def sh(cwd: Path, site: Path, *cmd: str, ok: bool = True, columns: int = 200) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "GIT_AUTHOR_NAME": "u", "GIT_AUTHOR_EMAIL": "u@u", "GIT_COMMITTER_NAME": "u",
           "GIT_COMMITTER_EMAIL": "u@u", "DVC_NO_ANALYTICS": "1", "PYTHONPATH": str(site),
           "COLUMNS": str(columns)}
    res = subprocess.run(list(cmd), cwd=cwd, capture_output=True, text=True, env=env, timeout=1800)
    if ok and res.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} exited {res.returncode}:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    return res


def edit(path: Path, fn) -> None:  # type: ignore[no-untyped-def]
    data = yaml.safe_load(path.read_text())
    fn(data)
    path.write_text(yaml.safe_dump(data, sort_keys=False))


def set_key(data: dict, key: str, value: object) -> None:
    *path, last = key.split(".")
    for part in path:
        data = data.setdefault(part, {})
    data[last] = value


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--md", type=Path, required=True)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="trtpipe-own-"))
    site = tmp / "site"
    for item in ("pipeline", "calibration"):
        shutil.copytree(ROOT / item, site / item, ignore=shutil.ignore_patterns("__pycache__"))
    root = tmp / "det"
    root.mkdir()
    run = lambda *cmd, **kw: sh(root, site, *cmd, **kw)  # noqa: E731
    result: dict = {"project": "three-output detector (boxes, landmarks, prob), trained on sklearn digits",
                    "python": sys.version.split()[0]}
    run("git", "init", "-q")
    run("dvc", "init", "-q")
    shutil.copy(ROOT / "tests" / "models" / "digit_detector.py", root / "det_model.py")
    run(sys.executable, "-c", "import det_model; det_model.train('weights.pt', epochs=3); "
                              "det_model.train('weights2.pt', epochs=2)")
    run("trtpipe", "init", "--name", "det")
    config = root / "configs" / "det.yaml"

    def own_model(c: dict) -> None:
        c["model"].update(source="factory", arch="det_model:make", checkpoint="weights.pt",
                          inputs=[{"name": "image", "shape": [1, 8, 8], "dtype": "float32"}])
        del c["model"]["outputs"], c["model"]["train"]
        c["calibration"]["num_samples"] = 64
        c["evaluate"]["latency"] = {"warmup": 2, "iterations": 20, "batch_sizes": [1, 32]}
        c["build"]["int8_from_tune"] = True
        c["tune"] = {"budget": {"metric": "top1_agreement@prob", "min": 0.9}, "max_candidates": 12,
                     "search_samples": 64}
        c["gate"] = {"latency": {"slack_ms": 0.1}}

    edit(config, own_model)
    run("trtpipe", "dvc")
    result["wc_l_dvc_yaml"] = len((root / "dvc.yaml").read_text().splitlines())
    result["dvc_check"] = run("trtpipe", "dvc", "--check").stdout.strip()
    run("git", "add", "-A")
    run("git", "commit", "-qm", "det")
    t = time.perf_counter()
    out = run("dvc", "repro")
    result["first_repro_s"] = round(time.perf_counter() - t, 1)
    result["first_repro_stages"] = [ln.split("'")[1] for ln in out.stdout.splitlines() if ln.startswith("Running stage")]
    run("git", "add", "-A")
    run("git", "commit", "-qm", "first run")

    reruns = []
    for key, value in EDITS:
        original = config.read_bytes()
        edit(config, lambda d: set_key(d, key, value))
        status = json.loads(run("dvc", "status", "--json").stdout or "{}")
        reruns.append({"edit": f"{key}: {json.dumps(value)}", "stages dvc status lists": sorted(status)})
        config.write_bytes(original)
    result["reruns"] = reruns
    # a key the config did not have when dvc.yaml was written: dvc.yaml does not watch it, and the
    # first stage that reads it says so instead of running on
    original = config.read_bytes()
    edit(config, lambda d: set_key(d, "build.workspace_mb", 512))
    new_key = run("dvc", "repro", ok=False)
    config.write_bytes(original)
    result["new_key"] = {"edit": "build.workspace_mb: 512 (not in the config before)", "exit": new_key.returncode,
                         "error": [ln for ln in (new_key.stdout + new_key.stderr).splitlines() if "error" in ln.lower()][:2]}
    result["status_after_restoring"] = sorted(json.loads(run("dvc", "status", "--json").stdout or "{}"))

    t = time.perf_counter()
    exp = run("dvc", "exp", "run", "-S", "configs/det.yaml:tune.budget.metric=snr_db@prob",
              "-S", "configs/det.yaml:tune.budget.min=45", ok=False)
    result["exp_run"] = {"exit": exp.returncode, "seconds": round(time.perf_counter() - t, 1),
                         "stages": [ln.split("'")[1] for ln in exp.stdout.splitlines() if ln.startswith("Running stage")],
                         "tail": (exp.stdout + exp.stderr).strip().splitlines()[-4:]}
    reg = root / "artifacts" / "registry" / "det"
    result["registry_versions"] = sorted(p.name for p in reg.iterdir() if p.is_dir())
    result["dvc_exp_show"] = run("dvc", "exp", "show", "--no-pager", columns=200).stdout.rstrip()
    result["dvc_exp_show_max_width"] = max(len(ln) for ln in result["dvc_exp_show"].splitlines())
    result["dvc_metrics_diff"] = run("dvc", "metrics", "diff", "--all", ok=False).stdout.rstrip()

    outside = tmp / "elsewhere"
    outside.mkdir()
    (outside / "far_models.py").write_text((root / "det_model.py").read_text())
    edit(config, lambda c: c["model"].update(arch="far_models:make"))
    bad = sh(root, Path(f"{site}{os.pathsep}{outside}"), "trtpipe", "dvc", "--check", ok=False)
    result["check_unwatched_module"] = {"exit": bad.returncode, "stderr": bad.stderr.strip()}

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    md = [f"# A project of the user's own (issue 19), {result['project']}", "",
          f"`wc -l dvc.yaml`: {result['wc_l_dvc_yaml']}; `trtpipe dvc --check`: {result['dvc_check']}", "",
          f"First `dvc repro`: {len(result['first_repro_stages'])} stages in {result['first_repro_s']} s", "",
          "| edit (one key) | stages `dvc status` lists |", "|---|---|"]
    md += [f"| `{r['edit']}` | {', '.join(r['stages dvc status lists']) or '(none)'} |" for r in reruns]
    md += ["", f"Adding a key the config did not have (`{result['new_key']['edit']}`), then `dvc repro`: exit "
           f"{result['new_key']['exit']}", "", "```", *result["new_key"]["error"], "```"]
    md += ["", f"`dvc exp run -S tune.budget.metric=snr_db@prob -S tune.budget.min=45`: exit {result['exp_run']['exit']}"
           f" in {result['exp_run']['seconds']} s, stages {', '.join(result['exp_run']['stages'])}; registry versions:"
           f" {', '.join(result['registry_versions'])}", "",
           f"`dvc exp show` (COLUMNS=200, widest line {result['dvc_exp_show_max_width']}):", "", "```",
           result["dvc_exp_show"], "```", "",
           f"`trtpipe dvc --check` with model.arch in a module outside the project: exit "
           f"{result['check_unwatched_module']['exit']}", "", "```", result["check_unwatched_module"]["stderr"], "```"]
    args.md.write_text("\n".join(md) + "\n")
    print("\n".join(md))
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
