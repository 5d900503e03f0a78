"""dvc.yaml watches every input of every stage: the committed file is what `trtpipe dvc`
derives from the config; every module a stage really imports is one of its dependencies;
`dvc status` sees the user's checkpoint, data, factory module and the project's code
change; an int8 knob re-runs the int8 stages only; and a stage run by DVC refuses a
dvc.yaml that does not watch its inputs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline import dvcgen
from tests._project import dvc_project, first_run, run_tool
from pipeline.config import load_config

ROOT = Path(__file__).resolve().parents[1]
STAGE_CALLS = {  # each stage's function on the faults template project (tests/faults/conftest.py)
    "prepare": "prepare.run(cfg, Path('out/prepare'))",
    "export": "export.run(cfg, A/'prepare'/'model.pt', Path('out/export'))",
    "validate": "validate.run(cfg, A/'prepare'/'model.pt', A/'export'/'model.onnx', A/'prepare'/'eval.npz', Path('out/validate'))",
    "calibrate": "calibrate.run(cfg, A/'export'/'model.onnx', A/'prepare'/'calib.npz', Path('out/calibrate'), progress=False)",
    "tune": "tune.run(cfg, A/'export'/'model.onnx', A/'calibrate', A/'prepare'/'eval.npz', Path('out/tune'), "
            "calib_data=A/'prepare'/'calib.npz', progress=False)",
    "build": "[build.run(cfg, p, A/'export'/'model.onnx', Path('out/build')/p, calib_dir=A/'calibrate', "
             "calib_data=A/'prepare'/'calib.npz') for p in ('fp32', 'fp16', 'int8')]",
    "evaluate": "evaluate.run(cfg, 'int8', A/'build'/'int8', A/'build'/'fp32', A/'prepare'/'eval.npz', "
                "A/'validate'/'reference.npz', Path('out/int8.json'))",
    "compare": "compare.run(cfg, A/'eval', Path('out/compare'))",
    "publish": "publish.run(cfg, A/'build', A/'eval', Path('out/registry'), Path('out/published.json'))",
}
TRACE = """
import sys
from pathlib import Path
from pipeline.config import load_config
from pipeline.stages import {stage}
A = Path('artifacts')
cfg = load_config()
{call}
root = Path(sys.argv[1]).resolve()
files = sorted(str(Path(m.__file__).resolve().relative_to(root)) for m in list(sys.modules.values())
               if getattr(m, '__file__', None) and Path(m.__file__).resolve().is_relative_to(root)
               and Path(m.__file__).resolve().relative_to(root).parts[0] in ('pipeline', 'calibration'))
