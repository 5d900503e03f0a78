"""The calibrate stage end to end on the digits CNN and real digits: ranges, TensorRT cache,
Q/DQ model and report agree bit for bit; bad inputs give clear errors; the output folder
is replaced atomically."""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from calibration.algorithms import amax_to_scale
from calibration.cache import hex_to_scale, read_cache
from pipeline.datasets import load_splits
from calibration.errors import CacheMismatchError, CalibrationError
from calibration.qdq import read_qdq_scales
from pipeline.config import CalibrationConfig, load_config
from pipeline.errors import DataError
from pipeline.stages import calibrate

ROOT = Path(__file__).resolve().parents[2]
FIXTURE_DIR = (ROOT / ".." / "shared" / "fixtures" / "trt86-resnet18-entropy2").resolve()


def _cfg(**calibration):
    cfg = load_config(ROOT / "configs" / "digits.yaml", params_path=ROOT / "no-params.yaml")
    return cfg.model_copy(update={"calibration": CalibrationConfig(**{**cfg.calibration.model_dump(), **calibration})})


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> tuple[Path, Path]:
    """The digits CNN (random weights, exported like the export stage does) and the
    prepared calibration samples (digits, preprocessed by the config)."""
    import torch

    from pipeline.models import digits_cnn

    folder = tmp_path_factory.mktemp("digits")
    cfg = _cfg()
    splits = load_splits(cfg.data, cfg.model.input)
    np.save(folder / "calib.npy", splits.calibration.x)
    torch.manual_seed(0)
    net = digits_cnn().eval()
    torch.onnx.export(net, torch.from_numpy(splits.calibration.x[:1]), str(folder / "model.onnx"),
                      input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "b"}, "logits": {0: "b"}}, opset_version=17, dynamo=False)
    return folder / "model.onnx", folder / "calib.npy"


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_entropy_outputs_agree_bit_for_bit(digits, tmp_path: Path):
    onnx_path, calib = digits
    out = tmp_path / "calibrate"
    report = calibrate.run(_cfg(), onnx_path, calib, out, progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["calibrate.json", "calibration.cache", "model.qdq.onnx",
                                                     "ranges.json"]
    assert report == json.loads((out / "calibrate.json").read_text())
    assert report["method"] == "entropy" and report["samples"] == 320 and report["batches"] == 10
    assert report["rules"] == "tensorrt" and report["histogram_growth"] == "double"
    assert report["samples_available"] == 359 and report["tensors"] >= 10
    assert report["peak_rss_mb"] > 0 and report["seconds"]["total"] > 0
    for name in ("ranges.json", "calibration.cache", "model.qdq.onnx"):
        assert report["sha256"][name] == _sha(out / name)
    assert report["sha256"]["calib_data"] == _sha(calib)
    assert report["qdq"]["check_first_samples"]["cosine_min"] > 0.99
    import onnx

    onnx.checker.check_model(onnx.load(str(out / "model.qdq.onnx")), full_check=True)

    ranges = json.loads((out / "ranges.json").read_text())["tensors"]
    cache = read_cache(out / "calibration.cache", expect_version="8.6.0", expect_algorithm="EntropyCalibration2")
    assert list(cache.scales) == list(ranges)  # same tensors, graph order, graph input first
    assert next(iter(ranges)) == "input"
    qdq = read_qdq_scales(out / "model.qdq.onnx")
    for name, r in ranges.items():
        scale = amax_to_scale(r["amax"])
        assert np.float32(r["scale"]).view(np.uint32) == scale.view(np.uint32), name
        assert hex_to_scale(r["scale_hex"]).view(np.uint32) == scale.view(np.uint32), name
        assert cache.scales[name].view(np.uint32) == scale.view(np.uint32), name
        # tensorrt rules: 2048 bins whatever the growth, amax up to half a bin above the top
        assert r["method"] == "entropy" and r["num_bins"] == 2048 and r["bin_width"] > 0
        assert 0 < r["amax"] <= (2048.5 + 1e-9) * r["bin_width"]
        if name in qdq:
            assert qdq[name]["scale"].view(np.uint32) == scale.view(np.uint32), name
    assert "input" in qdq and sum(not v["weight"] for v in qdq.values()) == report["qdq"]["activations"]


def test_rules_tensorrt_against_reference(digits, tmp_path: Path):
    """The two rule sets on the same data: tensorrt keeps 2048 bins and doubles the width
    of a grown tensor, puts amax at a bin centre and gives the MaxPool output its input's
    range; reference appends bins, puts amax on a bin edge, MaxPool on its own."""
    onnx_path, calib = digits
    calibrate.run(_cfg(), onnx_path, calib, tmp_path / "t", progress=False)
    ref_rep = calibrate.run(_cfg(rules="reference"), onnx_path, calib, tmp_path / "r", progress=False)
    assert ref_rep["rules"] == "reference" and ref_rep["histogram_growth"] == "append"
    trt = json.loads((tmp_path / "t" / "ranges.json").read_text())["tensors"]
    ref = json.loads((tmp_path / "r" / "ranges.json").read_text())["tensors"]
    grown = [n for n, r in ref.items() if r["num_bins"] > 2048]
    assert grown, "digits calibration data should grow some histograms"
    for name in ref:
        t, r = trt[name], ref[name]
        first_width = r["bin_width"]  # reference keeps the first batch's width
        assert t["bin_width"] == pytest.approx(first_width * (2 if name in grown else 1), rel=1e-12), name
        assert r["amax"] / r["bin_width"] == pytest.approx(round(r["amax"] / r["bin_width"]), abs=1e-6), name
        if "range_from" not in t:
            bins = t["amax"] / t["bin_width"]
            assert bins - 0.5 == pytest.approx(round(bins - 0.5), abs=1e-6), name
    pools = [n for n in trt if "MaxPool" in n]
    assert pools
    for name in pools:
        src = trt[name]["range_from"]
        assert trt[name]["amax"] == trt[src]["amax"] and "range_from" not in ref[name]


def test_deterministic(digits, tmp_path: Path):
    onnx_path, calib = digits
    a = calibrate.run(_cfg(), onnx_path, calib, tmp_path / "a", progress=False)
    b = calibrate.run(_cfg(), onnx_path, calib, tmp_path / "b", progress=False)
    for name in ("ranges.json", "calibration.cache", "model.qdq.onnx"):
        assert a["sha256"][name] == b["sha256"][name], name


def test_seeded_sample_choice(digits, tmp_path: Path):
    onnx_path, calib = digits
    a = calibrate.run(_cfg(num_samples=64, batch_size=16), onnx_path, calib, tmp_path / "a", progress=False)
    b = calibrate.run(_cfg(num_samples=64, batch_size=16, seed=1), onnx_path, calib, tmp_path / "b", progress=False)
    assert a["samples"] == b["samples"] == 64 and a["batches"] == 4
    assert a["sha256"]["ranges.json"] != b["sha256"]["ranges.json"]
    c = calibrate.run(_cfg(num_samples=100, batch_size=32), onnx_path, calib, tmp_path / "c", progress=False)
    assert c["samples"] == 96 and c["samples_dropped"] == 4  # full batches only


def test_minmax_and_percentile(digits, tmp_path: Path):
    onnx_path, calib = digits
    calibrate.run(_cfg(method="minmax"), onnx_path, calib, tmp_path / "mm", progress=False)
    cache = read_cache(tmp_path / "mm" / "calibration.cache", expect_version="8.6.0",
                       expect_algorithm="MinMaxCalibration")
    ranges = json.loads((tmp_path / "mm" / "ranges.json").read_text())["tensors"]
    for name, r in ranges.items():
        assert r["amax"] == r["max_abs"] and cache.scales[name] == amax_to_scale(r["max_abs"])

    rep = calibrate.run(_cfg(method="percentile", percentile=99.9), onnx_path, calib, tmp_path / "p", progress=False)
    assert rep["cache"]["header"] == "TRT-8600-EntropyCalibration2" and "percentile" in rep["cache"]["note"]
    pr = json.loads((tmp_path / "p" / "ranges.json").read_text())
    assert pr["percentile"] == 99.9
    assert all(t["amax"] <= ranges[n]["amax"] for n, t in pr["tensors"].items())
    assert any(t["amax"] < ranges[n]["amax"] for n, t in pr["tensors"].items())


def test_cache_of_another_version_or_algorithm_is_refused_by_name(digits, tmp_path: Path):
    onnx_path, calib = digits
    calibrate.run(_cfg(method="minmax"), onnx_path, calib, tmp_path / "mm", progress=False)
    cache = tmp_path / "mm" / "calibration.cache"
    with pytest.raises(CacheMismatchError, match=r"mm/calibration\.cache has header 'TRT-8600-MinMaxCalibration' "
                                                  r"but 'TRT-8600-EntropyCalibration2' is expected \(different algorithm\)"):
        read_cache(cache, expect_version="8.6.0", expect_algorithm="EntropyCalibration2")
    with pytest.raises(CacheMismatchError, match=r"'TRT-100300-MinMaxCalibration' is expected \(different TensorRT version\)"):
        read_cache(cache, expect_version="10.3.0", expect_algorithm="MinMaxCalibration")


def test_fewer_samples_than_a_batch_keeps_the_old_outputs(digits, tmp_path: Path):
    onnx_path, calib = digits
    small = tmp_path / "small.npy"
    np.save(small, np.load(calib)[:10])
    out = tmp_path / "out"
    out.mkdir()
    (out / "calibration.cache").write_text("previous\n")
    with pytest.raises(CalibrationError, match=r"small\.npy: 10 calibration samples are fewer than one batch of 32"):
        calibrate.run(_cfg(), onnx_path, small, out, progress=False)
    assert (out / "calibration.cache").read_text() == "previous\n"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".out")) == []


