"""TensorRT calibration cache: the text file an ``IInt8Calibrator`` writes and reads back
(``trtexec --calib=FILE`` reads it too).

Format (TensorRT 8.x-10.x)::

    TRT-8600-EntropyCalibration2
    input: 3ca9d545
    (Unnamed Layer* 0) [Constant]_output: 0

* Header ``TRT-<version>-<algorithm>``; ``<version>`` is ``major*1000 + minor*100 + patch``
  before TensorRT 10 (8.6.0 -> 8600) and ``major*10000 + minor*100 + patch`` from 10 on
  (10.3.0 -> 100300).
* One line per tensor: ``<name>: <scale>``, the float32 scale (amax / 127) as its
  IEEE-754 bit pattern in lowercase hex without leading zeros (a zero scale is ``0``).
  Names may contain ``:`` and spaces, so a line splits at its LAST ``": "``.

TensorRT compares the header with its own version and the calibrator's algorithm and, on
any difference, ignores the cache without a word and calibrates again. ``read_cache``
therefore checks the header and raises ``CacheMismatchError`` naming both headers.

TensorRT only reads caches under its own algorithm names (``ALGORITHMS``). Ranges we
compute another way (MinMax, percentile) are still written under the header of the
calibrator class that hands the cache to TensorRT (normally ``EntropyCalibration2``):
TensorRT then uses the scales as they are. The header does not record the method, so
the real one must be recorded beside the cache (build.json / manifest).
"""

from __future__ import annotations

import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import numpy as np

from calibration.errors import CacheMismatchError, CalibrationError

ALGORITHMS = ("EntropyCalibration2", "EntropyCalibration", "MinMaxCalibration", "LegacyCalibration")
DEFAULT_ALGORITHM = "EntropyCalibration2"
# The header algorithm of a cache, by what made it: the calibrate stage's ``calibration.method`` (its scales go in
# under EntropyCalibration2, which TensorRT uses as they are, except minmax), and TensorRT's own calibrator
# (``build.int8_calibrator``).
METHOD_ALGORITHM = {"entropy": "EntropyCalibration2", "minmax": "MinMaxCalibration", "percentile": "EntropyCalibration2",
                    "mse": "EntropyCalibration2"}
CALIBRATOR_ALGORITHM = {"entropy2": "EntropyCalibration2", "minmax": "MinMaxCalibration"}

_HEADER_RE = re.compile(r"^TRT-(\d+)-([A-Za-z0-9_]+)$")
_VERSION_RE = re.compile(r"^\s*(\d+)\.(\d+)(?:\.(\d+))?")
_HEX_RE = re.compile(r"^[0-9a-fA-F]{1,8}$")
_LEADING_DIGITS_RE = re.compile(r"\d+")


# -- header -----------------------------------------------------------------------------
def trt_version_int(version: str | int) -> int:
    """TensorRT's version number as the cache header writes it.

    ``"8.6.0" -> 8600``, ``"8.6.1.6" -> 8601``, ``"10.3.0" -> 100300``; an int is taken as
    already encoded. Extra components (build number, ``.post1``) are ignored.
    """
    if isinstance(version, (int, np.integer)) and not isinstance(version, bool):
        return int(version)
    if not _VERSION_RE.match(str(version)):
        raise CalibrationError(f"cannot read TensorRT version {version!r}; give it as 'major.minor.patch', "
                               "e.g. '8.6.1' (tensorrt.__version__)")
    major, minor, patch = trt_version_parts(version)
    return major * (10000 if major >= 10 else 1000) + minor * 100 + patch


def trt_version_parts(version: str) -> tuple[int, int, int]:
    """``(major, minor, patch)`` of a TensorRT version string: the leading digits of each of
    its first three dot-separated parts, a part that is missing or does not start with a
    digit counting as 0 (``"8.6.1.6" -> (8, 6, 1)``, ``"8.6.dev" -> (8, 6, 0)``,
    ``"10.0.0b6" -> (10, 0, 0)``). The one parser of TensorRT versions: the cache header,
    the runtime's API checks and the registry's compatibility check all use it."""
    parts = [_LEADING_DIGITS_RE.match(p) for p in str(version).strip().split(".")[:3]]
    numbers = [int(m.group()) if m else 0 for m in parts]
    numbers += [0] * (3 - len(numbers))
    return numbers[0], numbers[1], numbers[2]


