"""Structured (neuron/channel) pruning: remove whole units and channels, so the network really shrinks."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn as nn
import torch.nn.functional as F

from lightning.pytorch.utilities import rank_zero_warn

from growprune.criteria.channels import ChannelCriterion, FilterNormCriterion
from growprune.metrics import count_parameters, dense_flops, layer_flops
from growprune.modes import evaluating
from growprune.schedules import Schedule
from growprune.strategies.base import Strategy, broadcast_from_rank_zero, scoring_batches_for
from growprune.strategies.unstructured import check_prune_amounts
from growprune.surgery.channels import ChannelGraph, ChannelGroup
from growprune.surgery.optimizer import repair_training

TARGETS = ("channels", "params", "flops")
SCOPES = ("global", "layer")
COSTS = (None, "latency", "flops", "params")


@dataclass
class _Layer:
    """Cost of one layer and the groups that own its output and input channels."""

    flops: float
    weight: int
    other: int
    out_root: str | None
    in_root: str | None
    depthwise: bool


class StructuredPruning(Strategy):
    """Remove the lowest-scoring channels/units of every prunable group, on a schedule.

    The schedule's amount is the fraction of the ORIGINAL network (as the strategy first saw it,
    kept in checkpoints across resumes) to remove, measured in
    ``target`` units: ``"channels"`` (prunable channels), ``"params"`` (all parameters) or
    ``"flops"`` (dense FLOPs; 0.5 halves them). Global ranking (default) compares normalised scores
    across groups and picks how many channels each loses so the target is met (within one
    channel's cost; FLOPs are estimated exactly for convolutions and linear layers, then measured).

    Args:
        schedule: when to prune and how much (fractions in [0, 1)).
        criterion: channel scores (default: L1 filter norm). Any ``ChannelCriterion``, yours too.
        target: ``"channels"``, ``"params"`` or ``"flops"``.
        scope: ``"global"`` (one ranking) or ``"layer"`` (every group loses the same fraction).
        skip: names of layers whose channels must stay (the output layer always stays).
        min_channels: channels every group keeps at least (never removes a whole layer).
        round_to: keep channel counts at multiples of this (e.g. 8) so kernels run fast; ``None``: any.
        scoring_batches: training batches for data-driven criteria (default 8 when needed).
        cost: global ranking by importance per cost: ``None`` (default) ranks by normalised score
            alone; ``"latency"`` divides each group's scores by its channels' share of the measured
            batch-1 forward time of its layers (so slow, weight-bound layers give up channels
            first); ``"flops"`` / ``"params"`` use their share of FLOPs or parameters instead.
            Combine with ``max_fraction``: alone, cost-aware ranking empties whole layers.
        max_fraction: the largest fraction of a group's ORIGINAL channels global ranking may remove
            (per-layer ceiling, like Torch-Pruning's ``max_pruning_ratio``); 1.0: no ceiling.
        name: metric prefix and edit-log key.
        verbose: print a line after each pruning step.
    """

    def __init__(
        self,
        schedule: Schedule,
        criterion: ChannelCriterion | None = None,
        target: str = "channels",
        scope: str = "global",
        skip: list[str] | None = None,
        min_channels: int = 1,
        round_to: int | None = None,
        scoring_batches: int | None = None,
        cost: str | None = None,
        max_fraction: float = 1.0,
        name: str | None = None,
        verbose: bool = True,
    ):
        criterion = criterion if criterion is not None else FilterNormCriterion(p=1)
        if cost not in COSTS:
            raise ValueError(f"cost must be one of {COSTS}, got {cost!r}")
        if not 0.0 < max_fraction <= 1.0:
            raise ValueError(f"max_fraction must lie in (0, 1], got {max_fraction}")
        self.cost = cost
        self.max_fraction = max_fraction
        if not isinstance(criterion, ChannelCriterion):
            raise TypeError(f"criterion must be a ChannelCriterion, got {type(criterion).__name__}")
        super().__init__(schedule, name=name, scoring_batches=scoring_batches_for(criterion, scoring_batches), verbose=verbose)
        check_prune_amounts(schedule)
        if target not in TARGETS:
            raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
        if scope not in SCOPES:
            raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
        if min_channels < 1:
            raise ValueError(f"min_channels must be >= 1 (a layer is never removed whole), got {min_channels}")
        if round_to is not None and round_to < 1:
            raise ValueError(f"round_to must be >= 1, got {round_to}")
        self.criterion = criterion
        self.target = target
        self.scope = scope
        self.skip = list(skip or [])
        self.min_channels = min_channels
        self.round_to = round_to
        self.graph: ChannelGraph | None = None
        self.original: dict[str, Any] = {}

    # ------------------------------------------------------------------------------- set-up
    def _example(self, pl_module: Any) -> torch.Tensor:
        if pl_module.input_shape is None:
            raise ValueError(f"{self.name}: structured pruning needs the module's input_shape")
        return torch.zeros(1, *pl_module.input_shape, device=pl_module.device)

    def check(self, trainer: pl.Trainer, pl_module: Any) -> None:
        self.graph = ChannelGraph(pl_module.model, self._example(pl_module), self.skip)
        groups = self.graph.groups()
        if not groups:
            raise ValueError(f"{self.name}: the model has no prunable channel group")
        if not self.original:
            self.original = {
                "channels": {group.root: group.channels for group in groups},
                "params": count_parameters(pl_module.model),
                "flops": dense_flops(pl_module.model, pl_module.input_shape),
            }
        final = self.schedule.final_target
        if self.scope == "layer" and self.target == "channels":
            for group in groups:
                if round((1 - final) * self.original["channels"][group.root]) < self.min_channels:
                    raise ValueError(f"{self.name}: removing {final:.0%} of the channels of {group.root!r} would remove the whole layer")
        reachable = self._achieved(pl_module, self._layers(pl_module), groups,
                                   {g.root: g.channels - self._kept_count(self.min_channels, g.channels) for g in groups})
        if final > reachable + 1e-9:
            raise ValueError(
                f"{self.name}: a {self.target} reduction of {final:.1%} is not reachable; keeping {self.min_channels} "
                f"channel(s) per group (and skipped layers whole) removes at most {reachable:.1%}"
            )

    # ------------------------------------------------------------------------------ planning
    def _kept_count(self, kept: int, channels: int) -> int:
        kept = max(kept, self.min_channels)
        if self.round_to:
            kept = min(channels, math.ceil(kept / self.round_to) * self.round_to)
        return min(kept, channels)

    def _layers(self, pl_module: Any) -> dict[str, _Layer]:
        """Per-layer costs now, keyed by layer name; ``""`` holds the totals (params, FLOPs)."""
        assert self.graph is not None
        per_layer = layer_flops(pl_module.model, pl_module.input_shape)
        owners: dict[str, dict[str, str]] = {}
        for group in self.graph.groups():
            for layer, side in group.members:
                owners.setdefault(layer, {})[side] = group.root
        layers = {}
        for name, module in pl_module.model.named_modules():
            parameters = list(module.named_parameters(recurse=False))
            if not parameters:
                continue
            weight = sum(p.numel() for key, p in parameters if key == "weight" and p.dim() >= 2)
            other = sum(p.numel() for key, p in parameters) - weight
            depthwise = isinstance(module, nn.modules.conv._ConvNd) and module.groups > 1 and module.groups == module.out_channels
            layers[name] = _Layer(per_layer.get(name, 0.0), weight, other, owners.get(name, {}).get("out"),
                                  owners.get(name, {}).get("in"), depthwise)
        layers[""] = _Layer(float(per_layer[""]), count_parameters(pl_module.model), 0, None, None, False)
        return layers

    def _achieved(self, pl_module: Any, layers: dict[str, _Layer], groups: list[ChannelGroup], removed: dict[str, int]) -> float:
        """Estimated fraction of the original network gone (in target units) after removing ``removed``."""
        if self.target == "channels":
            current = sum(group.channels for group in groups)
            total = sum(self.original["channels"].values())
            return (total - current + sum(removed.values())) / total
        kept = {group.root: (group.channels - removed.get(group.root, 0)) / group.channels for group in groups}
        params, flops = float(layers[""].weight), layers[""].flops
        for name, layer in layers.items():
            if not name:
                continue
            out_ratio = kept.get(layer.out_root, 1.0)
            in_ratio = 1.0 if layer.depthwise else kept.get(layer.in_root, 1.0)
            params -= layer.weight * (1 - out_ratio * in_ratio) + layer.other * (1 - out_ratio)
            flops -= layer.flops * (1 - out_ratio * in_ratio)
        if self.target == "params":
            return 1 - params / self.original["params"]
        return 1 - flops / self.original["flops"]

    def _layer_times(self, pl_module: Any, repeats: int = 7) -> dict[str, float]:
        """Median batch-1 forward time of every layer with parameters (seconds), by forward hooks."""
        import statistics
        import time

        samples: dict[str, list[float]] = {}
        started: dict[str, float] = {}
        hooks = []
        for name, module in pl_module.model.named_modules():
            if next(module.children(), None) is None and any(True for _ in module.parameters(recurse=False)):
                hooks.append(module.register_forward_pre_hook(lambda m, i, n=name: started.__setitem__(n, time.perf_counter())))
                hooks.append(module.register_forward_hook(
                    lambda m, i, o, n=name: samples.setdefault(n, []).append(time.perf_counter() - started[n])))
        try:
            with evaluating(pl_module.model):
                for _ in range(repeats + 1):
                    pl_module.model(self._example(pl_module))
        finally:
            for hook in hooks:
                hook.remove()
        return {name: statistics.median(values[1:]) for name, values in samples.items()}

    def _cost_per_channel(self, pl_module: Any, groups: list[ChannelGroup], layers: dict[str, _Layer]) -> dict[str, float]:
        """Relative cost of one channel of each group (mean 1 over all channels)."""
        if self.cost == "latency":
            per_layer = self._layer_times(pl_module)
        else:
            per_layer = {name: (layer.flops if self.cost == "flops" else layer.weight + layer.other)
                         for name, layer in layers.items() if name}
        costs = {g.root: sum(per_layer.get(layer, 0.0) for layer in g.layers) / g.channels for g in groups}
        total_channels = sum(g.channels for g in groups)
        mean = sum(costs[g.root] * g.channels for g in groups) / total_channels
        return {root: max(cost / mean, 1e-6) if mean > 0 else 1.0 for root, cost in costs.items()}

    def plan(self, pl_module: Any, groups: list[ChannelGroup], scores: dict[str, torch.Tensor], target: float) -> dict[str, list[int]]:
        """Channel indices to remove from each group so that ``target`` is reached."""
        cost_aware = self.cost is not None and self.scope == "global"
        needs_layers = self.target != "channels" or (cost_aware and self.cost != "latency")
        layers = self._layers(pl_module) if needs_layers else {}
        if cost_aware:
            costs = self._cost_per_channel(pl_module, groups, layers)
            scores = {root: score / costs[root] for root, score in scores.items()}
        order = {root: torch.argsort(score).tolist() for root, score in scores.items()}
        # a group whose criterion gives no finite score (e.g. no batch norm for BN scales) stays whole
        caps = {g.root: (g.channels - self._kept_count(self.min_channels, g.channels)) if torch.isfinite(scores[g.root]).any() else 0
                for g in groups}
        if self.max_fraction < 1.0:
            for g in groups:
                original = self.original["channels"].get(g.root, g.channels)
                keep_at_least = math.ceil((1.0 - self.max_fraction) * original)
                caps[g.root] = max(0, min(caps[g.root], g.channels - keep_at_least))
        ranked_roots = [root for _, root in sorted((float(scores[g.root][i]), g.root) for g in groups for i in range(g.channels))]

        def counts_global(k: int) -> dict[str, int]:
            taken: dict[str, int] = {}
            for root in ranked_roots[:k]:
                taken[root] = taken.get(root, 0) + 1
            return self._rounded(groups, taken, caps)

        def counts_uniform(fraction: float) -> dict[str, int]:
            return self._rounded(groups, {g.root: int(fraction * g.channels) for g in groups}, caps)

        if self.scope == "layer" and self.target == "channels":
            original = self.original["channels"]
            counts = {g.root: min(caps[g.root], g.channels - self._kept_count(round((1 - target) * original.get(g.root, g.channels)), g.channels))
                      for g in groups}
            counts = {root: max(0, count) for root, count in counts.items()}
        else:
            if self._achieved(pl_module, layers, groups, {}) >= target:
                return {}
            if self.scope == "global" and self.round_to and self.round_to > 1:
                counts = self._take_blocks(pl_module, layers, groups, scores, caps, target)
                return {root: sorted(order[root][:count]) for root, count in counts.items() if count > 0}
            if self.scope == "global":
                low, high, counts_of = 0, sum(g.channels for g in groups), counts_global
            else:
                low, high, counts_of = 0, 1000, lambda step: counts_uniform(step / 1000)
            # smallest k whose removal reaches the target (the achieved fraction grows with k)
            while low < high:
                middle = (low + high) // 2
                if self._achieved(pl_module, layers, groups, counts_of(middle)) >= target - 1e-12:
                    high = middle
                else:
                    low = middle + 1
            counts = counts_of(low)
        return {root: sorted(order[root][:count]) for root, count in counts.items() if count > 0}

    def _take_blocks(self, pl_module: Any, layers: dict[str, _Layer], groups: list[ChannelGroup],
                     scores: dict[str, torch.Tensor], caps: dict[str, int], target: float) -> dict[str, int]:
        """Global ranking when channel counts must stay multiples of ``round_to``.

        Each group can only lose blocks (down to the next multiple, then ``round_to`` at a time),
        lowest-scored channels first. Blocks are taken in order of mean score; one that would
        overshoot the target by more than a percentage point is skipped (with the rest of its
        group), so a coarse block (half of a 16-channel group) does not blow past the target.
        """
        blocks: list[tuple[float, str, int]] = []
        for group in groups:
            ordered = torch.sort(scores[group.root]).values
            kept = group.channels
            floor = self._kept_count(group.channels - caps[group.root], group.channels)
            mean_so_far = -math.inf
            while True:
                step = kept % self.round_to or self.round_to
                if kept - step < floor:
                    break
                removed = group.channels - kept
                mean_so_far = max(mean_so_far, float(ordered[removed:removed + step].mean()))
                blocks.append((mean_so_far, group.root, step))
                kept -= step
        blocks.sort(key=lambda block: block[0])
        counts = {group.root: 0 for group in groups}
        blocked: set[str] = set()
        achieved = self._achieved(pl_module, layers, groups, counts)
        for _, root, step in blocks:
            if achieved >= target - 1e-12:
                break
            if root in blocked:
                continue
            trial = {**counts, root: counts[root] + step}
            trial_achieved = self._achieved(pl_module, layers, groups, trial)
            if trial_achieved > target + 0.01:
                blocked.add(root)
                continue
            counts, achieved = trial, trial_achieved
        if achieved < target - 1e-12:
            # nothing fits within the slack: take blocks in order until the target is reached
            counts = {group.root: 0 for group in groups}
            for _, root, step in blocks:
                counts[root] += step
                if self._achieved(pl_module, layers, groups, counts) >= target - 1e-12:
                    break
        return counts

    def _rounded(self, groups: list[ChannelGroup], taken: dict[str, int], caps: dict[str, int]) -> dict[str, int]:
        counts = {}
        for group in groups:
            removed = min(taken.get(group.root, 0), caps[group.root])
            counts[group.root] = group.channels - self._kept_count(group.channels - removed, group.channels)
        return counts

    # -------------------------------------------------------------------------------- action
    def act(self, trainer: pl.Trainer, pl_module: Any, target: float) -> dict[str, Any]:
        model = pl_module.model
        if self.graph is None or not self.graph.is_current():
            self.graph = ChannelGraph(model, self._example(pl_module), self.skip)
        groups = self.graph.groups()
        batches = self.collect_batches(trainer, pl_module) if self.criterion.requires_data else None
        self.criterion.prepare(model, batches)
        if self.criterion.requires_grad:
            self._accumulate_gradients(model, batches or [])
        scores = {group.root: self.criterion.score(self.graph, group) for group in groups}
        if self.criterion.requires_grad:
            model.zero_grad(set_to_none=True)
        plan = broadcast_from_rank_zero(trainer, self.plan(pl_module, groups, scores, target))
        history_start = len(self.graph.history())
        changes = self.graph.remove(plan)
        repair_training(trainer, pl_module, changes)
        measured = {
            "channels": sum(g.channels for g in self.graph.groups()),
            "params": count_parameters(model),
            "flops": dense_flops(model, pl_module.input_shape),
        }
        if self.target == "channels":
            achieved = 1 - measured["channels"] / sum(self.original["channels"].values())
        else:
            achieved = 1 - measured[self.target] / self.original[self.target]
        if abs(achieved - target) > 0.03:
            # the estimate is exact for chains, residual adds and depthwise convs; layers that
            # take inputs from several groups (concatenation) are only approximated
            rank_zero_warn(f"{self.name}: asked for {target:.1%} fewer {self.target}, got {achieved:.1%}")
        return {
            "action": "prune_channels",
            "criterion": repr(self.criterion),
            "target_type": self.target,
            "achieved": achieved,
            "flops_reduction": self.original["flops"] / measured["flops"],
            "params_reduction": self.original["params"] / measured["params"],
            "removed": int(sum(len(indices) for indices in plan.values())),
            "channels": {group.root: group.channels for group in self.graph.groups()},
            "history": self.graph.history()[history_start:],
        }

    @staticmethod
    def _accumulate_gradients(model: nn.Module, batches: list) -> None:
        model.zero_grad(set_to_none=True)
        with evaluating(model, gradients=True):
            for inputs, targets in batches:
                F.cross_entropy(model(inputs), targets).backward()

    # ---------------------------------------------------------------------------- checkpoint
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["original"] = self.original
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.original = state_dict.get("original", self.original)
