"""Per-layer-type surgery: how one layer's input or output channels change, for pruning AND growth.

One :class:`LayerHandler` per layer type knows where the layer keeps its channels (which
dimension of which parameter or buffer) and how to move them. Its single primitive is a *remap*
of one side (``"out"`` or ``"in"``) through an index map (``new index -> old index``, with
:data:`~growprune.surgery.changes.NEW` for new channels, see :mod:`growprune.surgery.changes`):

* removing channels is a remap that keeps the others (``kept_index``);
* adding channels is a remap with new entries, appended or inserted in the middle
  (``inserted_index``), the exact inverse;
* resizing a layer to the shapes stored in a checkpoint is a remap to the stored size.

Layers are edited in place (same module object, new parameter tensors), and every remap returns
a :class:`~growprune.surgery.changes.ParameterChange` per replaced tensor, so optimizer state,
masks and snapshots follow the channels. New entries start *neutral*: weights and biases 0, norm
scales 1, running means 0 and running variances 1; growth initialisers overwrite them.

Handled: ``nn.Linear``, every ``nn.Conv*`` and ``nn.ConvTranspose*`` (grouped and depthwise
convolutions, any channel multiplier), ``_BatchNorm``, ``_InstanceNorm``, ``GroupNorm``,
``LayerNorm``, ``PReLU``, ``Embedding`` and ``MultiheadAttention`` (packed projections). Register your own layer type with
:func:`register_layer_handler`::

    class ScaleHandler(LayerHandler):
        def out_channels(self, module):
            return module.scale.shape[0]

        def remap(self, module, side, index):
            return {"scale": replace_tensor(module, "scale", 0, index, fill=1.0)}

    register_layer_handler(MyScale, ScaleHandler())

*Bare* parameters, an ``nn.Parameter`` that a module uses directly in ``forward`` (ConvNeXt's
layer scale, a ViT's class token and position embedding), have a :class:`ParameterHandler`
instead, per owner type and attribute name (:func:`register_parameter_handler`); without one they
are changed along the only dimension whose size is the channel count, new entries 0.
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import torch
import torch.nn as nn

from growprune.surgery.changes import NEW, ParameterChange

SIDES = ("out", "in")


# ------------------------------------------------------------------------------ tensor surgery
def remapped(tensor: torch.Tensor, dim: int, index: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
    """``tensor`` with dimension ``dim`` rebuilt through ``index`` (new entries ``fill``), same dtype/device."""
    index = index.to(tensor.device)
    result = tensor.detach().index_select(dim, index.clamp_min(0))
    is_new = index < 0
    if bool(is_new.any()):
        shape = [1] * tensor.dim()
        shape[dim] = -1
        result = result.masked_fill(is_new.view(shape), fill)
    return result.contiguous()


def set_tensor(module: nn.Module, name: str, value: torch.Tensor) -> None:
    """Replace parameter or buffer ``name`` of ``module`` by ``value`` (a parameter keeps requires_grad)."""
    if name in module._parameters:
        old = module._parameters[name]
        module._parameters[name] = nn.Parameter(value, requires_grad=old.requires_grad if old is not None else True)
    elif name in module._buffers:
        module._buffers[name] = value
    else:
        raise KeyError(f"{type(module).__name__} has no parameter or buffer named {name!r}")


def replace_tensor(module: nn.Module, name: str, dim: int, index: torch.Tensor, fill: float = 0.0) -> ParameterChange:
    """Remap dimension ``dim`` of parameter/buffer ``name`` through ``index``; return the change."""
    old = getattr(module, name)
    dim = dim % old.dim()
    maps: list[torch.Tensor | None] = [None] * old.dim()
    maps[dim] = index.cpu().long()
    set_tensor(module, name, remapped(old, dim, index, fill))
    return ParameterChange(old, maps)


def _grown_or_cut(current: int, size: int) -> torch.Tensor:
    """The map from ``current`` to ``size`` entries that keeps the first ones and appends new ones."""
    return torch.tensor([i if i < current else NEW for i in range(size)], dtype=torch.long)


def _check_index(index: torch.Tensor, size: int, what: str) -> torch.Tensor:
    index = torch.as_tensor(index, dtype=torch.long).reshape(-1)
    if index.numel() == 0:
        raise ValueError(f"{what}: a layer cannot lose all of its channels")
    old = index[index >= 0]
    if bool((index < NEW).any()) or (old.numel() and int(old.max()) >= size):
        raise ValueError(f"{what}: index map refers to channels outside 0..{size - 1}")
    if old.unique().numel() != old.numel():
        raise ValueError(f"{what}: index map repeats an old channel")
    return index


# ------------------------------------------------------------------------------------ handlers
class LayerHandler:
    """How one layer type's channels change. Subclass it for a custom layer (see the module docstring).

    ``out_channels``/``in_channels`` give the current sizes (``in_channels`` is ``None`` for layers
    whose input and output channels are the same, e.g. norms: they change with either side).
    ``remap`` moves one side through an index map and returns the changes by tensor name;
    ``check`` validates the layer after a whole group was changed (e.g. channels divisible by groups).
    """

    def out_channels(self, module: nn.Module) -> int:
        raise NotImplementedError(f"{type(self).__name__} must implement out_channels()")

    def in_channels(self, module: nn.Module) -> int | None:
        return None

    def remap(self, module: nn.Module, side: str, index: torch.Tensor) -> dict[str, ParameterChange]:
        raise NotImplementedError(f"{type(self).__name__} must implement remap()")

    def check(self, module: nn.Module, name: str) -> None:
        """Raise ``ValueError`` naming the layer if it is no longer consistent."""

    def validate(self, module: nn.Module, side: str, index: torch.Tensor) -> None:
        """Raise ``ValueError`` if :meth:`remap` would refuse ``index`` (called before a group changes)."""

    def channel_step(self, module: nn.Module) -> int:
        """Channels of this layer change in multiples of this (e.g. attention heads, norm groups)."""
        return 1

    def size(self, module: nn.Module, side: str) -> int:
        size = self.out_channels(module) if side == "out" else self.in_channels(module)
        return self.out_channels(module) if size is None else size

    def resize(self, module: nn.Module, shapes: Mapping[str, torch.Size], name: str) -> None:
        """Resize to the tensor shapes of a checkpoint (values are loaded afterwards)."""
        targets = self.sizes_from_shapes(module, shapes)
        for side, size in targets.items():
            current = self.size(module, side)
            if size != current:
                self.remap(module, side, _grown_or_cut(current, size))
        self.check(module, name)
        for key, shape in shapes.items():
            if key in dict(module.named_parameters(recurse=False)) or key in dict(module.named_buffers(recurse=False)):
                if getattr(module, key).shape != shape:
                    raise ValueError(f"layer {name!r} ({type(module).__name__}): cannot resize {key!r} to {tuple(shape)}")

    def sizes_from_shapes(self, module: nn.Module, shapes: Mapping[str, torch.Size]) -> dict[str, int]:
        """The channel counts per side that stored tensor shapes imply."""
        raise NotImplementedError(f"{type(self).__name__} cannot resize from stored shapes")


class LinearHandler(LayerHandler):
    """``nn.Linear``: output units are rows of ``weight`` (and ``bias``), inputs its columns."""

    def out_channels(self, module: nn.Linear) -> int:
        return module.out_features

    def in_channels(self, module: nn.Linear) -> int:
        return module.in_features

    def remap(self, module: nn.Linear, side: str, index: torch.Tensor) -> dict[str, ParameterChange]:
        if side == "out":
            index = _check_index(index, module.out_features, "linear output")
            changes = {"weight": replace_tensor(module, "weight", 0, index)}
            if module.bias is not None:
                changes["bias"] = replace_tensor(module, "bias", 0, index)
            module.out_features = int(index.numel())
            return changes
        index = _check_index(index, module.in_features, "linear input")
        module.in_features = int(index.numel())
        return {"weight": replace_tensor(module, "weight", 1, index)}

    def sizes_from_shapes(self, module: nn.Linear, shapes: Mapping[str, torch.Size]) -> dict[str, int]:
        out_features, in_features = shapes["weight"]
        return {"out": int(out_features), "in": int(in_features)}


class ConvHandler(LayerHandler):
    """Every ``nn.Conv*`` and ``nn.ConvTranspose*``, grouped and depthwise included.

    A convolution with ``groups`` g keeps g separate input slices. Three cases:

    * ordinary (g = 1): output channels are ``weight`` rows (columns for transposed convs), inputs
      the other dimension;
    * *depthwise family* (g = in_channels, one input channel per group, any multiplier
      m = out_channels / g): an input channel is a whole group. Changing inputs changes g; the
      m outputs of each group must change with it (the channel graph couples them);
    * grouped (g > 1, several inputs per group): every group must keep the same number of inputs;
      each output channel keeps the input slice of its own group.
    """

    def out_channels(self, module: nn.modules.conv._ConvNd) -> int:
        return module.out_channels

    def in_channels(self, module: nn.modules.conv._ConvNd) -> int:
        return module.in_channels

    @staticmethod
    def is_depthwise(module: nn.modules.conv._ConvNd) -> bool:
        """One input channel per group (depthwise, with any channel multiplier)."""
        return module.groups > 1 and module.groups == module.in_channels

    def remap(self, module: nn.modules.conv._ConvNd, side: str, index: torch.Tensor) -> dict[str, ParameterChange]:
        if module.transposed and module.groups > 1:
            raise ValueError("growprune cannot change the channels of a grouped transposed convolution")
        if side == "out":
            index = _check_index(index, module.out_channels, "convolution output")
            if self.is_depthwise(module) and module.out_channels == module.groups:
                # multiplier 1: output channel i IS input channel i (DepGraph couples both sides)
                module.in_channels = module.groups = int(index.numel())
            changes = {"weight": replace_tensor(module, "weight", 1 if module.transposed else 0, index)}
            if module.bias is not None:
                changes["bias"] = replace_tensor(module, "bias", 0, index)
            module.out_channels = int(index.numel())
            return changes
        index = _check_index(index, module.in_channels, "convolution input")
        if self.is_depthwise(module):
            if module.out_channels == module.groups:
                return self.remap(module, "out", index)
            # multiplier > 1: only the group count changes here; the outputs follow through the graph
            module.in_channels = module.groups = int(index.numel())
            return {}
        if module.groups == 1:
            module.in_channels = int(index.numel())
            return {"weight": replace_tensor(module, "weight", 0 if module.transposed else 1, index)}
        return self._remap_grouped_inputs(module, index)

    def validate(self, module: nn.modules.conv._ConvNd, side: str, index: torch.Tensor) -> None:
        if module.groups == 1 or self.is_depthwise(module):
            return
        if side == "in":
            self._local_inputs(module, index)
            return
        out_per_group = module.out_channels // module.groups
        kept = index[index >= 0]
        counts = torch.bincount(kept // out_per_group, minlength=module.groups)
        if index.numel() % module.groups or bool((counts != counts[0]).any()):
            raise ValueError(
                f"grouped convolution ({module.groups} groups of {out_per_group} outputs): every group must keep "
                f"the same number of output channels, this change keeps {counts.tolist()}"
            )

    @staticmethod
    def _local_inputs(module: nn.modules.conv._ConvNd, index: torch.Tensor) -> torch.Tensor:
        """The input map split per group, as positions within each group (raises if it mixes groups)."""
        groups, per_group = module.groups, module.in_channels // module.groups
        if index.numel() % groups:
            raise ValueError(
                f"grouped convolution ({groups} groups): {index.numel()} input channels cannot be split into equal groups"
            )
        local = index.view(groups, index.numel() // groups).clone()
        for group in range(groups):
            old = local[group][local[group] >= 0]
            if bool(((old < group * per_group) | (old >= (group + 1) * per_group)).any()):
                raise ValueError(
                    f"grouped convolution ({groups} groups of {per_group} inputs): a channel would move to another "
                    "group, or the groups would keep different numbers of channels; every group must keep as many "
                    "of its own channels as the others"
                )
            local[group] = torch.where(local[group] >= 0, local[group] - group * per_group, local[group])
        return local

    def _remap_grouped_inputs(self, module: nn.modules.conv._ConvNd, index: torch.Tensor) -> dict[str, ParameterChange]:
        groups, per_group = module.groups, module.in_channels // module.groups
        local = self._local_inputs(module, index)
        old_weight = module.weight
        out_per_group = module.out_channels // groups
        rows = local.repeat_interleave(out_per_group, dim=0)  # (out_channels, new_per_group)
        kernel = old_weight.shape[2:]
        gather = rows.clamp_min(0).view(*rows.shape, *([1] * len(kernel))).expand(-1, -1, *kernel).to(old_weight.device)
        values = old_weight.detach().gather(1, gather)
        values = values.masked_fill((rows < 0).view(*rows.shape, *([1] * len(kernel))).to(values.device), 0.0)
        # flat map: new (o, j, k...) -> old (o, local[o, j], k...)
        kernel_size = int(torch.tensor(kernel).prod()) if len(kernel) else 1
        out_index = torch.arange(module.out_channels).view(-1, 1, 1)
        within = torch.arange(kernel_size).view(1, 1, -1)
        flat = (out_index * per_group + rows.unsqueeze(-1)) * kernel_size + within
        flat = torch.where(rows.unsqueeze(-1) >= 0, flat, torch.full_like(flat, NEW))
        set_tensor(module, "weight", values.contiguous())
        module.in_channels = int(index.numel())
        return {"weight": ParameterChange(old_weight, flat=flat.reshape(-1))}

    def check(self, module: nn.modules.conv._ConvNd, name: str) -> None:
        if module.in_channels % module.groups or module.out_channels % module.groups:
            raise ValueError(
                f"convolution {name!r} would have {module.in_channels} input and {module.out_channels} output channels, "
                f"not divisible by its {module.groups} groups"
            )
        expected = (module.in_channels, module.out_channels // module.groups) if module.transposed else \
            (module.out_channels, module.in_channels // module.groups)
        if tuple(module.weight.shape[:2]) != expected:
            raise ValueError(f"convolution {name!r}: weight of shape {tuple(module.weight.shape)} does not match its channels")

    def resize(self, module: nn.modules.conv._ConvNd, shapes: Mapping[str, torch.Size], name: str) -> None:
        first, second = (int(size) for size in shapes["weight"][:2])
        if module.transposed:
            in_channels, out_channels = first, second * module.groups
        else:
            out_channels, in_channels = first, second * module.groups
        if self.is_depthwise(module):
            # keep the channel multiplier: the stored outputs tell how many groups there are now
            multiplier = module.out_channels // module.groups
            module.in_channels = module.groups = out_channels // multiplier
            in_channels = module.in_channels
        if module.out_channels != out_channels:
            self._remap_out_plain(module, _grown_or_cut(module.out_channels, out_channels))
        if module.in_channels != in_channels:
            per_group, new_per_group = module.in_channels // module.groups, in_channels // module.groups
            index = torch.tensor([g * per_group + t if t < per_group else NEW
                                  for g in range(module.groups) for t in range(new_per_group)], dtype=torch.long)
            if module.groups == 1:
                self.remap(module, "in", index)
            else:
                self._remap_grouped_inputs(module, index)
        self.check(module, name)

    def _remap_out_plain(self, module: nn.modules.conv._ConvNd, index: torch.Tensor) -> None:
        replace_tensor(module, "weight", 1 if module.transposed else 0, index)
        if module.bias is not None:
            replace_tensor(module, "bias", 0, index)
        module.out_channels = int(index.numel())


class NormHandler(LayerHandler):
    """Batch, instance and group norm: one entry per channel in scale, shift and running statistics."""

    #: fill value of new entries, per tensor name (neutral: an added channel is normalised as usual)
    FILL = {"weight": 1.0, "bias": 0.0, "running_mean": 0.0, "running_var": 1.0}

    def out_channels(self, module: nn.Module) -> int:
        return module.num_channels if isinstance(module, nn.GroupNorm) else module.num_features

    def remap(self, module: nn.Module, side: str, index: torch.Tensor) -> dict[str, ParameterChange]:
        index = _check_index(index, self.out_channels(module), f"{type(module).__name__}")
        changes = {}
        for key, fill in self.FILL.items():
            if getattr(module, key, None) is not None:
                changes[key] = replace_tensor(module, key, 0, index, fill)
        if isinstance(module, nn.GroupNorm):
            module.num_channels = int(index.numel())
        else:
            module.num_features = int(index.numel())
        return changes

    def channel_step(self, module: nn.Module) -> int:
        return module.num_groups if isinstance(module, nn.GroupNorm) else 1

    def check(self, module: nn.Module, name: str) -> None:
        if isinstance(module, nn.GroupNorm) and module.num_channels % module.num_groups:
            raise ValueError(f"group norm {name!r}: {module.num_channels} channels are not divisible by its {module.num_groups} groups")

    def sizes_from_shapes(self, module: nn.Module, shapes: Mapping[str, torch.Size]) -> dict[str, int]:
        key = next(key for key in ("weight", "running_mean") if key in shapes)
        return {"out": int(shapes[key][0])}


class LayerNormHandler(LayerHandler):
    """``nn.LayerNorm``: channels are the LAST normalised dimension (as in channels-last blocks)."""

    def out_channels(self, module: nn.LayerNorm) -> int:
        return module.normalized_shape[-1]

    def remap(self, module: nn.LayerNorm, side: str, index: torch.Tensor) -> dict[str, ParameterChange]:
        index = _check_index(index, self.out_channels(module), "layer norm")
        changes = {}
        for key, fill in (("weight", 1.0), ("bias", 0.0)):
            if getattr(module, key, None) is not None:
                changes[key] = replace_tensor(module, key, -1, index, fill)
        module.normalized_shape = (*module.normalized_shape[:-1], int(index.numel()))
        return changes

    def sizes_from_shapes(self, module: nn.LayerNorm, shapes: Mapping[str, torch.Size]) -> dict[str, int]:
        return {"out": int(shapes["weight"][-1])}


class PReLUHandler(LayerHandler):
    """``nn.PReLU`` with one slope per channel (a single shared slope has no channels)."""

    def out_channels(self, module: nn.PReLU) -> int:
        return module.num_parameters

    def remap(self, module: nn.PReLU, side: str, index: torch.Tensor) -> dict[str, ParameterChange]:
        if module.num_parameters == 1:
            return {}
        index = _check_index(index, module.num_parameters, "PReLU")
        change = replace_tensor(module, "weight", 0, index, 0.25)
        module.num_parameters = int(index.numel())
        return {"weight": change}

    def sizes_from_shapes(self, module: nn.PReLU, shapes: Mapping[str, torch.Size]) -> dict[str, int]:
        return {"out": int(shapes["weight"][0])}


class EmbeddingHandler(LayerHandler):
    """``nn.Embedding``: channels are the embedding dimension (the vocabulary never changes)."""

    def out_channels(self, module: nn.Embedding) -> int:
        return module.embedding_dim

    def remap(self, module: nn.Embedding, side: str, index: torch.Tensor) -> dict[str, ParameterChange]:
        index = _check_index(index, module.embedding_dim, "embedding")
        change = replace_tensor(module, "weight", 1, index)
        module.embedding_dim = int(index.numel())
        return {"weight": change}

    def sizes_from_shapes(self, module: nn.Embedding, shapes: Mapping[str, torch.Size]) -> dict[str, int]:
        return {"out": int(shapes["weight"][1])}


class MultiheadAttentionHandler(LayerHandler):
    """``nn.MultiheadAttention`` (packed q/k/v projection): channels are the embedding dimension.

    The embedding dimension is both the input and the output of the layer: the index map moves
    the columns of the packed in-projection and the out-projection's rows (the residual stream).
    The query, key and value rows, the out-projection's columns and ``bias_k``/``bias_v`` live
    inside the heads: they follow the same map head by head, so every head keeps only its own
    dimensions and all heads keep the same width (a removal that takes more channels from one
    head than from another is evened out inside the heads; growth adds the new dimensions at the
    end of every head). The new size must stay divisible by ``num_heads``.
    """

    def out_channels(self, module: nn.MultiheadAttention) -> int:
        return module.embed_dim

    def channel_step(self, module: nn.MultiheadAttention) -> int:
        return module.num_heads

    def validate(self, module: nn.MultiheadAttention, side: str, index: torch.Tensor) -> None:
        if not module._qkv_same_embed_dim:
            raise ValueError("growprune changes attention only with one packed in-projection (kdim = vdim = embed_dim)")
        if index.numel() % module.num_heads:
            raise ValueError(f"attention with {module.num_heads} heads cannot have embedding size {index.numel()}: "
                             f"channels must change in multiples of the head count")

    def remap(self, module: nn.MultiheadAttention, side: str, index: torch.Tensor) -> dict[str, ParameterChange]:
        if not module._qkv_same_embed_dim:
            raise ValueError("growprune changes attention only with one packed in-projection (kdim = vdim = embed_dim)")
        embed = module.embed_dim
        index = _check_index(index, embed, "attention embedding")
        size = int(index.numel())
        if size % module.num_heads:
            raise ValueError(f"attention with {module.num_heads} heads cannot have embedding size {size}: "
                             f"channels must change in multiples of the head count")
        inner = _per_head(index, embed, module.num_heads)
        packed = torch.cat([torch.where(inner >= 0, inner + part * embed, inner) for part in range(3)])
        changes = {"in_proj_weight": _replace_dims(module, "in_proj_weight", [packed, index])}
        if module.in_proj_bias is not None:
            changes["in_proj_bias"] = _replace_dims(module, "in_proj_bias", [packed])
        changes["out_proj.weight"] = _replace_dims(module.out_proj, "weight", [index, inner])
        if module.out_proj.bias is not None:
            changes["out_proj.bias"] = _replace_dims(module.out_proj, "bias", [index])
        for key in ("bias_k", "bias_v"):
            if getattr(module, key, None) is not None:
                changes[key] = replace_tensor(module, key, 2, inner)
        module.embed_dim = module.kdim = module.vdim = size
        module.head_dim = size // module.num_heads
        module.out_proj.in_features = module.out_proj.out_features = size
        return changes

    def sizes_from_shapes(self, module: nn.MultiheadAttention, shapes: Mapping[str, torch.Size]) -> dict[str, int]:
        return {"out": int(shapes["in_proj_weight"][1])}


def _per_head(index: torch.Tensor, embed: int, heads: int) -> torch.Tensor:
    """The map of the dimensions inside the heads for an embedding map ``index``: head by head.

    Each head keeps the dimensions of its own that ``index`` keeps (in order); a head left with
    too many drops its last ones, one left with too few takes back its own dropped dimensions
    (first ones first), then new ones. A removal that keeps equally many channels of every head
    gives ``index`` itself.
    """
    head_dim, width = embed // heads, index.numel() // heads
    old = index[index >= 0]
    pieces = []
    for head in range(heads):
        own = torch.arange(head * head_dim, (head + 1) * head_dim)
        kept = old[(old // head_dim) == head][:width]
        back = own[~torch.isin(own, kept)][: max(0, width - kept.numel())]
        chosen = torch.sort(torch.cat([kept, back])).values
        pieces += [chosen, torch.full((width - chosen.numel(),), NEW, dtype=torch.long)]
    return torch.cat(pieces).long()


def _replace_dims(module: nn.Module, name: str, indices: list[torch.Tensor]) -> ParameterChange:
    """Remap the first ``len(indices)`` dimensions of ``name`` at once (one change for all of them)."""
    old = getattr(module, name)
    value = old.detach()
    for dim, index in enumerate(indices):
        value = remapped(value, dim, index)
    set_tensor(module, name, value)
    return ParameterChange(old, [index.cpu().long() for index in indices] + [None] * (old.dim() - len(indices)))


# ------------------------------------------------------------------------------------ registry
_HANDLERS: dict[type, LayerHandler] = {}


def register_layer_handler(layer_type: type, handler: LayerHandler) -> None:
    """Use ``handler`` for ``layer_type`` and its subclasses (the most specific registration wins)."""
    if not isinstance(layer_type, type) or not issubclass(layer_type, nn.Module):
        raise TypeError(f"layer_type must be an nn.Module subclass, got {layer_type!r}")
    if not isinstance(handler, LayerHandler):
        raise TypeError(f"handler must be a LayerHandler, got {type(handler).__name__}")
    _HANDLERS[layer_type] = handler


def unregister_layer_handler(layer_type: type) -> None:
    """Forget the handler registered for exactly ``layer_type``."""
    _HANDLERS.pop(layer_type, None)


def handler_for(module: nn.Module) -> LayerHandler | None:
    """The handler of ``module``'s type (by method resolution order), or ``None``."""
    for cls in type(module).__mro__:
        if cls in _HANDLERS:
            return _HANDLERS[cls]
    return None


