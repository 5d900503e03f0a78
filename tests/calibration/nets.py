"""Model and data helpers shared by the calibration tests: real photos (scikit-image) and
a small residual CNN exported to ONNX."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _photo_crops(n: int, size: int, seed: int) -> np.ndarray:
    """Random crops (with flips) of scikit-image photos, ImageNet-normalized, NCHW float32."""
    from PIL import Image
    from skimage import data as skd

    photos = [skd.astronaut(), skd.coffee(), skd.chelsea(), skd.rocket()]
    rng = np.random.default_rng(seed)
    out = np.empty((n, 3, size, size), np.float32)
    mean, std = np.array([0.485, 0.456, 0.406], np.float32), np.array([0.229, 0.224, 0.225], np.float32)
    for k in range(n):
        im = photos[rng.integers(len(photos))]
        s = int(rng.integers(size, min(im.shape[:2]) + 1))
        y, x = rng.integers(0, im.shape[0] - s + 1), rng.integers(0, im.shape[1] - s + 1)
        crop = np.asarray(Image.fromarray(im[y:y + s, x:x + s]).resize((size, size), Image.BILINEAR), np.float32)
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        out[k] = ((crop / 255 - mean) / std).transpose(2, 0, 1)
    return out


def residual_cnn():
    """Conv-BN-ReLU, a residual block, pooling and a Linear head: the op mix TensorRT calibrates."""
    import torch
    from torch import nn

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
            self.conv1 = nn.Conv2d(8, 8, 3, padding=1)
            self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
            self.pool = nn.MaxPool2d(2)
            self.head = nn.Linear(8, 5)

        def forward(self, x):
            x = self.stem(x)
            y = torch.relu(self.conv1(x))
            x = torch.relu(self.conv2(y) + x)
            x = self.pool(x).mean(dim=(2, 3))
            return self.head(x)

    torch.manual_seed(0)
    net = Net().eval()
    with torch.no_grad():  # non-trivial BN statistics, so folding changes the weights
        net.stem[1].running_mean.uniform_(-0.5, 0.5)
        net.stem[1].running_var.uniform_(0.5, 2.0)
    return net


def export(net, path: Path, sample: np.ndarray) -> Path:
    import torch

    torch.onnx.export(net, torch.from_numpy(sample[:1]), str(path), input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "b"}, "logits": {0: "b"}}, opset_version=17, dynamo=False)
    return path
