"""One parser of TensorRT versions: the cache header, the runtime and the registry's
compatibility check read a version string the same way."""

from __future__ import annotations

import types

from calibration.cache import trt_version_int, trt_version_parts
from pipeline.runtime.trt_common import trt_version


def test_parts_are_leading_digits_of_three_dot_parts() -> None:
    assert trt_version_parts("8.6.1.6") == (8, 6, 1)
    assert trt_version_parts("8.6.dev") == (8, 6, 0)
    assert trt_version_parts("10.0.0b6") == (10, 0, 0)
    assert trt_version_parts("8.6") == (8, 6, 0)
    assert trt_version_parts("8.61") == (8, 61, 0)


def test_runtime_and_cache_header_agree_with_the_parser() -> None:
    for v in ("8.6.1.6", "10.0.0b6", "10.16.0", "11.1"):
        major, minor, patch = trt_version(types.SimpleNamespace(__version__=v))
        assert (major, minor, patch) == trt_version_parts(v)
        assert trt_version_int(v) == major * (10000 if major >= 10 else 1000) + minor * 100 + patch
