"""`trtpipe diagnose` (pipeline/diagnose.py) on a real digits run, on the CPU path: every node of
the FP32 ONNX compared in topological order, every quantized node listed, the first diverging
node a real node, a range planted 100x too wide flagged at the node that reads it, tune's
sensitivity cross-referenced, bad input one line."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from tests._project import trtpipe

ROOT = Path(__file__).resolve().parents[1]
PARAMS = {"config": "configs/digits.yaml", "override": True, "build": {"backend": "onnxruntime"},
          "calibration": {"num_samples": 64}}


@pytest.fixture(scope="module")
def run_root(clean: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("diagnose")
    shutil.copytree(ROOT / "configs", root / "configs")
    for sub in ("prepare", "export", "validate", "calibrate", "build"):
        shutil.copytree(clean / sub, root / "artifacts" / sub)
    (root / "params.yaml").write_text(yaml.safe_dump(PARAMS))
    return root


@pytest.fixture
def proj(run_root: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(run_root)
    return run_root


def _diagnose(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = trtpipe("-q", "diagnose", *args)
    c = capsys.readouterr()
    return code, c.out, c.err


def _quantized_nodes(path: Path) -> set[str]:
    import onnx

    m = onnx.load(str(path))
    dq = {o for n in m.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    return {n.name for n in m.graph.node if n.op_type not in ("QuantizeLinear", "DequantizeLinear")
            and any(i in dq for i in n.input)}


def _snr(ref: np.ndarray, got: np.ndarray) -> float:
    ref, got = ref.astype(np.float64), got.astype(np.float64)
    return 10 * math.log10(float(np.sum(ref ** 2)) / float(np.sum((ref - got) ** 2)))


def test_int8_every_node_in_order_every_quantized_node_listed(proj: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import onnx

    from calibration.ort_session import make_session

    code, out, err = _diagnose(capsys, "--precision", "int8", "--tolerance", "60", "--out", "diag/int8-60.json")
    assert code == 0, err
    assert out.startswith("diagnose@int8: onnxruntime on 8 samples;") and out.strip().endswith("(+ int8-60.png)")
    rep = json.loads(Path("diag/int8-60.json").read_text())
    assert Path("diag/int8-60.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    fp32 = onnx.load("artifacts/export/model.onnx")
    names = [n.name for n in fp32.graph.node]
    assert [r["node"] for r in rep["layers"]] == names and all(r["compared"] for r in rep["layers"])
    expected_q = _quantized_nodes(Path("artifacts/build/int8/model.onnx"))
    assert expected_q and set(rep["quantized_nodes"]) == expected_q
    assert {r["node"] for r in rep["layers"] if r["quantized"]} == expected_q
    # the first diverging node: a node of the ONNX, the first (topological order) whose SNR is under 60 dB
    first_below = next(r["node"] for r in rep["layers"] if r["snr_db"] < 60)
    assert rep["first_diverging"] == first_below and first_below in names
    assert rep["path"] == "onnxruntime" and rep["samples"] == 8
    # the numbers are the models' own: the output's SNR recomputed from two plain sessions
    with np.load("artifacts/prepare/eval.npz") as z:
        x = z["input"][:8]
    ref = make_session("artifacts/export/model.onnx").run(None, {"input": x})[0]
    got = make_session("artifacts/build/int8/model.onnx").run(None, {"input": x})[0]
    assert rep["outputs"]["logits"]["snr_db"] == pytest.approx(_snr(ref, got), abs=0.05)
    assert rep["layers"][-1]["snr_db"] == pytest.approx(_snr(ref, got), abs=0.05)


def test_a_range_planted_100x_too_wide_is_flagged_at_the_node_reading_it(proj: Path, tmp_path: Path,
                                                                          capsys: pytest.CaptureFixture[str]) -> None:
    import onnx

    from calibration.qdq import quantize_qdq, read_qdq_scales

    ranges = json.loads(Path("artifacts/calibrate/ranges.json").read_text())["tensors"]
    clean_qdq = Path("artifacts/calibrate/model.qdq.onnx")
    clean_scales = read_qdq_scales(clean_qdq)
    m = onnx.load(str(clean_qdq))
    inputs = {i.name for i in m.graph.input}
    acts = [n.input[0] for n in m.graph.node if n.op_type == "QuantizeLinear" and n.input[0] not in inputs]
    assert len(acts) >= 3
    target = acts[len(acts) // 2]  # a tensor in the middle of the network
    amax = {k: v["amax"] for k, v in ranges.items()}
    amax[target] *= 100
    bad = tmp_path / "bad.qdq.onnx"
    quantize_qdq("artifacts/export/model.onnx", bad, amax)
    assert float(read_qdq_scales(bad)[target]["scale"]) == pytest.approx(100 * float(clean_scales[target]["scale"]),
                                                                        rel=1e-5)
    bm = onnx.load(str(bad))
    dq_out = next(n.output[0] for n in bm.graph.node if n.op_type == "DequantizeLinear"
                  and n.input[0] == f"{target}_QuantizeLinear_Output")
    readers = [n.name for n in bm.graph.node if dq_out in n.input]
    assert len(readers) == 1

    code, out, err = _diagnose(capsys, "--precision", "int8", "--variant", str(bad), "--out", str(tmp_path / "bad.json"))
    assert code == 0, err
    rep = json.loads((tmp_path / "bad.json").read_text())
    assert rep["first_diverging"] == readers[0]
    assert f"first diverging: {readers[0]} (" in out
    flagged = rep["flagged"][0]
    q = next(i for i in flagged["quantized_inputs"] if i["tensor"] == target)
    assert q["scale"] == pytest.approx(100 * float(clean_scales[target]["scale"]), rel=1e-5)
    rows = {r["node"]: r for r in rep["layers"]}
    order = [r["node"] for r in rep["layers"]]
    assert all(not rows[n]["below_tolerance"] for n in order[:order.index(readers[0])])
    # the same node in the calibrated model is well above the tolerance: the flag is the planted range's
    code, _, err = _diagnose(capsys, "--precision", "int8", "--out", str(tmp_path / "clean.json"))
    assert code == 0, err
    clean_rows = {r["node"]: r for r in json.loads((tmp_path / "clean.json").read_text())["layers"]}
    assert not clean_rows[readers[0]]["below_tolerance"]
    assert clean_rows[readers[0]]["snr_db"] > rows[readers[0]]["snr_db"] + 20


def test_fp16_and_the_default_report_path(proj: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _diagnose(capsys, "--precision", "fp16", "--samples", "4")
    assert code == 0, err
    rep = json.loads(Path("artifacts/diagnose/fp16.json").read_text())
    assert Path("artifacts/diagnose/fp16.png").is_file()
    assert rep["quantized_nodes"] == [] and rep["samples"] == 4 and rep["stage"] == "diagnose"
    dtypes = [r["variant_dtype"] for r in rep["layers"] if r["compared"]]
    assert dtypes.count("float16") >= len(dtypes) - 1  # the fp16 model's tensors; the output Cast back to float32
    assert 30 < rep["outputs"]["logits"]["snr_db"] < math.inf
    code, _, err = _diagnose(capsys, "--precision", "fp16", "--samples", "4")
    assert code == 0, err  # its own earlier report is replaced


def _tune(out: Path) -> Any:
    """tune run into `out` with a budget full INT8 misses (cosine 0.99999): layers ranked and kept; its config."""
    from pipeline.config import load_config
    from pipeline.stages import tune

    params = {**PARAMS, "tune": {"budget": {"metric": "cosine@logits", "min": 0.99999}}}
    Path("params-tune.yaml").write_text(yaml.safe_dump(params))
    cfg = load_config(None, "params-tune.yaml", quiet=True)
    tune.run(cfg, Path("artifacts/export/model.onnx"), Path("artifacts/calibrate"), Path("artifacts/prepare/eval.npz"),
             out, validation=Path("artifacts/validate/validate.json"), calib_data=Path("artifacts/prepare/calib.npz"),
             progress=False)
    return cfg


def test_tune_sensitivity_is_cross_referenced(proj: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _tune(tmp_path / "tune")
    t = json.loads((tmp_path / "tune" / "tune.json").read_text())
    assert t["sensitivity"], "this budget is not met by full INT8, so tune ranks the layers"
    code, out, err = _diagnose(capsys, "--precision", "int8", "--tune-dir", str(tmp_path / "tune"), "--out",
                               str(tmp_path / "d.json"))
    assert code == 0, err
    rep = json.loads((tmp_path / "d.json").read_text())
    rank = {s["layer"]: s["rank"] for s in t["sensitivity"]}
    layer_of = {n: layer["name"] for layer in t["layers"] for n in layer["nodes"]}
    kept = {k["layer"] for k in t["kept"]}
    for r in rep["layers"]:
        if r["node"] in layer_of:
            assert r["tune"]["layer"] == layer_of[r["node"]]
            assert r["tune"]["sensitivity_rank"] == rank.get(layer_of[r["node"]])
            assert r["tune"]["kept_in_float"] == (layer_of[r["node"]] in kept)
        else:
            assert "tune" not in r
    assert rep["tune"]["most_sensitive"][0] == next(s["layer"] for s in t["sensitivity"] if s["rank"] == 1)


@pytest.mark.parametrize("args, words", [
    (("--precision", "int8", "--build-dir", "nowhere"), ["nowhere/build.json", "not found", "build@int8"]),
    (("--precision", "int8", "--build-dir", "artifacts/build/fp16"), ["is a fp16 build, not int8"]),
    (("--precision", "fp16", "--eval-data", "missing.npz"), ["missing.npz", "not found"]),
    (("--precision", "int8", "--variant", "artifacts/export/model.onnx", "--out", "x.json"),
     ["no QuantizeLinear/DequantizeLinear", "not an int8 variant"]),
    (("--precision", "int8", "--variant", "params.yaml", "--out", "x.json"), ["--variant params.yaml", "not an ONNX"]),
    (("--precision", "int8", "--out", "artifacts/prepare/eval.npz"), ["--out", "input of this run"]),
    (("--precision", "int8", "--samples", "0", "--out", "x.json"), ["--samples 0"]),
])
def test_bad_input_is_one_line(proj: Path, capsys: pytest.CaptureFixture[str], args: tuple[str, ...],
                               words: list[str]) -> None:
    code, out, err = _diagnose(capsys, *args)
    lines = err.strip().splitlines()
    assert code in (1, 2) and out == "" and len(lines) == 1, err
    assert lines[0].startswith("trtpipe diagnose: error: ") and all(w in lines[0] for w in words), lines[0]
    assert not Path("x.json").exists()


def test_fp32_is_a_usage_error(proj: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _diagnose(capsys, "--precision", "fp32")
    assert code == 2 and "invalid choice: 'fp32'" in err


def test_verbose_keeps_stdout_to_the_result_line(proj: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()
    assert trtpipe("-v", "diagnose", "--precision", "int8", "--samples", "2", "--out", str(tmp_path / "v.json")) == 0
    c = capsys.readouterr()
    assert len(c.out.splitlines()) == 1 and c.out.startswith("diagnose@int8: ")  # Polygraphy's own log is on stderr
    assert "trtpipe: debug: diagnose@int8: 2 samples" in c.err


def test_without_matplotlib_every_number_is_written_and_the_plot_skipped(proj: Path, tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch,
                                                                          capsys: pytest.CaptureFixture[str]) -> None:
    """The GPU-side install (trtpipe[tensorrt]) has no matplotlib: diagnose still reports, says why no plot."""
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    out = tmp_path / "int8.json"
    capsys.readouterr()
    code = trtpipe("diagnose", "--precision", "int8", "--samples", "4", "--out", str(out))
    c = capsys.readouterr()
    assert code == 0, c.err
    rep = json.loads(out.read_text())
    assert rep["plot"] is None and not out.with_suffix(".png").exists() and rep["layers"]
    assert "matplotlib is not installed" in c.err and "Traceback" not in c.err
    assert "(+ " not in c.out


def test_a_tuned_tensorrt_int8_build_is_diagnosed_on_the_qdq_onnx_it_used(proj: Path, tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    """A TensorRT int8 build that applied tune (explicit route: tune's Q/DQ ONNX, kept layers without
    Q/DQ) is diagnosed on that ONNX, not on calibrate's full-INT8 one; an edited tuned ONNX is refused."""
    import onnx

    from pipeline.stages import build
    from tests.backends.test_trt_versions import _Memory
    from tests.backends.trt_standin import install

    cfg = _tune(tmp_path / "tune")
    t = json.loads((tmp_path / "tune" / "tune.json").read_text())
    assert t["met"] and t["kept"], "this budget keeps some layers out of INT8"

    # the build, by the build stage, with TensorRT 11's stand-in (int8 there is the typed Q/DQ route)
    import pipeline.backends as backends
    from pipeline.backends import tensorrt_backend
    from pipeline.runtime import cuda_memory

    with monkeypatch.context() as m:
        install(m, "11.1.0")
        m.setattr(backends, "tensorrt_usable", lambda: (True, ""))
        m.setattr(tensorrt_backend, "device_info", lambda i=0: {"gpu": "stand-in"})
        m.setattr(cuda_memory, "open_memory", lambda kind="auto", device=0: _Memory())
        trt_cfg = cfg.model_copy(update={"build": cfg.build.model_copy(update={
            "backend": "tensorrt", "int8_from_tune": True, "timing_cache": None})})
        build.run(trt_cfg, "int8", Path("artifacts/export/model.onnx"), tmp_path / "b8", Path("artifacts/calibrate"),
                  Path("artifacts/prepare/calib.npz"), Path("artifacts/validate/validate.json"), tmp_path / "tune")
    b = json.loads((tmp_path / "b8" / "build.json").read_text())
    assert b["backend"] == "tensorrt" and b["tune"]["qdq_onnx"] == str(tmp_path / "tune" / "model.qdq.onnx")

    # TensorRT does not import here: the CPU path, on tune's Q/DQ ONNX
    code, out, err = _diagnose(capsys, "--precision", "int8", "--build-dir", str(tmp_path / "b8"), "--tune-dir",
                               str(tmp_path / "tune"), "--out", str(tmp_path / "d.json"))
    assert code == 0, err
    rep = json.loads((tmp_path / "d.json").read_text())
    assert rep["variant_onnx"] == str(tmp_path / "tune" / "model.qdq.onnx")
    kept_nodes = {n for layer in t["layers"] if layer["name"] in {k["layer"] for k in t["kept"]} for n in layer["nodes"]}
    assert kept_nodes and not kept_nodes & set(rep["quantized_nodes"])
    assert set(rep["quantized_nodes"]) == _quantized_nodes(tmp_path / "tune" / "model.qdq.onnx")
    assert set(rep["quantized_nodes"]) != _quantized_nodes(Path("artifacts/calibrate/model.qdq.onnx"))

    model = onnx.load(str(tmp_path / "tune" / "model.qdq.onnx"))
    model.doc_string = "edited"
    onnx.save(model, str(tmp_path / "tune" / "model.qdq.onnx"))
    code, out, err = _diagnose(capsys, "--precision", "int8", "--build-dir", str(tmp_path / "b8"), "--tune-dir",
                               str(tmp_path / "tune"), "--out", str(tmp_path / "d2.json"))
    assert code != 0 and len(err.strip().splitlines()) == 1 and "changed since the int8 build" in err
    assert not (tmp_path / "d2.json").exists()
