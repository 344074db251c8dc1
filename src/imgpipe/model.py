"""The CNN (the seed's MNIST network, sized from the data) and the one function that
builds it with its optimizer and scheduler: the place to swap any of the three."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

MODEL_NAME = "convnet-v1"


class ConvNet(nn.Module):
    """Two 3x3 convolutions, max-pool, dropout, two linear layers (as in the seed).

    Padding keeps tiny images (8x8 digits) usable; adaptive pooling caps the
    flattened size at 64x8x8 so large images do not blow up ``fc1``.
    """

    def __init__(self, in_channels: int, height: int, width: int, num_classes: int) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError("a classifier needs at least two classes")
        pooled = (min(8, max(1, height // 2)), min(8, max(1, width // 2)))
        self.conv1 = nn.Conv2d(in_channels, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.pool = nn.AdaptiveMaxPool2d(pooled)
        self.dropout1 = nn.Dropout(0.25)
        self.fc1 = nn.Linear(64 * pooled[0] * pooled[1], 128)
        self.dropout2 = nn.Dropout(0.5)
        self.fc2 = nn.Linear(128, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        x = self.dropout1(self.pool(x))
        x = torch.flatten(x, 1)
        x = self.dropout2(F.relu(self.fc1(x)))
        return F.log_softmax(self.fc2(x), dim=1)


@dataclass(frozen=True)
class Trainable:
    """What training updates: the model, its optimizer and the learning-rate schedule."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler


def build_trainable(
    image_shape: tuple[int, int, int],
    num_classes: int,
    *,
    lr: float,
    gamma: float,
    device: torch.device,
) -> Trainable:
    """The seed's recipe: the CNN, Adadelta, and StepLR decaying by ``gamma`` every epoch."""
    channels, height, width = image_shape
    model = ConvNet(channels, height, width, num_classes).to(device)
    optimizer = torch.optim.Adadelta(model.parameters(), lr=lr)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=gamma)
    return Trainable(model, optimizer, scheduler)
