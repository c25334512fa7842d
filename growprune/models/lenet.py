"""LeNet-300-100 and LeNet-5 (the Caffe variant used by Han et al. 2015 and most pruning papers).

Both take ``width``, which scales every hidden layer (units and channels) to
``max(1, round(c * width))``: the thinner dense networks of a same-size baseline. The default
1.0 builds the original network.
"""

from __future__ import annotations

import math

import torch.nn as nn

from growprune.models.registry import register_model


def _pair(size: int | tuple[int, int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def _scaled(name: str, channels: int, width: float) -> int:
    """``max(1, round(channels * width))``; ``width`` must be a finite number > 0 (``name`` is the model)."""
    if isinstance(width, bool) or not isinstance(width, (int, float)) or not math.isfinite(width) or width <= 0:
        raise ValueError(f"{name} width must be a finite number > 0, got {width!r}")
    return max(1, round(channels * width))


@register_model("lenet_300_100")
def lenet_300_100(num_classes: int = 10, in_channels: int = 1, image_size: int | tuple[int, int] = 28,
                  width: float = 1.0) -> nn.Module:
    """Fully connected 784-300-100-10 network (266,610 parameters on MNIST); ``width`` scales the 300 and 100."""
    height, image_width = _pair(image_size)
    hidden1, hidden2 = _scaled("lenet_300_100", 300, width), _scaled("lenet_300_100", 100, width)
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(in_channels * height * image_width, hidden1),
        nn.ReLU(),
        nn.Linear(hidden1, hidden2),
        nn.ReLU(),
        nn.Linear(hidden2, num_classes),
    )


@register_model("lenet5")
def lenet5(num_classes: int = 10, in_channels: int = 1, image_size: int | tuple[int, int] = 28,
           width: float = 1.0) -> nn.Module:
    """Conv(20,5x5)-pool-Conv(50,5x5)-pool-FC500-FC10 (431,080 parameters on MNIST).

    ``width`` scales the 20 and 50 channels and the 500 units. Needs inputs of at least 16x16
    pixels (two valid 5x5 convolutions, each followed by 2x2 pooling).
    """
    conv1, conv2, hidden = (_scaled("lenet5", count, width) for count in (20, 50, 500))
    height, image_width = _pair(image_size)
    out_h, out_w = ((height - 4) // 2 - 4) // 2, ((image_width - 4) // 2 - 4) // 2
    if out_h < 1 or out_w < 1:
        raise ValueError(f"lenet5 needs images of at least 16x16 pixels, got {height}x{image_width}")
    return nn.Sequential(
        nn.Conv2d(in_channels, conv1, kernel_size=5),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(conv1, conv2, kernel_size=5),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(conv2 * out_h * out_w, hidden),
        nn.ReLU(),
        nn.Linear(hidden, num_classes),
    )
