"""LeNet-300-100 and LeNet-5 (the Caffe variant used by Han et al. 2015 and most pruning papers)."""

from __future__ import annotations

import torch.nn as nn

from growprune.models.registry import register_model


def _pair(size: int | tuple[int, int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


@register_model("lenet_300_100")
def lenet_300_100(num_classes: int = 10, in_channels: int = 1, image_size: int | tuple[int, int] = 28) -> nn.Module:
    """Fully connected 784-300-100-10 network (266,610 parameters on MNIST)."""
    height, width = _pair(image_size)
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(in_channels * height * width, 300),
        nn.ReLU(),
        nn.Linear(300, 100),
        nn.ReLU(),
        nn.Linear(100, num_classes),
    )


@register_model("lenet5")
def lenet5(num_classes: int = 10, in_channels: int = 1, image_size: int | tuple[int, int] = 28) -> nn.Module:
    """Conv(20,5x5)-pool-Conv(50,5x5)-pool-FC500-FC10 (431,080 parameters on MNIST).

    Needs inputs of at least 16x16 pixels (two valid 5x5 convolutions, each followed by 2x2 pooling).
    """
    height, width = _pair(image_size)
    out_h, out_w = ((height - 4) // 2 - 4) // 2, ((width - 4) // 2 - 4) // 2
    if out_h < 1 or out_w < 1:
        raise ValueError(f"lenet5 needs images of at least 16x16 pixels, got {height}x{width}")
    return nn.Sequential(
        nn.Conv2d(in_channels, 20, kernel_size=5),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(20, 50, kernel_size=5),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(50 * out_h * out_w, 500),
        nn.ReLU(),
        nn.Linear(500, num_classes),
    )
