"""Where the channels that one growth edit added live in the model, entry by entry.

:meth:`growprune.surgery.channels.ChannelGraph.add` (an :class:`~growprune.surgery.edits.AddChannels`
edit) appends *neutral* channels and returns a :class:`~growprune.surgery.changes.ParameterChange`
per replaced tensor, with :data:`~growprune.surgery.changes.NEW` marking new entries.
:func:`new_units` turns that map into :class:`NewUnits`: the new entries sorted by what they do
(produce the new channels, consume them, pass them through, normalise them), and per entry the
channel position it belongs to. Growth initialisers write values through these slices.

Which producer's new channels reach which consumer's new inputs (the *groups*, and so which
entries form one unit) is not in the change map when one edit grew several groups;
:func:`group_units` finds it with one forward-mode derivative per producer on a probe input.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd import forward_ad
from torch.overrides import TorchFunctionMode

from growprune.modes import preserved_modes
from growprune.surgery.changes import NEW, ParameterChange

#: Roles of a :class:`UnitSlice`.
ROLES = ("fan_in", "fan_out", "through", "norm", "other")

_NORMS = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm, nn.modules.instancenorm._InstanceNorm)


@dataclass
class UnitSlice:
    """The new entries of one parameter or buffer.

    Attributes:
        name: the tensor's name in the model (``"features.0.weight"``).
        module: the name of the module that owns it.
        role: ``"fan_in"`` (new output rows of a conv/linear weight and their bias: they produce the
            new channels), ``"fan_out"`` (new input columns of a conv/linear weight: they consume
            them), ``"through"`` (a depthwise convolution's new filters and bias: they consume a new
            channel and produce one), ``"norm"`` (a norm layer's new weight, bias and running
            statistics) or ``"other"`` (any other tensor that grew, e.g. a bare layer-scale parameter).
        mask: boolean, the tensor's shape: ``True`` at this slice's entries.
        positions: the new channel positions along the channel dimension (a consumer's input
            channels, a producer's output channels), ascending.
        index: ``(len(positions), entries per position)`` flat indices into the tensor: row ``i``
            holds the entries of channel position ``positions[i]``.
    """

    name: str
    module: str
    role: str
    mask: torch.Tensor
    positions: torch.Tensor
    index: torch.Tensor
    #: boolean, the tensor's shape: ``True`` at every new entry of the tensor (this slice's and others')
    new: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.new is None:
            self.new = self.mask
        own = torch.zeros(self.mask.numel(), dtype=torch.bool)
        own[self.index.reshape(-1)] = True
        self.mask = own.reshape(self.mask.shape).to(self.mask.device)

    @property
    def buffer(self) -> bool:
        return self.name.rpartition(".")[2] in ("running_mean", "running_var")

    def tensor(self, model: nn.Module) -> torch.Tensor:
        """The live tensor (a parameter or buffer of ``model``)."""
        try:
            return model.get_parameter(self.name)
        except AttributeError:
            return model.get_buffer(self.name)


@dataclass
class NewUnits:
    """Where the channels just added by ChannelGraph.add (one AddChannels edit) live in the model."""

    fan_in: list[UnitSlice] = field(default_factory=list)
    fan_out: list[UnitSlice] = field(default_factory=list)
    norms: list[UnitSlice] = field(default_factory=list)
    #: depthwise convolutions' new filters (they both consume and produce a new channel)
    through: list[UnitSlice] = field(default_factory=list)
    #: new entries of other tensors (bare parameters, PReLU, ...); initialisers leave them neutral
    other: list[UnitSlice] = field(default_factory=list)
    #: filled by :func:`group_units`: which producers and consumer positions form each group
    groups: list["UnitGroup"] | None = None

    def slices(self) -> list[UnitSlice]:
        return self.fan_in + self.fan_out + self.norms + self.through + self.other

    def producers(self) -> list[UnitSlice]:
        """The fan-in weight slices (one per layer that produces new channels)."""
        return [s for s in self.fan_in if s.name.endswith("weight")]

    def count(self) -> int:
        """Number of new units (channels) in total.

        Exact once :func:`group_units` has run (each group counted once, however many producers it
        has); before, the new output channels of every producer are summed, so a residual-stream
        group with several producers counts once per producer.
        """
        if self.groups is not None:
            return sum(group.count for group in self.groups)
        return sum(int(s.positions.numel()) for s in self.producers())

    def __bool__(self) -> bool:
        return bool(self.slices())


@dataclass
class UnitGroup:
    """One channel group's new units: unit ``j`` is row ``j`` of every ``(k, d)`` index matrix.

    Attributes:
        count: the number of new channels ``k``.
        producers: ``(slice, (k, d) flat indices)`` for every producing weight.
        biases: ``(slice, (k, 1) flat indices)`` for the producers' biases.
        consumers: ``(slice, (k, e) flat indices)`` for every consuming weight (a consumer after a
            flatten sees each channel at several positions: they form one unit's columns).
        label: a producer's layer name, for messages.
    """

    count: int
    producers: list[tuple[UnitSlice, torch.Tensor]]
    biases: list[tuple[UnitSlice, torch.Tensor]]
    consumers: list[tuple[UnitSlice, torch.Tensor]]
    label: str


def _new_mask(change: ParameterChange, tensor: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Entries with no old counterpart, and per dimension which indices are new (all-False if none)."""
    shape = tuple(tensor.shape)
    if change.flat is not None:
        mask = (change.flat.to(tensor.device) == NEW).reshape(shape)
        per_dim = []
        for dim in range(len(shape)):
            others = tuple(d for d in range(len(shape)) if d != dim)
            per_dim.append(mask.all(dim=others) if others else mask)
        return mask, per_dim
    per_dim = []
    mask = torch.zeros(shape, dtype=torch.bool, device=tensor.device)
    for dim, size in enumerate(shape):
        index = change.index[dim] if change.index and dim < len(change.index) else None
        new = torch.zeros(size, dtype=torch.bool, device=tensor.device) if index is None else (index.to(tensor.device) == NEW)
        per_dim.append(new)
        if index is None or not bool(new.any()):
            continue
        view = [1] * len(shape)
        view[dim] = -1
        mask = mask | new.view(view)
    return mask, per_dim


def _rows(flat: torch.Tensor, dim: int, chosen: torch.Tensor, keep: list[torch.Tensor | None]) -> torch.Tensor:
    """Flat indices: for each chosen index of ``dim``, the entries with the other dims filtered by ``keep``."""
    sub = flat.movedim(dim, 0)[chosen]
    others = [k for d, k in enumerate(keep) if d != dim]
    for offset, keep_mask in enumerate(others, start=1):
        if keep_mask is not None:
            sub = sub.index_select(offset, torch.nonzero(keep_mask.cpu()).flatten())
    return sub.reshape(len(chosen), -1)


def _is_depthwise(module: nn.Module) -> bool:
    return isinstance(module, nn.modules.conv._ConvNd) and module.groups > 1 and module.groups == module.in_channels \
        and not module.transposed


def _slice_of(name: str, module_name: str, module: nn.Module, attribute: str, tensor: torch.Tensor,
              change: ParameterChange) -> list[UnitSlice]:
    mask, per_dim = _new_mask(change, tensor)
    if not bool(mask.any()):
        return []
    flat = torch.arange(tensor.numel()).reshape(tuple(tensor.shape))
    cpu_mask = mask.cpu()
    dims = [dim for dim, new in enumerate(per_dim) if bool(new.any())]

    def whole(role: str, dim: int) -> UnitSlice:
        positions = torch.nonzero(per_dim[dim].cpu()).flatten()
        return UnitSlice(name, module_name, role, mask, positions, _rows(flat, dim, positions, [None] * tensor.dim()))

    is_layer = isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)) and not getattr(module, "transposed", False)
    if is_layer and attribute == "bias":
        return [whole("through" if _is_depthwise(module) else "fan_in", 0)]
    if is_layer and attribute == "weight":
        if _is_depthwise(module):
            return [whole("through", 0)]
        rows, cols = per_dim[0].cpu(), per_dim[1].cpu()
        result = []
        if bool(rows.any()):  # new output rows, without the entries that see other new inputs (left 0)
            positions = torch.nonzero(rows).flatten()
            result.append(UnitSlice(name, module_name, "fan_in", mask, positions,
                                    _rows(flat, 0, positions, [None, ~cols] + [None] * (tensor.dim() - 2))))
        consumed = cpu_mask & ~rows.view([-1] + [1] * (tensor.dim() - 1))
        if bool(consumed.any()):
            result.append(_consumer_slice(name, module_name, module, mask, consumed, flat))
        return result
    if isinstance(module, _NORMS):
        return [whole("norm", dims[0] if dims else 0)]
    return [whole("other", dims[0] if dims else 0)]


