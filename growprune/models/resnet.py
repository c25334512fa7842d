"""ResNets for small images.

* CIFAR ResNet-20/32/44/56/110 (He et al. 2016, section 4.2): three stages of 16/32/64 channels.
  ``shortcut="A"`` (the paper's, parameter-free: strided subsample + zero channel padding) gives
  the published sizes (ResNet-20: 0.27M, ResNet-56: 0.85M); ``shortcut="B"`` uses 1x1 conv + BN
  projections, which structured pruning tools trace more easily.
* ResNet-18/34 for small images: the ImageNet block layout with a 3x3 stem and no stem pool.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from growprune.models.registry import register_model


class ChannelPadShortcut(nn.Module):
    """Option-A shortcut: take every ``stride``-th pixel and zero-pad the channels up to ``out_channels``."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.in_channels, self.out_channels, self.stride = in_channels, out_channels, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        extra = self.out_channels - x.shape[1]
        return F.pad(x, (0, 0, 0, 0, extra // 2, extra - extra // 2))


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with a residual connection; the cell unit of growprune's cell surgery."""

    def __init__(self, in_channels: int, channels: int, stride: int = 1, shortcut: str = "B"):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != channels:
            if shortcut == "A":
                self.shortcut = ChannelPadShortcut(in_channels, channels, stride)
            elif shortcut == "B":
                self.shortcut = nn.Sequential(
                    nn.Conv2d(in_channels, channels, 1, stride=stride, bias=False), nn.BatchNorm2d(channels)
                )
            else:
                raise ValueError(f"shortcut must be 'A' or 'B', got {shortcut!r}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """Stem conv-BN-ReLU, stages of ``BasicBlock``s, global average pool, linear classifier."""

    def __init__(
        self,
        blocks_per_stage: list[int],
        widths: list[int],
        num_classes: int = 10,
        in_channels: int = 3,
        shortcut: str = "B",
    ):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        stages = []
        channels = widths[0]
        for index, (count, width) in enumerate(zip(blocks_per_stage, widths)):
            stride = 1 if index == 0 else 2
            blocks = []
            for block_index in range(count):
                blocks.append(BasicBlock(channels, width, stride if block_index == 0 else 1, shortcut))
                channels = width
            stages.append(nn.Sequential(*blocks))
        self.layers = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layers(out)
        return self.fc(torch.flatten(self.pool(out), 1))


def _register_cifar_resnet(depth: int) -> None:
    if (depth - 2) % 6:
        raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
    per_stage = (depth - 2) // 6

    def builder(num_classes: int = 10, in_channels: int = 3, shortcut: str = "A", width: float = 1.0) -> nn.Module:
        if isinstance(width, bool) or not isinstance(width, (int, float)) or not math.isfinite(width) or width <= 0:
            raise ValueError(f"resnet{depth} width must be a finite number > 0, got {width!r}")
        widths = [max(1, round(channels * width)) for channels in (16, 32, 64)]
        return ResNet([per_stage] * 3, widths, num_classes, in_channels, shortcut)

    builder.__name__ = f"resnet{depth}"
    builder.__doc__ = f"CIFAR ResNet-{depth} (He et al. 2016): 3 stages x {per_stage} basic blocks, 16/32/64 channels (times ``width``)."
    register_model(builder.__name__)(builder)


for _depth in (20, 32, 44, 56, 110):
    _register_cifar_resnet(_depth)


@register_model("resnet18")
def resnet18(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    """ResNet-18 for small images (3x3 stem, no stem pool; 11.17M parameters for 10 classes)."""
    return ResNet([2, 2, 2, 2], [64, 128, 256, 512], num_classes, in_channels, shortcut="B")


@register_model("resnet34")
def resnet34(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    """ResNet-34 for small images (3x3 stem, no stem pool; 21.28M parameters for 10 classes)."""
    return ResNet([3, 4, 6, 3], [64, 128, 256, 512], num_classes, in_channels, shortcut="B")
