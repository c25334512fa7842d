"""The edit log as typed operations, with one replay registry.

Every change growprune makes to a network is an :class:`Edit`: a small, JSON-serialisable record
that can be applied to a model and replayed later on a fresh copy of its base architecture.

=====================  ==================================================================
``mask_weights``       :class:`MaskWeights`: set unstructured masks (not structural)
``remove_channels``    :class:`RemoveChannels`: remove channels from channel groups
``add_channels``       :class:`AddChannels`: add neutral channels to channel groups
``remove_layer``       :class:`RemoveLayer`: replace a shape-preserving layer by identity
``insert_layer``       :class:`InsertLayer`: run a new layer after an existing one
``insert_cell``        :class:`InsertCell`: insert a block into an ``nn.Sequential`` stage
``remove_cell``        :class:`RemoveCell`: replace a block by identity
=====================  ==================================================================

``GrowPruneModule.apply_edit(edit)`` applies one (and logs it, and repairs the optimizer when
training); strategies go through the same call. A checkpoint stores the log; loading it replays
every structural edit on the base architecture (:func:`replay`) and checks the result against the
stored tensor shapes. The log, with the base architecture, is also a genotype for evolutionary
search.

Add an operation by subclassing :class:`Edit` (a dataclass with JSON-able fields) and decorating
it with :func:`register_edit`; ``kind`` is its name in the log.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterable, Mapping

import torch
import torch.nn as nn

from growprune.surgery.changes import ParameterChange
from growprune.surgery.channels import ChannelGraph
from growprune.surgery.layers import (
    INITS,
    build_module,
    copy_architecture,
    initialise,
    insert_after,
    insert_cell,
    remove_members,
    remove_module,
)


@dataclass
class EditResult:
    """What an edit did to the model's tensors (names are relative to the edited model).

    Attributes:
        changes: replaced tensors (parameters and buffers) -> how their entries moved.
        renamed: old tensor name -> new name (the tensor object itself is unchanged).
        removed: names of tensors that no longer exist.
        added: names of new tensors (of inserted layers or cells).
        masks: parameter name -> mask to set (:class:`MaskWeights`).
    """

    changes: dict[str, ParameterChange] = field(default_factory=dict)
    renamed: dict[str, str] = field(default_factory=dict)
    removed: list[str] = field(default_factory=list)
    added: list[str] = field(default_factory=list)
    masks: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def structural(self) -> bool:
        """Whether any tensor was replaced, renamed, removed or added."""
        return bool(self.changes or self.renamed or self.removed or self.added)


class EditContext:
    """What edits need besides the model: example inputs, and a channel graph kept across edits.

    Args:
        example_inputs: one input batch (one sample is enough).
        graph_factory: builds the model's :class:`ChannelGraph` when there is none or it is stale
            (default: without the dry run, as for replaying edits that were checked when first made).
    """

    def __init__(self, example_inputs: torch.Tensor, graph_factory: Callable[[nn.Module], ChannelGraph] | None = None):
        self.example_inputs = example_inputs
        self.graph_factory = graph_factory or (lambda model: ChannelGraph(model, example_inputs, check=False))
        self.graph: ChannelGraph | None = None

    def channel_graph(self, model: nn.Module) -> ChannelGraph:
        """The model's channel graph, rebuilt when the model changed under it."""
        if self.graph is None or self.graph.model is not model or not self.graph.is_current():
            self.graph = self.graph_factory(model)
        return self.graph


EDITS: dict[str, type["Edit"]] = {}


def register_edit(cls: type["Edit"]) -> type["Edit"]:
    """Class decorator: make an :class:`Edit` subclass replayable under its ``kind``."""
    if not getattr(cls, "kind", None):
        raise TypeError(f"{cls.__name__} needs a class attribute 'kind' (its name in the edit log)")
    if cls.kind in EDITS and EDITS[cls.kind] is not cls:
        raise ValueError(f"an edit of kind {cls.kind!r} is registered already ({EDITS[cls.kind].__name__})")
    EDITS[cls.kind] = cls
    return cls


