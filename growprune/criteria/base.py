"""The criterion interface: one base class that scores candidates, higher = more important.

Every criterion goes through the same two calls per action of a strategy:

1. :meth:`Criterion.prepare` ``(model, batches)``: once, with the scoring batches (``None`` unless
   ``requires_data``). When ``requires_grad`` is set, the gradients of the loss on those batches
   are in each parameter's ``.grad`` during ``prepare`` and scoring (the strategy computes them
   with :func:`growprune.scoring.loss_gradients` and puts the training gradients back afterwards).
2. a score call for the granularity the strategy works at:

   * :meth:`Criterion.score_weights` ``(model, layers)``: one score per weight of each layer
     (unstructured pruning and regrowth);
   * :meth:`Criterion.score_channels` ``(graph, groups)``: one score per channel of each channel
     group (structured pruning and growth).

A criterion says which granularities it serves in ``granularities``; a strategy refuses one that
does not serve its own, before training. To add a method, subclass :class:`WeightCriterion` and
implement :meth:`WeightCriterion.score_layer`, or subclass
:class:`~growprune.criteria.channels.ChannelCriterion` and implement ``raw_scores``, or subclass
:class:`Criterion` directly for a criterion that serves both; name the class in a YAML config
with ``class_path``.
"""

from __future__ import annotations

from typing import Any, ClassVar, Sequence

import torch
import torch.nn as nn

Batch = tuple[torch.Tensor, torch.Tensor]

GRANULARITIES = ("weights", "channels")


class Criterion:
    """Base of every importance criterion (see the module docstring for the call order).

    Attributes:
        requires_data: the strategy draws scoring batches and passes them to :meth:`prepare`.
        requires_grad: the loss gradients on those batches are in ``.grad`` while scoring.
        granularities: what the criterion scores: ``"weights"`` and/or ``"channels"``.
    """

    requires_data: bool = False
    requires_grad: bool = False
    granularities: ClassVar[tuple[str, ...]] = ()

    def prepare(self, model: nn.Module, batches: Sequence[Batch] | None) -> None:
        """Called once per action before scoring (record statistics here); checks data is there."""
        if self.requires_data and not batches:
            raise ValueError(f"{type(self).__name__} needs training batches, got none")

    def supports(self, granularity: str) -> bool:
        return granularity in self.granularities

    def score_weights(self, model: nn.Module, layers: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
        """A score tensor of each layer's ``weight`` shape, by layer name."""
        raise TypeError(f"{type(self).__name__} does not score single weights")

    def score_channels(self, graph: Any, groups: Sequence[Any]) -> dict[str, torch.Tensor]:
        """One score per channel of each :class:`~growprune.surgery.channels.ChannelGroup`, by root name."""
        raise TypeError(f"{type(self).__name__} does not score channels")

    def excluded_groups(self, graph: Any, groups: Sequence[Any]) -> set[str]:
        """Roots of groups this criterion never scores finitely (they stay whole); known before data."""
        return set()

    def __repr__(self) -> str:
        arguments = ", ".join(f"{key}={value!r}" for key, value in vars(self).items() if not key.startswith("_"))
        return f"{type(self).__name__}({arguments})"


class WeightCriterion(Criterion):
    """A criterion for single weights: implement :meth:`score_layer` (data-free) or
    :meth:`Criterion.prepare` plus :meth:`score_layer` (data-driven)."""

    granularities: ClassVar[tuple[str, ...]] = ("weights",)

    def score_weights(self, model: nn.Module, layers: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
        return {name: self.score_layer(name, layer) for name, layer in layers.items()}

    def score_layer(self, name: str, layer: nn.Module) -> torch.Tensor:
        """Score one layer's weights (higher = more important), a tensor of ``layer.weight``'s shape."""
        raise NotImplementedError(f"{type(self).__name__} must implement score_layer() or score_weights()")

    def score(self, model: nn.Module, layers: dict[str, nn.Module], batches: Sequence[Batch] | None = None) -> dict[str, torch.Tensor]:
        """Shortcut outside strategies: :meth:`prepare` then :meth:`score_weights`."""
        self.prepare(model, batches)
        return self.score_weights(model, layers)
