"""Any torchvision classification model, registered as ``torchvision.<name>`` (random init, no download)."""

from __future__ import annotations

from typing import Callable

import torch.nn as nn


def _first_conv(model: nn.Module) -> tuple[nn.Module, str, nn.Conv2d] | None:
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            parent_name, _, child = name.rpartition(".")
            return model.get_submodule(parent_name) if parent_name else model, child, module
    return None


def _adapt_in_channels(model: nn.Module, in_channels: int) -> None:
    """Replace the stem convolution so the model takes ``in_channels`` input channels."""
    found = _first_conv(model)
    if found is None or found[2].in_channels == in_channels:
        return
    parent, child, conv = found
    replacement = nn.Conv2d(
        in_channels,
        conv.out_channels,
        conv.kernel_size,
        conv.stride,
        conv.padding,
        conv.dilation,
        conv.groups if conv.groups == 1 else in_channels,
        conv.bias is not None,
        conv.padding_mode,
    )
    setattr(parent, child, replacement)


def _make_builder(name: str) -> Callable[..., nn.Module]:
    def builder(num_classes: int = 1000, in_channels: int = 3, **kwargs) -> nn.Module:
        import torchvision

        if "weights" in kwargs and kwargs["weights"] is not None:
            raise ValueError("growprune never downloads weights at run time; load a state dict instead")
        model = torchvision.models.get_model(name, weights=None, num_classes=num_classes, **kwargs)
        _adapt_in_channels(model, in_channels)
        return model

    builder.__name__ = f"torchvision.{name}"
    builder.__doc__ = f"torchvision's {name} (random initialisation)."
    return builder


def torchvision_builders() -> dict[str, Callable[..., nn.Module]]:
    """Builders for every model in ``torchvision.models`` (classification only)."""
    import torchvision

    names = torchvision.models.list_models(module=torchvision.models)
    return {f"torchvision.{name}": _make_builder(name) for name in names}
