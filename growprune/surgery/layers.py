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

import copy
import importlib
import math
from typing import Any, Mapping, Sequence

import torch
import torch.nn as nn

from growprune.modes import evaluating

INITS = (None, "identity", "zero_last_norm")
#: modules that pass non-negative inputs through unchanged in eval mode
IDENTITY_SAFE = (nn.ReLU, nn.ReLU6, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.Identity)


def build_module(spec: Mapping[str, Any] | Sequence[Mapping[str, Any]]) -> nn.Module:
    """An ``nn.Module`` from ``{"class_path": "package.Class", "init_args": {...}}``; a list of such
    specs builds an ``nn.Sequential`` of them (e.g. ``[conv, batch norm, ReLU]``)."""
    if isinstance(spec, Sequence) and not isinstance(spec, (str, bytes)):
        if not spec:
            raise ValueError("a list module spec needs at least one module")
        return nn.Sequential(*(build_module(item) for item in spec))
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


def copy_architecture(model: nn.Module, path: str) -> nn.Module:
    """A fresh copy of the module at ``path``: same classes and shapes, parameters re-initialised
    (each submodule's own ``reset_parameters``; batch-norm statistics reset too)."""
    if not path:
        raise ValueError("copy_of needs the path of a submodule, not the whole model")
    try:
        template = model.get_submodule(path)
    except AttributeError as error:
        raise ValueError(f"copy_of: no module named {path!r} in the model") from error
    module = copy.deepcopy(template)
    with torch.no_grad():
        for sub in module.modules():
            if callable(getattr(sub, "reset_parameters", None)):
                sub.reset_parameters()
            if isinstance(sub, nn.modules.batchnorm._BatchNorm) and sub.track_running_stats:
                sub.reset_running_stats()
    return module


def _identity_norm(norm: nn.Module) -> None:
    """Eval-mode identity batch norm for any input: mean 0, variance 1, scale sqrt(1 + eps), shift 0."""
    if not isinstance(norm, nn.modules.batchnorm._BatchNorm) or not norm.affine or not norm.track_running_stats:
        raise ValueError(f"identity initialisation can make only an affine batch norm with running statistics exact "
                         f"(a per-sample norm normalises every input), got {type(norm).__name__}")
    norm.running_mean.zero_()
    norm.running_var.fill_(1.0)
    norm.weight.fill_(math.sqrt(1.0 + norm.eps))
    norm.bias.zero_()


def _identity_weight_layer(module: nn.Module) -> None:
    if isinstance(module, nn.Linear) and module.in_features == module.out_features:
        nn.init.eye_(module.weight)
    elif isinstance(module, nn.modules.conv._ConvNd) and module.in_channels == module.out_channels \
            and module.groups == 1 and not module.transposed:
        nn.init.dirac_(module.weight)
    else:
        raise ValueError(f"identity initialisation needs a square linear or convolution layer, got {module}")
    if module.bias is not None:
        module.bias.zero_()


def initialise(module: nn.Module, init: str | None) -> None:
    """Apply one of :data:`INITS` to a freshly built module.

    ``"identity"``: a square linear/convolution layer becomes the identity; so does an
    ``nn.Sequential`` of one such layer followed by batch norms, ReLUs and dropouts: each batch norm
    gets running mean 0, running variance 1, scale sqrt(1 + eps) and shift 0, which is exactly the
    identity in eval mode for any input (:func:`calibrate_identity_norm` then fits it to data so that
    train mode is close to the identity too). A ReLU keeps the function only where its input is
    >= 0 (after another ReLU); strategies measure the output change after every insertion.
    ``"zero_last_norm"``: the last normalisation layer's scale and shift are set to 0.
    """
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    with torch.no_grad():
        if init == "identity":
            if isinstance(module, nn.Sequential):
                children = list(module.children())
                weights = [child for child in children if isinstance(child, (nn.Linear, nn.modules.conv._ConvNd))]
                if len(weights) != 1 or children[0] is not weights[0]:
                    raise ValueError("identity initialisation of an nn.Sequential needs exactly one linear or convolution "
                                     f"layer, first, followed by norms/activations; got {[type(c).__name__ for c in children]}")
                for child in children[1:]:
                    if isinstance(child, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)):
                        _identity_norm(child)
                    elif not isinstance(child, IDENTITY_SAFE):
                        raise ValueError(f"identity initialisation: {type(child).__name__} is not the identity (allowed "
                                         "after the weight layer: batch norm, ReLU, ReLU6, dropout)")
                _identity_weight_layer(children[0])
            else:
                _identity_weight_layer(module)
        elif init == "zero_last_norm":
            norms = [m for m in module.modules() if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm))]
            if not norms or getattr(norms[-1], "weight", None) is None:
                raise ValueError("zero_last_norm needs a cell with an affine normalisation layer")
            norms[-1].weight.zero_()
            norms[-1].bias.zero_()


