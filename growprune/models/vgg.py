"""VGG-11/13/16/19 for small images (CIFAR-style: 3x3 convs, 5 max-pools, one linear classifier)."""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from growprune.models.registry import register_model

_CONFIGS: dict[str, list[int | str]] = {
    "vgg11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg13": [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    "vgg19": [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M"],
}


class VGG(nn.Module):
    """``features`` (conv [+BN] + ReLU blocks, max-pools) -> global average pool -> ``classifier``.

    The global pool makes the classifier independent of the input resolution (32x32 inputs give
    1x1 maps after five pools, where it changes nothing).

    ``width`` scales every convolution's channels: ``max(1, round(c * width))`` (0.25 gives the
    quarter-width VGG that :class:`~growprune.strategies.ChannelGrowth` grows back to full width).
    """

    def __init__(self, config: list[int | str], num_classes: int = 10, in_channels: int = 3, batch_norm: bool = True,
                 width: float = 1.0):
        super().__init__()
        if isinstance(width, bool) or not isinstance(width, (int, float)) or not math.isfinite(width) or width <= 0:
            raise ValueError(f"VGG width must be a finite number > 0, got {width!r}")
        config = [item if item == "M" else max(1, round(int(item) * width)) for item in config]
        layers: list[nn.Module] = []
        channels = in_channels
        for item in config:
            if item == "M":
                layers.append(nn.MaxPool2d(2, ceil_mode=True))
                continue
            layers.append(nn.Conv2d(channels, int(item), kernel_size=3, padding=1, bias=True))
            if batch_norm:
                layers.append(nn.BatchNorm2d(int(item)))
            layers.append(nn.ReLU(inplace=True))
            channels = int(item)
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


def _make_builder(depth_name: str, batch_norm: bool):
    def builder(num_classes: int = 10, in_channels: int = 3, width: float = 1.0) -> nn.Module:
        return VGG(_CONFIGS[depth_name], num_classes=num_classes, in_channels=in_channels, batch_norm=batch_norm,
                   width=width)

    suffix = "_bn" if batch_norm else ""
    builder.__name__ = f"{depth_name}{suffix}"
    builder.__doc__ = f"{depth_name.upper()} for small images{' with batch norm' if batch_norm else ''}; ``width`` scales the channels."
    return builder


for _name in _CONFIGS:
    for _bn in (True, False):
        _builder = _make_builder(_name, _bn)
        register_model(_builder.__name__)(_builder)
