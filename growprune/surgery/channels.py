"""Neuron/channel surgery on any architecture, on top of Torch-Pruning's dependency graph (DepGraph).

DepGraph finds which layers must change together when a channel goes (residual adds, concatenation,
depthwise and grouped convolutions, batch norm) and removes the channels physically, so the network
really gets smaller. :class:`ChannelGraph` wraps it with the known hazards handled:

* building the graph leaves the model in eval mode and re-enables frozen parameters: both are
  restored (:class:`~growprune.surgery.optimizer.preserved_modes`);
* it fails under ``torch.no_grad()``: the graph is built with gradients enabled;
* it replaces parameter objects: :meth:`ChannelGraph.remove` returns a :class:`ParameterChange` map
  so optimizer state can be sliced (see :func:`~growprune.surgery.optimizer.repair_training`);
* layers it cannot trace correctly (e.g. parameter-free channel padding) are found by a dry run on
  a copy, and reported by name before the real model is touched;
* no ``BasePruner`` (its mutable default arguments leak between instances).

Every removal is recorded in DepGraph's JSON pruning history, which :func:`replay_channel_edits`
replays on a freshly built base architecture.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import torch.nn as nn
import torch_pruning as tp

from growprune.modes import preserved_modes
from growprune.surgery.optimizer import ParameterChange

PRUNABLE_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


@dataclass
class ChannelGroup:
    """Channels that are removed together: one DepGraph group, as data a user can inspect.

    Attributes:
        root: name of the layer whose output channels define the group.
        channels: current number of channels.
        members: ``(layer name, "out" | "in")`` for every layer with parameters that changes with it.
        prunable: ``False`` when the group would change a skipped layer's output channels.
    """

    root: str
    channels: int
    members: list[tuple[str, str]] = field(default_factory=list)
    prunable: bool = True

    @property
    def layers(self) -> list[str]:
        return sorted({name for name, _ in self.members})


def _index(value: Any) -> int:
    return int(value.idx) if hasattr(value, "idx") else int(value)


def execution_order(model: nn.Module, example_inputs: torch.Tensor) -> list[str]:
    """Names of the weight layers in the order a forward pass calls them."""
    order: list[str] = []
    names = {module: name for name, module in model.named_modules()}
    hooks = [module.register_forward_hook(lambda m, i, o: order.append(names[m]))
             for module in model.modules() if isinstance(module, PRUNABLE_TYPES)]
    try:
        with preserved_modes(model), torch.no_grad():
            model.eval()
            model(example_inputs)
    finally:
        for hook in hooks:
            hook.remove()
    return list(dict.fromkeys(order))


class ChannelGraph:
    """The channel groups of a model and the surgery that removes channels from them.

    Args:
        model: the network (edited in place by :meth:`remove`).
        example_inputs: one batch of inputs (a single sample is enough).
        skip: names of layers whose channels must not change (the output layer is always skipped).
    """

    def __init__(self, model: nn.Module, example_inputs: torch.Tensor, skip: Sequence[str] = ()):
        self.model = model
        self.example_inputs = example_inputs
        modules = dict(model.named_modules())
        unknown = [name for name in skip if name not in modules]
        if unknown:
            raise ValueError(f"no layer named {unknown[0]!r}; weight layers: {', '.join(execution_order(model, example_inputs))}")
        order = execution_order(model, example_inputs)
        if not order:
            raise ValueError("the model has no linear or convolution layers to prune")
        self.output_layer = order[-1]
        self.skip = set(skip) | {self.output_layer}
        self._check_traceable()
        self.graph = self._build(model)
        self._handlers = {self.graph._module2name[group.items[0][0].target.module]: group.items[0][0].handler
                          for group in self._raw_groups(self.graph, model)}
        self._modules = self._module_identity()
        self._groups: list[ChannelGroup] | None = None

    def _module_identity(self) -> dict[str, tuple]:
        return {name: (id(module), tuple(tuple(p.shape) for p in module.parameters(recurse=False)))
                for name, module in self.model.named_modules()}

    def is_current(self) -> bool:
        """Whether the model is as this graph last saw it: same layer objects and shapes (else rebuild)."""
        return self._module_identity() == self._modules

    def _build(self, model: nn.Module) -> tp.DependencyGraph:
        with preserved_modes(model), torch.enable_grad():
            return tp.DependencyGraph().build_dependency(model, example_inputs=self.example_inputs)

    def _check_traceable(self) -> None:
        """Dry run on a copy: remove one channel of every group, then run a forward pass.

        DepGraph treats operations it does not know as channel-preserving; a layer that is not
        (like zero channel padding) makes the pruned model fail. Report it before touching the model.
        """
        trial = copy.deepcopy(self.model)
        graph = self._build(trial)
        groups = self._raw_groups(graph, trial)
        try:
            self._cut_one_channel_each(trial, groups)
            return
        except Exception:  # DepGraph raises many kinds; find the group that breaks, to name it
            pass
        trial = copy.deepcopy(self.model)
        graph = self._build(trial)
        names = {module: name for name, module in trial.named_modules()}
        for group in self._raw_groups(graph, trial):
            members = [names.get(dep.target.module, "?") for dep, _ in group.items]
            try:
                self._cut_one_channel_each(trial, [group])
            except Exception as error:
                suspects = [name for name, module in trial.named_modules()
                            if next(module.children(), None) is None and not any(True for _ in module.parameters(recurse=False))
                            and type(module).__module__.split(".")[0] != "torch"]
                hint = f"; parameter-free custom layers that may change channel counts: {', '.join(suspects)}" if suspects else ""
                raise ValueError(
                    f"channel surgery cannot handle the layers around {members[0]!r} "
                    f"(group {', '.join(m for m in members if m != '?')}): {error}{hint}. "
                    "Register a Torch-Pruning handler for the custom layer, or skip these layers"
                ) from error

    def _cut_one_channel_each(self, model: nn.Module, groups: list[Any]) -> None:
        for group in groups:
            if len(group.items[0][1]) > 1:
                group.prune([0])
        with torch.no_grad(), preserved_modes(model):
            model.eval()
            model(self.example_inputs)

    def _raw_groups(self, graph: tp.DependencyGraph, model: nn.Module) -> list[Any]:
        modules = dict(model.named_modules())
        ignored = [modules[name] for name in self.skip if name in modules]
        return list(graph.get_all_groups(ignored_layers=ignored, root_module_types=PRUNABLE_TYPES))

    # ------------------------------------------------------------------------------ discovery
    def groups(self) -> list[ChannelGroup]:
        """Every prunable channel group of the model (cached until the next :meth:`remove`)."""
        if self._groups is None:
            self._groups = self._list_groups()
        return list(self._groups)

    def _list_groups(self) -> list[ChannelGroup]:
        names = {module: name for name, module in self.model.named_modules()}
        result = []
        for group in self._raw_groups(self.graph, self.model):
            root_dep, root_idxs = group.items[0]
            members = []
            for dep, _ in group.items:
                module = dep.target.module
                if isinstance(module, nn.Module) and any(True for _ in module.parameters(recurse=False)):
                    side = "out" if self.graph.is_out_channel_pruning_fn(dep.handler) else "in"
                    members.append((names[module], side))
            members = list(dict.fromkeys(members))
            # a skipped layer may lose input channels (the output layer must), never output channels
            prunable = not any(name in self.skip and side == "out" for name, side in members)
            result.append(ChannelGroup(names[root_dep.target.module], len(root_idxs), members, prunable))
        return [group for group in result if group.prunable]

    def tp_group(self, root: str) -> Any:
        """Torch-Pruning's group rooted at layer ``root`` with all channel indices (for scoring)."""
        if root not in self._handlers:
            raise ValueError(f"no channel group is rooted at {root!r}")
        module = self.model.get_submodule(root)
        channels = next(group.channels for group in self.groups() if group.root == root)
        return self.graph.get_pruning_group(module, self._handlers[root], list(range(channels)))

    # -------------------------------------------------------------------------------- surgery
    def remove(self, plan: dict[str, Sequence[int]]) -> dict[nn.Parameter, ParameterChange]:
        """Remove channels: ``plan`` maps a group's root layer to the channel indices to drop.

        Returns, for every parameter that was replaced, its :class:`ParameterChange` (old object and
        kept indices per dimension), for slicing optimizer state and masks.
        """
        groups = {group.root: group for group in self.groups()}
        for root, indices in plan.items():
            if root not in groups:
                raise ValueError(f"{root!r} is not the root of a prunable channel group; roots: {', '.join(groups)}")
            if len(set(indices)) >= groups[root].channels:
                raise ValueError(f"removing {len(set(indices))} of {groups[root].channels} channels of {root!r} would remove the whole layer")
        origins: dict[int, tuple[nn.Parameter, list[torch.Tensor | None]]] = {}
        with preserved_modes(self.model):
            for root, indices in plan.items():
                indices = sorted({int(i) for i in indices})
                if not indices:
                    continue
                root_module = self.model.get_submodule(root)
                group = self.graph.get_pruning_group(root_module, self._handlers[root], indices)
                before = {}
                for dep, idxs in group.items:
                    module = dep.target.module
                    if isinstance(module, nn.Module):
                        for key, parameter in module.named_parameters(recurse=False):
                            before[(module, key)] = (parameter, [_index(i) for i in idxs])
                group.prune()
                for (module, key), (old, removed) in before.items():
                    new = getattr(module, key)
                    if new is old or new.shape == old.shape:
                        continue
                    kept: list[torch.Tensor | None] = []
                    for dim, (old_size, new_size) in enumerate(zip(old.shape, new.shape)):
                        if old_size == new_size:
                            kept.append(None)
                        else:
                            drop = set(removed)
                            kept.append(torch.tensor([i for i in range(old_size) if i not in drop], dtype=torch.long))
                    first, earlier = origins.pop(id(old), (old, [None] * old.dim()))
                    composed = [k if e is None else (e if k is None else e[k]) for e, k in zip(earlier, kept)]
                    origins[id(new)] = (first, composed)
        self._groups = None  # channel counts changed
        self._modules = self._module_identity()
        changes = {}
        parameters = {id(p): p for p in self.model.parameters()}
        for new_id, (old, kept) in origins.items():
            if new_id in parameters:
                changes[parameters[new_id]] = ParameterChange(old, kept)
        return changes

    def history(self) -> list[list[Any]]:
        """DepGraph's pruning history: ``[root layer, is output-channel pruning, indices]`` per removal."""
        return [[name, bool(out), [_index(i) for i in idxs]] for name, out, idxs in self.graph.pruning_history()]


def replay_channel_edits(model: nn.Module, example_inputs: torch.Tensor, history: list[list[Any]]) -> nn.Module:
    """Apply a recorded pruning history (from edit-log records) to a fresh base architecture."""
    with preserved_modes(model), torch.enable_grad():
        graph = tp.DependencyGraph().build_dependency(model, example_inputs=example_inputs)
        graph.load_pruning_history(history)
    return model