register_layer_handler(nn.Linear, LinearHandler())
register_layer_handler(nn.modules.conv._ConvNd, ConvHandler())
register_layer_handler(nn.modules.batchnorm._BatchNorm, NormHandler())
register_layer_handler(nn.modules.instancenorm._InstanceNorm, NormHandler())
register_layer_handler(nn.GroupNorm, NormHandler())
register_layer_handler(nn.LayerNorm, LayerNormHandler())
register_layer_handler(nn.PReLU, PReLUHandler())
register_layer_handler(nn.Embedding, EmbeddingHandler())
register_layer_handler(nn.MultiheadAttention, MultiheadAttentionHandler())


# ------------------------------------------------------------------------------ bare parameters
class ParameterHandler:
    """How a *bare* parameter changes: an ``nn.Parameter`` a module uses directly in ``forward``.

    ConvNeXt's layer scale (``CNBlock.layer_scale``, shape ``(C, 1, 1)``), a ViT's class token
    ``(1, 1, D)`` and position embedding ``(1, S, D)`` belong to no weight layer: DepGraph puts
    them in the channel group they touch, and growprune changes them like any layer, through an
    index map along their channel dimension (so optimizer state, masks, growth, the edit log and
    checkpoint resizing follow them).

    Args:
        dim: the channel dimension. ``None``: the only dimension whose size is the channel count
            DepGraph sees; a shape with two such dimensions (``(32, 32)``) is refused as ambiguous.
        fill: value of new entries (growth): a number, or ``"mean"`` for the mean of the existing
            entries along the channel dimension. The default 0 is neutral for additive parameters
            (token, position embedding). A multiplicative per-channel scale may take any value
            and still keep the function, since a new channel's input weights are zero and so is
            what the scale multiplies; ``"mean"`` puts the new channel on its peers' scale
            (for a fresh ConvNeXt: its initial 1e-6) so that it can learn once initialised.
        sync: called with the owner module after a change, to update attributes that mirror the
            size (e.g. ``VisionTransformer.hidden_dim``, which its ``forward`` reshapes by).
    """

    def __init__(self, dim: int | None = None, fill: float | str = 0.0,
                 sync: Callable[[nn.Module], None] | None = None):
        if isinstance(fill, str) and fill != "mean":
            raise ValueError(f"fill must be a number or 'mean', got {fill!r}")
        self.dim = dim
        self.fill = fill
        self.sync = sync

    def channel_dim(self, parameter: torch.Tensor, depgraph_dim: int | None, name: str) -> int:
        """The channel dimension of ``parameter`` (``depgraph_dim``: the one DepGraph indexed)."""
        if self.dim is not None:
            return self.dim % parameter.dim()
        if depgraph_dim is None:
            raise ValueError(f"bare parameter {name!r} of shape {tuple(parameter.shape)} has no channel dimension "
                             "(every dimension has size 1)")
        channels = parameter.shape[depgraph_dim]
        candidates = [dim for dim, size in enumerate(parameter.shape) if size == channels]
        if len(candidates) > 1:
            raise ValueError(
                f"bare parameter {name!r} of shape {tuple(parameter.shape)}: dimensions {candidates} all have "
                f"{channels} entries, so which one holds the channels is ambiguous; say it with "
                f"growprune.surgery.handlers.register_parameter_handler(<owner type>, {name.rpartition('.')[2]!r}, "
                "ParameterHandler(dim=...))"
            )
        return depgraph_dim % parameter.dim()

    def remap(self, owner: nn.Module, key: str, dim: int, index: torch.Tensor) -> ParameterChange:
        """Rebuild ``owner.<key>`` along ``dim`` through ``index`` (new entries: :attr:`fill`)."""
        old = getattr(owner, key)
        index = _check_index(index, old.shape[dim], f"bare parameter {key!r}")
        if self.fill == "mean":
            change = replace_tensor(owner, key, dim, index)
            shape = [1] * old.dim()
            shape[dim] = -1
            is_new = (index < 0).to(old.device).view(shape)
            mean = old.detach().mean(dim=dim, keepdim=True)
            set_tensor(owner, key, torch.where(is_new, mean, getattr(owner, key).detach()).contiguous())
        else:
            change = replace_tensor(owner, key, dim, index, float(self.fill))
        if self.sync is not None:
            self.sync(owner)
        return change

    def resize(self, owner: nn.Module, key: str, shape: Sequence[int], name: str) -> None:
        """Resize ``owner.<key>`` to a stored ``shape`` (one dimension may differ; values are loaded afterwards)."""
        current = tuple(getattr(owner, key).shape)
        shape = tuple(int(size) for size in shape)
        differ = [dim for dim, (a, b) in enumerate(zip(current, shape)) if a != b]
        if len(current) != len(shape) or len(differ) > 1 or (differ and self.dim is not None
                                                                 and differ[0] != self.dim % len(current)):
            raise ValueError(f"bare parameter {name!r}: cannot resize shape {current} to {shape} "
                             "(only its channel dimension may change)")
        if differ:
            self.remap(owner, key, differ[0], _grown_or_cut(current[differ[0]], shape[differ[0]]))


