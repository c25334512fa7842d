"""Resize layers to the shapes stored in a state dict: the reload path for untyped changes.

A checkpoint whose edit log records its structural edits is reloaded by replaying them
(:mod:`growprune.surgery.edits`). A state dict of a network changed by hand (outside the edit
log) only says the new shapes: :func:`resize_to_state_dict` resizes each layer whose stored
shapes differ with the layer's handler (:mod:`growprune.surgery.handlers`, the same code that
removes and adds channels), keeping its type, dtype, device and options (groups and channel
multiplier of convolutions); the values are then loaded as usual. Bare parameters (a module's own
``nn.Parameter`` used directly in ``forward``, e.g. ConvNeXt's layer scale) are resized along the
one dimension that differs, by their :class:`~growprune.surgery.handlers.ParameterHandler` (which
also updates attributes such as ``VisionTransformer.hidden_dim``). Other layers without a handler
raise a clear error, and nothing is changed unless every mismatched layer can be resized.
"""

from __future__ import annotations

import copy
from typing import Mapping

import torch
import torch.nn as nn

from growprune.surgery.handlers import handler_for, parameter_handler_for


def _stored_shapes(module_name: str, module: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Size]:
    prefix = f"{module_name}." if module_name else ""
    shapes = {}
    for key, _ in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
        stored = state_dict.get(prefix + key)
        if stored is not None:
            shapes[key] = stored.shape
    return shapes


def resize_to_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor], prefix: str = "") -> list[str]:
    """Resize the layers of ``model`` whose shapes differ from ``state_dict`` (keys under ``prefix``).

    A module without a layer handler whose differing tensors are all its own parameters (bare
    parameters such as ConvNeXt's layer scale or a ViT's class token) has them resized by their
    :class:`~growprune.surgery.handlers.ParameterHandler` (one dimension each). Returns the names
    of the resized layers.
    """
    resized: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        shapes = _stored_shapes(prefix + name if name else prefix.rstrip("."), module, state_dict)
        current = {key: tensor.shape for key, tensor in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False))}
        if not any(key in current and current[key] != shape for key, shape in shapes.items()):
            continue
        trial = copy.deepcopy(module)  # resize a copy: a failure leaves the model as it was
        _resize_own(trial, shapes, name)
        resized[name] = trial
    for name, new in resized.items():
        if not name:  # the model itself is the layer: it cannot be swapped, resize it where it is
            _resize_own(model, _stored_shapes(prefix.rstrip("."), model, state_dict), name)
            continue
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
    return list(resized)


def _resize_own(module: nn.Module, shapes: Mapping[str, torch.Size], name: str) -> None:
    """Resize ``module``'s own tensors to ``shapes``: by its layer handler, else as bare parameters."""
    handler = handler_for(module)
    if handler is not None:
        handler.resize(module, shapes, name)
        return
    parameters = dict(module.named_parameters(recurse=False))
    differing = [key for key, tensor in list(parameters.items()) + list(module.named_buffers(recurse=False))
                 if key in shapes and tensor.shape != shapes[key]]
    if any(key not in parameters for key in differing):
        raise ValueError(
            f"layer {name!r} ({type(module).__name__}) has other shapes in the checkpoint than in the model, "
            "and growprune has no layer handler to resize it (register one with "
            "growprune.surgery.handlers.register_layer_handler, or record the change as a typed edit)"
        )
    for key in differing:
        full = f"{name}.{key}" if name else key
        parameter_handler_for(module, key).resize(module, key, shapes[key], full)
