"""What the TensorRT builder and runner share: importing tensorrt with an actionable
error, its version, and ONE process-wide logger (TensorRT keeps the first logger it is
given, so every builder and runtime here uses this one) that can capture messages."""

from __future__ import annotations

import contextlib
import logging
import threading
from typing import Any, Iterator

from calibration.cache import trt_version_parts

from ..errors import BackendError
from ..log import get_logger as trtpipe_logger

SUPPORTED = "TensorRT >= 8.6"


def require_tensorrt() -> Any:
    """`import tensorrt`, or a BackendError that says what to install."""
    try:
        import tensorrt as trt
    except Exception as e:  # ImportError, or a broken install (libnvinfer missing)
        raise BackendError(
            f"tensorrt does not import ({type(e).__name__}: {e}); install it with pip install 'trtpipe[tensorrt]' "
            f"({SUPPORTED}, plus pycuda) on a machine with an NVIDIA GPU and driver, "
            "or set build.backend: onnxruntime (or auto) to use the CPU backend"
        ) from None
    return trt


def installed_version() -> Any:
    """The installed TensorRT's version string, or None when tensorrt does not import."""
    try:
        import tensorrt as trt
    except Exception:
        return None
    return str(trt.__version__)


def tensorrt_usable() -> tuple[bool, str]:
    """Whether TensorRT imports and a CUDA GPU is visible, and why not."""
    try:
        import tensorrt  # noqa: F401
    except Exception as e:  # ImportError or a broken install (missing libnvinfer)
        return False, f"tensorrt does not import ({type(e).__name__}: {e})"
    from .cuda_device import gpu_count

    try:
        n = gpu_count()
    except Exception as e:
        return False, f"no usable CUDA driver ({e})"
    return (n > 0, "" if n else "no CUDA GPU visible")


def trt_version(trt: Any = None) -> tuple[int, int, int]:
    trt = trt or require_tensorrt()
    return trt_version_parts(str(trt.__version__))


class _Capture:
    def __init__(self) -> None:
        self.messages: list[tuple[str, str]] = []  # (severity name, text)

    def errors(self) -> list[str]:
        return [m for s, m in self.messages if s in ("ERROR", "INTERNAL_ERROR")]

    def warnings(self) -> list[str]:
        return [m for s, m in self.messages if s == "WARNING"]

    def matching(self, *needles: str) -> list[str]:
        return [m for _, m in self.messages if any(n.lower() in m.lower() for n in needles)]


_LOGGER: Any = None
_LOCK = threading.Lock()


def get_logger() -> Any:
    """The process-wide trt.ILogger: prints warnings and errors to stderr (INFO too when
    `logger.verbose` is set) and records every message into active `capture()` blocks."""
    global _LOGGER
    with _LOCK:
        if _LOGGER is None:
            trt = require_tensorrt()

            class _Logger(trt.ILogger):  # type: ignore[misc, valid-type]
                def __init__(self) -> None:
                    trt.ILogger.__init__(self)
                    self.captures: list[_Capture] = []
                    self.verbose = False
                    self.quiet = False

                def log(self, severity: Any, msg: str) -> None:
                    name = getattr(severity, "name", str(severity)).split(".")[-1]
                    if name == "VERBOSE":
                        return
                    for c in list(self.captures):
                        c.messages.append((name, msg))
                    if self.quiet:
                        return
                    level = {"ERROR": logging.ERROR, "INTERNAL_ERROR": logging.ERROR, "WARNING": logging.WARNING,
                             "INFO": logging.INFO if self.verbose else logging.DEBUG}.get(name, logging.DEBUG)
                    trtpipe_logger("trtpipe.tensorrt").log(level, f"[TensorRT {name}] {msg}")

            _LOGGER = _Logger()  # records INFO and above; VERBOSE is dropped at once
        return _LOGGER


@contextlib.contextmanager
def capture(quiet: bool = False) -> Iterator[_Capture]:
    """Record TensorRT's log messages for the block (and silence printing if `quiet`)."""
    logger = get_logger()
    c = _Capture()
    logger.captures.append(c)
    was_quiet = logger.quiet
    logger.quiet = quiet or was_quiet
    try:
        yield c
    finally:
        logger.captures.remove(c)
        logger.quiet = was_quiet