def _sync_vit_hidden_dim(owner: nn.Module) -> None:
    # torchvision's VisionTransformer reshapes the patch embedding by its own hidden_dim attribute
    owner.hidden_dim = int(owner.class_token.shape[-1])


_PARAMETER_HANDLERS: dict[tuple[type, str], ParameterHandler] = {}
DEFAULT_PARAMETER_HANDLER = ParameterHandler()
# torchvision's bare parameters, matched by class name so that growprune never imports torchvision
# itself (an owner of one of these types means torchvision is loaded already)
_TORCHVISION_PARAMETERS: dict[tuple[str, str], ParameterHandler] = {
    ("torchvision.models.convnext.CNBlock", "layer_scale"): ParameterHandler(dim=0, fill="mean"),
    ("torchvision.models.vision_transformer.VisionTransformer", "class_token"):
        ParameterHandler(dim=-1, fill=0.0, sync=_sync_vit_hidden_dim),
    ("torchvision.models.vision_transformer.Encoder", "pos_embedding"): ParameterHandler(dim=-1, fill=0.0),
}


def register_parameter_handler(owner_type: type, name: str, handler: ParameterHandler) -> None:
    """Use ``handler`` for the bare parameter ``name`` of ``owner_type`` modules (and subclasses)."""
    if not isinstance(owner_type, type) or not issubclass(owner_type, nn.Module):
        raise TypeError(f"owner_type must be an nn.Module subclass, got {owner_type!r}")
    if not isinstance(handler, ParameterHandler):
        raise TypeError(f"handler must be a ParameterHandler, got {type(handler).__name__}")
    _PARAMETER_HANDLERS[(owner_type, name)] = handler


