"""A three-head model a user might bring (a face-detector's shape): from one 8x8 digit image,
the ink's bounding box, its centre of mass (a landmark) and the class probabilities, as a
dict of three outputs. `train` fits it to targets computed from the real digits."""

import numpy as np
import torch
from torch import nn


class DigitDetector(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                  nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.Flatten())
        self.boxes = nn.Linear(32 * 64, 4)
        self.landmarks = nn.Linear(32 * 64, 2)
        self.prob = nn.Sequential(nn.Linear(32 * 64, 10), nn.Softmax(dim=1))

    def forward(self, image: torch.Tensor) -> dict:
        f = self.body(image)
        return {"boxes": self.boxes(f), "landmarks": self.landmarks(f), "prob": self.prob(f)}


def make() -> nn.Module:
    return DigitDetector()


def targets(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Bounding box (x1, y1, x2, y2, pixels) of ink > 4 and its centre of mass, per raw 0..16 image."""
    boxes, centres = [], []
    for img in images[:, 0]:
        ys, xs = np.nonzero(img > 4)
        boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
        w = img / img.sum()
        centres.append([(w.sum(0) * np.arange(8)).sum(), (w.sum(1) * np.arange(8)).sum()])
    return np.asarray(boxes, np.float32), np.asarray(centres, np.float32)


def train(path: str, epochs: int = 15) -> None:
    from sklearn.datasets import load_digits

    d = load_digits()
    raw = d.images[:, None].astype(np.float32)
    boxes, centres = targets(raw)
    x = torch.from_numpy((raw / 16.0 - 0.5) / 0.5)
    y, b, c = torch.from_numpy(d.target), torch.from_numpy(boxes), torch.from_numpy(centres)
    torch.manual_seed(0)
    model = make()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(epochs):
        for i in range(0, len(x), 64):
            out = model(x[i:i + 64])
            loss = (nn.functional.nll_loss(torch.log(out["prob"] + 1e-9), y[i:i + 64])
                    + nn.functional.smooth_l1_loss(out["boxes"], b[i:i + 64])
                    + nn.functional.smooth_l1_loss(out["landmarks"], c[i:i + 64]))
            opt.zero_grad()
            loss.backward()
            opt.step()
    torch.save(model.eval().state_dict(), path)
