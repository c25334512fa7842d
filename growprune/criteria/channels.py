"""Channel (neuron) criteria: one score per channel of a channel group, higher = more important.

Scores are divided by their group's mean (``normalize=True``) so that one global ranking across
groups compares like with like. Subclass :class:`ChannelCriterion` and implement
:meth:`ChannelCriterion.raw_scores` to add a method.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
import torch.nn as nn
import torch_pruning as tp

from growprune.criteria.base import Batch
from growprune.modes import evaluating


class ChannelCriterion:
    """Scores the channels of a :class:`~growprune.surgery.channels.ChannelGroup`.

    Attributes:
        requires_data: the strategy must collect training batches (``prepare`` receives them).
        requires_grad: gradients of the loss on those batches must be in ``.grad`` when scoring.
    """

    requires_data: bool = False
    requires_grad: bool = False

    def __init__(self, normalize: bool = True):
        self.normalize = normalize

    def prepare(self, model: nn.Module, batches: Sequence[Batch] | None) -> None:
        """Called once per pruning step before any group is scored (e.g. to record activations)."""

    def raw_scores(self, graph: Any, group: Any) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} must implement raw_scores()")

    def score(self, graph: Any, group: Any) -> torch.Tensor:
        scores = self.raw_scores(graph, group).detach().float().flatten()
        if scores.numel() != group.channels:
            raise ValueError(f"{type(self).__name__} gave {scores.numel()} scores for {group.channels} channels of {group.root!r}")
        if self.normalize and torch.isfinite(scores).all():
            scores = scores / scores.abs().mean().clamp_min(1e-12)
        return scores

    def __repr__(self) -> str:
        arguments = ", ".join(f"{key}={value!r}" for key, value in vars(self).items() if not key.startswith("_"))
        return f"{type(self).__name__}({arguments})"


class FilterNormCriterion(ChannelCriterion):
    """Lp norm of each channel's weights over every layer of the group (p=1: Li et al. 2017's L1)."""

    def __init__(self, p: int = 1, normalize: bool = True):
        super().__init__(normalize)
        if p not in (1, 2):
            raise ValueError(f"p must be 1 or 2, got {p}")
        self.p = p
        self._importance = tp.importance.GroupMagnitudeImportance(p=p, group_reduction="mean", normalizer=None)

    def raw_scores(self, graph: Any, group: Any) -> torch.Tensor:
        return self._importance(graph.tp_group(group.root))


class BNScaleCriterion(ChannelCriterion):
    """|gamma| of the batch-norm layers in the group (network slimming, Liu et al. 2017).

    Groups without a batch-norm layer (e.g. hidden linear layers) get infinite scores: the
    strategy leaves them whole rather than guess a comparable score.
    """

    def __init__(self, normalize: bool = False):
        super().__init__(normalize)
        self._importance = tp.importance.BNScaleImportance(group_reduction="mean", normalizer=None)

    def raw_scores(self, graph: Any, group: Any) -> torch.Tensor:
        scores = self._importance(graph.tp_group(group.root))
        if scores is None:
            return torch.full((group.channels,), math.inf)
        return scores


class TaylorCriterion(ChannelCriterion):
    """First-order Taylor importance |sum w * dL/dw| per channel (Molchanov et al. 2019)."""

    requires_data = True
    requires_grad = True

    def __init__(self, normalize: bool = True):
        super().__init__(normalize)
        self._importance = tp.importance.GroupTaylorImportance(group_reduction="mean", normalizer=None)

    def raw_scores(self, graph: Any, group: Any) -> torch.Tensor:
        return self._importance(graph.tp_group(group.root))


class RandomChannelCriterion(ChannelCriterion):
    """Uniform random scores (the baseline), reproducible from ``seed``."""

    def __init__(self, seed: int = 0):
        super().__init__(normalize=False)
        self.seed = seed
        self._generator = torch.Generator().manual_seed(seed)

    def raw_scores(self, graph: Any, group: Any) -> torch.Tensor:
        return torch.rand(group.channels, generator=self._generator)


class ActivityCriterion(ChannelCriterion):
    """Mean post-ReLU output of each channel of the group's root layer on training batches, times
    whether the channel still has outgoing connections: NNrelief's structured rule scores units with
    zero mean activity or no outgoing connection 0, so they go first."""

    requires_data = True

    def __init__(self, normalize: bool = True):
        super().__init__(normalize)
        self._activity: dict[str, torch.Tensor] = {}

    def prepare(self, model: nn.Module, batches: Sequence[Batch] | None) -> None:
        if not batches:
            raise ValueError("ActivityCriterion needs training batches, got none")
        sums: dict[str, torch.Tensor] = {}
        count = 0
        names = {module: name for name, module in model.named_modules()}

        def record(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
            dims = [d for d in range(output.dim()) if d != 1]
            value = torch.relu(output.detach()).mean(dim=dims) * output.shape[0]
            sums[names[module]] = sums.get(names[module], 0) + value

        hooks = [m.register_forward_hook(record) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear, nn.Conv1d))]
        try:
            with evaluating(model):
                for inputs, _ in batches:
                    model(inputs)
                    count += inputs.shape[0]
        finally:
            for hook in hooks:
                hook.remove()
        self._activity = {name: value / count for name, value in sums.items()}

    def raw_scores(self, graph: Any, group: Any) -> torch.Tensor:
        if group.root not in self._activity:
            raise ValueError(f"no activity was recorded for {group.root!r}")
        activity = self._activity[group.root].cpu()
        consumers = [name for name, side in group.members if side == "in"]
        connected = torch.ones_like(activity, dtype=torch.bool)
        for name in consumers:
            weight = graph.model.get_submodule(name).weight.detach().cpu()
            if isinstance(graph.model.get_submodule(name), nn.Linear) and weight.shape[1] != activity.numel():
                per_channel = weight.abs().sum(0).view(activity.numel(), -1).sum(1)
            else:
                per_channel = weight.abs().transpose(0, 1).flatten(1).sum(1) if weight.shape[1] == activity.numel() else None
            if per_channel is not None:
                connected &= per_channel > 0
        return activity * connected
