"""`trtpipe artifacts export --triton DIR`: a Triton model repository from real published
versions (tests/_small_registry.py), its config.pbtxt checked field by field."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from pipeline import triton
from pipeline.errors import ArtifactError

from tests import _small_registry as small

publish_trt = small.published_engine  # a TensorRT version for one compute capability, by the real publish path


def parse_pbtxt(text: str) -> dict[str, Any]:
    """The subset of protobuf text format config.pbtxt uses: scalars, lists of messages, int lists."""
    tokens = re.findall(r'"(?:[^"\\]|\\.)*"|[\[\]{},:]|[^\s\[\]{},:"]+', "\n".join(
        line for line in text.splitlines() if not line.lstrip().startswith("#")))
    pos = 0

    def value() -> Any:
        nonlocal pos
        t = tokens[pos]
        pos += 1
        if t == "{":
            return message("}")
        if t == "[":
            items = []
            while tokens[pos] != "]":
                items.append(value())
                if tokens[pos] == ",":
                    pos += 1
            pos += 1
            return items
        if t.startswith('"'):
            return t[1:-1]
        return int(t) if re.fullmatch(r"-?\d+", t) else t

    def message(end: str | None) -> dict[str, Any]:
        nonlocal pos
        out: dict[str, Any] = {}
        while pos < len(tokens) and tokens[pos] != end:
            key = tokens[pos]
            pos += 1
            if tokens[pos] == ":":
                pos += 1
            assert key not in out, f"field {key} twice"
            out[key] = value()
        pos += 1
        return out

    return message(None)


@pytest.fixture
def reg(tmp_path: Path) -> dict[str, Any]:
    reg = tmp_path / "registry"
    ort = small.published(tmp_path / "w", reg, "fp32")
    v90, p90, _ = publish_trt(tmp_path / "w", reg, "9.0")
    v80, p80, _ = publish_trt(tmp_path / "w", reg, "8.0")
    return {"reg": reg, "ort": ort, "trt": {"9.0": (v90, p90), "8.0": (v80, p80)}}


def test_export_two_architectures_and_onnxruntime(tmp_path: Path, reg: dict[str, Any]) -> None:
    out = tmp_path / "triton"
    written = triton.export(reg["reg"], out)
    assert set(written) == {"tiny-fp16", "tiny-fp32"}

    cfg = parse_pbtxt((out / "tiny-fp16" / "config.pbtxt").read_text())
    assert cfg["name"] == "tiny-fp16" and cfg["platform"] == "tensorrt_plan"
    assert cfg["max_batch_size"] == 32  # the profile's max batch
    assert cfg["input"] == [{"name": "input", "data_type": "TYPE_FP32", "dims": [4]}]
    assert cfg["output"] == [{"name": "logits", "data_type": "TYPE_FP32", "dims": [4]}]
    ccs = {e["key"]: e["value"] for e in cfg["cc_model_filenames"]}
    assert ccs == {"9.0": "model.sm90.plan", "8.0": "model.sm80.plan"}
    assert "default_model_filename" not in cfg  # two architectures: no fallback
    for cc, fname in ccs.items():
        f = out / "tiny-fp16" / "1" / fname
        assert f.is_file() and not f.is_symlink()
        assert f.read_bytes() == (reg["trt"][cc][1] / "model.plan").read_bytes()

    cfg = parse_pbtxt((out / "tiny-fp32" / "config.pbtxt").read_text())
    assert cfg["platform"] == "onnxruntime_onnx" and cfg["default_model_filename"] == "model.onnx"
    assert cfg["max_batch_size"] == 0  # no profile: full dims, batch axis -1
    assert cfg["input"] == [{"name": "input", "data_type": "TYPE_FP32", "dims": [-1, 4]}]
    assert (out / "tiny-fp32" / "1" / "model.onnx").read_bytes() == (reg["ort"].path / "model.onnx").read_bytes()
    assert (out / triton.MARKER).is_file()

    # a second export over its own previous export is allowed, and gives the same files
    before = small.tree(out)
    triton.export(reg["reg"], out)
    assert {k: v[0] for k, v in small.tree(out).items()} == {k: v[0] for k, v in before.items()}


def test_latest_per_architecture_and_single_default(tmp_path: Path, reg: dict[str, Any]) -> None:
    newer, path, _ = publish_trt(tmp_path / "w", reg["reg"], "9.0", published_at="2026-12-02T10:00:00+00:00",
                                 plan=b"newer sm90 engine", workspace_mb=2048)  # a rebuild with other settings
    out = tmp_path / "triton"
    written = triton.export(reg["reg"], out)
    assert newer in written["tiny-fp16"]["versions"] and reg["trt"]["9.0"][0] not in written["tiny-fp16"]["versions"]
    assert (out / "tiny-fp16" / "1" / "model.sm90.plan").read_bytes() == b"newer sm90 engine"

    one = tmp_path / "one"
    triton.export(reg["reg"], one, [reg["trt"]["8.0"][0]])
    cfg = parse_pbtxt((one / "tiny-fp16" / "config.pbtxt").read_text())
    assert cfg["default_model_filename"] == "model.sm80.plan"
    assert {e["key"]: e["value"] for e in cfg["cc_model_filenames"]} == {"8.0": "model.sm80.plan"}
    assert not (one / "tiny-fp32").exists()


def test_refuses_mixed_onnx_digests(tmp_path: Path, reg: dict[str, Any]) -> None:
    other, _, _ = publish_trt(tmp_path / "w", reg["reg"], "8.0", scale=3.0)  # another ONNX
    out = tmp_path / "triton"
    with pytest.raises(ArtifactError) as e:
        triton.export(reg["reg"], out, [reg["trt"]["9.0"][0], other])
    msg = str(e.value)
    assert "\n" not in msg and reg["trt"]["9.0"][0] in msg and other in msg and "ONNX digest" in msg
    assert not out.exists()

    other_trt, _, _ = publish_trt(tmp_path / "w", reg["reg"], "8.0", trt="10.4.0")
    with pytest.raises(ArtifactError, match="backend version") as e:
        triton.export(reg["reg"], out, [reg["trt"]["9.0"][0], other_trt])
    assert reg["trt"]["9.0"][0] in str(e.value) and other_trt in str(e.value)
    assert not out.exists()


def test_refuses_existing_foreign_folder_and_damaged_version(tmp_path: Path, reg: dict[str, Any]) -> None:
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    r = subprocess.run([sys.executable, "-m", "pipeline.cli", "artifacts", "export", "--registry", str(reg["reg"]),
                        "--triton", str(out)], capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    assert r.returncode == 1, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and str(out) in r.stderr and triton.MARKER in r.stderr
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]

    (reg["trt"]["8.0"][1] / "model.plan").write_bytes(b"tampered")
    fresh = tmp_path / "fresh"
    with pytest.raises(ArtifactError, match="model.plan"):
        triton.export(reg["reg"], fresh)
    assert not fresh.exists()


def test_cli_export(tmp_path: Path, reg: dict[str, Any]) -> None:
    out = tmp_path / "triton"
    r = subprocess.run([sys.executable, "-m", "pipeline.cli", "artifacts", "export", "--registry", str(reg["reg"]),
                        "--triton", str(out)], capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    assert r.returncode == 0, r.stderr
    assert "tiny-fp16" in r.stdout and "model.sm80.plan" in r.stdout
    assert (out / "tiny-fp16" / "config.pbtxt").is_file()


def test_ampere_plus_engine_is_the_default_beside_exact_architectures(tmp_path: Path) -> None:
    """A native sm90 engine and a hardware-compatible one built on the same 9.0 GPU: two files, the
    native one for 9.0, the ampere_plus one the default for every other GPU (8.0 and later)."""
    reg = tmp_path / "registry"
    v90, p90, _ = publish_trt(tmp_path / "w", reg, "9.0")
    vamp, pamp, mamp = publish_trt(tmp_path / "w", reg, "9.0", hardware_compatibility="ampere_plus")
    assert mamp["settings"]["hardware_compatibility"] == "ampere_plus"
    out = tmp_path / "triton"
    written = triton.export(reg, out)
    assert written["tiny-fp16"]["versions"] == [v90, vamp]
    cfg = parse_pbtxt((out / "tiny-fp16" / "config.pbtxt").read_text())
    assert {e["key"]: e["value"] for e in cfg["cc_model_filenames"]} == {"9.0": "model.sm90.plan"}
    assert cfg["default_model_filename"] == "model.ampere_plus.plan"
    assert (out / "tiny-fp16" / "1" / "model.sm90.plan").read_bytes() == (p90 / "model.plan").read_bytes()
    assert (out / "tiny-fp16" / "1" / "model.ampere_plus.plan").read_bytes() == (pamp / "model.plan").read_bytes()

    # only the hardware-compatible engine: no cc list, the one file is the default
    out2 = tmp_path / "triton2"
    triton.export(reg, out2, versions=[vamp])
    cfg = parse_pbtxt((out2 / "tiny-fp16" / "config.pbtxt").read_text())
    assert "cc_model_filenames" not in cfg and cfg["default_model_filename"] == "model.ampere_plus.plan"
