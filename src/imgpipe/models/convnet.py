"""The seed's CNN (``model=convnet``, the default), sized from the data; kept bit for bit
as the seed trains it."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# What the checkpoint fingerprint and model.pt have always called this network: keeping the
# name keeps old checkpoints resumable and old model files loadable.
CONVNET_ID = "convnet-v1"


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
