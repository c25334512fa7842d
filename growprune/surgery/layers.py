"""Layer and cell surgery: insert a layer after another, insert a cell into a stage, remove either.

* A *layer* is any module at a path (``"features.3"``). Removing it replaces it by ``nn.Identity``
  (allowed only when its input and output shapes match); inserting a layer after it turns the path
  into ``nn.Sequential(original, new)``, so the original's tensors are renamed ``<path>.0.*`` and
  the new layer's are ``<path>.1.*``.
* A *cell* is a block of a stage (an ``nn.Sequential`` of residual blocks, e.g. ``"layers.1"`` of
  growprune's ResNets or ``"layer2"`` of torchvision's). Inserting a cell at position ``i`` shifts
  the names of the later cells by one; removing a cell replaces it by ``nn.Identity`` (names stay).
  Both need a cell whose output shape equals its input shape.

New modules are built from JSON-able specs, ``{"class_path": "torch.nn.Linear", "init_args":
{...}}`` (the same form as YAML configs), so the edit log can rebuild them on reload. Optional
initialisation: ``"identity"`` for a square linear or convolution layer (the output equals the
input), ``"zero_last_norm"`` for a cell whose last normalisation layer's scale and shift are set
to zero (a residual cell then adds nothing). Shapes are probed with a forward pass on the example
inputs before anything changes.
"""

from __future__ import annotations

import importlib
from typing import Any, Mapping

import torch
import torch.nn as nn

from growprune.modes import evaluating

INITS = (None, "identity", "zero_last_norm")


def build_module(spec: Mapping[str, Any]) -> nn.Module:
    """An ``nn.Module`` from ``{"class_path": "package.Class", "init_args": {...}}``."""
    if not isinstance(spec, Mapping) or "class_path" not in spec:
        raise ValueError(f"a module spec needs a 'class_path' (and optional 'init_args'), got {spec!r}")
    module_name, _, class_name = str(spec["class_path"]).rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError, ValueError) as error:
        raise ValueError(f"cannot import {spec['class_path']!r}: {error}") from error
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ValueError(f"{spec['class_path']!r} is not an nn.Module class")
    return cls(**dict(spec.get("init_args") or {}))


def initialise(module: nn.Module, init: str | None) -> None:
    """Apply one of :data:`INITS` to a freshly built module."""
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    with torch.no_grad():
        if init == "identity":
            if isinstance(module, nn.Linear) and module.in_features == module.out_features:
                nn.init.eye_(module.weight)
            elif isinstance(module, nn.modules.conv._ConvNd) and module.in_channels == module.out_channels \
                    and module.groups == 1 and not module.transposed:
                nn.init.dirac_(module.weight)
            else:
                raise ValueError(f"identity initialisation needs a square linear or convolution layer, got {module}")
            if module.bias is not None:
                module.bias.zero_()
        elif init == "zero_last_norm":
            norms = [m for m in module.modules() if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm))]
            if not norms or getattr(norms[-1], "weight", None) is None:
                raise ValueError("zero_last_norm needs a cell with an affine normalisation layer")
            norms[-1].weight.zero_()
            norms[-1].bias.zero_()


def _parent(model: nn.Module, path: str) -> tuple[nn.Module, str]:
    if not path:
        raise ValueError("the path of a layer is needed (the whole model cannot be replaced)")
    try:
        model.get_submodule(path)
    except AttributeError as error:
        raise ValueError(f"no module named {path!r} in the model") from error
    parent_name, _, child = path.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


def _tensor_names(module: nn.Module, prefix: str) -> list[str]:
    return [f"{prefix}.{name}" for name, _ in list(module.named_parameters()) + list(module.named_buffers())]


def _io_shapes(model: nn.Module, module: nn.Module, example_inputs: torch.Tensor) -> list[tuple[tuple, tuple]]:
    """(input shape, output shape) of every call of ``module`` in a forward pass on ``example_inputs``."""
    seen: list[tuple[tuple, tuple]] = []

    def hook(_: nn.Module, args: tuple, output: Any) -> None:
        inputs = tuple(tuple(a.shape) for a in args if isinstance(a, torch.Tensor))
        outputs = tuple(output.shape) if isinstance(output, torch.Tensor) else None
        seen.append((inputs, outputs))

    handle = module.register_forward_hook(hook)
    try:
        with evaluating(model):
            model(example_inputs)
    finally:
        handle.remove()
    return seen


