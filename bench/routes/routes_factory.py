"""Models and data of bench/routes_projects.py's projects (copied into each project).

* ``resnet50()``: torchvision's ResNet-50, seeded weights (no download), its BatchNorm statistics
  drawn so that activations are not the identity-like ones of a fresh init.
* ``eval_crops()`` / ``calib_crops()``: 128 / 256 scikit-image photo crops (configs/efficientnet_lite0_factory's
  crops: held-out seeds), float32 NCHW 0..255 (data.preprocess normalizes them).
"""

from __future__ import annotations

from typing import Any, Iterator

import numpy as np

EVAL, CALIB = 128, 256


def resnet50() -> Any:
    import torch
    import torchvision

    torch.manual_seed(0)
    net = torchvision.models.resnet50(weights=None)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return net.eval()


def _batches(n: int, seed: int, batch: int = 64) -> Iterator[np.ndarray]:
    from efficientnet_lite0_factory import crops_uint8

    u8 = crops_uint8(n, seed)
    for i in range(0, n, batch):
        yield np.ascontiguousarray(u8[i:i + batch].astype(np.float32).transpose(0, 3, 1, 2))


def eval_crops() -> Iterator[np.ndarray]:
    return _batches(EVAL, 1)


def calib_crops() -> Iterator[np.ndarray]:
    return _batches(CALIB, 0)
