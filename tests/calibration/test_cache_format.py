"""The calibration cache file as users meet it: what write_cache leaves on disk (mode,
temporary file, folders), that it reads back under any locale, and the exact advice each
refusal gives. Complements test_cache.py (format and round trip)."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import tempfile
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest

from calibration.cache import cache_header, parse_cache, read_cache, trt_version_int, write_cache
from calibration.errors import CacheMismatchError, CalibrationError

ROOT = Path(__file__).resolve().parents[2]
ALGORITHM_LIST = "EntropyCalibration2, EntropyCalibration, MinMaxCalibration, LegacyCalibration"


# -- versions and headers -------------------------------------------------------------
@pytest.mark.parametrize("version,want", [("8.6", 8600), ("10.3", 100300), ("9.0", 9000)])
def test_version_without_patch_counts_patch_zero(version, want):
    """tensorrt.__version__ of some wheels has two components: the patch is 0."""
    assert trt_version_int(version) == want
    assert cache_header(version) == f"TRT-{want}-EntropyCalibration2"


def test_unreadable_version_shows_an_example():
    with pytest.raises(CalibrationError) as err:
        trt_version_int("latest")
    assert "'latest'" in str(err.value)
    assert "give it as 'major.minor.patch', e.g. '8.6.1' (tensorrt.__version__)" in str(err.value)


def test_unknown_algorithm_lists_the_ones_tensorrt_reads(tmp_path):
    with pytest.raises(CalibrationError) as err:
        cache_header("8.6.0", "Percentile")
    assert f"TensorRT only reads caches for {ALGORITHM_LIST} (use the one" in str(err.value)
    # the same list when the expected algorithm is checked on read
    path = write_cache(tmp_path / "c.cache", {"t": 1.0}, "8.6.0")
    with pytest.raises(CalibrationError, match=ALGORITHM_LIST):
        read_cache(path, expect_algorithm="Percentile")


def test_both_header_parts_differ_says_so(tmp_path):
    path = write_cache(tmp_path / "c.cache", {"t": 1.0}, "8.6.0", "MinMaxCalibration")
    with pytest.raises(CacheMismatchError) as err:
        read_cache(path, expect_version="10.3.0", expect_algorithm="EntropyCalibration2")
    msg = str(err.value)
    assert "(different TensorRT version and algorithm)" in msg
    assert msg.endswith("Recreate the cache for this TensorRT and algorithm with `trtpipe calibrate`, or build with "
                        "the TensorRT and calibrator that wrote it")


def test_matching_header_with_only_one_expectation_given(tmp_path):
    path = write_cache(tmp_path / "c.cache", {"t": 1.0}, "10.3.0", "MinMaxCalibration")
    assert read_cache(path, expect_algorithm="MinMaxCalibration").version == 100300
    assert read_cache(path, expect_version="10.3").algorithm == "MinMaxCalibration"
    with pytest.raises(CacheMismatchError, match=r"\(different TensorRT version\)"):
        read_cache(path, expect_version="10.3.1")


# -- what write_cache leaves on disk --------------------------------------------------
def test_write_creates_missing_parent_folders(tmp_path):
    path = write_cache(tmp_path / "a" / "b" / "c" / "model.cache", {"t": 0.5}, "8.6.0")
    assert path == tmp_path / "a" / "b" / "c" / "model.cache"
    assert read_cache(path).scales == {"t": np.float32(0.5)}


def test_written_cache_is_world_readable_not_executable(tmp_path):
    """mkstemp makes 0600; the cache is an ordinary file (TensorRT or DVC may read it as
    another user): 0644 whatever the umask."""
    old = os.umask(0o077)
    try:
        path = write_cache(tmp_path / "c.cache", {"t": 1.0}, "8.6.0")
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644


def test_write_does_not_need_the_system_temp_folder(tmp_path, monkeypatch):
    """The temporary file is made beside the cache (same filesystem, so the final rename is
    atomic), never in $TMPDIR: an unusable temp folder does not matter."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "no-such-tmp"))
    path = write_cache(tmp_path / "out" / "c.cache", {"t": 2.0}, "8.6.0")
    assert read_cache(path).scales == {"t": np.float32(2.0)}
    assert not (tmp_path / "no-such-tmp").exists()


