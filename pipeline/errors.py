"""One exception family. The CLI turns any `PipelineError` into one line on stderr
(what is wrong, where, what to do) and exit status 1; anything else is a bug and keeps
its traceback."""

from __future__ import annotations


class PipelineError(Exception):
    """Base of every error a user can act on."""

    exit_code = 1


class UsageError(PipelineError):
    """The command line itself is wrong (exit status 2)."""

    exit_code = 2


class ConfigError(PipelineError):
    """A config or params file has a wrong key, type or value."""


class DataError(PipelineError):
    """A dataset is missing, empty, or has the wrong shape or dtype."""


class ModelError(PipelineError):
    """A model, checkpoint or ONNX file cannot be loaded or is invalid."""


class ToleranceError(PipelineError):
    """A numeric comparison exceeded the tolerance the config allows."""


class BackendError(PipelineError):
    """A backend (TensorRT, onnxruntime) is unavailable or failed to build or run."""


class ArtifactError(PipelineError):
    """A published artifact or manifest is missing, corrupt or does not match this machine."""


class ReportError(PipelineError):
    """A report (compare.json, eval json) is missing or from another schema version.

    Used by the gate, which exits 2 for bad input."""

    exit_code = 2


class GateFailure(PipelineError):
    """An accuracy or latency regression that the gate must stop."""
