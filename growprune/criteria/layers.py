"""Layer and cell criteria: one score per removable layer or cell, higher = more important.

A strategy that removes layers or cells (:class:`~growprune.strategies.LayerPruning`,
:class:`~growprune.strategies.CellPruning`) asks :func:`~growprune.surgery.discovery.permissible_elements`
for the removable candidates, then calls ``prepare(model, batches)`` and
``score_layers(model, candidates, batches)`` once per action and removes the lowest-scoring ones.
To add a method, subclass :class:`LayerCriterion` and implement :meth:`LayerCriterion.score_layers`;
name the class in a YAML config with ``class_path``.

* :class:`BlockInfluenceCriterion`: ``1 - cos(input, output)`` of the element on data, averaged over
  samples (ShortGPT's block influence): an element whose output points where its input did changes
  little and goes first.
* :class:`LayerWeightCriterion`: the mean ``|w|^p`` of the element's linear/convolution weights, to
  the power ``1/p`` (normalised per parameter, so wide and narrow layers compare): data-free.
"""

from __future__ import annotations

from typing import Any, ClassVar, Sequence

import torch
import torch.nn as nn

from growprune.criteria.base import Batch, Criterion
from growprune.modes import evaluating
from growprune.surgery.discovery import Element, is_weight_layer


class LayerCriterion(Criterion):
    """A criterion for whole layers or cells: implement :meth:`score_layers`.

    ``candidates`` are :class:`~growprune.surgery.discovery.Element` records: ``path``, ``members``
    (the modules that make it, in order), ``kind`` (``"layer"`` or ``"cell"``) and shapes.
    """

    granularities: ClassVar[tuple[str, ...]] = ("layers", "cells")

    def score_layers(self, model: nn.Module, candidates: Sequence[Element], batches: Sequence[Batch] | None) -> dict[str, float]:
        """One score per candidate, by its ``path`` (higher = more important)."""
        raise NotImplementedError(f"{type(self).__name__} must implement score_layers()")

    def score(self, model: nn.Module, candidates: Sequence[Element], batches: Sequence[Batch] | None = None) -> dict[str, float]:
        """Shortcut outside strategies: :meth:`prepare` then :meth:`score_layers`, with the result checked."""
        self.prepare(model, batches)
        scores = self.score_layers(model, candidates, batches)
        missing = [candidate.path for candidate in candidates if candidate.path not in scores]
        if missing:
            raise ValueError(f"{type(self).__name__} gave no score for {missing[0]!r}")
        return scores


class BlockInfluenceCriterion(LayerCriterion):
    """Block influence: mean over samples of ``1 - cos(x, f(x))`` (input and output flattened per sample).

    Measured in eval mode (batch-norm statistics stay) on the scoring batches; one forward pass per
    batch scores every candidate at once. A sample whose input or output is all zero counts as
    cosine 0 (influence 1): nothing is known about its direction, so it does not argue for removal.
    """

    requires_data = True

    def score_layers(self, model: nn.Module, candidates: Sequence[Element], batches: Sequence[Batch] | None) -> dict[str, float]:
        if not batches:
            raise ValueError(f"{type(self).__name__} needs training batches, got none")
        totals = {candidate.path: 0.0 for candidate in candidates}
        counts = {candidate.path: 0 for candidate in candidates}
        entering: dict[str, torch.Tensor] = {}
        handles = []

        def on_input(path: str):
            def hook(_: nn.Module, args: tuple) -> None:
                entering[path] = args[0].detach()
            return hook

        def on_output(path: str):
            def hook(_: nn.Module, args: tuple, output: Any) -> None:
                x = entering.pop(path).flatten(1).double()
                y = output.detach().flatten(1).double()
                cosine = torch.nn.functional.cosine_similarity(x, y, dim=1, eps=1e-30)
                degenerate = (x.norm(dim=1) == 0) | (y.norm(dim=1) == 0)
                cosine = torch.where(degenerate, torch.zeros_like(cosine), cosine)
                totals[path] += float((1 - cosine).sum())
                counts[path] += int(x.shape[0])
            return hook

        try:
            for candidate in candidates:
                first, last = model.get_submodule(candidate.members[0]), model.get_submodule(candidate.members[-1])
                handles.append(first.register_forward_pre_hook(on_input(candidate.path)))
                handles.append(last.register_forward_hook(on_output(candidate.path)))
            with evaluating(model):
                for inputs, _ in batches:
                    model(inputs)
        finally:
            for handle in handles:
                handle.remove()
        never = [path for path, count in counts.items() if count == 0]
        if never:
            raise ValueError(f"{type(self).__name__}: {never[0]!r} did not run on the scoring batches")
        return {path: totals[path] / counts[path] for path in totals}


class LayerWeightCriterion(LayerCriterion):
    """Aggregated weight importance: ``(mean |w|^p)^(1/p)`` over the weights of the element's
    linear and convolution layers (``p=1``: mean magnitude; ``p=2``: root mean square). Data-free.

    A zero-initialised residual cell scores by its (random) convolution weights, not by its zero
    last norm: use :class:`BlockInfluenceCriterion` to see that it does nothing yet.
    """

    def __init__(self, p: float = 1.0):
        if not isinstance(p, (int, float)) or isinstance(p, bool) or p <= 0:
            raise ValueError(f"p must be a number > 0, got {p!r}")
        self.p = float(p)

    def score_layers(self, model: nn.Module, candidates: Sequence[Element], batches: Sequence[Batch] | None) -> dict[str, float]:
        scores = {}
        for candidate in candidates:
            weights = [module.weight.detach() for member in candidate.members
                       for module in model.get_submodule(member).modules() if is_weight_layer(module)]
            if not weights:
                raise ValueError(f"{type(self).__name__}: {candidate.path!r} has no linear or convolution weights to score")
            total = sum(float(w.abs().double().pow(self.p).sum()) for w in weights)
            count = sum(w.numel() for w in weights)
            scores[candidate.path] = (total / count) ** (1 / self.p)
        return scores
