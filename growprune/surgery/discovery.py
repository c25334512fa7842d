"""Every permissible element of a network, at every granularity, as data.

:func:`permissible_elements` answers "what can be grown or pruned here?" for any ``nn.Module``
with one forward pass (hooks, eval mode, the example inputs), one ``torch.fx`` trace per
container module (one level deep: every submodule stays a leaf) and the channel graph:

* **channel groups**: the roots and channel counts of :meth:`ChannelGraph.groups` (channels that
  change together, residual streams included);
* **layers**: a *layer* is one weight layer (a leaf ``nn.Linear`` or non-transposed ``nn.Conv1d/2d/3d``)
  together with the normalisation, activation and dropout modules that follow it directly among its
  siblings in an ``nn.Sequential`` (VGG's ``conv, BN, ReLU``), or an ``nn.Sequential`` that holds
  exactly one weight layer first and only such modules after it (torchvision's
  ``Conv2dNormActivation`` and ``downsample``; the layers growprune inserts): then the
  ``nn.Sequential`` itself is the layer. A weight layer called from a ``forward`` of its own (e.g.
  ``conv1`` of a ResNet block, whose ``bn1`` and ReLU are called in the block's ``forward``) is a
  layer alone. A residual block is a cell, never a layer;
* **cells**: a *cell* is a module (not the whole model, not a layer) whose ``forward``, traced one
  level deep, adds two tensors that both depend on its single input (``x + branch(x)``, or
  ``shortcut(x) + branch(x)``), and whose output depends on that sum: ResNet basic and bottleneck
  blocks, torchvision's and growprune's, wherever they sit. A module whose ``forward`` fx cannot
  trace is not a cell (listed in ``untraced``);
* **stages**: the ``nn.Sequential`` modules with at least one cell among their direct children.

Removal and insertion rules (FIELD_NOTES section 6):

* a layer or cell is **removable** when it runs once per forward pass, takes one tensor and
  returns a tensor of the same shape: it is then replaced by identity (``RemoveLayer`` /
  ``RemoveCell``). Downsampling blocks, the stem and the classifier change the shape and stay;
* a **layer insertion point** is the end of every layer that runs once and does not produce the
  model's output: a new shape-preserving layer runs right after the layer's last member
  (``InsertLayer(path=<that member>)``); ``after_activation`` marks points after a ReLU (inputs
  >= 0), where a new identity ``conv, BN, ReLU`` is exact too;
* a **cell insertion point** is a position ``index`` of a stage whose entering tensor has the shape
  of the stage's template cell (its last shape-preserving cell): a copy of the template's
  architecture fits there (``InsertCell(stage, index, {"copy_of": template})``). A zero-initialised
  residual cell (last norm scale and shift 0) adds nothing: with a ReLU after the sum the output is
  unchanged when the entering tensor is >= 0, as it is after every ResNet block.
"""

from __future__ import annotations

import dataclasses
import operator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx
import torch.nn as nn

from growprune.modes import evaluating

#: leaf modules that compute a weighted sum (a "weight layer")
WEIGHT_LAYERS: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
#: modules that belong to the weight layer in front of them
NORMS: tuple[type[nn.Module], ...] = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm,
                                      nn.modules.instancenorm._InstanceNorm)
ACTIVATIONS: tuple[type[nn.Module], ...] = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Mish,
                                            nn.Hardswish, nn.Hardtanh, nn.Tanh, nn.Sigmoid, nn.Hardsigmoid,
                                            nn.PReLU, nn.Softplus)
DROPOUTS: tuple[type[nn.Module], ...] = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)
COMPANIONS = NORMS + ACTIVATIONS + DROPOUTS
#: activations whose outputs are >= 0 (an identity layer followed by one of them is exact there)
NON_NEGATIVE = (nn.ReLU, nn.ReLU6)

_ADDS = {operator.add, operator.iadd, torch.add}


def is_weight_layer(module: nn.Module) -> bool:
    """A leaf linear or (non-transposed) convolution layer."""
    return isinstance(module, WEIGHT_LAYERS) and not getattr(module, "transposed", False)


def is_layer_sequential(module: nn.Module) -> bool:
    """An ``nn.Sequential`` of one weight layer followed only by norm/activation/dropout modules."""
    children = list(module.children()) if isinstance(module, nn.Sequential) else []
    return bool(children) and is_weight_layer(children[0]) and all(isinstance(c, COMPANIONS) for c in children[1:])


