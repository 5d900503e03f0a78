"""Bad input: each a one-line error on stderr, exit status 1, and nothing written under artifacts/."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]


def trtpipe(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "pipeline", *args], capture_output=True, text=True, env=env, timeout=300)


def edit_config(fn) -> None:
    path = Path("configs/digits.yaml")
    data = yaml.safe_load(path.read_text())
    fn(data)
    path.write_text(yaml.safe_dump(data))


def assert_one_line_error(res: subprocess.CompletedProcess, command: str, *fragments: str) -> None:
    assert res.returncode == 1, (res.returncode, res.stderr)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith(f"trtpipe {command}: error: ")
    assert "Traceback" not in res.stderr
    for f in fragments:
        assert f in lines[0], (f, lines[0])
    written = [p for p in Path("artifacts").rglob("*") if p.is_file()] if Path("artifacts").exists() else []
    assert written == [], written


def test_misspelt_key(project: Path) -> None:
    edit_config(lambda d: d["export"].update({"opsett": 17}))
    assert_one_line_error(trtpipe("prepare"), "prepare", "unknown key 'export.opsett'", "configs/digits.yaml")


def test_wrong_type(project: Path) -> None:
    edit_config(lambda d: d["validate"].update({"num_samples": "two hundred"}))
    assert_one_line_error(trtpipe("prepare"), "prepare", "'validate.num_samples'", "valid integer", "two hundred")


def test_checkpoint_that_does_not_exist(project: Path) -> None:
    edit_config(lambda d: d["model"].update({"checkpoint": "weights/missing.pt"}))
    assert_one_line_error(trtpipe("prepare"), "prepare", "weights/missing.pt: checkpoint not found")
    assert_one_line_error(trtpipe("export", "--checkpoint", "nope.pt"), "export", "nope.pt: checkpoint not found")


def test_corrupt_onnx(project: Path) -> None:
    bad = project / "broken.onnx"
    bad.write_bytes(b"\x08\x07this is not protobuf" * 50)
    assert_one_line_error(
        trtpipe("validate", "--onnx", str(bad), "--checkpoint", "x.pt", "--eval-data", "e.npz"),
        "validate", "broken.onnx", "ONNX",
    )
    assert_one_line_error(trtpipe("build", "--precision", "fp32", "--onnx", str(bad)), "build", "broken.onnx")


def test_empty_dataset(project: Path) -> None:
    np.savez(project / "empty.npz", x=np.zeros((0, 1, 8, 8), np.float32), y=np.zeros((0,), np.int64))
    edit_config(lambda d: d["data"].update({"source": "npz", "path": str(project / "empty.npz")}))
    assert_one_line_error(trtpipe("prepare"), "prepare", "empty.npz", "empty")


def test_dataset_with_wrong_image_shape(project: Path) -> None:
    rng = np.random.default_rng(0)
    np.savez(project / "big.npz", x=rng.random((50, 1, 9, 9), dtype=np.float32), y=rng.integers(0, 10, 50))
    edit_config(lambda d: d["data"].update({"source": "npz", "path": str(project / "big.npz")}))
    assert_one_line_error(trtpipe("prepare"), "prepare", "big.npz", "[1, 9, 9]", "[1, 8, 8]")


def test_usage_error_exits_2(project: Path) -> None:
    res = trtpipe("build", "--precision", "int4")
    assert res.returncode == 2 and "invalid choice" in res.stderr


def test_help_is_fast_and_imports_no_heavy_library() -> None:
    code = "import sys, pipeline.cli as c; c._load_extras(); c.build_parser(); print(sorted(m for m in ('torch','onnxruntime','tensorrt','onnx') if m in sys.modules))"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]"


def test_output_into_a_closed_pipe_is_quiet(tmp_path: Path) -> None:
    """`trtpipe ... | head`: the reader is gone before the report is written; exit 141, no traceback."""
    read, write = os.pipe()
    os.close(read)  # every write to `write` now fails with EPIPE
    try:
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        res = subprocess.run([sys.executable, "-m", "pipeline", "artifacts", "list", "--json", "--registry",
                              str(tmp_path / "registry")], stdout=write, stderr=subprocess.PIPE, text=True,
                             env=env, timeout=120)
    finally:
        os.close(write)
    assert res.returncode == 141, res.stderr
    assert "Traceback" not in res.stderr and "BrokenPipeError" not in res.stderr, res.stderr