def cache_header(trt_version: str | int, algorithm: str = DEFAULT_ALGORITHM) -> str:
    """``TRT-<version int>-<algorithm>``, e.g. ``TRT-8600-EntropyCalibration2``."""
    _check_algorithm(algorithm)
    return f"TRT-{trt_version_int(trt_version)}-{algorithm}"


def _check_algorithm(algorithm: str) -> None:
    if algorithm not in ALGORITHMS:
        raise CalibrationError(f"unknown calibration algorithm {algorithm!r}; TensorRT only reads caches for "
                               f"{', '.join(ALGORITHMS)} (use the one of the calibrator that reads the cache)")


# -- scale <-> hex ------------------------------------------------------------------------
def scale_to_hex(scale: float) -> str:
    """float32 bit pattern of ``scale``, lowercase hex without leading zeros."""
    bits = np.array(scale, dtype=np.float32).view(np.uint32)
    return format(int(bits), "x")


def hex_to_scale(text: str) -> np.float32:
    """The float32 whose IEEE-754 bit pattern is the hex ``text``."""
    return np.array(int(text, 16), dtype=np.uint32).view(np.float32)[()]


# -- the cache ----------------------------------------------------------------------------
@dataclass(frozen=True)
class CalibrationCache:
    """A parsed cache: ``scales`` maps tensor name -> float32 scale, in file order."""

    version: int
    algorithm: str
    scales: dict[str, np.float32] = field(default_factory=dict)
    path: Path | None = None

    @property
    def header(self) -> str:
        return f"TRT-{self.version}-{self.algorithm}"

    def amax(self) -> dict[str, float]:
        """Per-tensor amax = scale * 127 (in float64)."""
        return {name: float(scale) * 127.0 for name, scale in self.scales.items()}


def format_cache(scales: Mapping[str, float], trt_version: str | int,
                 algorithm: str = DEFAULT_ALGORITHM) -> str:
    """The cache text for ``scales`` (tensor name -> scale), in the mapping's order."""
    lines = [cache_header(trt_version, algorithm)]
    for name, scale in scales.items():
        _check_entry(name, scale)
        lines.append(f"{name}: {scale_to_hex(scale)}")
    return "\n".join(lines) + "\n"


def _check_entry(name: str, scale: float) -> None:
    if not isinstance(name, str) or not name or "\n" in name or "\r" in name:
        raise CalibrationError(f"tensor name {name!r} cannot go in a calibration cache: names must be "
                               "non-empty single-line strings")
    with np.errstate(over="ignore", invalid="ignore"):
        value = np.float32(scale)
    if not np.isfinite(value) or value < 0:
        raise CalibrationError(f"scale {scale!r} of tensor {name!r} is not a finite float32 >= 0; its "
                               "calibration range is broken (check the tensor's histogram)")


def write_cache(path: str | os.PathLike, scales: Mapping[str, float], trt_version: str | int,
                algorithm: str = DEFAULT_ALGORITHM) -> Path:
    """Write a TensorRT calibration cache atomically (temp file in the same folder, then
    ``os.replace``), so a reader never sees half a cache. Returns the path."""
    target = Path(path)
    text = format_cache(scales, trt_version, algorithm)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def read_cache(path: str | os.PathLike, expect_version: str | int | None = None,
               expect_algorithm: str | None = None) -> CalibrationCache:
    """Read and check a calibration cache.

    ``expect_version`` (``"8.6.1"`` or ``8601``) and ``expect_algorithm`` are what the
    TensorRT that will read the cache uses; a header that differs raises
    ``CacheMismatchError`` (TensorRT would silently recalibrate instead).
    """
    source = Path(path)
    try:
        text = source.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CalibrationError(f"calibration cache {source} does not exist; run `trtpipe calibrate` to "
                               "create it") from None
    except UnicodeDecodeError:
        raise CalibrationError(f"calibration cache {source} is not a text file; it is not a TensorRT "
                               "calibration cache (recreate it with `trtpipe calibrate`)") from None
    cache = parse_cache(text, source)
    _check_header(cache, source, expect_version, expect_algorithm)
    return cache


