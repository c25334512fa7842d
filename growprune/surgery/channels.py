"""Neuron/channel surgery on any architecture: dependency groups from DepGraph, edits by growprune.

Torch-Pruning's dependency graph (DepGraph) finds which layers must change together when a
channel of one layer changes: residual adds, concatenations and splits, flattening, depthwise and
grouped convolutions, batch norm. :class:`ChannelGraph` uses it for exactly that (the *groups* and
the index of each member's channels) and applies the edits with growprune's own per-layer
handlers (:mod:`growprune.surgery.handlers`), so removing and adding channels are one mechanism
run in two directions:

* :meth:`ChannelGraph.remove` removes channels (pruning), :meth:`ChannelGraph.add` adds them
  (growth: new channels start neutral, zero fan-in and fan-out, so the network's function is
  unchanged); both return a :class:`~growprune.surgery.changes.ParameterChange` for every
  replaced parameter and buffer, keyed by its name, so optimizer state, masks and snapshots follow;
* depthwise convolutions with a channel multiplier m > 1 (DepGraph treats their inputs and
  outputs as unrelated) are coupled here: removing or adding an input channel of such a layer
  removes or adds its m outputs, with everything that consumes them;
* grouped convolutions (ResNeXt, RegNet) and ``torch.chunk`` split a group's channels into equal
  *parts* (:attr:`ChannelGroup.parts`): every part loses and gains the same number of channels,
  so each conv group keeps its own inputs and outputs and each chunk stays equal;
* channels that pass through a channel shuffle, a block that calls its layers' weights through
  ``torch.nn.functional`` (torchvision's Swin attention), a split into fixed sizes or a grouped
  convolution fed by a concatenation stay whole (:attr:`ChannelGraph.held` says why, and a
  warning lists them); building and walking DepGraph is bounded (:mod:`growprune.surgery.depgraph`);
* bare parameters (an ``nn.Parameter`` used directly in ``forward``: layer scale, class token,
  position embedding) are changed by their :class:`~growprune.surgery.handlers.ParameterHandler`,
  in both directions, along the channel dimension DepGraph indexes;
* layer types without a growprune handler are changed by DepGraph's own function (removal only),
  with their changes inferred tensor by tensor (a tensor whose map cannot be inferred is
  reported, and its optimizer state restarts).

Hazards of DepGraph that are handled: it leaves the model in eval mode and re-enables frozen
parameters (both restored, :class:`~growprune.modes.preserved_modes`); it fails under
``torch.no_grad()`` (the graph is built with gradients enabled); layers it treats as
channel-preserving but that are not (e.g. zero channel padding) are found by a dry run on a copy
and reported by name before the real model is touched.
"""

from __future__ import annotations

import bisect
import copy
import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import torch
import torch.nn as nn

from growprune.errors import ConfigurationError
from growprune.modes import preserved_modes
from growprune.surgery.changes import NEW, ParameterChange, kept_index
from growprune.surgery.handlers import ConvHandler, ParameterHandler, bare_parameter_dims, handler_for, parameter_handler_for
from growprune.surgery.depgraph import GraphLimits, TracedGraph, all_groups, build_dependency_graph, dependency_group
from growprune.surgery.units import execution_order

PRUNABLE_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


@dataclass
class ChannelGroup:
    """Channels that change together: one dependency group, as data a user can inspect.

    Attributes:
        root: name of the layer whose output channels define the group.
        channels: current number of channels.
        members: ``(layer name, "out" | "in")`` for every layer with parameters that changes with it.
        prunable: ``False`` when the group would change a skipped layer's output channels.
        step: channels change in multiples of this (the least common multiple of what the members
            need, e.g. attention heads, group-norm groups or the number of ``parts``); 1 for most groups.
        parts: for a group that feeds or is a grouped convolution (ResNeXt, RegNet), or meets a
            ``torch.chunk``: its channels (root indices) split into the equal parts that the
            convolution's groups (the chunk's pieces) see. Every part loses and gains the same number
            of channels, so every group of the convolution keeps its own inputs and outputs and every
            piece stays equal. Empty for most groups.
    """

    root: str
    channels: int
    members: list[tuple[str, str]] = field(default_factory=list)
    prunable: bool = True
    step: int = 1
    parts: tuple[tuple[int, ...], ...] = ()

    @property
    def layers(self) -> list[str]:
        return sorted({name for name, _ in self.members})

    def removal_order(self, scores: torch.Tensor) -> list[int]:
        """Channel indices from the lowest score up, such that every prefix whose length is a multiple
        of ``len(parts)`` takes the same number of channels from each part (lowest first within each)."""
        if not self.parts:
            return torch.argsort(scores).tolist()
        values = scores.detach().float().flatten().cpu().tolist()
        ranked = [sorted(part, key=lambda i: (values[i], i)) for part in self.parts]
        order: list[int] = []
        for rank in zip(*ranked):
            order += sorted(rank, key=lambda i: (values[i], i))
        return order

    def balanced(self, count: int) -> list[int]:
        """``count`` channel indices, the first ``count / len(parts)`` of every part (e.g. for a dry run)."""
        if not self.parts:
            return list(range(count))
        share = count // len(self.parts)
        return sorted(i for part in self.parts for i in part[:share])