class Edit:
    """One typed change of a network. Subclasses are dataclasses with JSON-able fields.

    ``structural`` edits change tensors (shapes, names) and are replayed on reload; the others
    (masks) are restored from the checkpoint's own state.
    """

    kind: ClassVar[str] = ""
    structural: ClassVar[bool] = True

    def apply(self, model: nn.Module, context: EditContext) -> EditResult:
        """Change ``model`` in place; raise ``ValueError`` (with the model unchanged) on bad input."""
        raise NotImplementedError(f"{type(self).__name__} must implement apply()")

    def to_dict(self) -> dict[str, Any]:
        """The log entry: ``{"op": kind, <fields>}``."""
        return {"op": self.kind, **{f.name: getattr(self, f.name) for f in dataclasses.fields(self)}}  # type: ignore[arg-type]

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Edit":
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = set(data) - names - {"op"}
        if unknown:
            raise ValueError(f"edit {cls.kind!r} has no field(s) {sorted(unknown)}")
        return cls(**{key: value for key, value in data.items() if key in names})


def edit_from_dict(data: Mapping[str, Any]) -> Edit:
    """The :class:`Edit` a log entry describes."""
    kind = data.get("op") if isinstance(data, Mapping) else None
    if kind not in EDITS:
        raise ValueError(f"unknown edit {kind!r} in the edit log; known: {', '.join(sorted(EDITS))}")
    return EDITS[kind].from_dict(data)


# ------------------------------------------------------------------------------------ the edits
@register_edit
@dataclass
class MaskWeights(Edit):
    """Set unstructured masks: parameter name -> 0/1 tensor of the parameter's shape.

    The log keeps each mask's density, not the mask (the checkpoint stores the current masks), so
    a replayed ``MaskWeights`` changes nothing.
    """

    kind: ClassVar[str] = "mask_weights"
    structural: ClassVar[bool] = False
    masks: dict[str, torch.Tensor] | None = None
    density: dict[str, float] = field(default_factory=dict)

    def apply(self, model: nn.Module, context: EditContext) -> EditResult:
        if self.masks is None:
            return EditResult()
        parameters = dict(model.named_parameters())
        for name, mask in self.masks.items():
            if name not in parameters:
                raise ValueError(f"cannot mask {name!r}: the model has no such parameter")
            if tuple(mask.shape) != tuple(parameters[name].shape):
                raise ValueError(f"mask for {name!r} has shape {tuple(mask.shape)}, the parameter {tuple(parameters[name].shape)}")
        return EditResult(masks=dict(self.masks))

    def to_dict(self) -> dict[str, Any]:
        density = self.density or {name: float(mask.float().mean()) for name, mask in (self.masks or {}).items()}
        return {"op": self.kind, "density": density}


@register_edit
@dataclass
class RemoveChannels(Edit):
    """Remove channels: group root layer -> indices of its channels to drop (see ``ChannelGraph.groups``)."""

    kind: ClassVar[str] = "remove_channels"
    plan: dict[str, list[int]] = field(default_factory=dict)

    def apply(self, model: nn.Module, context: EditContext) -> EditResult:
        plan = {root: [int(i) for i in indices] for root, indices in self.plan.items()}
        return EditResult(changes=context.channel_graph(model).remove(plan))


@register_edit
@dataclass
class AddChannels(Edit):
    """Add neutral channels (zero fan-in and fan-out): group root layer -> how many."""

    kind: ClassVar[str] = "add_channels"
    plan: dict[str, int] = field(default_factory=dict)

    def apply(self, model: nn.Module, context: EditContext) -> EditResult:
        return EditResult(changes=context.channel_graph(model).add(dict(self.plan)))


@register_edit
@dataclass
class RemoveLayer(Edit):
    """Replace the layer at ``path`` by identity (its output shape must equal its input shape).

    ``members``: the layer's modules when it is more than one (a weight layer and the norm and
    activation modules after it in an ``nn.Sequential``, as
    :func:`~growprune.surgery.discovery.permissible_elements` lists them, ``path`` first); all are
    replaced by identities. Empty (the default, and every log written before it existed): only
    the module at ``path``.
    """

    kind: ClassVar[str] = "remove_layer"
    path: str = ""
    members: list[str] = field(default_factory=list)

    def apply(self, model: nn.Module, context: EditContext) -> EditResult:
        if not self.members:
            return EditResult(removed=remove_module(model, self.path, context.example_inputs, "layer"))
        if self.members[0] != self.path:
            raise ValueError(f"remove_layer: the first member must be the path {self.path!r}, got {self.members[0]!r}")
        return EditResult(removed=remove_members(model, self.members, context.example_inputs, "layer"))

    def to_dict(self) -> dict[str, Any]:
        # a single-module removal keeps the format logs had before members existed
        entry: dict[str, Any] = {"op": self.kind, "path": self.path}
        if self.members:
            entry["members"] = list(self.members)
        return entry


