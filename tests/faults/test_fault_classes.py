"""Fault classes of issue 18 (item 5), each tried as a user or a tool would meet it, through
the command line: output ownership (`--out`, `gate --junit/--summary`, $GITHUB_STEP_SUMMARY),
a gate fed a compare.json of another model or with rows that contradict themselves,
provenance of ONNX external data, OS errors (name too long, file size limit, a folder where a
file is expected), and YAML (duplicate keys, alias bombs).

Every case asserts the exit status, ONE line on stderr naming the thing at fault (no
traceback), and that nothing was changed or lost (sha256 of every file before and after)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import pytest

from tests._project import snapshot, trtpipe

ROOT = Path(__file__).resolve().parents[2]
CFG = Path("configs/digits.yaml")


def tree(root: Path = Path(".")) -> dict[str, str]:
    """sha256 of every file under `root` (the whole project: configs, params, artifacts)."""
    return snapshot(root)


def one_error(err: str, command: str, *fragments: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if not ln.startswith("trtpipe: note:")]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"trtpipe {command}: error: "), lines[0]
    assert "Traceback" not in err
    for f in fragments:
        assert f in lines[0], (f, lines[0])
    return lines[0]


def refused(capsys: pytest.CaptureFixture[str], argv: tuple[str, ...], *fragments: str, code: int = 1,
            root: Path = Path(".")) -> str:
    """Run `trtpipe argv` in this process: exit `code`, one line naming `fragments`, no file changed."""
    capsys.readouterr()
    before = tree(root)
    rc = trtpipe(*argv)
    _, err = capsys.readouterr()
    assert rc == code, (rc, err)
    line = one_error(err, argv[0], *fragments)
    assert tree(root) == before, "files changed"
    return line


def cli(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None, timeout: float = 120,
        preexec: Callable[[], Any] | None = None) -> subprocess.CompletedProcess[str]:
    """`trtpipe ARGS` as a separate process (for limits and hangs)."""
    e = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run([sys.executable, "-m", "pipeline", *args], capture_output=True, text=True, env=e,
                          cwd=cwd, timeout=timeout, preexec_fn=preexec)


# -- YAML: duplicate keys, alias bombs, one loader -------------------------------------------------------------
BOMB = ("lol0: &l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n"
        + "".join(f"lol{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 9) + "]\n" for i in range(1, 10)))


@pytest.mark.parametrize("where", ["config", "params"])
def test_duplicate_yaml_key_is_an_error_naming_file_line_and_key(project: Path, capsys: pytest.CaptureFixture[str],
                                                                where: str) -> None:
    path = CFG if where == "config" else Path("params.yaml")
    text = path.read_text()
    # the second 'calibration:' section would silently replace the first
    path.write_text(text + "calibration:\n  method: minmax\n")
    first = next(i for i, ln in enumerate(text.splitlines(), 1) if ln.startswith("calibration:"))
    line = len(text.splitlines()) + 1
    refused(capsys, ("prepare",), f"{path}:{line}: key 'calibration' is given twice", f"first on line {first}")


def test_duplicate_nested_key_in_config(project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = CFG.read_text()
    assert "  opset:" in text
    CFG.write_text(text.replace("  opset:", "  dynamic_batch: true\n  dynamic_batch: false\n  opset:", 1))
    refused(capsys, ("export",), str(CFG), "key 'dynamic_batch' is given twice")


def test_anchors_aliases_and_merge_keys_still_work(project: Path) -> None:
    from pipeline.config import load_config
    from pipeline.yamlio import load_yaml_text

    text = CFG.read_text()
    CFG.write_text(text.replace("latency: {percentile: p50, slack_ms: 0.1}",
                                "latency: &lat {percentile: p50, slack_ms: 0.1}", 1)
                   .replace("    fp32: {max_drop_vs_pytorch", "    fp32: {<<: {max_latency_regression: 0.4}, max_drop_vs_pytorch", 1))
    cfg = load_config(quiet=True)
    assert cfg.gate.thresholds["fp32"].max_latency_regression == 0.5  # the mapping's own key overrides the merge
    data = load_yaml_text("base: &b {x: 1, y: 2}\nc:\n  <<: *b\n  x: 3\nd: *b\n", "t.yaml")
    assert data == {"base": {"x": 1, "y": 2}, "c": {"x": 3, "y": 2}, "d": {"x": 1, "y": 2}}


def test_alias_bomb_in_the_config_is_refused_not_hung(project: Path) -> None:
    CFG.write_text(CFG.read_text() + BOMB)
    before = tree()
    res = cli("publish", cwd=project, timeout=60)  # publish read the config and hung here
    assert res.returncode == 1, res.stderr
    one_error(res.stderr, "publish", str(CFG), "alias bomb")
    assert tree() == before


def test_alias_bomb_in_params(project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    Path("params.yaml").write_text(Path("params.yaml").read_text() + BOMB)
    refused(capsys, ("dvc", "--check"), "params.yaml", "alias bomb")


def test_every_yaml_read_goes_through_the_one_loader() -> None:
    """No module of pipeline/ or calibration/ parses YAML but pipeline/yamlio.py."""
    import re

    offenders = []
    for pkg in ("pipeline", "calibration"):
        for f in (ROOT / pkg).rglob("*.py"):
            if f.name == "yamlio.py":
                continue
            if re.search(r"yaml\.(safe_load|load|full_load|unsafe_load|load_all|safe_load_all)\(", f.read_text()):
                offenders.append(str(f.relative_to(ROOT)))
    assert offenders == []


# -- provenance: an ONNX model's external-data file is part of the model -----------------------------------------
def _export_with_external_data() -> Path:
    """What export writes for a model over 2 GB (or a user's own export): model.onnx + model.onnx.data; then
    validate checks that pair as every later stage's ONNX."""
    import onnx

    from pipeline.fileio import sha256_model

    onnx_path = Path("artifacts/export/model.onnx")
    m = onnx.load(str(onnx_path))
    onnx.save_model(m, str(onnx_path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="model.onnx.data", size_threshold=0)
    rep = json.loads(Path("artifacts/export/export.json").read_text())
    rep["sha256"]["onnx"] = sha256_model(onnx_path)
    Path("artifacts/export/export.json").write_text(json.dumps(rep, indent=2))
    assert trtpipe("validate") == 0
    return onnx_path.parent / "model.onnx.data"


def test_changed_external_data_is_a_changed_model(finished: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = _export_with_external_data()
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # one weight changed; model.onnx itself is byte-identical
    data.write_bytes(bytes(raw))
    refused(capsys, ("calibrate",), "artifacts/export/model.onnx", "external data model.onnx.data",
            "is not the file validate wrote", "re-run validate")


def test_missing_external_data_is_refused(finished: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = _export_with_external_data()
    data.unlink()
    refused(capsys, ("calibrate",), "model.onnx.data")


def test_external_data_export_is_accepted_when_unchanged(finished: Path) -> None:
    from pipeline.fileio import sha256_file, sha256_model

    _export_with_external_data()
    onnx_path = Path("artifacts/export/model.onnx")
    assert sha256_model(onnx_path) != sha256_file(onnx_path)  # the digest covers the weights file too
    assert trtpipe("calibrate") == 0
    rep = json.loads(Path("artifacts/calibrate/calibrate.json").read_text())
    assert rep["sha256"]["onnx"] == sha256_model(onnx_path)


# -- OS errors: one line naming the path and what to do; a bug keeps its traceback --------------------------------
def _fsize_limit(limit: int) -> Callable[[], None]:
    def set_limit() -> None:
        import resource
        import signal

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of killing the process
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return set_limit


def test_file_size_limit_while_prepare_writes(finished: Path) -> None:
    before = tree()
    res = cli("prepare", cwd=finished, preexec=_fsize_limit(20_000))
    assert res.returncode == 1, res.stderr
    one_error(res.stderr, "prepare", "artifacts/prepare/model.pt", "File too large", "ulimit -f")
    assert tree() == before


def test_name_too_long_in_an_output_path(finished: Path, capsys: pytest.CaptureFixture[str]) -> None:
    refused(capsys, ("compare", "--out", "artifacts/" + "c" * 300), "c" * 300, "File name too long", "shorten it")


def test_name_too_long_from_model_name(finished: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = CFG.read_text()
    CFG.write_text(text.replace("name: digits-cnn", "name: " + "digits-cnn-" * 30, 1))
    line = refused(capsys, ("publish",), "digits-cnn-digits-cnn")
    assert "too long" in line.lower() or "shorten" in line.lower(), line


@pytest.mark.parametrize("argv, fragment", [
    (("export", "--checkpoint", "folder.pt"), "folder.pt: is a folder"),
    (("validate", "--eval-data", "folder.npz"), "folder.npz: is a folder"),
    (("calibrate", "--calib-data", "folder.npz"), "folder.npz: is a folder"),
    (("prepare", "--config", "folder.yaml"), "folder.yaml: is a folder"),
    (("prepare", "--params", "folder.yaml"), "folder.yaml: is a folder"),
    (("gate", "--report", "folder.json"), "folder.json: is a folder"),
    (("evaluate", "--precision", "fp16", "--reference", "folder.npz"), "folder.npz: is a folder"),
], ids=["checkpoint", "eval-data", "calib-data", "config", "params", "gate-report", "reference"])
def test_folder_where_a_file_is_expected(finished: Path, capsys: pytest.CaptureFixture[str], argv: tuple[str, ...],
                                         fragment: str) -> None:
    for name in ("folder.pt", "folder.npz", "folder.yaml", "folder.json"):
        Path(name).mkdir()
        (Path(name) / "inside").write_text("x")
    refused(capsys, argv, fragment, code=2 if argv[0] == "gate" else 1)


def test_folder_in_place_of_an_eval_report_is_not_skipped(finished: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """compare used to leave fp16 out silently when eval/fp16.json was a folder."""
    f = Path("artifacts/eval/fp16.json")
    f.unlink()
    f.mkdir()
    refused(capsys, ("compare",), "artifacts/eval/fp16.json: is a folder", code=2)


def test_folder_in_place_of_the_data_file(finished: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from tests._project import edit_yaml

    Path("data.npz").mkdir()
    edit_yaml(CFG, lambda d: d["data"].update(source="npz", path="data.npz"))
    refused(capsys, ("prepare",), "data.npz: is a folder")


def test_permission_denied_under_a_library_wrapper(finished: Path, capsys: pytest.CaptureFixture[str],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """torch wraps the OS's error in its own RuntimeError: the boundary still finds and names it."""
    import errno

    import torch

    def denied(obj: Any, f: Any, *a: Any, **k: Any) -> None:
        try:
            raise PermissionError(errno.EACCES, "Permission denied")
        except PermissionError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")

    monkeypatch.setattr(torch, "save", denied)
    refused(capsys, ("prepare",), "permission denied", "artifacts/prepare/model.pt", "check the permissions")


def test_a_bug_keeps_its_traceback(finished: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    from pipeline.stages import compare

    def bug(*a: Any, **k: Any) -> None:
        raise OSError(errno.EBADF, "Bad file descriptor")  # trtpipe's own mistake, not the machine's

    monkeypatch.setattr(compare, "run", bug)
    with pytest.raises(OSError):
        trtpipe("compare")
    monkeypatch.setattr(compare, "run", lambda *a, **k: {}["missing"])
    with pytest.raises(KeyError):
        trtpipe("compare")


# -- output ownership: a stage writes only into an output it owns -------------------------------------------------
OUT_CASES = [
    (("prepare", "--out", "artifacts"), "is not empty and is not prepare's output"),
    (("prepare", "--out", "."), "is the project folder"),
    (("compare", "--out", "/"), "a folder above it"),
    (("export", "--out", "artifacts/prepare"), "an input of this run"),
    (("validate", "--out", "artifacts/export"), "an input of this run"),
    (("calibrate", "--out", "artifacts/validate"), "an input of this run"),
    (("compare", "--out", "artifacts/calibrate"), "no compare.json in it"),
    (("compare", "--out", "artifacts/registry"), "the registry"),
    (("build", "--precision", "fp16", "--out", "artifacts/build/fp32"), "for precision 'fp32', not 'fp16'"),
    (("build", "--precision", "fp32", "--out", "artifacts/publish/current/fp32"), "published version"),
    (("compare", "--out", "configs"), "no compare.json in it"),
    (("compare", "--out", "params.yaml"), "is a file"),
    (("evaluate", "--precision", "fp32", "--out", "artifacts/prepare/model.pt"), "is a .pt file"),
    (("evaluate", "--precision", "fp32", "--out", "artifacts/eval"), "is a folder"),
    (("evaluate", "--precision", "fp16", "--out", "artifacts/eval/fp32.json"), "not recognisably written by it"),
    (("evaluate", "--precision", "fp32", "--out", "artifacts/compare/compare.json"), "not recognisably written by it"),
    (("publish", "--out", "configs/digits.yaml"), "is a .yaml file"),
    (("publish", "--out", "artifacts/eval/int8.json"), "not recognisably written by it"),
    (("publish", "--out", "artifacts/publish"), "is a folder"),
    (("gate", "--junit", "artifacts/compare/compare.json"), "an input of this run"),
    (("gate", "--junit", "artifacts/eval/fp32.json"), "not recognisably written by it"),
    (("gate", "--summary", "artifacts/prepare/model.pt"), "is a .pt file"),
    (("gate", "--summary", "artifacts"), "is a folder"),
]


@pytest.mark.parametrize("argv, fragment", OUT_CASES, ids=["-".join(c[0]).replace("/", "_") for c in OUT_CASES])
def test_an_output_that_is_not_the_stages_own_is_refused(finished: Path, capsys: pytest.CaptureFixture[str],
                                                          argv: tuple[str, ...], fragment: str) -> None:
    # the whole project (configs, params, every artifact, the registry) is byte-identical afterwards
    out = argv[argv.index("--out") + 1] if "--out" in argv else argv[-1]
    refused(capsys, argv, out, fragment, code=2 if argv[0] == "gate" else 1)


@pytest.mark.parametrize("where", ["artifacts", "artifacts/prepare/model.pt", "artifacts/compare/compare.json",
                                   "configs/digits.yaml"])
def test_github_step_summary_is_appended_only_to_a_text_file(finished: Path, capsys: pytest.CaptureFixture[str],
                                                             monkeypatch: pytest.MonkeyPatch, where: str) -> None:
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", where)
    refused(capsys, ("gate",), "$GITHUB_STEP_SUMMARY", where, code=2)


def test_own_outputs_are_still_replaced(finished: Path, capsys: pytest.CaptureFixture[str],
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Re-runs into a stage's own output, a new folder, an empty one, and the gate's own files all work."""
    Path("empty").mkdir()
    assert trtpipe("compare") == 0
    assert trtpipe("compare", "--out", "empty") == 0 and Path("empty/compare.json").is_file()
    assert trtpipe("compare", "--out", "new/compare") == 0
    assert trtpipe("evaluate", "--precision", "fp16") == 0
    Path("summary.md").write_text("## earlier steps\n")
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", "summary.md")
    for _ in range(2):
        assert trtpipe("gate", "--junit", "gate.xml", "--summary", "gate.md") == 0
    assert Path("summary.md").read_text().startswith("## earlier steps\n")
    assert Path("summary.md").read_text().count("trtpipe gate passed") == 2
    capsys.readouterr()


# -- the gate: a compare.json of another model, or one that contradicts itself --------------------------------------
def _edit_compare(fn: Callable[[dict], None]) -> None:
    p = Path("artifacts/compare/compare.json")
    d = json.loads(p.read_text())
    fn(d)
    p.write_text(json.dumps(d, indent=2))


GATE_CASES = [
    ("other-model", lambda d: d.update(model="resnet50"), ("compare.json: model: is 'resnet50'", "'digits-cnn'")),
    ("agreement-row-raised", lambda d: d["variants"]["int8"].update(fp32_cosine=0.99999),
     ("variants.int8.fp32_cosine", "agreement.int8.fp32")),
    ("agreement-section-lowered", lambda d: d["agreement"]["int8"]["fp32"]["logits"].update(top1_agreement=0.5),
     ("variants.int8.fp32_top1_agreement",)),
    ("metric-raised-delta-kept", lambda d: d["variants"]["int8"].update(top1=d["variants"]["int8"]["top1"] + 5),
     ("variants.int8.top1_delta",)),
    ("flags-removed", lambda d: (d["flags"].update(int8=["NaN outputs"])), ("variants.int8.flagged",)),
    ("speedup-forged", lambda d: d["variants"]["int8"].update(b1_speedup=9.0), ("variants.int8.b1_speedup",)),
]


@pytest.mark.parametrize("name, edit, fragments", GATE_CASES, ids=[c[0] for c in GATE_CASES])
def test_gate_fails_a_foreign_or_self_contradicting_report(finished: Path, capsys: pytest.CaptureFixture[str],
                                                          name: str, edit: Callable[[dict], None],
                                                          fragments: tuple[str, ...]) -> None:
    assert trtpipe("gate") == 0  # the untouched report passes
    _edit_compare(edit)
    refused(capsys, ("gate",), *fragments)