def _consumer_slice(name: str, module_name: str, module: nn.Module, mask: torch.Tensor, consumed: torch.Tensor,
                    flat: torch.Tensor) -> UnitSlice:
    """New input columns; a grouped convolution's are per group (positions in full input coordinates)."""
    groups = module.groups if isinstance(module, nn.modules.conv._ConvNd) else 1
    rows_per_group = consumed.shape[0] // groups
    width = consumed.shape[1]
    positions, entries = [], []
    for group in range(groups):
        rows = slice(group * rows_per_group, (group + 1) * rows_per_group)
        block = consumed[rows]
        columns = torch.nonzero(block.flatten(2).any(dim=2).any(dim=0) if block.dim() > 2 else block.any(dim=0)).flatten()
        for column in columns.tolist():
            positions.append(group * width + column)
            selected = flat[rows, column]
            entries.append(selected[block[:, column]].flatten())
    return UnitSlice(name, module_name, "fan_out", mask, torch.tensor(positions, dtype=torch.long), torch.stack(entries))


def new_units(model: nn.Module, changes: dict[str, ParameterChange]) -> NewUnits:
    """The :class:`NewUnits` of the changes that ``ChannelGraph.add`` / ``AddChannels`` / ``apply_edit`` returned.

    Raises ``ValueError`` naming the tensor when a change does not belong to ``model``.
    """
    units = NewUnits()
    modules = dict(model.named_modules())
    for name, change in changes.items():
        module_name, _, attribute = name.rpartition(".")
        module = modules.get(module_name)
        tensor = getattr(module, attribute, None) if module is not None else None
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"the change of {name!r} names no parameter or buffer of {type(model).__name__}")
        for unit_slice in _slice_of(name, module_name, module, attribute, tensor, change):
            getattr(units, {"fan_in": "fan_in", "fan_out": "fan_out", "through": "through", "norm": "norms",
                            "other": "other"}[unit_slice.role]).append(unit_slice)
    return units


