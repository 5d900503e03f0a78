"""A small CNN on 8x8 digits with one planted layer that INT8 cannot take.

`plant` multiplies output channel 0 of conv2 (weights and bias) by `scale` and divides
conv3's weights reading that channel by the same `scale`. ReLU is positively homogeneous,
so the FP32 function does not change, but the tensor conv3 reads now holds one channel
`scale` times larger than the others: with one INT8 scale per activation tensor, the other
15 channels fall into a handful of quantization steps. The layer that breaks is conv3
(the ONNX node `/c3/Conv`); keeping it out of INT8 is the one fix."""

import torch
from torch import nn


class OutlierCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(1, 16, 3, padding=1)
        self.c2 = nn.Conv2d(16, 16, 3, padding=1)
        self.c3 = nn.Conv2d(16, 16, 3, padding=1)
        self.c4 = nn.Conv2d(16, 16, 3, padding=1)
        self.fc = nn.Linear(16 * 64, 10)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.c1(input))
        x = torch.relu(self.c2(x))
        x = torch.relu(self.c3(x))
        x = torch.relu(self.c4(x))
        return self.fc(torch.flatten(x, 1))


def make() -> nn.Module:
    return OutlierCNN()


PLANTED = "/c3/Conv"


def plant(model: OutlierCNN, scale: float = 1000.0) -> OutlierCNN:
    with torch.no_grad():
        model.c2.weight[0] *= scale
        model.c2.bias[0] *= scale
        model.c3.weight[:, 0] /= scale
    return model


def save(path: str, planted: bool = True, seed: int = 0) -> None:
    torch.manual_seed(seed)
    model = make().eval()
    if planted:
        plant(model)
    torch.save(model.state_dict(), path)
