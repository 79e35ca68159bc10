"""The paper's plain CNN (``CNN_Nlayer`` in its public code): depth x (3x3 conv of 128 channels, ReLU),
global average pool, one linear layer. No BatchNorm, no pooling between convolutions, so every convolution
runs at full input resolution: the cleanest case for measuring conv-backward savings."""

from __future__ import annotations

import torch
from torch import nn

from ssprop_energy.errors import ConfigError

CNN_WIDTH = 128


class PlainCNN(nn.Module):
    """``depth`` convolutions of ``width`` channels (3x3, padding 1, bias, ReLU), GAP, linear head."""

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        image_size: int = 32,
        dropout: float = 0.0,
        depth: int = 3,
        width: int = CNN_WIDTH,
    ) -> None:
        super().__init__()
        if depth < 1 or width < 1:
            raise ConfigError(f"cnn needs depth >= 1 and width >= 1, got depth={depth}, width={width}")
        layers: list[nn.Module] = []
        channels = in_channels
        for _ in range(depth):
            layers += [nn.Conv2d(channels, width, 3, padding=1), nn.ReLU(inplace=True)]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            channels = width
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))
