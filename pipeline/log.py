"""One logger for trtpipe, and one helper for progress bars.

Every module logs through ``get_logger(__name__)`` (children of the ``trtpipe`` logger); its
one handler writes plain lines to the *current* ``sys.stderr`` (``trtpipe: note: ...``,
``trtpipe: warning: ...``, ``trtpipe: debug: ...``), through ``tqdm.write`` while a progress
bar is on screen so that a line never lands inside a bar. ``configure(verbose, quiet)``
(the CLI's ``-v``/``-q``) sets the level: DEBUG, INFO (default) or WARNING.

Progress bars come from ``progress_bar()``: tqdm with ``leave=False`` (a finished bar clears
its line, so it never overprints the result printed after it), off on a non-TTY stderr
and with ``-q``. A command's result lines go to stdout (``print``) and its one-line error
to stderr (``pipeline.cli._fail``); neither goes through this logger.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, Iterable, Optional

NAME = "trtpipe"
_LABELS = {logging.DEBUG: "debug", logging.INFO: "note", logging.WARNING: "warning", logging.ERROR: "error",
           logging.CRITICAL: "error"}
_state = {"quiet": False}


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        label = _LABELS.get(record.levelno, record.levelname.lower())
        text = f"{NAME}: {label}: {record.getMessage()}"
        if record.exc_info and record.levelno <= logging.DEBUG:
            text += "\n" + self.formatException(record.exc_info)
        return text


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever sys.stderr is at the time (pytest's capture, a redirected stream)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass

    def emit(self, record: logging.LogRecord) -> None:
        try:
            msg = self.format(record)
            tqdm_mod = sys.modules.get("tqdm")
            bars = getattr(getattr(tqdm_mod, "tqdm", None), "_instances", None) if tqdm_mod else None
            if bars:  # a bar is on screen: tqdm.write clears it, prints the line and redraws it
                tqdm_mod.tqdm.write(msg, file=sys.stderr)
            else:
                sys.stderr.write(msg + "\n")
                sys.stderr.flush()
        except Exception:  # pragma: no cover - logging must never raise
            self.handleError(record)


def _root() -> logging.Logger:
    logger = logging.getLogger(NAME)
    if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
        handler = _StderrHandler()
        handler.setFormatter(_Formatter())
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False  # one line per message, whatever the root logger has
    return logger


LOGGER = _root()


def get_logger(name: Optional[str] = None) -> logging.Logger:
    """``trtpipe`` or a child of it (``pipeline.registry`` -> ``trtpipe.registry``)."""
    if not name or name == NAME:
        return LOGGER
    short = name.split(".", 1)[1] if name.startswith(("pipeline.", "calibration.")) else name
    if name.startswith("calibration."):
        short = "calibration." + short
    return LOGGER.getChild(short)


def configure(verbose: bool = False, quiet: bool = False) -> None:
    """-v: DEBUG; -q: WARNING and no progress bars; neither: INFO. -v wins over -q."""
    _root().setLevel(logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO)
    _state["quiet"] = bool(quiet) and not verbose


def quiet() -> bool:
    return _state["quiet"]


def progress_enabled() -> bool:
    """Bars only for a person watching: stderr is a terminal and -q was not given."""
    if _state["quiet"]:
        return False
    try:
        return bool(sys.stderr.isatty())
    except (AttributeError, ValueError):
        return False


def progress_bar(iterable: Optional[Iterable[Any]] = None, *, enabled: bool = True, **kwargs: Any) -> Any:
    """A tqdm bar (or tqdm's pass-through when off): ``leave=False`` and stderr unless told."""
    from tqdm import tqdm

    kwargs.setdefault("leave", False)
    kwargs.setdefault("file", sys.stderr)
    kwargs.setdefault("dynamic_ncols", True)
    return tqdm(iterable, disable=not (enabled and progress_enabled()), **kwargs)