def parse_cache(text: str, source: str | os.PathLike = "<cache text>") -> CalibrationCache:
    """Parse cache text; every error names ``source`` and the line number."""
    lines = [line[:-1] if line.endswith("\r") else line for line in text.split("\n")]
    if not lines or not lines[0].strip():
        raise CalibrationError(f"calibration cache {source} is empty: expected a first line like "
                               "'TRT-8600-EntropyCalibration2'; recreate it with `trtpipe calibrate`")
    version, algorithm = _parse_header(lines[0], source)
    scales: dict[str, np.float32] = {}
    for number, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        name, scale = _parse_line(line, number, source)
        if name in scales:
            raise CalibrationError(f"calibration cache {source}, line {number}: tensor {name!r} appears twice; "
                                   "the file is corrupt, recreate it with `trtpipe calibrate`")
        scales[name] = scale
    return CalibrationCache(version, algorithm, scales, Path(source) if isinstance(source, Path) else None)


def _parse_header(line: str, source: str | os.PathLike) -> tuple[int, str]:
    match = _HEADER_RE.match(line.strip())
    if not match or match.group(2) not in ALGORITHMS:
        raise CalibrationError(
            f"calibration cache {source}, line 1: {line.strip()[:80]!r} is not a TensorRT cache header "
            f"(expected 'TRT-<version>-<algorithm>' with algorithm one of {', '.join(ALGORITHMS)}); "
            "recreate the cache with `trtpipe calibrate`")
    return int(match.group(1)), match.group(2)


def _parse_line(line: str, number: int, source: str | os.PathLike) -> tuple[str, np.float32]:
    name, sep, value = line.rpartition(": ")
    value = value.strip()
    if not sep or not name or not _HEX_RE.match(value):
        raise CalibrationError(
            f"calibration cache {source}, line {number}: {line[:80]!r} is not '<tensor name>: <hex float32 "
            "scale>'; the file is corrupt or not a TensorRT cache, recreate it with `trtpipe calibrate`")
    return name, hex_to_scale(value)


def _check_header(cache: CalibrationCache, source: Path, expect_version: str | int | None,
                  expect_algorithm: str | None) -> None:
    version = cache.version if expect_version is None else trt_version_int(expect_version)
    algorithm = cache.algorithm if expect_algorithm is None else expect_algorithm
    if expect_algorithm is not None:
        _check_algorithm(expect_algorithm)
    expected = f"TRT-{version}-{algorithm}"
    if expected == cache.header:
        return
    what = "TensorRT version" if version != cache.version else "algorithm"
    if version != cache.version and algorithm != cache.algorithm:
        what = "TensorRT version and algorithm"
    raise CacheMismatchError(
        f"calibration cache {source} has header {cache.header!r} but {expected!r} is expected "
        f"(different {what}). TensorRT would silently ignore this cache and calibrate again. "
        "Recreate the cache for this TensorRT and algorithm with `trtpipe calibrate`, or build with "
        "the TensorRT and calibrator that wrote it")


# -- values a checksum cannot vet -------------------------------------------------------
# Tensors TensorRT's parser makes that the ONNX does not name: `(Unnamed Layer* 12) [Constant]_output`.
UNNAMED_RE = re.compile(r"^\(Unnamed Layer\* \d+\) \[[^\]\n]+\]_output(?:_\d+)?$")


@dataclass(frozen=True)
class NetworkNames:
    """The tensor names of an ONNX graph: every one (`tensors`) and those holding weights
    (`weights`: initializers, Constant outputs), whose scale TensorRT writes as 0."""

    tensors: frozenset[str]
    weights: frozenset[str]
    source: str = ""