print('TRACE ' + ' '.join(files))
"""


def _stage_deps(doc: dict, stage: str) -> set[str]:
    body = doc["stages"][stage]
    body = body.get("do", body)
    return {d for d in body["deps"] if isinstance(d, str)}


def test_committed_dvc_yaml_is_what_trtpipe_dvc_writes() -> None:
    cfg = load_config(ROOT / "configs" / "digits.yaml", ROOT / "params.yaml", quiet=True)
    expected = dvcgen.render(dvcgen.generate(cfg, "configs/digits.yaml", root=ROOT), "configs/digits.yaml")
    assert (ROOT / "dvc.yaml").read_text() == expected, "dvc.yaml is stale: run `trtpipe dvc`"


@pytest.mark.parametrize("stage", list(STAGE_CALLS))
def test_every_module_a_stage_imports_is_a_dependency(stage: str, template: Path, tmp_path: Path) -> None:
    """Run the stage for real in a fresh interpreter and list the project modules it imported:
    each must be a dependency of that stage in dvc.yaml."""
    work = tmp_path / "p"
    shutil.copytree(template, work, symlinks=True)
    script = TRACE.format(stage=stage, call=STAGE_CALLS[stage])
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    res = subprocess.run([sys.executable, "-c", script, str(ROOT)], cwd=work, capture_output=True, text=True, env=env,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    imported = set(res.stdout.rsplit("TRACE ", 1)[1].split())
    deps = _stage_deps(yaml.safe_load((ROOT / "dvc.yaml").read_text()), stage)
    assert imported, "the trace found no project module"
    assert imported <= deps, f"{stage} imports modules dvc.yaml does not list: {sorted(imported - deps)}"


def test_the_derivation_follows_lazy_imports() -> None:
    deps = dvcgen.code_deps("pipeline.stages.build")
    # build imports the backends only inside get_backend(), and TensorRT's backend only there
    assert "pipeline/backends/tensorrt_backend.py" in deps and "pipeline/backends/trt_calibrator.py" in deps
    assert "pipeline/stages/compare.py" not in deps and "pipeline/registry.py" not in deps


def test_a_stage_run_by_dvc_refuses_a_dvc_yaml_that_misses_an_input(template: Path, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    from tests._project import trtpipe

    work = tmp_path / "p"
    shutil.copytree(template, work, symlinks=True)
    monkeypatch.chdir(work)
    (work / "weights.pt").write_bytes((work / "artifacts" / "prepare" / "model.pt").read_bytes())
    assert trtpipe("dvc") == 0
    capsys.readouterr()
    cfg = yaml.safe_load((work / "configs" / "digits.yaml").read_text())
    cfg["model"]["checkpoint"] = "weights.pt"  # the config now names a file dvc.yaml does not watch
    (work / "configs" / "digits.yaml").write_text(yaml.safe_dump(cfg))
    monkeypatch.setenv("DVC_STAGE", "prepare")
    assert trtpipe("prepare") == 1
    err = capsys.readouterr().err
    assert "dvc.yaml does not watch every input" in err and "stage 'prepare' does not depend on weights.pt" in err
    assert "run `trtpipe dvc`" in err
    monkeypatch.delenv("DVC_STAGE")
    assert trtpipe("dvc", "--check") == 1
    assert trtpipe("dvc") == 0 and trtpipe("dvc", "--check") == 0


# -- dvc itself ---------------------------------------------------------------------------------------
def _sh(cwd: Path, *cmd: str) -> str:
    return run_tool(cwd, *cmd, pythonpath=ROOT)


USER_MODEL = '''
import torch
from torch import nn

def make():
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 64, 10))
'''


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A git + DVC project with this repository's code, a user's own model factory, checkpoint
    and npz data, and a dvc.yaml from `trtpipe dvc`; the pipeline run once."""
    import numpy as np
    import torch
    from sklearn.datasets import load_digits

    r = dvc_project(tmp_path)
    (r / "user_models.py").write_text(USER_MODEL)
    ns: dict = {}
    exec(USER_MODEL, ns)
    torch.manual_seed(0)
    torch.save(ns["make"]().state_dict(), r / "weights.pt")
    d = load_digits()
    np.savez(r / "digits.npz", x=(d.images[:, None] / 16.0).astype(np.float32), y=d.target)
    cfg = yaml.safe_load((ROOT / "configs" / "digits.yaml").read_text())
    cfg["model"].update(name="user-cnn", source="factory", arch="user_models:make", checkpoint="weights.pt")
    cfg["data"].update(source="npz", path="digits.npz", preprocess={})
    cfg["evaluate"]["latency"] = {"warmup": 1, "iterations": 3, "batch_sizes": [1]}
    (r / "configs" / "user.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params.update(config="configs/user.yaml")
    params["calibration"]["num_samples"] = 64
    (r / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    first_run(r, _sh)
    return r


def _changed(r: Path) -> set[str]:
    out = json.loads(_sh(r, "dvc", "status", "--json"))
    return set(out)


@pytest.mark.slow
def test_dvc_status_sees_user_inputs_and_code(repo: Path) -> None:
    assert _changed(repo) == set()
    edits = {
        "weights.pt": {"prepare"},
        "digits.npz": {"prepare"},
        "user_models.py": {"prepare", "export", "validate"},
        "pipeline/models.py": {"prepare", "export", "validate"},
        "pipeline/data/sources.py": {"prepare"},
    }
    for path, stages in edits.items():
        f = repo / path
        original = f.read_bytes()
        f.write_bytes(original + (b"\n# edited\n" if path.endswith(".py") else b"\0"))
        changed = _changed(repo)
        assert stages <= changed, (path, changed)
        f.write_bytes(original)
    assert _changed(repo) == set()


@pytest.mark.slow
def test_an_int8_knob_reruns_only_the_int8_stages(repo: Path) -> None:
    out = _sh(repo, "dvc", "exp", "run", "-S", "build.int8_route=explicit")
    ran = {line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage '")}
    assert "build@int8" in ran, out
    assert not ran & {"prepare", "export", "validate", "calibrate", "build@fp32", "build@fp16", "evaluate@fp32",
                      "evaluate@fp16"}, ran


def test_a_project_without_trtpipe_code_watches_the_installed_files(tmp_path: Path) -> None:
    """A user's own project (trtpipe installed, not vendored): trtpipe's code is one dependency,
    .trtpipe-version (its version and source hash, written by `trtpipe dvc`), never absolute paths."""
    root = tmp_path / "mine"
    (root / "configs").mkdir(parents=True)
    shutil.copy(dvcgen.ROOT / "configs" / "digits.yaml", root / "configs" / "digits.yaml")
    (root / "params.yaml").write_text(yaml.safe_dump({"config": "configs/digits.yaml"}))
    cwd = os.getcwd()
    os.chdir(root)
    try:
        cfg = load_config(quiet=True)
        stages = dvcgen.generate(cfg, "configs/digits.yaml", root=root)["stages"]
    finally:
        os.chdir(cwd)
    deps = stages["prepare"]["deps"]
    assert deps == [dvcgen.VERSION_FILE], deps
    assert not [d for st in stages.values() for d in st.get("do", st)["deps"] if Path(d).is_absolute()]
    assert "configs/digits.yaml:" not in str(deps) and "model" in str(stages["prepare"]["params"])
