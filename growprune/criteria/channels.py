"""Channel (neuron) criteria: one score per channel of a channel group, higher = more important.

They follow the one criterion interface of :mod:`growprune.criteria.base` (``prepare`` once per
action, then ``score_channels``). Scores are divided by their group's mean (``normalize=True``)
so that one global ranking across groups compares like with like. Subclass
:class:`ChannelCriterion` and implement :meth:`ChannelCriterion.raw_scores` to add a method.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Sequence

import torch
import torch.nn as nn
import torch_pruning as tp
from lightning.pytorch.utilities import rank_zero_warn

from growprune.criteria.base import Batch, Criterion
from growprune.modes import evaluating
from growprune.surgery.units import UnitEnd, UnitGraph, UnitTraceError, is_unit_layer


class ChannelCriterion(Criterion):
    """A criterion for channels: implement :meth:`raw_scores` (one score per channel of a group).

    :meth:`score_channels` checks each group's score count and, with ``normalize``, divides
    the scores by their group's mean, so one global ranking compares like with like.
    """

    granularities: ClassVar[tuple[str, ...]] = ("channels",)

    def __init__(self, normalize: bool = True):
        self.normalize = normalize

    def raw_scores(self, graph: Any, group: Any) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} must implement raw_scores()")

    def score(self, graph: Any, group: Any) -> torch.Tensor:
        """The (normalised) scores of one group."""
        scores = self.raw_scores(graph, group).detach().float().flatten().cpu()
        if scores.numel() != group.channels:
            raise ValueError(f"{type(self).__name__} gave {scores.numel()} scores for {group.channels} channels of {group.root!r}")
        if self.normalize and torch.isfinite(scores).all():
            scores = scores / scores.abs().mean().clamp_min(1e-12)
        return scores

    def score_channels(self, graph: Any, groups: Sequence[Any]) -> dict[str, torch.Tensor]:
        return {group.root: self.score(graph, group) for group in groups}


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

    def excluded_groups(self, graph: Any, groups: Sequence[Any]) -> set[str]:
        """Groups without a batch-norm layer: they get no finite score and stay whole."""
        return {group.root for group in groups if not any(
            isinstance(graph.model.get_submodule(name), nn.modules.batchnorm._BatchNorm) for name, _ in group.members)}

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
    """NNrelief's structured rule: the mean absolute output of each channel of the group's root
    layer on training batches, measured where the network sees it, times whether the channel still
    has outgoing connections. Channels that are always 0 (dead) or feed nothing score 0 and go first.

    "Where the network sees it" is the end of the root layer's unit-preserving chain
    (:class:`~growprune.surgery.units.UnitEnd`): after its batch norm, activation, dropout and
    pooling, that is the input of the layer that consumes it, or the last unit-preserving op before
    a residual add or a concatenation. The raw layer output is the wrong tensor: batch norm can
    make a channel always negative (0 after the ReLU) or flip an always-negative one positive.
    Activity is mean ``|x|`` over samples and positions (after a ReLU, ``|x| = x``), over all calls
    of a layer that runs more than once; every linear and conv layer (1-d, 2-d, 3-d) is measured.

    Fallback: when ``torch.fx`` cannot trace the model, the root layer's output is passed through
    the group's batch-norm layer(s) that run right after it and then a ReLU; a warning (once per
    criterion) names the reason. Those forward passes run at the first :meth:`score` call of the
    pruning step, when the groups are known.
    """

    requires_data = True

    def __init__(self, normalize: bool = True):
        super().__init__(normalize)
        self._activity: dict[str, torch.Tensor] = {}
        self._fallback_batches: list[Batch] | None = None  # untraceable model: measured at score time
        self._warned = False

    def prepare(self, model: nn.Module, batches: Sequence[Batch] | None) -> None:
        if not batches:
            raise ValueError("ActivityCriterion needs training batches, got none")
        self._activity, self._fallback_batches = {}, None
        try:
            graph = UnitGraph(model, batches[0][0][:2])
        except UnitTraceError as error:
            if not self._warned:
                self._warned = True
                rank_zero_warn(
                    f"ActivityCriterion: {error}; measuring each root layer's output through the group's batch "
                    "norm that runs right after it and a ReLU instead (other ops in between are not seen)"
                )
            self._fallback_batches = list(batches)
            return
        self._activity = _chain_end_activity(graph, batches)

    def raw_scores(self, graph: Any, group: Any) -> torch.Tensor:
        if self._fallback_batches is not None and group.root not in self._activity:
            # one pass over the batches for every group of the step; the batches are not kept after it
            groups = {other.root: other for other in graph.groups()}
            groups[group.root] = group
            self._activity.update(_hooked_activity(graph.model, self._fallback_batches, groups))
            self._fallback_batches = None
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


class _MeanAbs:
    """Running mean of |x| per unit and layer, over samples, positions and calls (float64 sums)."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}

    def add(self, name: str, per_unit: torch.Tensor) -> None:
        """``per_unit``: shape ``(units, entries)``, every entry of unit ``j`` in row ``j``."""
        total = per_unit.abs().sum(dim=1, dtype=torch.float64)
        self.sums[name] = self.sums[name] + total if name in self.sums else total
        self.counts[name] = self.counts.get(name, 0) + per_unit.shape[1]

    def means(self) -> dict[str, torch.Tensor]:
        return {name: (total / max(self.counts[name], 1)).float() for name, total in self.sums.items()}