def calibrate_identity_norm(model: nn.Module, path: str, batches: Sequence[torch.Tensor]) -> int:
    """Fit the batch norms of the (just inserted, identity) layer at ``path`` to the data reaching them.

    Every batch norm of ``Sequential(weight layer, batch norm[, ...])`` gets running mean = shift =
    the per-channel mean m of its input on ``batches`` (eval mode), running variance = the
    per-channel variance v, and scale = sqrt(v + eps). Eval mode stays exactly the identity
    (gamma (x - m) / sqrt(v + eps) + beta = x); train mode normalises with each batch's own
    statistics, which are close to m and v, so it stays close to the identity as well (with the
    data-free initialisation it would standardise every channel). Returns the number of samples used.
    """
    layer = model.get_submodule(path)
    norms = [m for m in layer.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return 0
    seen: dict[int, list[torch.Tensor]] = {id(norm): [] for norm in norms}

    def hook(norm: nn.Module, args: tuple, _: Any) -> None:
        x = args[0].detach()
        seen[id(norm)].append(x.transpose(0, 1).reshape(x.shape[1], -1).double())

    handles = [norm.register_forward_hook(hook) for norm in norms]
    samples = 0
    try:
        with evaluating(model):
            for inputs in batches:
                model(inputs)
                samples += int(inputs.shape[0])
    finally:
        for handle in handles:
            handle.remove()
    if not samples:
        raise ValueError(f"calibrating the batch norms of {path!r} needs at least one batch of inputs")
    with torch.no_grad():
        for norm in norms:
            values = torch.cat(seen[id(norm)], dim=1)
            mean, var = values.mean(dim=1), values.var(dim=1, unbiased=False)
            norm.running_mean.copy_(mean)
            norm.running_var.copy_(var)
            norm.weight.copy_(torch.sqrt(var + norm.eps))
            norm.bias.copy_(mean)
    return samples


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


def remove_members(model: nn.Module, members: Sequence[str], example_inputs: torch.Tensor, what: str = "layer") -> list[str]:
    """Replace a layer made of several modules (a weight layer and the norm/activation modules that
    follow it, consecutive children of one ``nn.Sequential``) by identities; return the tensors gone.

    Checked before anything changes: every member exists and runs once, the members are consecutive
    siblings in one ``nn.Sequential`` (so each feeds the next), and the first one's input shape
    equals the last one's output shape.
    """
    members = list(members)
    if not members:
        raise ValueError(f"a {what} needs at least one member module")
    if len(members) == 1:
        return remove_module(model, members[0], example_inputs, what)
    parents = [_parent(model, member) for member in members]
    container = parents[0][0]
    names = list(container._modules) if isinstance(container, nn.Sequential) else []
    children = [child for _, child in parents]
    if not names or any(parent is not container for parent, _ in parents) or children[0] not in names \
            or names[names.index(children[0]):names.index(children[0]) + len(children)] != children:
        raise ValueError(f"the members {members} of {what} {members[0]!r} are not consecutive children of one nn.Sequential")
    first = _io_shapes(model, model.get_submodule(members[0]), example_inputs)
    last = _io_shapes(model, model.get_submodule(members[-1]), example_inputs)
    if len(first) != 1 or len(last) != 1:
        raise ValueError(f"{what} {members[0]!r} runs {len(first)} times per forward pass; only a {what} that runs once can be removed")
    if len(first[0][0]) != 1 or last[0][1] is None or first[0][0][0] != last[0][1]:
        raise ValueError(f"{what} {members[0]!r} (with {', '.join(members[1:])}) maps shape {first[0][0]} to {last[0][1]}: only "
                         "a layer whose output shape equals its input shape can be removed")
    removed = [name for member in members for name in _tensor_names(model.get_submodule(member), member)]
    for child in children:
        setattr(container, child, nn.Identity())
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


def _is_residual(module: nn.Module) -> bool:
    from growprune.surgery.discovery import residual_sum

    if type(module).forward is nn.Sequential.forward or not module._modules:
        return False
    try:
        return residual_sum(module)
    except Exception:  # fx cannot trace it: not known to be residual
        return False


def insert_cell(model: nn.Module, stage: str, index: int, cell: nn.Module, example_inputs: torch.Tensor) -> tuple[dict[str, str], list[str]]:
    """Insert ``cell`` at position ``index`` of the ``nn.Sequential`` at ``stage``.

    Returns (old tensor name -> new name for the shifted cells, names of the new tensors).
    """
    container = model.get_submodule(stage) if stage else model
    if not isinstance(container, nn.Sequential):
        raise ValueError(f"cells are inserted into an nn.Sequential stage; {stage!r} is a {type(container).__name__}")
    if not 0 <= index <= len(container):
        raise ValueError(f"cell position {index} is outside 0..{len(container)} of stage {stage!r}")
    if not _is_residual(cell) and not any(_is_residual(child) for child in container):
        raise ValueError(f"stage {stage!r} is not a residual stage (none of its blocks adds its input to a branch) and the new "
                         f"{type(cell).__name__} is no residual block either: the model has no residual stage to grow a cell in")
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