def test_bad_calibration_data(digits, tmp_path: Path):
    onnx_path, calib = digits
    x = np.load(calib)
    np.save(tmp_path / "shape.npy", x[:, :, :4, :4])
    with pytest.raises(DataError, match=r"shape\.npy: samples have shape \[1, 4, 4\].*expects \[1, 8, 8\]"):
        calibrate.run(_cfg(), onnx_path, tmp_path / "shape.npy", tmp_path / "o", progress=False)
    with pytest.raises(DataError, match=r"missing\.npy: calibration samples not found"):
        calibrate.run(_cfg(), onnx_path, tmp_path / "missing.npy", tmp_path / "o", progress=False)
    bad = x.copy()
    bad[40, 0, 2, 2] = np.inf
    np.save(tmp_path / "inf.npy", bad)
    with pytest.raises(CalibrationError, match=r"batch 1 \(samples 32\.\.63 of .*inf\.npy\).*'input' has 0 NaN and 1 Inf"):
        calibrate.run(_cfg(), onnx_path, tmp_path / "inf.npy", tmp_path / "o", progress=False)
    assert not (tmp_path / "o").exists()


def _fixture_inputs(request) -> Path | None:
    """The regenerated TensorRT-fixture inputs, if test_trt_fixture already made them."""
    make = FIXTURE_DIR / "make_inputs.py"
    cache = getattr(request.config, "cache", None)
    if not make.is_file() or cache is None:
        return None
    key = hashlib.sha256(make.read_bytes()).hexdigest()[:16]
    folder = Path(cache.mkdir("trt86-resnet18-entropy2")) / key
    return folder if (folder / "done").is_file() else None