def unregister_parameter_handler(owner_type: type, name: str) -> None:
    """Forget the handler registered for exactly ``owner_type`` and ``name``."""
    _PARAMETER_HANDLERS.pop((owner_type, name), None)


def registered_parameter_handler(owner: nn.Module, name: str) -> ParameterHandler | None:
    """The handler registered for bare parameter ``name`` of ``owner`` (by method resolution order), or ``None``."""
    for cls in type(owner).__mro__:
        handler = _PARAMETER_HANDLERS.get((cls, name)) or _TORCHVISION_PARAMETERS.get((f"{cls.__module__}.{cls.__qualname__}", name))
        if handler is not None:
            return handler
    return None


def parameter_handler_for(owner: nn.Module, name: str) -> ParameterHandler:
    """The handler of bare parameter ``name`` of ``owner``: the registered one, else the default (fill 0)."""
    return registered_parameter_handler(owner, name) or DEFAULT_PARAMETER_HANDLER


def bare_parameter_dims(model: nn.Module) -> list[tuple[nn.Parameter, int]]:
    """``(parameter, channel dimension)`` of every parameter of ``model`` whose handler names the dimension.

    Passed to DepGraph, so its channel indices refer to the same dimension growprune changes.
    """
    dims = []
    for owner in model.modules():
        for key, parameter in owner.named_parameters(recurse=False):
            handler = registered_parameter_handler(owner, key)
            if handler is not None and handler.dim is not None:
                dims.append((parameter, handler.dim % parameter.dim()))
    return dims