Shape = tuple[int, ...]


@dataclass
class Element:
    """A layer or a cell.

    Attributes:
        path: the layer's (first) module, or the cell's module.
        members: the modules that make the element, in order (a layer's weight module and its
            companions; ``[path]`` for a cell or a layer ``nn.Sequential``).
        kind: ``"layer"`` or ``"cell"``.
        input_shape: shape of the tensor entering the first member (``None`` if it did not run once
            on one tensor).
        output_shape: shape of the tensor leaving the last member.
        calls: how often the members ran in one forward pass (the least of them).
        removable: runs once, one tensor in, same shape out: can be replaced by identity.
        after_activation: the last member is a ReLU (outputs >= 0).
    """

    path: str
    members: list[str]
    kind: str
    input_shape: Shape | None
    output_shape: Shape | None
    calls: int
    removable: bool
    after_activation: bool = False
    why_not: str = ""

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["input_shape"] = list(self.input_shape) if self.input_shape is not None else None
        data["output_shape"] = list(self.output_shape) if self.output_shape is not None else None
        return data


@dataclass
class LayerInsertionPoint:
    """A new shape-preserving layer can run right after ``after`` (the last member of ``layer``)."""

    after: str
    layer: str
    shape: Shape
    after_activation: bool

    def to_dict(self) -> dict[str, Any]:
        return {"after": self.after, "layer": self.layer, "shape": list(self.shape), "after_activation": self.after_activation}


@dataclass
class CellInsertionPoint:
    """A copy of the cell ``template``'s architecture fits at position ``index`` of ``stage``."""

    stage: str
    index: int
    shape: Shape
    template: str

    def spec(self) -> dict[str, Any]:
        """The JSON-able cell spec for :class:`~growprune.surgery.edits.InsertCell`."""
        return {"copy_of": self.template}

    def to_dict(self) -> dict[str, Any]:
        return {"stage": self.stage, "index": self.index, "shape": list(self.shape), "template": self.template}


