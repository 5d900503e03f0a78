"""TensorRT calibration cache: header, bit-exact scales, atomic write, clear errors."""

from __future__ import annotations

import os

from pathlib import Path

import numpy as np
import pytest

from calibration.cache import (
    ALGORITHMS,
    cache_header,
    format_cache,
    hex_to_scale,
    read_cache,
    scale_to_hex,
    trt_version_int,
    write_cache,
)
from calibration.errors import CacheMismatchError, CalibrationError

FIXTURE_DIR = Path(os.environ.get("TRTPIPE_FIXTURE_DIR") or (Path(__file__).resolve().parents[2] / ".." / "shared" / "fixtures" / "trt86-resnet18-entropy2"))
FIXTURE_CACHE = FIXTURE_DIR / "tensorrt-8.6.0.cache"


def _bits(value) -> int:
    return int(np.array(value, dtype=np.float32).view(np.uint32))


ODD_SCALES = {
    "input": np.float32(0.020731654),
    "(Unnamed Layer* 0) [Constant]_output": np.float32(0.0),
    "weights: with ': ' inside: ": np.float32(1.0),
    "/a/b:c/Conv_output_0": np.float32(np.finfo(np.float32).tiny),  # smallest normal
    "denormal min": np.array(1, np.uint32).view(np.float32)[()],  # 1e-45
    "denormal max": np.array(0x007FFFFF, np.uint32).view(np.float32)[()],
    "largest": np.finfo(np.float32).max,
    "one ulp above 1": np.nextafter(np.float32(1), np.float32(2)),
    "negative zero": np.float32(-0.0),
    " leading space": np.float32(3.0e-3),
}


@pytest.mark.parametrize("version,want", [("8.6.0", 8600), ("8.6.1.6", 8601), ("8.5.3", 8503),
                                          ("10.3.0", 100300), ("10.13.2.6", 101302), ("10.0.1", 100001),
                                          ("8.6.1.post1", 8601), (8600, 8600)])
def test_trt_version_int(version, want):
    assert trt_version_int(version) == want


def test_trt_version_int_rejects_garbage():
    with pytest.raises(CalibrationError, match="major.minor.patch"):
        trt_version_int("eight")


def test_header():
    assert cache_header("8.6.0") == "TRT-8600-EntropyCalibration2"
    assert cache_header("10.3.0", "MinMaxCalibration") == "TRT-100300-MinMaxCalibration"
    with pytest.raises(CalibrationError, match="EntropyCalibration2"):
        cache_header("8.6.0", "PercentileCalibration")


def test_hex_matches_tensorrt_style():
    assert scale_to_hex(0.0) == "0"  # no zero padding, as TensorRT writes it
    assert scale_to_hex(1.0) == "3f800000"
    assert scale_to_hex(np.array(1, np.uint32).view(np.float32)[()]) == "1"
    assert _bits(hex_to_scale("3ca9d545")) == 0x3CA9D545


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_round_trip_is_bit_exact(tmp_path, algorithm):
    path = write_cache(tmp_path / "sub" / "model.cache", ODD_SCALES, "10.3.0", algorithm)
    cache = read_cache(path, expect_version="10.3.0", expect_algorithm=algorithm)
    assert (cache.version, cache.algorithm) == (100300, algorithm)
    assert list(cache.scales) == list(ODD_SCALES)  # order kept
    for name, scale in ODD_SCALES.items():
        assert isinstance(cache.scales[name], np.float32)
        assert _bits(cache.scales[name]) == _bits(scale), name
    assert path.read_text().splitlines()[0] == f"TRT-100300-{algorithm}"
    assert [p.name for p in path.parent.iterdir()] == ["model.cache"]  # no temp file left


def test_float64_scales_are_rounded_to_float32_once(tmp_path):
    path = write_cache(tmp_path / "c.cache", {"t": 0.1}, "8.6.0")
    assert _bits(read_cache(path).scales["t"]) == _bits(np.float32(0.1))