def network_names(onnx_path: str | os.PathLike) -> NetworkNames:
    """The tensor names of `onnx_path` (graph inputs, outputs, node outputs, initializers)."""
    import onnx

    try:
        model = onnx.load(str(onnx_path), load_external_data=False)
    except Exception as e:  # onnx raises DecodeError, OSError ...
        raise CalibrationError(f"{onnx_path}: cannot read the ONNX to check calibration tensor names "
                               f"({type(e).__name__}: {e}); re-run export") from None
    g = model.graph
    weights = {t.name for t in g.initializer} | {o for n in g.node if n.op_type == "Constant" for o in n.output}
    tensors = ({v.name for v in g.input} | {v.name for v in g.output} | {o for n in g.node for o in n.output}
               | weights)
    return NetworkNames(frozenset(t for t in tensors if t), frozenset(weights), str(onnx_path))


def _bad_scale(name: str, value: float, network: NetworkNames | None) -> str | None:
    """Why `value` cannot be the scale of tensor `name` (None: it can)."""
    unnamed = bool(UNNAMED_RE.match(name))
    if not np.isfinite(value):
        return "is not finite"
    if value < 0:
        return "is negative"
    if value == 0 and not unnamed and (network is None or name not in network.weights):
        return "is zero (only weights and TensorRT's own constants may have scale 0)"
    if network is not None and name not in network.tensors and not unnamed:
        return f"names a tensor the network ({network.source}) does not have"
    return None


def check_scales(cache: CalibrationCache, source: str | os.PathLike, network: NetworkNames | None = None) -> None:
    """Refuse, in one line naming the file, the tensor and the value, a scale that is NaN,
    +-Inf, negative, zero (but for weights and `(Unnamed Layer* N) [...]_output` constants),
    or of a tensor the network lacks (`(Unnamed Layer* N) [...]_output`, made by TensorRT's
    parser, allowed)."""
    for name, scale in cache.scales.items():
        why = _bad_scale(name, float(scale), network)
        if why:
            raise CalibrationError(f"calibration cache {source}: tensor {name!r} has scale {float(scale)!r} "
                                   f"(hex {scale_to_hex(scale)}), which {why}; the cache is corrupt or for another "
                                   "model: recreate it with `trtpipe calibrate`")


def check_ranges(path: str | os.PathLike, network: NetworkNames | None = None) -> None:
    """The calibrate stage's ranges.json: every tensor's amax and scale a finite number > 0
    (0 for weights), scale_hex valid hex of that scale, and every tensor in the network."""
    import json
    import math

    source = Path(path)
    try:
        doc = json.loads(source.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CalibrationError(f"{source}: not readable calibration ranges ({e}); re-run calibrate") from None
    tensors = doc.get("tensors") if isinstance(doc, dict) else None
    if not isinstance(tensors, dict) or not tensors:
        raise CalibrationError(f"{source}: holds no 'tensors' (name -> amax, scale); re-run calibrate")
    for name, t in tensors.items():
        if not isinstance(t, dict):
            raise CalibrationError(f"{source}: tensor {name!r} is {t!r}, not its range; re-run calibrate")
        for key in ("amax", "scale"):
            v = t.get(key)
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise CalibrationError(f"{source}: tensor {name!r} has {key} {v!r}, not a number; the ranges are "
                                       "corrupt: re-run calibrate")
            why = _bad_scale(name, float(v), network)
            if why:
                raise CalibrationError(f"{source}: tensor {name!r} has {key} {v!r}, which {why}; the ranges are "
                                       "corrupt or for another model: re-run calibrate")
        hx = t.get("scale_hex")
        if hx is not None:
            if not isinstance(hx, str) or not _HEX_RE.match(hx):
                raise CalibrationError(f"{source}: tensor {name!r} has scale_hex {hx!r}, not the hex of a float32; "
                                       "the ranges are corrupt: re-run calibrate")
            if scale_to_hex(np.float32(t["scale"])) != hx.lower() and not math.isclose(
                    float(hex_to_scale(hx)), float(t["scale"]), rel_tol=1e-6):
                raise CalibrationError(f"{source}: tensor {name!r} has scale_hex {hx!r} ({float(hex_to_scale(hx))!r}) "
                                       f"but scale {t['scale']!r}; the ranges are corrupt: re-run calibrate")