@register_edit
@dataclass
class InsertLayer(Edit):
    """Run a new layer (built from ``layer``) after ``path``.

    ``layer``: a ``class_path``/``init_args`` spec, a list of them (an ``nn.Sequential``, e.g.
    ``[conv, batch norm, ReLU]``) or ``{"copy_of": <path>}`` (a freshly initialised copy of a module
    of the model, built when the edit is applied or replayed).
    ``init``: ``None`` (the constructor's initialisation) or ``"identity"`` (square linear/conv, or
    such a layer followed by batch norm / ReLU: exact in eval mode, see
    :func:`~growprune.surgery.layers.initialise`).
    """

    kind: ClassVar[str] = "insert_layer"
    path: str = ""
    layer: dict[str, Any] | list[dict[str, Any]] = field(default_factory=dict)
    init: str | None = None

    def apply(self, model: nn.Module, context: EditContext) -> EditResult:
        new = _new_module(self.layer, self.init, context.example_inputs, model)
        renamed, added = insert_after(model, self.path, new, context.example_inputs)
        return EditResult(renamed=renamed, added=added)


@register_edit
@dataclass
class InsertCell(Edit):
    """Insert a new cell (built from ``cell``) at position ``index`` of the ``nn.Sequential`` ``stage``.

    ``cell``: a spec as for :class:`InsertLayer`; ``{"copy_of": "layers.1.2"}`` copies the
    architecture of an existing block (e.g. the stage's last), so no spec has to be written by hand.
    ``init``: ``None`` or ``"zero_last_norm"`` (a residual cell then adds nothing). The stage must
    hold a residual block, or the new cell must be one.
    """

    kind: ClassVar[str] = "insert_cell"
    stage: str = ""
    index: int = 0
    cell: dict[str, Any] | list[dict[str, Any]] = field(default_factory=dict)
    init: str | None = None

    def apply(self, model: nn.Module, context: EditContext) -> EditResult:
        new = _new_module(self.cell, self.init, context.example_inputs, model)
        renamed, added = insert_cell(model, self.stage, int(self.index), new, context.example_inputs)
        return EditResult(renamed=renamed, added=added)


@register_edit
@dataclass
class RemoveCell(Edit):
    """Replace the cell at ``path`` by identity (a block whose output shape equals its input shape)."""

    kind: ClassVar[str] = "remove_cell"
    path: str = ""

    def apply(self, model: nn.Module, context: EditContext) -> EditResult:
        return EditResult(removed=remove_module(model, self.path, context.example_inputs, "cell"))


def _new_module(spec: Mapping[str, Any] | list[Mapping[str, Any]], init: str | None, example: torch.Tensor,
                model: nn.Module | None = None) -> nn.Module:
    """A layer or cell built from its spec (``{"copy_of": path}`` needs ``model``), initialised, on the
    device and dtype of the inputs, in the model's train/eval mode."""
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    if isinstance(spec, Mapping) and "copy_of" in spec:
        if model is None:
            raise ValueError("a copy_of spec needs the model it copies from")
        module = copy_architecture(model, str(spec["copy_of"]))
    else:
        module = build_module(spec)
    module = module.to(device=example.device, dtype=example.dtype)
    initialise(module, init)
    if model is not None:
        module.train(model.training)
    return module


# ---------------------------------------------------------------------------------------- replay
def edit_entries(edit_log: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Every edit of an edit log, in order (each log record lists its edits under ``"ops"``)."""
    return [dict(entry) for record in edit_log for entry in record.get("ops", [])]


def structural_entries(edit_log: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The edits of a log that change tensors (what a reload must replay)."""
    return [entry for entry in edit_entries(edit_log) if edit_from_dict(entry).structural]


def replay(model: nn.Module, edits: Iterable[Mapping[str, Any] | Edit], example_inputs: torch.Tensor,
           context: EditContext | None = None) -> nn.Module:
    """Apply logged edits (dicts or :class:`Edit` objects) to ``model`` in order; return it.

    ``model`` must be the architecture the edits were first applied to (usually the base
    architecture freshly built). Masks are not replayed (they are state, not structure).
    """
    context = context or EditContext(example_inputs)
    for entry in edits:
        edit = entry if isinstance(entry, Edit) else edit_from_dict(entry)
        if edit.structural:
            edit.apply(model, context)
    return model


def replay_log(model: nn.Module, edit_log: Iterable[Mapping[str, Any]], example_inputs: torch.Tensor) -> nn.Module:
    """Replay every edit of a module's edit log (``GrowPruneModule.edit_log``) on ``model``."""
    return replay(model, edit_entries(edit_log), example_inputs)
