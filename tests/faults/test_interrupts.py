"""Faults from the machine: a stage killed (SIGKILL) at every commit point, the disk filling
up mid-write, and two processes working on one registry at once. After each: no
half-written output is ever trusted, the next run succeeds, no hidden staging folder is
left behind, and errors are one line."""

from __future__ import annotations

import errno
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests._project import ROOT, snapshot, trtpipe

A = Path("artifacts")

# Runs `trtpipe ARGS` with os.replace (the commit of every atomic write) patched to SIGKILL the
# process on its K-th call; K=0 counts the calls and exits normally.
KILLER = """
import os, signal, sys
k = int(sys.argv[1]); calls = [0]; real = os.replace
def replace(*a, **kw):
    calls[0] += 1
    if calls[0] == k:
        os.kill(os.getpid(), signal.SIGKILL)
    return real(*a, **kw)
os.replace = replace
from pipeline import cli
rc = cli.main(sys.argv[2:])
sys.stderr.write(f"REPLACES={calls[0]}\\n")
sys.exit(rc)
"""


def _run(*args: str, k: int = 0, limit_fsize: int | None = None) -> subprocess.CompletedProcess:
    def preexec() -> None:
        if limit_fsize is not None:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit_fsize, limit_fsize))

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-c", KILLER, str(k), *args], capture_output=True, text=True, env=env,
                          timeout=600, preexec_fn=preexec)


def _consistent(stage: str) -> None:
    """The stage's outputs, whatever state the kill left, are complete or absent: the stage
    after it accepts them, or refuses them naming the stage to re-run."""
    from pipeline.errors import PipelineError
    from pipeline.provenance import calibrated, sha256_of
    from pipeline.registry import verify_all

    if stage == "calibrate":
        try:
            calibrated(A / "calibrate", sha256_of(A / "export" / "model.onnx"),
                       ("ranges.json", "calibration.cache", "model.qdq.onnx"))
        except PipelineError as e:
            assert "re-run calibrate" in str(e) or "run the calibrate stage" in str(e), e
    elif stage == "publish":
        assert all(r.ok(integrity_only=True) for r in verify_all(A / "registry", integrity_only=True))


@pytest.mark.slow
@pytest.mark.parametrize("argv", [("calibrate",), ("publish",)], ids=["calibrate", "publish"])
def test_kill_at_every_commit_point(argv: tuple[str, ...], finished: Path) -> None:
    if argv == ("publish",):  # a publish that has work to do: new versions
        import shutil

        shutil.rmtree(A / "registry")
    count = _run(*argv)
    assert count.returncode == 0, count.stderr
    n = int(count.stderr.strip().rsplit("REPLACES=", 1)[1])
    assert n >= 2
    clean = Path.cwd()
    for k in range(1, n + 1):
        work = clean.parent / f"kill-{argv[0]}-{k}"
        import shutil

        shutil.copytree(clean, work, symlinks=True)
        os.chdir(work)
        if argv == ("publish",):
            shutil.rmtree(A / "registry", ignore_errors=True)
        killed = _run(*argv, k=k)
        assert killed.returncode == -signal.SIGKILL, (k, killed.stderr)
        _consistent(argv[0])
        rerun = _run(*argv)
        assert rerun.returncode == 0, (k, rerun.stderr)
        _consistent(argv[0])
        leftovers = [p for p in A.rglob(".*") if ".tmp-" in p.name or ".staging-" in p.name]
        assert leftovers == [], (k, leftovers)
        os.chdir(clean)


def test_disk_full_while_prepare_writes(finished: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    import numpy as np

    real = np.savez

    def full(file, *a, **kw):  # what the OS answers when the disk fills up mid-write
        real(file, *a, **kw)
        raise OSError(errno.ENOSPC, "No space left on device", str(getattr(file, "name", file)))

    monkeypatch.setattr(np, "savez", full)
    before = snapshot()
    capsys.readouterr()
    assert trtpipe("prepare") == 1
    err = [ln for ln in capsys.readouterr().err.strip().splitlines() if not ln.startswith("trtpipe: note:")]
    assert len(err) == 1 and "disk full while writing" in err[0] and "Traceback" not in err[0]
    assert snapshot() == before  # the earlier outputs are untouched
    assert not [p for p in A.rglob(".*") if ".tmp-" in p.name]  # and no staging folder is left


def test_file_size_limit_while_build_writes_names_the_output(finished: Path) -> None:
    """A write the system refuses half-way (here: a file-size limit) during build@fp32 is
    blamed on the output being written, never on the ONNX input."""
    before = snapshot()
    res = _run("build", "--precision", "fp32", limit_fsize=64 * 1024)
    lines = [ln for ln in res.stderr.strip().splitlines() if not ln.startswith(("REPLACES=", "trtpipe: note:"))]
    assert res.returncode == 1, res.stderr
    assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr
    assert "artifacts/build/fp32/model.onnx" in lines[0] and "export/model.onnx" not in lines[0], lines[0]
    assert ("could not write" in lines[0] or "disk full" in lines[0] or "file size" in lines[0]), lines[0]
    assert snapshot() == before


def test_publish_while_verify_runs(finished: Path) -> None:
    """A publish and a verify at the same time take turns on the registry's lock."""
    import shutil

    shutil.rmtree(A / "registry")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "pipeline"]
    first = subprocess.run(cmd + ["publish"], capture_output=True, text=True, env=env, timeout=300)
    assert first.returncode == 0, first.stderr
    procs = [subprocess.Popen(cmd + args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for args in (["artifacts", "verify", "--integrity-only"], ["publish"], ["artifacts", "verify", "--integrity-only"])]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    assert all(rc == 0 for rc, _ in results), results
    assert all("Traceback" not in err for _, err in results)
