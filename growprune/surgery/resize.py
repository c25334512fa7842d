"""Resize layers to the shapes stored in a state dict, so a structurally changed network reloads.

Rebuilding the base architecture and loading a checkpoint of a pruned (or grown) copy fails with
"size mismatch". :func:`resize_to_state_dict` replaces each standard layer whose stored shapes
differ (linear, convolution, batch/group/layer norm) by a fresh layer of the stored shape; the
values are then loaded as usual. Custom layers with mismatched shapes raise a clear error.
"""

from __future__ import annotations

from typing import Mapping

import torch
import torch.nn as nn

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _stored_shapes(module_name: str, module: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Size]:
    prefix = f"{module_name}." if module_name else ""
    shapes = {}
    for key, _ in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
        stored = state_dict.get(prefix + key)
        if stored is not None:
            shapes[key] = stored.shape
    return shapes


def _resized(module: nn.Module, shapes: dict[str, torch.Size], name: str) -> nn.Module:
    factory = {"device": module.weight.device if getattr(module, "weight", None) is not None else None}
    if isinstance(module, nn.Linear):
        out_features, in_features = shapes["weight"]
        new: nn.Module = nn.Linear(in_features, out_features, bias=module.bias is not None, **factory)
    elif isinstance(module, _CONVS):
        out_channels, in_per_group = shapes["weight"][:2]
        depthwise = module.groups > 1 and module.groups == module.in_channels == module.out_channels
        groups = out_channels if depthwise else module.groups
        new = type(module)(
            in_per_group * groups, out_channels, module.kernel_size, module.stride, module.padding,
            module.dilation, groups, module.bias is not None, module.padding_mode, **factory,
        )
    elif isinstance(module, nn.modules.batchnorm._BatchNorm):
        new = type(module)(shapes["running_mean" if "running_mean" in shapes else "weight"][0], module.eps,
                           module.momentum, module.affine, module.track_running_stats, **factory)
    elif isinstance(module, nn.GroupNorm):
        new = nn.GroupNorm(module.num_groups, shapes["weight"][0], module.eps, module.affine, **factory)
    elif isinstance(module, nn.LayerNorm):
        new = nn.LayerNorm(tuple(shapes["weight"]), module.eps, module.elementwise_affine, **factory)
    else:
        raise ValueError(
            f"layer {name!r} ({type(module).__name__}) has other shapes in the checkpoint than in the model, "
            "and growprune does not know how to resize it; replay the edit log or resize it in on_load_checkpoint"
        )
    new.train(module.training)
    for key, parameter in module.named_parameters(recurse=False):
        getattr(new, key).requires_grad_(parameter.requires_grad)
    return new


def resize_to_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor], prefix: str = "") -> list[str]:
    """Replace the layers of ``model`` whose shapes differ from ``state_dict`` (keys under ``prefix``).

    Returns the names of the replaced layers. Nothing is changed if a mismatched layer cannot be
    resized: every layer is checked before any is replaced.
    """
    replacements = {}
    for name, module in model.named_modules():
        shapes = _stored_shapes(prefix + name if prefix else name, module, state_dict)
        current = {key: tensor.shape for key, tensor in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False))}
        if any(key in current and current[key] != shape for key, shape in shapes.items()):
            replacements[name] = _resized(module, shapes, name)
    for name, new in replacements.items():
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
    return list(replacements)