def test_overwrite_is_atomic_replacement(tmp_path):
    path = tmp_path / "c.cache"
    write_cache(path, {"a": 1.0}, "8.6.0")
    write_cache(path, {"b": 2.0}, "8.6.0")
    assert list(read_cache(path).scales) == ["b"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.cache"]


@pytest.mark.parametrize("scales,match", [({"t": float("nan")}, "finite"), ({"t": -1.0}, "finite"),
                                          ({"t": 1e40}, "finite"), ({"": 1.0}, "non-empty"),
                                          ({"a\nb": 1.0}, "single-line")])
def test_write_rejects_bad_entries_and_leaves_no_file(tmp_path, scales, match):
    with pytest.raises(CalibrationError, match=match):
        write_cache(tmp_path / "c.cache", scales, "8.6.0")
    assert list(tmp_path.iterdir()) == []


def test_version_mismatch_names_both_headers(tmp_path):
    path = write_cache(tmp_path / "c.cache", {"t": 1.0}, "8.6.0")
    with pytest.raises(CacheMismatchError) as err:
        read_cache(path, expect_version="10.3.0", expect_algorithm="EntropyCalibration2")
    msg = str(err.value)
    assert str(path) in msg
    assert "'TRT-8600-EntropyCalibration2'" in msg and "'TRT-100300-EntropyCalibration2'" in msg
    assert "TensorRT version" in msg and "silently ignore" in msg and "trtpipe calibrate" in msg


def test_algorithm_mismatch(tmp_path):
    path = write_cache(tmp_path / "c.cache", {"t": 1.0}, "8.6.0", "MinMaxCalibration")
    with pytest.raises(CacheMismatchError, match="different algorithm") as err:
        read_cache(path, expect_version=8600, expect_algorithm="EntropyCalibration2")
    assert "'TRT-8600-MinMaxCalibration'" in str(err.value)
    assert "'TRT-8600-EntropyCalibration2'" in str(err.value)


def test_mismatch_is_a_calibration_error(tmp_path):
    path = write_cache(tmp_path / "c.cache", {"t": 1.0}, "8.6.0")
    with pytest.raises(CalibrationError):
        read_cache(path, expect_version="8.6.1")


@pytest.mark.parametrize("text,line", [
    ("TRT-8600-EntropyCalibration2\ninput: 3ca9d545\nthis line is garbage\n", 3),
    ("TRT-8600-EntropyCalibration2\ninput: 3ca9d545\nconv: xyz\n", 3),
    ("TRT-8600-EntropyCalibration2\ninput: 123456789\n", 2),
    ("TRT-8600-EntropyCalibration2\n: 3f800000\n", 2),
    ("TRT-8600-EntropyCalibration2\na: 1\n\nb: 2\na: 3\n", 5),  # duplicate name
    ("not a header\ninput: 3ca9d545\n", 1),
    ("TRT-8600-PercentileCalibration\n", 1),
])
def test_garbage_names_the_line(tmp_path, text, line):
    path = tmp_path / "bad.cache"
    path.write_text(text)
    with pytest.raises(CalibrationError, match=f"line {line}") as err:
        read_cache(path)
    assert str(path) in str(err.value) and "recreate" in str(err.value)


def test_empty_and_missing_and_binary_files(tmp_path):
    (tmp_path / "empty.cache").write_text("")
    with pytest.raises(CalibrationError, match="is empty"):
        read_cache(tmp_path / "empty.cache")
    with pytest.raises(CalibrationError, match="does not exist"):
        read_cache(tmp_path / "missing.cache")
    (tmp_path / "engine.cache").write_bytes(b"\xff\xfe\x00\x81binary")
    with pytest.raises(CalibrationError, match="not a text file"):
        read_cache(tmp_path / "engine.cache")


def test_crlf_and_missing_final_newline_are_accepted(tmp_path):
    path = tmp_path / "c.cache"
    path.write_bytes(b"TRT-8600-EntropyCalibration2\r\na: b: 3f800000\r\nc: 0")
    cache = read_cache(path)
    assert cache.scales == {"a: b": np.float32(1.0), "c": np.float32(0.0)}


@pytest.fixture(scope="module")
def fixture_cache_path():
    if not FIXTURE_CACHE.is_file():
        pytest.skip(f"TensorRT fixture not found at {FIXTURE_CACHE.resolve()} (the shared/ folder beside "
                    "the repository)")
    return FIXTURE_CACHE


def test_reads_real_tensorrt_86_cache(fixture_cache_path):
    cache = read_cache(fixture_cache_path, expect_version="8.6.0", expect_algorithm="EntropyCalibration2")
    assert cache.version == 8600 and cache.algorithm == "EntropyCalibration2"
    assert len(cache.scales) == 74
    assert _bits(cache.scales["input"]) == 0x3CA9D545
    assert cache.scales["(Unnamed Layer* 74) [Matrix Multiply]_output"] == hex_to_scale("3d68fc2c")
    assert sum(1 for s in cache.scales.values() if s == 0) == 20  # weights/constants
    assert cache.amax()["input"] == pytest.approx(float(hex_to_scale("3ca9d545")) * 127)


def test_rewriting_real_cache_is_byte_identical(fixture_cache_path, tmp_path):
    cache = read_cache(fixture_cache_path)
    out = write_cache(tmp_path / "again.cache", cache.scales, "8.6.0", cache.algorithm)
    assert out.read_bytes() == fixture_cache_path.read_bytes()
    assert format_cache(cache.scales, 8600) == fixture_cache_path.read_text()