def test_while_writing_only_a_hidden_tmp_file_named_after_the_cache_appears(tmp_path, monkeypatch):
    """A concurrent reader (or a user after kill -9) sees the old cache or the new one,
    plus at most `.<cache name>.<random>.tmp`: hidden, named after its cache, marked as
    temporary."""
    target = tmp_path / "model.cache"
    write_cache(target, {"old": 1.0}, "8.6.0")
    seen: list[list[str]] = []
    real_fsync = os.fsync

    def spy(fd):
        seen.append(sorted(os.listdir(tmp_path)))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", spy)
    write_cache(target, {"new": 1.0}, "8.6.0")
    monkeypatch.undo()
    assert seen, "write_cache did not fsync its data"
    names = seen[0]
    assert "model.cache" in names and read_cache(target).scales.keys() == {"new"}
    temps = [n for n in names if n != "model.cache"]
    assert len(temps) == 1
    assert temps[0].startswith(".model.cache.") and temps[0].endswith(".tmp"), temps
    assert sorted(os.listdir(tmp_path)) == ["model.cache"]


def test_failed_write_raises_the_os_error_and_keeps_the_old_cache(tmp_path, monkeypatch):
    target = tmp_path / "c.cache"
    write_cache(target, {"old": 1.0}, "8.6.0")
    before = target.read_bytes()

    def full(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device", str(dst))

    monkeypatch.setattr(os, "replace", full)
    with pytest.raises(OSError, match="No space left on device"):
        write_cache(target, {"new": 1.0}, "8.6.0")
    monkeypatch.undo()
    assert target.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["c.cache"]  # the temporary file is gone


_LOCALE_ROUND_TRIP = textwrap.dedent("""
    import locale, sys
    from calibration.cache import read_cache, write_cache
    assert locale.getpreferredencoding(False).lower() in ("ansi_x3.4-1968", "ascii"), locale.getpreferredencoding(False)
    path = write_cache(sys.argv[1], {"conv\\u00e9/\\u03bc_output": 0.25}, "8.6.0")
    print(ascii(list(read_cache(path).scales.items())))
""")


def test_cache_is_utf8_whatever_the_locale(tmp_path):
    """Tensor names are UTF-8 in the file (as TensorRT writes them), also when Python runs
    under an ASCII locale (LC_ALL=C without UTF-8 mode, as in minimal containers)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LC_", "LANG", "PYTHONUTF8", "PYTHONIOENCODING"))}
    env.update(LC_ALL="C", LANG="C", PYTHONUTF8="0", PYTHONCOERCECLOCALE="0")
    path = tmp_path / "c.cache"
    out = subprocess.run([sys.executable, "-c", _LOCALE_ROUND_TRIP, str(path)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ascii([("conv\u00e9/\u03bc_output", np.float32(0.25))])
    assert path.read_bytes() == "TRT-8600-EntropyCalibration2\nconv\u00e9/\u03bc_output: 3e800000\n".encode("utf-8")


# -- refusals of bad entries ----------------------------------------------------------
@pytest.mark.parametrize("name", ["a\rb", "line\r", "two\nlines"])
def test_names_that_would_break_a_line_are_refused(tmp_path, name):
    with pytest.raises(CalibrationError) as err:
        write_cache(tmp_path / "c.cache", {name: 1.0}, "8.6.0")
    assert f"tensor name {name!r} cannot go in a calibration cache: names must be non-empty single-line strings" \
        == str(err.value)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("scale", [
    1e40,  # overflows float32
    10 ** 40,  # an int that overflows float32
    np.array(0x7FF4000000000000, np.uint64).view(np.float64)[()],  # a signalling NaN
])
def test_unrepresentable_scale_is_a_calibration_error_even_with_fp_warnings_as_errors(tmp_path, scale):
    """Under `-W error` or np.seterr(all='raise') the refusal is still the one
    CalibrationError that names the tensor, not a numpy warning from the cast."""
    with warnings.catch_warnings(), np.errstate(all="raise"):
        warnings.simplefilter("error")
        with pytest.raises(CalibrationError) as err:
            write_cache(tmp_path / "c.cache", {"conv": scale}, "8.6.0")
    msg = str(err.value)
    assert "of tensor 'conv' is not a finite float32 >= 0; its calibration range is broken " \
           "(check the tensor's histogram)" in msg
    assert list(tmp_path.iterdir()) == []


# -- refusals on read -----------------------------------------------------------------
def test_missing_and_binary_caches_say_what_to_run(tmp_path):
    with pytest.raises(CalibrationError) as err:
        read_cache(tmp_path / "missing.cache")
    assert str(err.value) == (f"calibration cache {tmp_path / 'missing.cache'} does not exist; "
                              "run `trtpipe calibrate` to create it")
    (tmp_path / "model.engine").write_bytes(b"\x80\x81\xfe\xff")
    with pytest.raises(CalibrationError) as err:
        read_cache(tmp_path / "model.engine")
    assert str(err.value) == (f"calibration cache {tmp_path / 'model.engine'} is not a text file; it is not a "
                              "TensorRT calibration cache (recreate it with `trtpipe calibrate`)")


def test_errors_in_cache_text_name_the_text_source():
    with pytest.raises(CalibrationError) as err:
        parse_cache("")
    assert str(err.value) == ("calibration cache <cache text> is empty: expected a first line like "
                              "'TRT-8600-EntropyCalibration2'; recreate it with `trtpipe calibrate`")
    with pytest.raises(CalibrationError, match=r"calibration cache from-trtexec, line 3: tensor 'a' appears twice; "
                                               r"the file is corrupt, recreate it with `trtpipe calibrate`$"):
        parse_cache("TRT-8600-EntropyCalibration2\na: 1\na: 2\n", "from-trtexec")


def test_crlf_text_parses_to_the_same_scales_and_quotes_lines_without_cr():
    text = "TRT-8600-EntropyCalibration2\r\ninput: 3ca9d545\r\nconv: 3f800000\r\n"
    cache = parse_cache(text)
    assert cache.header == "TRT-8600-EntropyCalibration2"
    assert {k: int(np.array(v).view(np.uint32)) for k, v in cache.scales.items()} == {"input": 0x3CA9D545,
                                                                                   "conv": 0x3F800000}
    with pytest.raises(CalibrationError) as err:
        parse_cache(text + "garbage\r\n")
    assert "line 4: 'garbage' is not '<tensor name>: <hex float32 scale>'" in str(err.value)


def test_long_bad_lines_are_quoted_to_80_characters():
    header = "X" * 80 + "Y" * 40
    with pytest.raises(CalibrationError) as err:
        parse_cache(header + "\n")
    msg = str(err.value)
    assert f"line 1: {'X' * 80!r} is not a TensorRT cache header" in msg
    assert "Y" not in msg
    assert (f"(expected 'TRT-<version>-<algorithm>' with algorithm one of {ALGORITHM_LIST}); "
            "recreate the cache with `trtpipe calibrate`") in msg

    line = "A" * 80 + "B" * 40
    with pytest.raises(CalibrationError) as err:
        parse_cache("TRT-8600-EntropyCalibration2\n" + line + "\n")
    msg = str(err.value)
    assert f"line 2: {'A' * 80!r} is not '<tensor name>: <hex float32 scale>'; the file is corrupt or not a " \
           "TensorRT cache, recreate it with `trtpipe calibrate`" in msg
    assert "B" not in msg


def test_a_cache_remembers_the_file_it_came_from(tmp_path):
    path = write_cache(tmp_path / "c.cache", {"t": 1.0}, "8.6.0")
    assert read_cache(path).path == path
    assert read_cache(str(path)).path == path
    assert parse_cache(path.read_text()).path is None
    assert parse_cache(path.read_text(), "some text").path is None

