"""Data-free and gradient criteria for single weights: magnitude, random, SNIP-style saliency."""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from growprune.criteria.base import Batch, WeightCriterion
from growprune.modes import evaluating


class MagnitudeCriterion(WeightCriterion):
    """|w| (Han et al. 2015). Combine with ``scope="layer"`` or ``scope="global"`` in the strategy."""

    def score_layer(self, name: str, layer: nn.Module) -> torch.Tensor:
        return layer.weight.detach().abs()


class RandomCriterion(WeightCriterion):
    """Uniform random scores, for weights or channels: the baseline every pruning paper should beat.

    Args:
        seed: seed of the scores; each call draws new scores from the same stream, so every rank
            of a distributed run (and every rerun) prunes the same weights.
    """

    granularities = ("weights", "channels")

    def __init__(self, seed: int = 0):
        self.seed = seed
        self._generator = torch.Generator().manual_seed(seed)

    def score_layer(self, name: str, layer: nn.Module) -> torch.Tensor:
        scores = torch.rand(layer.weight.shape, generator=self._generator)
        return scores.to(layer.weight.device)

    def score_channels(self, graph: Any, groups: Sequence[Any]) -> dict[str, torch.Tensor]:
        return {group.root: torch.rand(group.channels, generator=self._generator) for group in groups}


class GradientCriterion(WeightCriterion):
    """Connection saliency |w * dL/dw| summed over training batches (SNIP, Lee et al. 2019).

    The forward passes run in eval mode (batch-norm statistics are left untouched) and use
    ``torch.autograd.grad``, so the parameters' ``.grad`` (e.g. gradients being accumulated under
    ``accumulate_grad_batches``) are never touched.
    """

    requires_data = True

    def prepare(self, model: nn.Module, batches: Sequence[Batch] | None) -> None:
        super().prepare(model, batches)
        self._batches = list(batches or [])

    def score_weights(self, model: nn.Module, layers: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
        batches = getattr(self, "_batches", None)
        if not batches:
            raise ValueError("GradientCriterion needs training batches to score weights: call prepare(model, batches) first")
        try:
            return self._saliency(model, layers, batches)
        finally:
            self._batches = []  # do not keep the batches (memory) beyond this action

    @staticmethod
    def _saliency(model: nn.Module, layers: dict[str, nn.Module], batches: Sequence[Batch]) -> dict[str, torch.Tensor]:
        weights = {name: layer.weight for name, layer in layers.items()}
        totals = {name: torch.zeros_like(w) for name, w in weights.items()}
        # autograd.grad leaves .grad alone; frozen weights are scored too, then frozen again
        with evaluating(model, gradients=True):
            for weight in weights.values():
                weight.requires_grad_(True)
            for inputs, targets in batches:
                gradients = torch.autograd.grad(F.cross_entropy(model(inputs), targets), list(weights.values()), allow_unused=True)
                for (name, weight), gradient in zip(weights.items(), gradients):
                    if gradient is not None:
                        totals[name] += (weight.detach() * gradient).abs()
        return totals
