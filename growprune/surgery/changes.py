"""How a changed tensor relates to the one it replaced: per-dimension index maps with new entries.

Every structural edit (removing or adding channels, resizing on reload) replaces parameters and
buffers. What training depends on (optimizer state, masks, rewind snapshots) must follow each
entry to its new place. A :class:`ParameterChange` says where every entry of the new tensor came
from: per dimension, a 1-D map ``new index -> old index``, where :data:`NEW` (-1) marks an entry
that did not exist before. Removing channels keeps a subset (``[0, 2, 3]``), adding appends
(``[0, 1, 2, NEW, NEW]``) or inserts in the middle (``[0, 1, NEW, 2, 3]``, a concatenation).

Grouped convolutions keep a separate input slice per group, so their input map differs from group
to group and no single per-dimension map describes it; such a change carries a ``flat`` map over
all entries instead (new flat position -> old flat position or :data:`NEW`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

#: Marks an entry of an index map that is new (it has no old counterpart).
NEW = -1


@dataclass
class ParameterChange:
    """Where each entry of a new parameter (or buffer) came from in ``old``.

    Attributes:
        old: the tensor that was replaced (its values and identity: optimizer state is keyed by it).
        index: per dimension, ``None`` (unchanged) or a LongTensor ``new index -> old index`` with
            :data:`NEW` for new entries. ``None`` for the whole list: nothing moved.
        flat: alternatively, a LongTensor over all new entries (row-major) ``-> old flat index``
            or :data:`NEW`; used when no per-dimension map exists (grouped convolutions).
    """

    old: torch.Tensor
    index: Sequence[torch.Tensor | None] | None = None
    flat: torch.Tensor | None = None

    # The old name of this field; kept so code written against it reads naturally.
    @property
    def kept(self) -> Sequence[torch.Tensor | None] | None:
        return self.index

    def new_shape(self) -> torch.Size:
        """Shape of the new tensor implied by the maps (the flat map needs the new tensor itself)."""
        if self.flat is not None:
            raise ValueError("a flat change does not determine the new shape")
        dims = list(self.old.shape)
        for dim, index in enumerate(self.index or []):
            if index is not None:
                dims[dim] = int(index.numel())
        return torch.Size(dims)

    def flat_index(self, new_shape: Sequence[int]) -> torch.Tensor:
        """The change as one map over all new entries (row-major), for composing with flat changes."""
        if self.flat is not None:
            return self.flat
        old_strides = torch.tensor(_strides(self.old.shape), dtype=torch.long)
        grids = []
        for dim, size in enumerate(new_shape):
            index = self.index[dim] if self.index and dim < len(self.index) else None
            grids.append(torch.arange(size, dtype=torch.long) if index is None else index.cpu().long())
        mesh = torch.meshgrid(*grids, indexing="ij") if grids else []
        flat = torch.zeros(tuple(new_shape), dtype=torch.long)
        new = torch.zeros(tuple(new_shape), dtype=torch.bool)
        for dim, values in enumerate(mesh):
            flat += values.clamp_min(0) * old_strides[dim]
            new |= values < 0
        flat[new] = NEW
        return flat.reshape(-1)

    def then(self, later: "ParameterChange", middle_shape: Sequence[int], new_shape: Sequence[int]) -> "ParameterChange":
        """This change followed by ``later`` (whose ``old`` is this change's result), as one change from ``self.old``."""
        if self.flat is None and later.flat is None:
            composed: list[torch.Tensor | None] = []
            for dim in range(len(new_shape)):
                first = self.index[dim] if self.index and dim < len(self.index) else None
                second = later.index[dim] if later.index and dim < len(later.index) else None
                composed.append(_compose(first, second))
            return ParameterChange(self.old, composed)
        first = self.flat_index(middle_shape)
        second = later.flat_index(new_shape)
        return ParameterChange(self.old, flat=_compose(first, second))

    def carry(self, value: torch.Tensor, new_shape: Sequence[int], fill: float | torch.Tensor = 0.0) -> torch.Tensor:
        """``value`` (shaped like ``old``, e.g. a momentum buffer) moved to the new layout.

        New entries take ``fill``: a number, or a tensor of the new shape to take them from.
        """
        new_shape = tuple(int(size) for size in new_shape)
        if self.flat is not None:
            result = _filled(fill, new_shape, value)
            flat = self.flat.to(value.device)
            present = flat >= 0
            result.view(-1)[present] = value.reshape(-1)[flat[present]]
            return result
        if value.shape != self.old.shape:
            raise ValueError(f"cannot carry a tensor of shape {tuple(value.shape)} through a change of a {tuple(self.old.shape)} tensor")
        moved = value
        keep: torch.Tensor | None = None  # broadcastable: True where an entry has an old value
        for dim in range(value.dim()):
            index = self.index[dim] if self.index and dim < len(self.index) else None
            if index is None:
                if moved.shape[dim] != new_shape[dim]:
                    raise ValueError(f"dimension {dim} changed size ({moved.shape[dim]} -> {new_shape[dim]}) without an index map")
                continue
            index = index.to(value.device)
            moved = moved.index_select(dim, index.clamp_min(0))
            is_new = index < 0
            if bool(is_new.any()):
                shape = [1] * len(new_shape)
                shape[dim] = -1
                old_here = (~is_new).view(shape)
                keep = old_here if keep is None else keep & old_here
        if keep is None:  # nothing new (removal): the gathered values are the result
            return moved.contiguous()
        return torch.where(keep, moved, _filled(fill, new_shape, value))


def _filled(fill: float | torch.Tensor, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    if isinstance(fill, torch.Tensor):
        return fill.detach().to(device=like.device, dtype=like.dtype).clone().reshape(shape)
    return torch.full(shape, fill, dtype=like.dtype, device=like.device)


def _strides(shape: Sequence[int]) -> list[int]:
    strides, step = [], 1
    for size in reversed(list(shape)):
        strides.append(step)
        step *= int(size)
    return list(reversed(strides))


def _compose(first: torch.Tensor | None, second: torch.Tensor | None) -> torch.Tensor | None:
    """``first`` then ``second`` (both new -> old maps) as one map; NEW stays NEW."""
    if second is None:
        return first
    if first is None:
        return second
    second = second.to(first.device)
    composed = first[second.clamp_min(0)]
    return torch.where(second < 0, torch.full_like(composed, NEW), composed)


def kept_index(size: int, removed: Sequence[int], device: torch.device | None = None) -> torch.Tensor:
    """The map that keeps every index of ``range(size)`` except ``removed``, in order."""
    drop = torch.zeros(size, dtype=torch.bool)
    if len(removed):
        drop[torch.as_tensor(list(removed), dtype=torch.long)] = True
    return torch.arange(size, dtype=torch.long)[~drop].to(device) if device is not None else torch.arange(size)[~drop]


def inserted_index(size: int, after: int, count: int) -> torch.Tensor:
    """The map that inserts ``count`` new entries after old index ``after`` (``-1``: at the front)."""
    old = torch.arange(size, dtype=torch.long)
    return torch.cat([old[: after + 1], torch.full((count,), NEW, dtype=torch.long), old[after + 1 :]])
