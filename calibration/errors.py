"""Errors raised by the calibration package: part of the pipeline's one exception family."""

from __future__ import annotations

from pipeline.errors import PipelineError


class CalibrationError(PipelineError):
    """Bad calibration input: too few samples, NaN/Inf activations, a cache for another
    TensorRT version or algorithm. Messages name the file or tensor and what to do."""


class CacheMismatchError(CalibrationError):
    """A calibration cache whose header names another TensorRT version or algorithm than
    the one expected. TensorRT itself would ignore such a cache without a word and
    calibrate again; callers may catch this to recalibrate on purpose."""
