"""A finished project for tests that run the command line: the whole CPU pipeline
(prepare .. publish) run once through `trtpipe` on the embedded digits default, copied
into a fresh folder per test (fixtures `template` and `project` in tests/conftest.py)."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PARAMS = {
    "config": "configs/digits.yaml",
    "override": True,  # these values win over configs/digits.yaml's, on purpose
    "calibration": {"method": "entropy", "num_samples": 64, "batch_size": 32, "percentile": 99.99},
    "build": {"backend": "auto", "int8_route": "auto", "calibration_source": "auto"},
    "evaluate": {"latency": {"warmup": 1, "iterations": 5, "batch_sizes": [1, 32]}},
}


def trtpipe(*args: str) -> int:
    """`trtpipe ARGS` in this process (the CLI's own error handling included)."""
    from pipeline import cli

    cli._extra_commands.clear()  # main() registers the extra subcommands on every call
    try:
        return cli.main(list(args))
    except SystemExit as e:  # argparse's usage errors
        return int(e.code or 0)


PIPELINE = [
    ("prepare",), ("export",), ("validate",), ("calibrate",),
    ("build", "--precision", "fp32"), ("build", "--precision", "fp16"), ("build", "--precision", "int8"),
    ("evaluate", "--precision", "fp32"), ("evaluate", "--precision", "fp16"), ("evaluate", "--precision", "int8"),
    ("compare",), ("publish",),
]


def make_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import os

    root = tmp_path_factory.mktemp("project-template")
    shutil.copytree(ROOT / "configs", root / "configs")
    (root / "params.yaml").write_text(yaml.safe_dump(PARAMS, sort_keys=False))
    cwd = os.getcwd()
    os.chdir(root)
    try:
        for step in PIPELINE:
            assert trtpipe(*step) == 0, step
    finally:
        os.chdir(cwd)
    return root


def snapshot(root: Path = Path("artifacts")) -> dict[str, str]:
    """Every file under `root` (hidden ones included) with its sha256."""
    if not root.exists():
        return {}
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def edit_yaml(path: str | Path, fn: Any) -> None:
    path = Path(path)
    data = yaml.safe_load(path.read_text())
    fn(data)
    path.write_text(yaml.safe_dump(data, sort_keys=False))


def tool_env(pythonpath: Any = None) -> dict[str, str]:
    """The environment tests run git, dvc and trtpipe in: this venv's tools first, a fixed git
    identity, no DVC analytics, and `pythonpath` (which copy of trtpipe runs) when given."""
    import os
    import sys

    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t",
           "DVC_NO_ANALYTICS": "1"}
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    return env


def run_tool(cwd: Path, *cmd: str, pythonpath: Any = None, timeout: int = 900) -> str:
    """`cmd` in `cwd` (tool_env); its stdout and stderr, asserting it exited 0."""
    import subprocess

    res = subprocess.run(list(cmd), cwd=cwd, capture_output=True, text=True, env=tool_env(pythonpath), timeout=timeout)
    assert res.returncode == 0, f"{' '.join(cmd)} exited {res.returncode}:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return res.stdout + res.stderr


def first_run(r: Path, sh: Any) -> None:
    """git and dvc in `r`, dvc.yaml from its config, `dvc repro`, and the result committed;
    `sh(cwd, *cmd)` runs a command (the caller's environment: which copy of the code runs)."""
    import sys

    sh(r, "git", "init", "-q")
    sh(r, "dvc", "init", "-q")
    sh(r, sys.executable, "-m", "pipeline", "dvc")
    sh(r, "dvc", "repro", "-q")
    sh(r, "git", "add", "-A")
    sh(r, "git", "commit", "-qm", "run")


def dvc_project(tmp_path: Path) -> Path:
    """A folder holding a copy of this repository's code (pipeline/, calibration/, configs/), for
    tests that run git and dvc in it; skips where git or the venv's dvc is missing."""
    import sys

    if shutil.which("git") is None or shutil.which("dvc", path=str(Path(sys.executable).parent)) is None:
        pytest.skip("needs git and dvc")
    r = tmp_path / "repo"
    r.mkdir()
    for item in ("pipeline", "calibration", "configs"):
        shutil.copytree(ROOT / item, r / item, ignore=shutil.ignore_patterns("__pycache__"))
    return r