@pytest.mark.slow
def test_stage_cache_matches_tensorrt_86(request, tmp_path: Path):
    """The stage on the fixture's ResNet-18 and 512 images, 16 batches of 32: per-tensor
    scales equal to TensorRT 8.6's own cache for at least 95% of the tensors."""
    folder = _fixture_inputs(request)
    if folder is None or importlib.util.find_spec("torch") is None:
        pytest.skip("fixture inputs not generated (run tests/calibration/test_trt_fixture.py first)")
    cfg = load_config(ROOT / "configs" / "digits.yaml", params_path=ROOT / "no-params.yaml")
    model = cfg.model.model_copy(update={"input": cfg.model.input.model_copy(update={"shape": [3, 224, 224]})})
    cfg = cfg.model_copy(update={"model": model, "calibration": CalibrationConfig(num_samples=512, batch_size=32)})
    rep = calibrate.run(cfg, folder / "resnet18.onnx", folder / "calib.npy", tmp_path / "out", progress=False)
    ours = read_cache(tmp_path / "out" / "calibration.cache").amax()
    trt = read_cache(FIXTURE_DIR / "tensorrt-8.6.0.cache", expect_version="8.6.0").amax()
    common = [n for n in ours if trt.get(n)]
    rel = np.array([abs(ours[n] - trt[n]) / trt[n] for n in common])
    assert len(common) >= 50 and rep["samples"] == 512
    # tensorrt rules (the default): the same scale as TensorRT's for nearly every tensor
    assert np.median(rel) <= 1e-5 and np.mean(rel <= 1e-5) >= 0.95, (float(np.median(rel)), float(np.mean(rel <= 1e-5)))
