"""CIFAR-style ResNets as the paper trains them (He et al. 2016, arXiv 1512.03385, CIFAR variant).

Differences from the ImageNet ResNet: a 3x3 stride-1 stem and no max-pool, so a 32x32 image reaches the last
stage at 4x4. Stages of 64/128/256/512 channels (x4 for bottlenecks), 1x1 projection shortcuts where shape
changes. The head is a global average pool, which equals the paper's ``avg_pool2d(4)`` for 28x28 and 32x32
inputs (both end at 4x4) and also works at 16x16 (2x2), the digits default.

Dropout placement follows the paper's public code: after the stem, after every BatchNorm inside a block and
after a projection shortcut's BatchNorm. With ``dropout=0`` no dropout module exists, so the state_dict is
identical either way.
"""

from __future__ import annotations

import torch
from torch import nn


def _dropout(p: float) -> nn.Module:
    return nn.Dropout(p) if p > 0 else nn.Identity()


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual connection (ResNet-18/34)."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1, dropout: float = 0.0) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.drop1 = _dropout(dropout)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.drop2 = _dropout(dropout)
        self.shortcut = _shortcut(in_planes, planes * self.expansion, stride, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.drop1(torch.relu(self.bn1(self.conv1(x))))
        out = self.drop2(self.bn2(self.conv2(out)))
        return torch.relu(out + self.shortcut(x))


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3, 1x1 expand (x4) with a residual connection (ResNet-50)."""

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1, dropout: float = 0.0) -> None:
        super().__init__()
        out_planes = planes * self.expansion
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.drop1 = _dropout(dropout)
        # Stride on the 3x3 convolution, as in the paper's code (the "ResNet v1.5" placement).
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.drop2 = _dropout(dropout)
        self.conv3 = nn.Conv2d(planes, out_planes, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.drop3 = _dropout(dropout)
        self.shortcut = _shortcut(in_planes, out_planes, stride, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.drop1(torch.relu(self.bn1(self.conv1(x))))
        out = self.drop2(torch.relu(self.bn2(self.conv2(out))))
        out = self.drop3(self.bn3(self.conv3(out)))
        return torch.relu(out + self.shortcut(x))


def _shortcut(in_planes: int, out_planes: int, stride: int, dropout: float) -> nn.Module:
    if stride == 1 and in_planes == out_planes:
        return nn.Identity()
    layers: list[nn.Module] = [
        nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False),
        nn.BatchNorm2d(out_planes),
    ]
    if dropout > 0:
        layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers)


class CifarResNet(nn.Module):
    """ResNet for small images; see the module docstring."""

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        num_blocks: tuple[int, int, int, int],
        num_classes: int = 10,
        in_channels: int = 3,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.drop1 = _dropout(dropout)
        in_planes = 64
        stages = []
        for planes, blocks, stride in zip((64, 128, 256, 512), num_blocks, (1, 2, 2, 2)):
            layers = []
            for s in [stride] + [1] * (blocks - 1):
                layers.append(block(in_planes, planes, s, dropout))
                in_planes = planes * block.expansion
            stages.append(nn.Sequential(*layers))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(in_planes, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.drop1(torch.relu(self.bn1(self.conv1(x))))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.linear(torch.flatten(self.pool(out), 1))


# ``image_size`` is accepted for the registry's uniform signature; the adaptive pool makes these nets
# independent of it.


def resnet18(num_classes: int = 10, in_channels: int = 3, image_size: int = 32, dropout: float = 0.0) -> CifarResNet:
    """CIFAR ResNet-18: 11,173,962 parameters with 10 classes and 3 input channels."""
    return CifarResNet(BasicBlock, (2, 2, 2, 2), num_classes, in_channels, dropout)


def resnet34(num_classes: int = 10, in_channels: int = 3, image_size: int = 32, dropout: float = 0.0) -> CifarResNet:
    """CIFAR ResNet-34: 21,282,122 parameters with 10 classes and 3 input channels."""
    return CifarResNet(BasicBlock, (3, 4, 6, 3), num_classes, in_channels, dropout)


def resnet50(num_classes: int = 10, in_channels: int = 3, image_size: int = 32, dropout: float = 0.0) -> CifarResNet:
    """CIFAR ResNet-50: 23,520,842 parameters with 10 classes and 3 input channels."""
    return CifarResNet(Bottleneck, (3, 4, 6, 3), num_classes, in_channels, dropout)
