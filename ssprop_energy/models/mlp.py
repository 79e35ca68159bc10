"""The paper's MLP (``MLP_Nlayer``, hidden size 256): the model its ``SSPropLinear`` experiments use."""

from __future__ import annotations

import torch
from torch import nn

from ssprop_energy.errors import ConfigError

MLP_HIDDEN = 256


class MLP(nn.Module):
    """Flatten, then ``depth`` linear layers (``depth - 1`` hidden layers of ``hidden`` units with ReLU)."""

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        image_size: int = 32,
        dropout: float = 0.0,
        depth: int = 3,
        hidden: int = MLP_HIDDEN,
    ) -> None:
        super().__init__()
        if depth < 1 or hidden < 1:
            raise ConfigError(f"mlp needs depth >= 1 and hidden >= 1, got depth={depth}, hidden={hidden}")
        features = in_channels * image_size * image_size
        layers: list[nn.Module] = [nn.Flatten()]
        for _ in range(depth - 1):
            layers += [nn.Linear(features, hidden), nn.ReLU(inplace=True)]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            features = hidden
        layers.append(nn.Linear(features, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