@dataclass(frozen=True)
class _Coupling:
    """A depthwise convolution with channel multiplier > 1 whose inputs belong to a group."""

    layer: str
    multiplier: int


def _has_state(module: Any) -> bool:
    return isinstance(module, nn.Parameter) or any(True for _ in module.parameters(recurse=False)) or \
        any(True for _ in module.buffers(recurse=False))


class ChannelGraph:
    """The channel groups of a model and the surgery that removes or adds channels in them.

    Args:
        model: the network (edited in place by :meth:`remove` and :meth:`add`).
        example_inputs: one batch of inputs (a single sample is enough).
        skip: names of layers whose output channels must not change (the output layer always stays).
        check: run the dry run that finds layers DepGraph cannot handle (off for replaying edits).
        limits: bounds on DepGraph's size and time (:class:`~growprune.surgery.depgraph.GraphLimits`);
            over them, :class:`~growprune.errors.ConfigurationError` names the part of the model.
    """

    def __init__(self, model: nn.Module, example_inputs: torch.Tensor, skip: Sequence[str] = (), check: bool = True,
                 limits: GraphLimits | None = None):
        self.model = model
        self.example_inputs = example_inputs
        self.limits = limits if limits is not None else GraphLimits()
        #: root -> why the group's channels stay whole (channel shuffle, weights used outside their layer, ...)
        self.held: dict[str, str] = {}
        order = execution_order(model, example_inputs)
        if not order:
            raise ValueError("the model has no linear or convolution layers to prune")
        self.output_layer = order[-1]
        self.skip = frozenset(self._checked_skip(skip)) | {self.output_layer}
        self.unmapped: list[str] = []  # tensors changed by a DepGraph fallback whose map was not inferred
        if check:
            self._check_traceable()
        self._build()
        if check:
            self.groups()  # finds the held groups, so that the user hears of them now
            if self.held:
                shown = "; ".join(f"{root!r}: {reason}" for root, reason in list(self.held.items())[:2])
                more = f"; and {len(self.held) - 2} more (ChannelGraph.held lists them)" if len(self.held) > 2 else ""
                warnings.warn(f"{type(model).__name__}: {len(self.held)} channel group(s) stay whole: {shown}{more}", stacklevel=2)

    def _checked_skip(self, skip: Iterable[str]) -> set[str]:
        modules = dict(self.model.named_modules())
        unknown = [name for name in skip if name not in modules]
        if unknown:
            raise ValueError(f"no layer named {unknown[0]!r}; weight layers: {', '.join(execution_order(self.model, self.example_inputs))}")
        return set(skip)

    # ------------------------------------------------------------------------------ the graph
    def _build(self) -> None:
        self._needs_build = False
        self.held = {}
        self._tp_groups = None
        self._traced = self._dependency_graph(self.model)
        self.graph = self._traced.graph
        self._names = {module: name for name, module in self.model.named_modules()}
        self._root_handlers: dict[str, Any] = {}
        for group in self._full_groups().values():
            self._root_handlers[self._names[group.items[0].dep.target.module]] = group.items[0].dep.handler
        self._couplings = self._find_couplings()
        self._modules = self._module_identity()
        self._groups: dict[frozenset, list[ChannelGroup]] = {}
        self._parts_of: dict[str, str] = {}  # root -> the grouped convolutions / chunks that split its channels into parts

    def _full_groups(self) -> dict[str, Any]:
        """DepGraph's groups with all channels, by root name (cached until the next edit: slow on big graphs)."""
        if getattr(self, "_tp_groups", None) is None:
            output = self.model.get_submodule(self.output_layer)
            self._tp_groups = {self._names[group.items[0].dep.target.module]: group for group in
                               all_groups(self._traced, [output], PRUNABLE_TYPES, self._names)}
        return self._tp_groups

    def _dependency_graph(self, model: nn.Module) -> TracedGraph:
        """DepGraph, bounded by :attr:`limits`, with shuffles and functional blocks traced as units (:mod:`~growprune.surgery.depgraph`)."""
        with preserved_modes(model), torch.enable_grad(), warnings.catch_warnings():
            # bare parameters are growprune's (ParameterHandler): DepGraph's guess-the-dimension notice does not apply
            warnings.filterwarnings("ignore", message="Unwrapped parameters detected")
            return build_dependency_graph(model, self.example_inputs, self.limits,
                                          unwrapped_parameters=bare_parameter_dims(model))

    def _module_identity(self) -> dict[str, tuple]:
        return {name: (id(module), tuple(tuple(p.shape) for p in module.parameters(recurse=False)))
                for name, module in self.model.named_modules()}

    def is_current(self) -> bool:
        """Whether the model is as this graph last saw it: same layer objects and shapes (else rebuild)."""
        return self._module_identity() == self._modules

    def _find_couplings(self) -> dict[str, list[_Coupling]]:
        """Groups whose channels feed depthwise convs with multiplier > 1, and those convs' own groups."""
        couplings: dict[str, list[_Coupling]] = {}
        self._hidden_roots: set[str] = set()
        for name, module in self.model.named_modules():
            if isinstance(module, nn.modules.conv._ConvNd) and ConvHandler.is_depthwise(module) \
                    and module.out_channels > module.groups and not module.transposed:
                feeding = next((root for root in self._root_handlers
                                if (name, "in") in self._members(self._tp_group_of(root))), None)
                if feeding is None:
                    continue
                couplings.setdefault(feeding, []).append(_Coupling(name, module.out_channels // module.groups))
                self._hidden_roots.add(name)
        return couplings

    def _tp_group_of(self, root: str, indices: Sequence[int] | None = None) -> Any:
        if indices is None and root in self._full_groups():
            return self._full_groups()[root]
        module = self.model.get_submodule(root)
        handler = self.graph.get_pruner_of_module(module)
        size = handler.get_out_channels(module)
        self._traced.update_mappings()
        return dependency_group(self._traced, module, self._root_handlers[root],
                                list(range(size)) if indices is None else list(indices), root)

    def _side(self, dep: Any) -> str:
        return "out" if self.graph.is_out_channel_pruning_fn(dep.handler) else "in"

    def _members(self, tp_group: Any) -> list[tuple[str, str]]:
        members = []
        for item in tp_group.items:
            module = item.dep.target.module
            if isinstance(module, nn.Parameter):
                name = self.graph._param_to_name.get(module)
                if name is not None:
                    members.append((name, self._side(item.dep)))
            elif isinstance(module, nn.Module) and module in self._names and _has_state(module):
                members.append((self._names[module], self._side(item.dep)))
        return list(dict.fromkeys(members))

    def _check_traceable(self) -> None:
        """Dry run on a copy: remove one channel of every group, then run a forward pass.

        DepGraph treats operations it does not know as channel-preserving; a layer that is not
        (like zero channel padding) makes the pruned model fail. Report it before touching the model.
        """
        trial = copy.deepcopy(self.model)
        try:
            graph = ChannelGraph(trial, self.example_inputs, skip=(), check=False, limits=self.limits)
            groups = graph.groups()
        except ConfigurationError:
            raise  # names the part of the model already
        except Exception as error:  # DepGraph raises many kinds; name the model, never a bare traceback
            raise ValueError(f"the channel dependency graph of {type(self.model).__name__} cannot be built: "
                             f"{type(error).__name__}: {error}") from error
        try:
            graph.remove({group.root: group.balanced(group.step) for group in groups if group.channels > group.step})
            self._probe(trial)
            return
        except Exception:  # find the group that breaks, to name it
            pass
        trial = copy.deepcopy(self.model)
        graph = ChannelGraph(trial, self.example_inputs, skip=(), check=False, limits=self.limits)
        for group in graph.groups():
            if group.channels <= group.step:
                continue
            try:
                graph.remove({group.root: group.balanced(group.step)})
                self._probe(trial)
            except Exception as error:
                suspects = [name for name, module in trial.named_modules()
                            if next(module.children(), None) is None and not any(True for _ in module.parameters(recurse=False))
                            and type(module).__module__.split(".")[0] != "torch"]
                hint = f"; parameter-free custom layers that may change channel counts: {', '.join(suspects)}" if suspects else ""
                raise ValueError(
                    f"channel surgery cannot handle the layers around {group.root!r} "
                    f"(group {', '.join(group.layers)}): {error}{hint}. "
                    "Register a layer handler (growprune.surgery.handlers) or a Torch-Pruning pruner for the "
                    "custom layer, or skip these layers"
                ) from error

    def _probe(self, model: nn.Module) -> None:
        with torch.no_grad(), preserved_modes(model):
            model.eval()
            model(self.example_inputs)

    # ------------------------------------------------------------------------------ discovery
    def groups(self, skip: Iterable[str] = ()) -> list[ChannelGroup]:
        """Every channel group whose output layers are not skipped (cached until the next edit).

        ``skip`` adds layer names to the graph's own ``skip``.
        """
        self._ensure_built()
        key = frozenset(self._checked_skip(skip)) | self.skip
        if key not in self._groups:
            self._groups[key] = self._list_groups(key)
        return list(self._groups[key])

    def _list_groups(self, skip: frozenset) -> list[ChannelGroup]:
        result = []
        for root in self._root_handlers:
            if root in self._hidden_roots:
                continue
            tp_group = self._tp_group_of(root)
            items = list(tp_group.items)
            members = self._members(tp_group)
            for coupling in self._couplings.get(root, []):
                coupled = self._tp_group_of(coupling.layer)
                items += coupled.items
                members += self._members(coupled)
            members = list(dict.fromkeys(members))
            reason = next((self._traced.held[item.dep.target].reason for item in items if item.dep.target in self._traced.held), None)
            parts: tuple[tuple[int, ...], ...] = ()
            if reason is None:
                parts, reason = self._parts(root, len(tp_group.items[0].idxs), tp_group.items)
            if reason is not None:
                self.held.setdefault(root, f"its channels pass through {reason}")
                continue
            prunable = not any(name in skip and side == "out" for name, side in members)
            if prunable:
                step = math.lcm(self._step(members), len(parts) or 1)
                result.append(ChannelGroup(root, len(tp_group.items[0].idxs), members, prunable, step, parts))
        return result

    def _parts(self, root: str, channels: int, items: Sequence[Any]) -> tuple[tuple[tuple[int, ...], ...], str | None]:
        """The equal parts the group's grouped convolutions and chunks split its channels into, or why there are none.

        Each grouped convolution member (input or output side) labels every root channel with the
        convolution group it lands in, a ``torch.chunk`` with the piece it lands in (chunks cut
        equal pieces of whatever size comes in); channels with the same labels from all of them
        form a part. The group is held whole (reason returned) when a grouped convolution or chunk
        sees channels of other groups too (a concatenation: the groups would have to change
        together), the parts differ in size, or the channels meet a split into fixed sizes.
        """
        labels: list[list[int | None]] = []
        names: list[str] = []
        seen: set[tuple[int, str]] = set()
        for item in items:
            node = item.dep.target
            if node in self._traced.channel_splits:
                if (id(node), "split") in seen:
                    continue
                seen.add((id(node), "split"))
                where = self._traced.describe(node)
                if node not in self._traced.chunks or not node.module.offsets:
                    return (), f"a split into pieces of fixed sizes ({where}), which would cut its channels elsewhere"
                offsets = node.module.offsets
                if len(set(item.idxs)) != offsets[-1]:
                    return (), f"a chunk ({where}) together with channels of other groups: its pieces could not stay equal"
                label = [None] * channels
                for index, root_index in zip(item.idxs, item.root_idxs):
                    label[root_index] = bisect.bisect_right(offsets, index) - 1
                labels.append(label)
                names.append(f"chunk {where}")
                continue
            conv = node.module
            if not isinstance(conv, nn.modules.conv._ConvNd) or conv.groups == 1 or ConvHandler.is_depthwise(conv):
                continue
            side = self._side(item.dep)
            if (id(conv), side) in seen:
                continue
            seen.add((id(conv), side))
            name = self._names.get(conv, type(conv).__name__)
            if conv.transposed:
                return (), f"grouped transposed convolution {name!r}, which growprune cannot change"
            size = conv.in_channels if side == "in" else conv.out_channels
            if len(set(item.idxs)) != size:
                return (), (f"grouped convolution {name!r} ({conv.groups} groups) together with channels of other groups "
                            "(a concatenation): its groups could not stay equal")
            per_group = size // conv.groups
            label: list[int | None] = [None] * channels
            for index, root_index in zip(item.idxs, item.root_idxs):
                if label[root_index] not in (None, index // per_group):
                    return (), f"grouped convolution {name!r} at two places at once"
                label[root_index] = index // per_group
            labels.append(label)
            names.append(f"grouped convolution layer {name!r}")
        if not labels:
            return (), None
        classes: dict[tuple, list[int]] = {}
        for channel in range(channels):
            classes.setdefault(tuple(label[channel] for label in labels), []).append(channel)
        sizes = {len(members) for members in classes.values()}
        if len(sizes) > 1 or any(all(value is None for value in key) for key in classes):
            return (), (f"{' and '.join(names)}, which see only some of its channels or split them into unequal "
                        "parts: their groups could not stay equal")
        self._parts_of[root] = " and ".join(names)
        return tuple(tuple(classes[key]) for key in sorted(classes, key=lambda key: tuple(-1 if v is None else v for v in key))), None

    def _step(self, members: list[tuple[str, str]]) -> int:
        modules = dict(self.model.named_modules())
        step = 1
        for name, _ in members:
            module = modules.get(name)
            handler = handler_for(module) if module is not None else None
            if handler is not None:
                step = math.lcm(step, handler.channel_step(module))
        return step

    def tp_group(self, root: str) -> Any:
        """Torch-Pruning's group rooted at layer ``root`` with all channel indices (for scoring).

        For a group that feeds a depthwise convolution with multiplier > 1 this is the group up to
        that convolution's inputs (which are left out: one weight per group says nothing about a
        channel); the layers after it are not part of the scoring group.
        """
        self._ensure_built()
        if root in self.held:
            raise ValueError(f"the channels of {root!r} stay whole: {self.held[root]}")
        if root not in self._root_handlers or root in self._hidden_roots:
            raise ValueError(f"no channel group is rooted at {root!r}")
        group = self._tp_group_of(root)
        coupled = {id(self.model.get_submodule(coupling.layer)) for coupling in self._couplings.get(root, [])}
        if not coupled:
            return group
        scoring = copy.copy(group)
        scoring._group = [item for item in group._group
                          if not (id(item.dep.target.module) in coupled and self._side(item.dep) == "in")]
        return scoring

    # -------------------------------------------------------------------------------- surgery
    def remove(self, plan: dict[str, Sequence[int]]) -> dict[str, ParameterChange]:
        """Remove channels: ``plan`` maps a group's root layer to the channel indices to drop.

        Returns, for every replaced parameter or buffer (by name in the model), its
        :class:`ParameterChange` (the old tensor and, per dimension, the old index of each entry).
        Every root and index is checked before anything changes.
        """
        groups = {group.root: group for group in self.groups()}
        cleaned: dict[str, list[int]] = {}
        for root, indices in plan.items():
            if root not in groups:
                self._refuse_root(root, groups, "a prunable channel group")
            unique = sorted({int(i) for i in indices})
            if unique and (unique[0] < 0 or unique[-1] >= groups[root].channels):
                raise ValueError(f"channel indices of {root!r} must lie in 0..{groups[root].channels - 1}, got {unique}")
            if len(unique) >= groups[root].channels:
                raise ValueError(f"removing {len(unique)} of {groups[root].channels} channels of {root!r} would remove the whole layer")
            if len(unique) % groups[root].step:
                raise ValueError(f"channels of {root!r} change in multiples of {groups[root].step} "
                                 f"({self._step_reason(groups[root])}), got {len(unique)}")
            self._check_balanced(groups[root], unique)
            if unique:
                cleaned[root] = unique
        for root, indices in cleaned.items():  # every layer's own constraints, before any layer changes
            tp_group = self._tp_group_of(root, indices)
            self._validate(tp_group.items)
            for coupling in self._couplings.get(root, []):
                self._validate(self._tp_group_of(coupling.layer, self._coupled_outputs(tp_group, coupling)).items)
        changes: dict[str, ParameterChange] = {}
        touched: dict[str, nn.Module] = {}
        with preserved_modes(self.model):
            for root, indices in cleaned.items():
                tp_group = self._tp_group_of(root, indices)
                coupled = [(coupling, self._coupled_outputs(tp_group, coupling)) for coupling in self._couplings.get(root, [])]
                self._apply(tp_group.items, changes, touched)
                self._traced.mappings_current = False  # concatenation sizes and channel counts changed
                for coupling, outputs in coupled:
                    self._apply(self._tp_group_of(coupling.layer, outputs).items, changes, touched)
                    self._traced.mappings_current = False
            self._check_layers(touched)
        self._after_edit(rebuild=False)
        return changes

    def _refuse_root(self, root: str, groups: dict[str, ChannelGroup], kind: str) -> None:
        if root in self.held:
            raise ValueError(f"the channels of {root!r} stay whole: {self.held[root]}")
        raise ValueError(f"{root!r} is not the root of {kind}; roots: {', '.join(groups)}")

    def _step_reason(self, group: ChannelGroup) -> str:
        if group.parts:
            return f"{len(group.parts)} equal parts for {self._parts_of.get(group.root, 'grouped convolutions')}"
        return "attention heads or norm groups"

    def _check_balanced(self, group: ChannelGroup, indices: Sequence[int]) -> None:
        """Every part of a grouped-convolution group must lose as many channels as the others."""
        if not group.parts:
            return
        chosen = set(indices)
        counts = [sum(1 for i in part if i in chosen) for part in group.parts]
        if len(set(counts)) > 1:
            raise ValueError(f"channels of {group.root!r} come in {len(group.parts)} parts of {len(group.parts[0])} for "
                             f"{self._parts_of.get(group.root, 'grouped convolutions')}: every group must keep as many "
                             f"channels as the others; this plan removes {counts} per part")

    def add(self, plan: dict[str, int]) -> dict[str, ParameterChange]:
        """Add channels: ``plan`` maps a group's root layer to how many channels to append.

        New channels go after the root's last channel, and in every member at the position that
        channel has there (in the middle of a concatenation, as a block after a flatten). They start
        neutral: zero incoming and outgoing weights, norm scale 1 and shift 0, running mean 0 and
        variance 1, so the network computes exactly what it did. Returns the changes like
        :meth:`remove`. Roots and counts are checked before anything changes.
        """
        groups = {group.root: group for group in self.groups()}
        for root, count in plan.items():
            if root not in groups:
                self._refuse_root(root, groups, "a channel group that may change")
            if isinstance(count, bool) or not isinstance(count, int) or count < 0:
                raise ValueError(f"the number of channels to add to {root!r} must be an integer >= 0, got {count!r}")
            if count % groups[root].step:
                raise ValueError(f"channels of {root!r} change in multiples of {groups[root].step} "
                                 f"({self._step_reason(groups[root])}), got {count}")
            self._check_growable(root)
        # every insertion is placed in the coordinates of the network as it is now, then each
        # layer side is remapped once: several groups may insert into one layer (concatenation)
        insertions: dict[tuple[int, str], tuple[nn.Module, str, str, list[tuple[int, int]]]] = {}
        for root, count in plan.items():
            if count == 0:
                continue
            tp_group = self._tp_group_of(root)
            # a grouped convolution's group grows at the end of every part (every conv group keeps its own channels)
            parts = groups[root].parts or (tuple(range(groups[root].channels)),)
            for part in parts:
                last, share = max(part), count // len(parts)
                self._collect_insertions(tp_group.items, last, share, insertions)
                for coupling in self._couplings.get(root, []):
                    outputs = self._coupled_outputs(tp_group, coupling, root_channels=[last])
                    self._collect_insertions(self._tp_group_of(coupling.layer).items, max(outputs),
                                             share * coupling.multiplier, insertions)
        changes: dict[str, ParameterChange] = {}
        touched: dict[str, nn.Module] = {}
        with preserved_modes(self.model):
            for module, name, side, spots in insertions.values():
                if side == "param":
                    self._grow_parameter(module, spots, changes)
                    continue
                handler = handler_for(module)
                index = _with_insertions(handler.size(module, side), spots)
                self._record(name, module, handler.remap(module, side, index), changes)
                touched[name] = module
            self._check_layers(touched)
        # DepGraph cannot grow its own bookkeeping (concatenation sizes): it is built anew
        self._after_edit(rebuild=True)
        return changes

    def _collect_insertions(self, items: Sequence[Any], last: int, count: int,
                            insertions: dict[tuple[int, str], tuple[nn.Module, str, str, list[tuple[int, int]]]]) -> None:
        """For each member of one group: after which of its indices ``count`` root channels' entries go."""
        done: set[tuple[int, str]] = set()
        for item in items:
            target = item.dep.target.module
            if not _has_state(target):
                continue  # DepGraph's own operation nodes: the graph is rebuilt afterwards
            side, key = ("param", (id(target), "param")) if isinstance(target, nn.Parameter) else self._side_key(item.dep, target)
            if key in done:
                continue
            done.add(key)
            positions = [i for i, r in zip(item.idxs, item.root_idxs) if r == last]
            if not positions:
                continue  # this member does not see the root's last channel (e.g. another split part)
            name = self.graph._param_to_name[target] if side == "param" else self._names[target]
            entry = insertions.setdefault(key, (target, name, side, []))
            entry[3].append((max(positions), count * len(positions)))

    def _side_key(self, dep: Any, target: nn.Module) -> tuple[str, tuple[int, str]]:
        """The side a dependency changes, and the key that makes each layer side change once per group.

        Layers whose input and output channels are the same ones (norms, attention, depthwise
        convolutions with multiplier 1) appear twice in a group but change once.
        """
        side = self._side(dep)
        handler = handler_for(target)
        one_sided = handler is not None and handler.in_channels(target) is None
        depthwise = isinstance(target, nn.modules.conv._ConvNd) and target.groups > 1 and target.groups == target.out_channels
        return side, (id(target), "out" if depthwise or one_sided else side)

    def _check_growable(self, root: str) -> None:
        modules = dict(self.model.named_modules())
        for name, _ in self._members(self._tp_group_of(root)):
            module = modules.get(name)
            if module is None:  # a bare parameter (e.g. layer scale): its channel dimension must be clear
                self._bare_parameter(self.model.get_parameter(name))
                continue
            if handler_for(module) is None:
                kind = type(module).__name__
                raise ValueError(f"cannot add channels to the group of {root!r}: {name!r} is {kind}, which has no "
                                 "growprune layer handler (register one with growprune.surgery.handlers.register_layer_handler)")

    def _coupled_outputs(self, tp_group: Any, coupling: _Coupling, root_channels: Sequence[int] | None = None) -> list[int]:
        """Output channels of a multiplier-m depthwise conv fed by the given root channels of ``tp_group``."""
        module = self.model.get_submodule(coupling.layer)
        for item in tp_group.items:
            if item.dep.target.module is module and self._side(item.dep) == "in":
                inputs = [i for i, r in zip(item.idxs, item.root_idxs) if root_channels is None or r in root_channels]
                return [i * coupling.multiplier + k for i in inputs for k in range(coupling.multiplier)]
        raise RuntimeError(f"depthwise layer {coupling.layer!r} is not in the group that feeds it")

    def _validate(self, items: Sequence[Any]) -> None:
        for item in items:
            target = item.dep.target.module
            if isinstance(target, nn.Parameter):
                self._bare_parameter(target)  # refuses an ambiguous channel dimension before anything changes
                continue
            handler = handler_for(target) if isinstance(target, nn.Module) and _has_state(target) else None
            if handler is not None:
                side = self._side(item.dep)
                try:
                    handler.validate(target, side, kept_index(handler.size(target, side), list(item.idxs)))
                except ValueError as error:
                    raise ValueError(f"layer {self._names[target]!r}: {error}") from error

    def _apply(self, items: Sequence[Any], changes: dict[str, ParameterChange], touched: dict[str, nn.Module]) -> None:
        """Remove each item's indices of one DepGraph group."""
        done: set[tuple[int, str]] = set()
        for item in items:
            dep, indices = item.dep, list(item.idxs)
            target = dep.target.module
            if isinstance(target, nn.Parameter):
                if (id(target), "param") not in done:
                    done.add((id(target), "param"))
                    self._remove_from_parameter(dep, indices, changes)
                continue
            if not _has_state(target):
                dep(indices)  # DepGraph's own bookkeeping (concatenation and split offsets)
                continue
            side, key = self._side_key(dep, target)
            if key in done:
                continue
            done.add(key)
            name = self._names[target]
            touched[name] = target
            handler = handler_for(target)
            if handler is None:
                self._remove_with_depgraph(dep, indices, name, target, changes)
                continue
            self._record(name, target, handler.remap(target, side, kept_index(handler.size(target, side), indices)), changes)

    @staticmethod
    def _record(name: str, module: Any, tensor_changes: dict[str, ParameterChange], changes: dict[str, ParameterChange]) -> None:
        for key, change in tensor_changes.items():
            full = f"{name}.{key}" if name else key
            owner, _, attribute = key.rpartition(".")
            new_shape = getattr(module.get_submodule(owner) if owner else module, attribute).shape
            if full in changes:
                changes[full] = changes[full].then(change, change.old.shape, new_shape)
            else:
                changes[full] = change

    def _remove_with_depgraph(self, dep: Any, indices: list[int], name: str, module: nn.Module,
                              changes: dict[str, ParameterChange]) -> None:
        """A layer type without a growprune handler: DepGraph's function, changes inferred per tensor."""
        before = dict(module.named_parameters(recurse=False)) | dict(module.named_buffers(recurse=False))
        dep(indices)
        after = dict(module.named_parameters(recurse=False)) | dict(module.named_buffers(recurse=False))
        self._record(name, module, self._inferred(name, before, after, indices), changes)

    def _bare_parameter(self, parameter: nn.Parameter) -> tuple[str, nn.Module, str, ParameterHandler, int]:
        """Name, owner module, attribute, handler and channel dimension of a bare parameter of the graph.

        Raises ``ValueError`` naming the parameter when its channel dimension is ambiguous.
        """
        name = self.graph._param_to_name[parameter]
        owner_name, _, key = name.rpartition(".")
        owner = self.model.get_submodule(owner_name) if owner_name else self.model
        handler = parameter_handler_for(owner, key)
        node = self.graph.module2node.get(parameter)
        dim = handler.channel_dim(parameter, getattr(node, "pruning_dim", None), name)
        return name, owner, key, handler, dim

    def _remove_from_parameter(self, dep: Any, indices: list[int], changes: dict[str, ParameterChange]) -> None:
        """A bare ``nn.Parameter`` used in a forward (e.g. layer scale): its handler removes the entries."""
        old = dep.target.module
        name, owner, key, handler, dim = self._bare_parameter(old)
        change = handler.remap(owner, key, dim, kept_index(old.shape[dim], indices))
        self._record(name.rpartition(".")[0], owner, {key: change}, changes)
        # DepGraph keeps working on this graph (no rebuild after a removal): point its node at the new tensor
        new = getattr(owner, key)
        self.graph._param_to_name[new] = self.graph._param_to_name.pop(old)
        self.graph.module2node[new] = self.graph.module2node.pop(old)
        self.graph.module2node[new].module = new

    def _grow_parameter(self, parameter: nn.Parameter, spots: Sequence[tuple[int, int]],
                        changes: dict[str, ParameterChange]) -> None:
        """Insert new entries into a bare parameter's channel dimension (values: its handler's fill)."""
        name, owner, key, handler, dim = self._bare_parameter(parameter)
        change = handler.remap(owner, key, dim, _with_insertions(parameter.shape[dim], spots))
        self._record(name.rpartition(".")[0], owner, {key: change}, changes)

    def _inferred(self, name: str, before: dict[str, torch.Tensor], after: dict[str, torch.Tensor],
                  indices: list[int]) -> dict[str, ParameterChange]:
        inferred = {}
        for key, old in before.items():
            new = after.get(key)
            if new is None or new is old or new.shape == old.shape:
                continue
            maps: list[torch.Tensor | None] = []
            mapped = True
            for old_size, new_size in zip(old.shape, new.shape):
                if old_size == new_size:
                    maps.append(None)
                elif old_size - new_size == len(indices):
                    maps.append(kept_index(old_size, indices))
                else:
                    mapped = False
                    break
            if mapped:
                inferred[key] = ParameterChange(old, maps)
            else:
                full = f"{name}.{key}" if name else key
                self.unmapped.append(full)
                warnings.warn(f"channel surgery changed {full!r} ({type(self.model.get_submodule(name)).__name__ if name else 'model'}) "
                              f"through Torch-Pruning in a way growprune cannot map entry by entry: its optimizer state "
                              "starts from zero (register a growprune layer handler for this layer type to keep it)")
        return inferred

    def _check_layers(self, touched: dict[str, nn.Module]) -> None:
        for name, module in touched.items():
            handler = handler_for(module)
            if handler is not None:
                handler.check(module, name)

    def _after_edit(self, rebuild: bool) -> None:
        self._tp_groups = None
        self._groups = {}  # channel counts changed
        self._names = {module: name for name, module in self.model.named_modules()}
        self._modules = self._module_identity()
        # after growth DepGraph's bookkeeping is stale; it is built anew when next needed
        self._needs_build = self._needs_build or rebuild

    def _ensure_built(self) -> None:
        if self._needs_build:
            self._build()


def _with_insertions(size: int, spots: Sequence[tuple[int, int]]) -> torch.Tensor:
    """The map of ``size`` old entries with ``count`` new ones after each ``(after, count)`` spot."""
    pieces, cursor = [], 0
    for after, count in sorted(spots):
        pieces += [torch.arange(cursor, after + 1), torch.full((count,), NEW)]
        cursor = after + 1
    pieces.append(torch.arange(cursor, size))
    return torch.cat(pieces).long()