@dataclass
class PermissibleElements:
    """Every permissible element of one network (see the module docstring for the definitions).

    Attributes:
        channel_groups: ``{"root", "channels"}`` of every channel group (the output layer excluded).
        layers: every layer (removable or not).
        cells: every residual cell.
        stages: ``nn.Sequential`` paths with cells among their direct children -> those cells.
        layer_insertion_points, cell_insertion_points: where new layers / cells fit.
        untraced: container modules ``torch.fx`` could not trace (so not known to be cells) -> why.
    """

    channel_groups: list[dict[str, Any]] = field(default_factory=list)
    layers: list[Element] = field(default_factory=list)
    cells: list[Element] = field(default_factory=list)
    stages: dict[str, list[str]] = field(default_factory=dict)
    layer_insertion_points: list[LayerInsertionPoint] = field(default_factory=list)
    cell_insertion_points: list[CellInsertionPoint] = field(default_factory=list)
    untraced: dict[str, str] = field(default_factory=dict)

    @property
    def removable_layers(self) -> list[str]:
        return [layer.path for layer in self.layers if layer.removable]

    @property
    def removable_cells(self) -> list[str]:
        return [cell.path for cell in self.cells if cell.removable]

    def layer(self, path: str) -> Element:
        """The layer whose path (or one of whose members) is ``path``."""
        for layer in self.layers:
            if path == layer.path or path in layer.members:
                return layer
        raise ValueError(f"{path!r} is not a layer of the model (layers: {', '.join(l.path for l in self.layers[:6])}, ...)")

    def cell(self, path: str) -> Element:
        for cell in self.cells:
            if cell.path == path:
                return cell
        raise ValueError(f"{path!r} is not a residual cell of the model")

    def summary(self) -> dict[str, int]:
        """Counts per granularity."""
        return {
            "channel_groups": len(self.channel_groups),
            "channels": sum(int(group["channels"]) for group in self.channel_groups),
            "layers": len(self.layers),
            "removable_layers": len(self.removable_layers),
            "cells": len(self.cells),
            "removable_cells": len(self.removable_cells),
            "stages": len(self.stages),
            "layer_insertion_points": len(self.layer_insertion_points),
            "cell_insertion_points": len(self.cell_insertion_points),
        }

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able data (lists and dicts of strings and numbers)."""
        return {
            "summary": self.summary(),
            "channel_groups": [dict(group) for group in self.channel_groups],
            "layers": [layer.to_dict() for layer in self.layers],
            "removable_layers": self.removable_layers,
            "cells": [cell.to_dict() for cell in self.cells],
            "removable_cells": self.removable_cells,
            "stages": {stage: list(cells) for stage, cells in self.stages.items()},
            "layer_insertion_points": [point.to_dict() for point in self.layer_insertion_points],
            "cell_insertion_points": [point.to_dict() for point in self.cell_insertion_points],
            "untraced": dict(self.untraced),
        }


# ----------------------------------------------------------------------------------- the probe
@dataclass
class _Calls:
    inputs: list[tuple[Shape, ...]] = field(default_factory=list)
    outputs: list[Shape | None] = field(default_factory=list)
    # the outputs themselves, kept alive for the pass: ids of freed tensors get reused
    output_objects: list[Any] = field(default_factory=list)


def _record_calls(model: nn.Module, example_inputs: torch.Tensor) -> tuple[dict[str, _Calls], Any]:
    """Every module's calls (input and output shapes) in one eval-mode forward pass, and the model's output."""
    calls: dict[str, _Calls] = {name: _Calls() for name, _ in model.named_modules()}
    handles = []

    def hook_for(name: str):
        def hook(_: nn.Module, args: tuple, output: Any) -> None:
            record = calls[name]
            record.inputs.append(tuple(tuple(a.shape) for a in args if isinstance(a, torch.Tensor)))
            record.outputs.append(tuple(output.shape) if isinstance(output, torch.Tensor) else None)
            record.output_objects.append(output)
        return hook

    for name, module in model.named_modules():
        handles.append(module.register_forward_hook(hook_for(name)))
    try:
        with evaluating(model):
            output = model(example_inputs)
    finally:
        for handle in handles:
            handle.remove()
    return calls, output


def _element(path: str, members: list[str], kind: str, calls: dict[str, _Calls], modules: dict[str, nn.Module]) -> Element:
    first, last = calls[members[0]], calls[members[-1]]
    count = min(len(calls[member].inputs) for member in members)
    input_shape = first.inputs[0][0] if len(first.inputs) == 1 and len(first.inputs[0]) == 1 else None
    output_shape = last.outputs[0] if len(last.outputs) == 1 else None
    why = ""
    if count != 1 or any(len(calls[member].inputs) != 1 for member in members):
        why = f"runs {count} times per forward pass"
    elif input_shape is None:
        why = f"takes {len(first.inputs[0])} tensors"
    elif output_shape is None:
        why = "does not return one tensor"
    elif input_shape != output_shape:
        why = f"maps shape {input_shape} to {output_shape}"
    return Element(path=path, members=list(members), kind=kind, input_shape=input_shape, output_shape=output_shape,
                   calls=count, removable=not why, after_activation=isinstance(modules[members[-1]], NON_NEGATIVE),
                   why_not=why)


def _layers(model: nn.Module, calls: dict[str, _Calls]) -> list[Element]:
    modules = dict(model.named_modules())
    layers: list[Element] = []
    covered: set[str] = set()
    for path, module in modules.items():
        if not path or path in covered:
            continue
        if is_layer_sequential(module):
            covered.update(f"{path}.{child}" for child in module._modules)
            layers.append(_element(path, [path], "layer", calls, modules))
        elif is_weight_layer(module):
            members = [path]
            parent_path, _, child = path.rpartition(".")
            parent = modules[parent_path]
            if isinstance(parent, nn.Sequential):
                names = list(parent._modules)
                for sibling in names[names.index(child) + 1:]:
                    if not isinstance(parent._modules[sibling], COMPANIONS):
                        break
                    members.append(f"{parent_path}.{sibling}" if parent_path else sibling)
            covered.update(members)
            layers.append(_element(path, members, "layer", calls, modules))
    return layers


class _OneLevelTracer(torch.fx.Tracer):
    """Traces one module's own ``forward``: every submodule it calls stays a leaf."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return True