def _check_shape_preserving(model: nn.Module, path: str, example_inputs: torch.Tensor, what: str) -> None:
    calls = _io_shapes(model, model.get_submodule(path), example_inputs)
    if len(calls) != 1:
        raise ValueError(f"{what} {path!r} runs {len(calls)} times per forward pass; only a module that runs once can be replaced")
    inputs, output = calls[0]
    if len(inputs) != 1 or output is None or inputs[0] != output:
        raise ValueError(f"{what} {path!r} maps shape {inputs} to {output}: only a module whose output shape equals "
                         "its input shape can be removed or inserted")


def remove_module(model: nn.Module, path: str, example_inputs: torch.Tensor, what: str = "layer") -> list[str]:
    """Replace the module at ``path`` by ``nn.Identity``; return the names of the tensors that are gone."""
    parent, child = _parent(model, path)
    _check_shape_preserving(model, path, example_inputs, what)
    module = model.get_submodule(path)
    removed = _tensor_names(module, path)
    setattr(parent, child, nn.Identity())
    return removed


def insert_after(model: nn.Module, path: str, layer: nn.Module, example_inputs: torch.Tensor) -> tuple[dict[str, str], list[str]]:
    """Run ``layer`` right after the module at ``path`` (which becomes ``Sequential(original, layer)``).

    Returns (old tensor name -> new name for the original's tensors, names of the new tensors). The
    new layer must keep the shape the original produced (checked before anything changes).
    """
    parent, child = _parent(model, path)
    original = model.get_submodule(path)
    calls = _io_shapes(model, original, example_inputs)
    if len(calls) != 1 or calls[0][1] is None:
        raise ValueError(f"layer {path!r} must run once per forward pass and return one tensor to insert after it")
    probe = torch.zeros(calls[0][1], dtype=example_inputs.dtype, device=example_inputs.device)
    try:
        with evaluating(layer):
            output = layer(probe)
    except RuntimeError as error:
        raise ValueError(f"the new layer cannot take the output of {path!r} (shape {tuple(probe.shape)}): {error}") from error
    if tuple(output.shape) != tuple(probe.shape):
        raise ValueError(f"the new layer changes the shape after {path!r} from {tuple(probe.shape)} to {tuple(output.shape)}")
    renamed = {name: f"{path}.0{name[len(path):]}" for name in _tensor_names(original, path)}
    setattr(parent, child, nn.Sequential(original, layer))
    return renamed, _tensor_names(layer, f"{path}.1")


def insert_cell(model: nn.Module, stage: str, index: int, cell: nn.Module, example_inputs: torch.Tensor) -> tuple[dict[str, str], list[str]]:
    """Insert ``cell`` at position ``index`` of the ``nn.Sequential`` at ``stage``.

    Returns (old tensor name -> new name for the shifted cells, names of the new tensors).
    """
    container = model.get_submodule(stage) if stage else model
    if not isinstance(container, nn.Sequential):
        raise ValueError(f"cells are inserted into an nn.Sequential stage; {stage!r} is a {type(container).__name__}")
    if not 0 <= index <= len(container):
        raise ValueError(f"cell position {index} is outside 0..{len(container)} of stage {stage!r}")
    # the shape entering position `index`: the input of the cell there, or the output of the last one
    target = container[index] if index < len(container) else container[len(container) - 1]
    calls = _io_shapes(model, target, example_inputs)
    if len(calls) != 1:
        raise ValueError(f"stage {stage!r}: cell {index} must run once per forward pass")
    shape = calls[0][0][0] if index < len(container) else calls[0][1]
    probe = torch.zeros(shape, dtype=example_inputs.dtype, device=example_inputs.device)
    try:
        with evaluating(cell):
            output = cell(probe)
    except RuntimeError as error:
        raise ValueError(f"the new cell cannot take inputs of shape {tuple(shape)} at stage {stage!r}: {error}") from error
    if tuple(output.shape) != tuple(shape):
        raise ValueError(f"the new cell maps {tuple(shape)} to {tuple(output.shape)}; a cell must keep the shape")
    prefix = f"{stage}." if stage else ""
    renamed = {}
    for position in range(index, len(container)):
        for name in _tensor_names(container[position], f"{prefix}{position}"):
            renamed[name] = f"{prefix}{position + 1}{name[len(prefix) + len(str(position)):]}"
    children = list(container)
    children.insert(index, cell)
    for key in list(container._modules):
        del container._modules[key]
    for position, child in enumerate(children):
        container.add_module(str(position), child)
    return renamed, _tensor_names(cell, f"{prefix}{index}")