def _chain_end_activity(graph: UnitGraph, batches: Sequence[Batch]) -> dict[str, torch.Tensor]:
    """Mean |x| per unit of every linear/conv layer, at the end of its unit-preserving chain."""
    watched: dict[str, list[tuple[str, UnitEnd]]] = {}  # node name -> (layer, how to read its units)
    for name, layer in graph.layers.items():
        if is_unit_layer(layer):
            for end in graph.ends(name):
                watched.setdefault(end.node, []).append((name, end))
    means = _MeanAbs()

    def record(node: str, value: torch.Tensor) -> None:
        for name, end in watched[node]:
            means.add(name, end.per_unit(value.detach()))

    for inputs, _ in batches:
        graph.run(inputs, watched, record)
    return means.means()


def _hooked_activity(model: nn.Module, batches: Sequence[Batch], groups: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Fallback without a traced graph: mean ReLU(batch norms(root output)) per channel of each
    group's root, with the group's batch-norm layers that run right after the root."""
    # which modules run right after each root: the call sequence of the leaf modules on a small batch
    names = {module: name for name, module in model.named_modules()}
    sequence: list[str] = []
    leaves = [module for module in model.modules() if next(module.children(), None) is None]
    handles = [leaf.register_forward_pre_hook(lambda module, args: sequence.append(names[module])) for leaf in leaves]
    try:
        with evaluating(model):
            model(batches[0][0][:2])
    finally:
        for handle in handles:
            handle.remove()
    norms: dict[str, list[nn.Module]] = {}
    for root, group in groups.items():
        members = {name for name, _ in group.members}
        norms[root] = []
        if root not in sequence:
            continue
        for name in sequence[sequence.index(root) + 1 :]:
            module = model.get_submodule(name)
            if name not in members or not isinstance(module, nn.modules.batchnorm._BatchNorm):
                break
            norms[root].append(module)

    means = _MeanAbs()

    def hook(root: str) -> Any:
        def record(module: nn.Module, args: Any, output: torch.Tensor) -> None:
            value = output.detach()
            for norm in norms[root]:
                value = norm(value)  # eval mode: running statistics, which stay untouched
            value = torch.relu(value)
            dim = value.dim() - 1 if isinstance(module, nn.Linear) else 1
            means.add(root, value.movedim(dim, 0).reshape(value.shape[dim], -1))

        return record

    roots = [root for root in groups if is_unit_layer(model.get_submodule(root))]
    handles = [model.get_submodule(root).register_forward_hook(hook(root)) for root in roots]
    try:
        with evaluating(model):
            for inputs, _ in batches:
                model(inputs)
    finally:
        for handle in handles:
            handle.remove()
    return means.means()
