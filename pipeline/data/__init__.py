"""The data layer: sources, preprocessing, splits and batches (README, "Your own model", Data).

A sample is a dict of named arrays, one per model input; a batch is the same dict with
the batch axis first. `load_splits` reads the configured source, preprocesses it and cuts
it into train / calibration / evaluation sets that never overlap; `save_samples` and
`load_samples` write and read them as `.npz` files (one key per input, plus the labels
key); `calibration_indices` and `calibration_batches` decide which calibration samples
every calibrator sees, in which batches."""

from .samples import Samples, calibration_batches, calibration_indices, load_samples, save_samples
from .splits import Splits, load_splits

__all__ = ["Samples", "Splits", "load_splits", "save_samples", "load_samples", "calibration_indices",
           "calibration_batches"]