def residual_sum(module: nn.Module) -> bool:
    """Whether ``module.forward`` (traced one level deep) adds two tensors that both depend on its
    single input, and returns something that depends on that sum. Raises what fx raises."""
    graph = _OneLevelTracer().trace(module)
    nodes = list(graph.nodes)
    inputs = [node for node in nodes if node.op == "placeholder"]
    if len(inputs) != 1:
        return False
    ancestors: dict[torch.fx.Node, set[torch.fx.Node]] = {}
    for node in nodes:  # fx nodes are in topological order
        ancestors[node] = set().union(*({parent} | ancestors[parent] for parent in node.all_input_nodes)) if node.all_input_nodes else set()
    output = next(node for node in nodes if node.op == "output")
    source = inputs[0]
    for node in nodes:
        is_add = (node.op == "call_function" and node.target in _ADDS) or (node.op == "call_method" and node.target in ("add", "add_"))
        if not is_add:
            continue
        operands = [arg for arg in node.args[:2] if isinstance(arg, torch.fx.Node)]
        if len(operands) == 2 and all(arg is source or source in ancestors[arg] for arg in operands) \
                and (node is output or node in ancestors[output]):
            return True
    return False


def _cells(model: nn.Module, calls: dict[str, _Calls], layer_paths: set[str]) -> tuple[list[Element], dict[str, str]]:
    modules = dict(model.named_modules())
    cells: list[Element] = []
    untraced: dict[str, str] = {}
    inside_layer = {f"{path}." for path in layer_paths}
    for path, module in modules.items():
        if not path or path in layer_paths or not module._modules or any(path.startswith(p) for p in inside_layer):
            continue
        if type(module).forward is nn.Sequential.forward or not calls[path].inputs:
            continue  # a Sequential only chains its children; a module that never runs cannot be probed
        try:
            residual = residual_sum(module)
        except Exception as error:  # fx raises many types on untraceable control flow
            untraced[path] = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"[:200]
            continue
        if residual:
            cells.append(_element(path, [path], "cell", calls, modules))
    return cells, untraced


def permissible_elements(model: nn.Module, example_inputs: torch.Tensor, channel_groups: bool = True,
                         graph: Any = None) -> PermissibleElements:
    """Every permissible element of ``model`` (see the module docstring for what counts as what).

    Args:
        model: any network (left as it was found: modes, flags, weights).
        example_inputs: one input batch (one sample is enough; zeros will do).
        channel_groups: also list the channel groups (builds a :class:`ChannelGraph` unless ``graph`` is given).
        graph: the model's current :class:`ChannelGraph`, to reuse.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"permissible_elements needs an nn.Module, got {type(model).__name__}")
    calls, model_output = _record_calls(model, example_inputs)
    modules = dict(model.named_modules())
    found = PermissibleElements()
    found.layers = _layers(model, calls)
    found.cells, found.untraced = _cells(model, calls, {layer.path for layer in found.layers})
    cell_paths = {cell.path: cell for cell in found.cells}
    for layer in found.layers:
        last = calls[layer.members[-1]]
        if layer.calls == 1 and len(last.outputs) == 1 and last.outputs[0] is not None \
                and last.output_objects[0] is not model_output:
            found.layer_insertion_points.append(LayerInsertionPoint(layer.members[-1], layer.path, last.outputs[0],
                                                                    layer.after_activation))
    for path, module in modules.items():
        if not isinstance(module, nn.Sequential):
            continue
        prefix = f"{path}." if path else ""
        children = [f"{prefix}{name}" for name in module._modules]
        members = [child for child in children if child in cell_paths]
        if not members:
            continue
        found.stages[path] = members
        templates = [cell_paths[child] for child in members if cell_paths[child].removable]
        if not templates or any(len(calls[child].inputs) != 1 for child in children):
            continue
        template = templates[-1]
        for index in range(len(children) + 1):
            record = calls[children[index]] if index < len(children) else calls[children[-1]]
            entering = (record.inputs[0][0] if len(record.inputs[0]) == 1 else None) if index < len(children) else record.outputs[0]
            if entering == template.input_shape:
                found.cell_insertion_points.append(CellInsertionPoint(path, index, entering, template.path))
    if channel_groups:
        if graph is None:
            from growprune.surgery.channels import ChannelGraph

            graph = ChannelGraph(model, example_inputs, check=False)
        found.channel_groups = [{"root": group.root, "channels": int(group.channels)} for group in graph.groups()]
    return found