# ------------------------------------------------------------------------------ groups
class unit_slope_at_zero(TorchFunctionMode):
    """ReLU-family activations get derivative 1 at exactly 0 (torch's is 0); values are unchanged.

    A new channel with zero fan-in sits at exactly 0 in front of its activation; with torch's
    ``relu'(0) = 0`` nothing reaches it (GradMax needs ``f'(0) = 1``, FIELD_NOTES section 6). The
    term added is ``(x - x.detach()) * (x == 0)``: zero in value, its derivative is 1 where ``x`` is 0.
    Catches ``F.relu``/``torch.relu`` (so ``nn.ReLU``), ``relu6`` and ``hardtanh`` with lower bound 0;
    in-place variants run out of place (callers use the returned tensor).
    """

    _RELU = {F.relu, torch.relu, torch.relu_, torch.Tensor.relu, torch.Tensor.relu_, F.relu_}
    _HARDTANH = {F.hardtanh, F.hardtanh_, F.relu6}

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = dict(kwargs or {})
        if func in self._RELU:
            x = args[0]
            return self._fixed(x, torch.relu(x))
        if func in self._HARDTANH:
            x = args[0]
            if func is F.relu6:
                low, high = 0.0, 6.0
            else:
                low = args[1] if len(args) > 1 else kwargs.get("min_val", -1.0)
                high = args[2] if len(args) > 2 else kwargs.get("max_val", 1.0)
            out = F.hardtanh(x, low, high)
            return self._fixed(x, out) if low == 0 else out
        return func(*args, **kwargs)

    @staticmethod
    def _fixed(x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        return out + (x - x.detach()) * (x == 0).to(x.dtype)


def _channel_response(tangent: torch.Tensor | None, module: nn.Module) -> torch.Tensor | None:
    """Per input channel of ``module``: whether the tangent reaching it is non-zero."""
    if tangent is None:
        return None
    dim = 1 if isinstance(module, nn.modules.conv._ConvNd) else tangent.dim() - 1
    others = tuple(d for d in range(tangent.dim()) if d != dim)
    return (tangent.abs().sum(dim=others) if others else tangent.abs()) > 0


def group_units(model: nn.Module, units: NewUnits, inputs: torch.Tensor) -> list[UnitGroup]:
    """Find which producers' new channels reach which consumers' new inputs (and store it on ``units``).

    One forward-mode derivative per producing layer, in eval mode on ``inputs`` (two samples are
    enough): the tangent of the producer's new rows reaches exactly the consumer inputs its new
    channels flow into (through norms, activations with slope 1 at 0, pooling, depthwise
    convolutions, additions and concatenations). Producers that reach the same consumer inputs
    (a residual stream) form one group. Depthwise (``through``) filters must be non-zero already,
    or nothing passes them. Raises ``ValueError`` naming the layers when the counts do not match.
    """
    producers = units.producers()
    consumers = units.fan_out
    consumer_modules = {s.module for s in consumers}
    modules = dict(model.named_modules())
    responses: dict[str, dict[str, torch.Tensor]] = {}  # producer slice -> consumer module -> channels reached
    probe = inputs[:2]
    neutral: dict[str, torch.Tensor] = {}
    for producer in producers:
        value = neutral.setdefault(producer.name, model.get_parameter(producer.name).detach().clone())
        value.view(-1)[producer.index.flatten().to(value.device)] = 0
    for producer in producers:
        seen: dict[str, torch.Tensor] = {}
        hooks = []

        def make_hook(module_name: str) -> Any:
            def hook(module: nn.Module, args: tuple) -> None:
                tangent = forward_ad.unpack_dual(args[0]).tangent if isinstance(args[0], torch.Tensor) else None
                reached = _channel_response(tangent, module)
                if reached is not None:
                    seen[module_name] = seen[module_name] | reached if module_name in seen else reached
            return hook

        for module_name in consumer_modules:
            hooks.append(modules[module_name].register_forward_pre_hook(make_hook(module_name)))
        parameter = model.get_parameter(producer.name)
        tangent = torch.zeros_like(parameter)
        generator = torch.Generator().manual_seed(0)
        tangent.view(-1)[producer.index.flatten().to(parameter.device)] = \
            torch.rand(producer.index.numel(), generator=generator).to(parameter) + 0.5
        try:
            with preserved_modes(model), torch.no_grad(), forward_ad.dual_level(), unit_slope_at_zero():
                model.eval()
                # at the neutral point (every new row 0) a ReLU passes the whole tangent (slope 1 at 0);
                # with fan-in already set it would cut off the positions where the unit is negative
                values = dict(neutral)
                values[producer.name] = forward_ad.make_dual(neutral[producer.name], tangent)
                torch.func.functional_call(model, values, (probe,), strict=False)
        finally:
            for hook in hooks:
                hook.remove()
        responses[producer.name] = {name: reached.cpu() for name, reached in seen.items()}

    # union of producers that reach a common consumer position
    parent = {p.name: p.name for p in producers}

    def find(name: str) -> str:
        while parent[name] != name:
            parent[name] = parent[parent[name]]
            name = parent[name]
        return name

    owner: dict[tuple[str, int], str] = {}
    for consumer in consumers:
        for position in consumer.positions.tolist():
            for producer in producers:
                reached = responses[producer.name].get(consumer.module)
                if reached is not None and position < reached.numel() and bool(reached[position]):
                    key = (consumer.name, position)
                    if key in owner:
                        parent[find(producer.name)] = find(owner[key])
                    else:
                        owner[key] = producer.name
    biases = {s.module: s for s in units.fan_in if s.name.endswith("bias")}
    groups: list[UnitGroup] = []
    roots = list(dict.fromkeys(find(p.name) for p in producers))
    for root in roots:
        members = [p for p in producers if find(p.name) == root]
        counts = {int(p.positions.numel()) for p in members}
        if len(counts) > 1:
            raise ValueError(f"the producers {', '.join(p.module for p in members)} of one channel group added "
                             f"different numbers of channels ({sorted(counts)})")
        count = counts.pop()
        producer_index = [(p, p.index) for p in members]
        bias_index = [(biases[p.module], biases[p.module].index) for p in members if p.module in biases]
        consumer_index = []
        for consumer in consumers:
            keep = [i for i, position in enumerate(consumer.positions.tolist())
                    if (consumer.name, position) in owner and find(owner[(consumer.name, position)]) == root]
            if not keep:
                continue
            if len(keep) % count:
                raise ValueError(f"layer {consumer.module!r} receives {len(keep)} new inputs from the group of "
                                 f"{members[0].module!r}, not a multiple of its {count} new channels")
            consumer_index.append((consumer, consumer.index[keep].reshape(count, -1)))
        groups.append(UnitGroup(count, producer_index, bias_index, consumer_index, members[0].module))
    units.groups = groups
    return groups


def gather(model: nn.Module, pairs: Sequence[tuple[UnitSlice, torch.Tensor]]) -> torch.Tensor:
    """The ``(k, d)`` values of the entries ``pairs`` index, concatenated over slices."""
    values = [pair[0].tensor(model).detach().reshape(-1)[pair[1].to(pair[0].tensor(model).device)] for pair in pairs]
    return torch.cat(values, dim=1) if values else torch.zeros(0)


def scatter(model: nn.Module, pairs: Sequence[tuple[UnitSlice, torch.Tensor]], values: torch.Tensor) -> None:
    """Write ``(k, d)`` values (concatenated over slices like :func:`gather`) in place."""
    offset = 0
    with torch.no_grad():
        for unit_slice, index in pairs:
            tensor = unit_slice.tensor(model)
            width = index.shape[1]
            tensor.view(-1)[index.to(tensor.device).reshape(-1)] = values[:, offset:offset + width].reshape(-1).to(tensor)
            offset += width
