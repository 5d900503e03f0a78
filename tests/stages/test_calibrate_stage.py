"""The calibrate stage end to end on the digits CNN and real digits: ranges, TensorRT cache,
Q/DQ model and report agree bit for bit; bad inputs give clear errors; the output folder
is replaced atomically."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from calibration.algorithms import amax_to_scale
from calibration.cache import hex_to_scale, read_cache
from calibration.errors import CacheMismatchError, CalibrationError
from calibration.qdq import read_qdq_scales
from pipeline.config import CalibrationConfig, load_config
from pipeline.errors import DataError, PipelineError
from pipeline.stages import calibrate

ROOT = Path(__file__).resolve().parents[2]


def _cfg(**calibration):
    cfg = load_config(ROOT / "configs" / "digits.yaml", params_path=ROOT / "no-params.yaml")
    return cfg.model_copy(update={"calibration": CalibrationConfig(**{**cfg.calibration.model_dump(), **calibration})})


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> SimpleNamespace:
    """The trained digits CNN exported and validated by the real stages, and prepare's
    calibration samples (359 digits, preprocessed by the config)."""
    from tests._digits_run import digits_base

    base = digits_base(tmp_path_factory)
    return SimpleNamespace(onnx=base / "export" / "model.onnx", calib=base / "prepare" / "calib.npz",
                           validation=base / "validate" / "validate.json")


def run(d: SimpleNamespace, out: Path, calib: Path | None = None, **calibration):
    return calibrate.run(_cfg(**calibration), d.onnx, calib or d.calib, out, validation=d.validation, progress=False)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_entropy_outputs_agree_bit_for_bit(digits, tmp_path: Path):
    out = tmp_path / "calibrate"
    report = run(digits, out)
    assert sorted(p.name for p in out.iterdir()) == ["calibrate.json", "calibration.cache", "maxima.json",
                                                     "model.qdq.onnx", "ranges.json"]
    on_disk = json.loads((out / "calibrate.json").read_text())
    noise = {"seconds", "peak_rss_mb", "search_ms_per_tensor"}  # run-to-run noise: never in the report on disk
    assert not noise & set(on_disk)
    assert {k: v for k, v in report.model_dump(mode="json").items() if k not in noise} == on_disk
    assert report.method == "entropy" and report.samples == 320 and report.batches == 10
    assert report.rules == "tensorrt" and report.settings["histogram_growth"] == "double"
    assert report.samples_available == 359 and report.tensors >= 10
    assert report.calibration_shapes == {"input": [32, 1, 8, 8]}
    assert report.peak_rss_mb > 0 and report.seconds["total"] > 0
    for name in ("ranges.json", "calibration.cache", "model.qdq.onnx"):
        assert report.sha256[name] == _sha(out / name)
    assert report.sha256["calib_data"] == _sha(digits.calib) and report.sha256["onnx"] == _sha(digits.onnx)
    assert report.qdq["check_first_samples"]["logits"]["cosine_min"] > 0.99
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
        if name in qdq and not qdq[name]["weight"]:
            assert qdq[name]["scale"].view(np.uint32) == scale.view(np.uint32), name
    assert "input" in qdq


def test_cache_header_names_the_target_tensorrt(digits, tmp_path: Path):
    rep = run(digits, tmp_path / "a", tensorrt_version="10.3.0")
    assert rep.cache["header"] == "TRT-100300-EntropyCalibration2"
    assert rep.cache["tensorrt_version_from"] == "calibration.tensorrt_version"
    read_cache(tmp_path / "a" / "calibration.cache", expect_version="10.3.0", expect_algorithm="EntropyCalibration2")
    rep = run(digits, tmp_path / "b")  # no TensorRT on this machine: 8.6.0, and the report says why
    assert rep.cache["tensorrt_version"] == "8.6.0" and "no TensorRT here" in rep.cache["tensorrt_version_from"]


def test_rules_tensorrt_against_reference(digits, tmp_path: Path):
    """The two rule sets on the same data: tensorrt keeps 2048 bins and doubles the width
    of a grown tensor, puts amax at a bin centre and gives the MaxPool output its input's
    range; reference appends bins, puts amax on a bin edge, MaxPool on its own."""
    run(digits, tmp_path / "t")
    ref_rep = run(digits, tmp_path / "r", rules="reference")
    assert ref_rep.rules == "reference" and ref_rep.settings["histogram_growth"] == "append"
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
    a, b = run(digits, tmp_path / "a"), run(digits, tmp_path / "b")
    for name in ("ranges.json", "calibration.cache", "model.qdq.onnx"):
        assert a.sha256[name] == b.sha256[name], name


def test_seeded_sample_choice(digits, tmp_path: Path):
    a = run(digits, tmp_path / "a", num_samples=64, batch_size=16)
    b = run(digits, tmp_path / "b", num_samples=64, batch_size=16, seed=1)
    assert a.samples == b.samples == 64 and a.batches == 4
    assert a.sha256["ranges.json"] != b.sha256["ranges.json"]
    c = run(digits, tmp_path / "c", num_samples=100, batch_size=32)
    assert c.samples == 96 and c.samples_dropped == 4  # full batches only


def test_minmax_and_percentile(digits, tmp_path: Path):
    run(digits, tmp_path / "mm", method="minmax")
    cache = read_cache(tmp_path / "mm" / "calibration.cache", expect_version="8.6.0",
                       expect_algorithm="MinMaxCalibration")
    ranges = json.loads((tmp_path / "mm" / "ranges.json").read_text())["tensors"]
    for name, r in ranges.items():
        assert r["amax"] == r["max_abs"] and cache.scales[name] == amax_to_scale(r["max_abs"])

    rep = run(digits, tmp_path / "p", method="percentile", percentile=99.9)
    assert rep.cache["header"] == "TRT-8600-EntropyCalibration2" and "percentile" in rep.cache["note"]
    pr = json.loads((tmp_path / "p" / "ranges.json").read_text())
    assert pr["percentile"] == 99.9
    assert all(t["amax"] <= ranges[n]["amax"] for n, t in pr["tensors"].items())
    assert any(t["amax"] < ranges[n]["amax"] for n, t in pr["tensors"].items())


def test_cache_of_another_version_or_algorithm_is_refused_by_name(digits, tmp_path: Path):
    run(digits, tmp_path / "mm", method="minmax")
    cache = tmp_path / "mm" / "calibration.cache"
    with pytest.raises(CacheMismatchError, match=r"mm/calibration\.cache has header 'TRT-8600-MinMaxCalibration' "
                                                  r"but 'TRT-8600-EntropyCalibration2' is expected \(different algorithm\)"):
        read_cache(cache, expect_version="8.6.0", expect_algorithm="EntropyCalibration2")
    with pytest.raises(CacheMismatchError, match=r"'TRT-100300-MinMaxCalibration' is expected \(different TensorRT version\)"):
        read_cache(cache, expect_version="10.3.0", expect_algorithm="MinMaxCalibration")


def _samples(d: SimpleNamespace, path: Path, x: np.ndarray) -> Path:
    np.savez(path, input=x)
    return path


def test_fewer_samples_than_a_batch_keeps_the_old_outputs(digits, tmp_path: Path):
    x = np.load(digits.calib)["input"]
    small = _samples(digits, tmp_path / "small.npz", x[:10])
    out = tmp_path / "out"
    run(digits, out)  # a previous, complete output of the stage
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(CalibrationError, match=r"small\.npz: 10 calibration samples are fewer than one batch of 32"):
        run(digits, out, small)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".out")) == []


def test_bad_calibration_data(digits, tmp_path: Path):
    x = np.load(digits.calib)["input"]
    with pytest.raises(DataError, match=r"shape\.npz: input 'input' has samples of shape \[1, 4, 4\].*expects \[1, 8, 8\]"):
        run(digits, tmp_path / "o", _samples(digits, tmp_path / "shape.npz", x[:, :, :4, :4]))
    with pytest.raises(DataError, match=r"missing\.npz: calibration data not found"):
        run(digits, tmp_path / "o", tmp_path / "missing.npz")
    bad = x.copy()
    bad[40, 0, 2, 2] = np.inf
    with pytest.raises(DataError, match=r"inf\.npz: input 'input': sample 40 contains NaN or Inf"):
        run(digits, tmp_path / "o", _samples(digits, tmp_path / "inf.npz", bad))
    assert not (tmp_path / "o").exists()


def test_refuses_an_onnx_validate_did_not_pass(digits, tmp_path: Path):
    import onnx

    other = tmp_path / "model.onnx"
    model = onnx.load(str(digits.onnx))
    model.doc_string = "edited after validate"  # a valid model, other bytes
    onnx.save(model, str(other))
    with pytest.raises(PipelineError, match=r"model\.onnx: the ONNX model is not the file validate wrote or checked.*re-run validate"):
        calibrate.run(_cfg(), other, digits.calib, tmp_path / "o", validation=digits.validation, progress=False)


def test_calibration_device_picks_where_to_bin(digits, tmp_path: Path):
    """calibration.device: cpu and the GPU code path's steps give the default's outputs bit for
    bit; cuda where no CUDA library can use a GPU is one line naming what to set, and writes nothing."""
    a = run(digits, tmp_path / "a", num_samples=64, batch_size=16)
    b = run(digits, tmp_path / "b", num_samples=64, batch_size=16, device="cpu")
    assert a.sha256 == b.sha256
    report = json.loads((tmp_path / "b" / "calibrate.json").read_text())
    assert report["collect"]["device"] == "cpu"
    from calibration.gpu_histogram import cuda_ops

    if cuda_ops()[0] is None:
        with pytest.raises(PipelineError, match="device 'cuda'") as e:
            run(digits, tmp_path / "c", num_samples=64, batch_size=16, device="cuda")
        assert "\n" not in str(e.value) and "device='cpu'" in str(e.value)
        assert not (tmp_path / "c").exists()
    with pytest.raises(Exception, match="device"):
        _cfg(device="gpu")
