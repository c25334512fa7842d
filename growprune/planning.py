"""Planning a structured prune: channel scores -> which channels to remove to reach a target.

A plain function of the model, its channel groups and their scores, usable without a strategy
(the evolutionary loop and growth call it too)::

    graph = ChannelGraph(model, example_inputs)
    groups = graph.groups()
    scores = FilterNormCriterion().score_channels(graph, groups)
    planner = ChannelPlanner(target="flops", scope="global", round_to=8)
    original = original_size(model, input_shape, groups)
    plan = planner.plan(model, input_shape, groups, scores, amount=0.5, original=original)
    graph.remove(plan)          # or module.apply_edit(RemoveChannels(plan))

The amount is the fraction of the ORIGINAL network to be gone, in ``target`` units: prunable
``"channels"``, all ``"params"``, or dense ``"flops"``. Parameters and FLOPs are estimated
exactly per layer from each group's kept fraction while a global threshold is searched (exact for
chains, residual adds and depthwise convolutions; layers fed by several groups, such as after a
concatenation, are approximated).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn as nn

from growprune.metrics import count_parameters, dense_flops, flop_table, layer_flops, layer_times
from growprune.validation import check_integer, check_number

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


def _step(group: Any) -> int:
    return int(getattr(group, "step", 1) or 1)


def removal_order(group: Any, scores: torch.Tensor) -> list[int]:
    """A group's channels from the lowest score up. For a grouped-convolution group (``parts``, see
    :class:`~growprune.surgery.channels.ChannelGroup`) every prefix of a multiple of ``len(parts)``
    channels takes equally many from each part, so counts in multiples of ``step`` stay balanced."""
    if getattr(group, "parts", ()):
        return group.removal_order(scores)
    return torch.argsort(scores).tolist()


def balanced_subset(group: Any, candidates: Sequence[int], count: int, multiple: int = 1) -> list[int]:
    """At most ``count`` of ``candidates`` (best first), taking the same number from every part of a
    grouped-convolution group, and leaving a multiple of ``multiple`` channels (or all of them).

    For a group without parts: ``candidates[:count]``. For one with parts, each part gives its
    first candidates; a part with fewer candidates than its share lowers everyone's share (no
    channel outside ``candidates`` is taken), e.g. for a threshold rule like network slimming.
    """
    parts = getattr(group, "parts", ())
    if not parts:
        return list(candidates[:count])
    where = {index: number for number, part in enumerate(parts) for index in part}
    per_part: list[list[int]] = [[] for _ in parts]
    for index in candidates:
        per_part[where[index]].append(index)
    share = min(count // len(parts), min(len(chosen) for chosen in per_part))
    while share > 0 and (group.channels - share * len(parts)) % multiple:
        share -= 1
    return [index for chosen in per_part for index in chosen[:share]]


def original_size(model: nn.Module, input_shape: Sequence[int], groups: Sequence[Any]) -> dict[str, Any]:
    """What targets are fractions of: channels per group root, total parameters, dense FLOPs."""
    return {
        "channels": {group.root: group.channels for group in groups},
        "params": count_parameters(model),
        "flops": dense_flops(model, input_shape),
    }


@dataclass
class ChannelPlanner:
    """How a structured prune turns scores into a plan.

    Args:
        target: ``"channels"``, ``"params"`` or ``"flops"``: the unit of the amount.
        scope: ``"global"`` (one ranking of normalised scores across groups) or ``"layer"``
            (every group loses the same fraction).
        min_channels: channels every group keeps at least (a layer is never removed whole).
        round_to: keep channel counts at multiples of this (``None``: any count).
        max_fraction: the largest fraction of a group's ORIGINAL channels global ranking may remove.
        cost: global ranking by importance per cost: ``None``, ``"latency"`` (measured batch-1
            layer time), ``"flops"`` or ``"params"``.
    """

    target: str = "channels"
    scope: str = "global"
    min_channels: int = 1
    round_to: int | None = None
    max_fraction: float = 1.0
    cost: str | None = None

    def __post_init__(self) -> None:
        if self.target not in TARGETS:
            raise ValueError(f"target must be one of {TARGETS}, got {self.target!r}")
        if self.scope not in SCOPES:
            raise ValueError(f"scope must be one of {SCOPES}, got {self.scope!r}")
        if self.cost not in COSTS:
            raise ValueError(f"cost must be one of {COSTS}, got {self.cost!r}")
        check_integer("min_channels", self.min_channels, minimum=1)  # a layer is never removed whole
        if self.round_to is not None:
            check_integer("round_to", self.round_to, minimum=1)
        check_number("max_fraction", self.max_fraction, minimum=0.0, maximum=1.0, strict_minimum=True)

    # ------------------------------------------------------------------------------ budget
    def kept_count(self, kept: int, channels: int, step: int = 1) -> int:
        """Channels a group keeps when asked to keep ``kept``: at least ``min_channels``, rounded up
        to a multiple of ``round_to`` and of the group's own ``step`` (e.g. attention heads)."""
        kept = max(kept, self.min_channels)
        multiple = math.lcm(self.round_to or 1, step)
        if multiple > 1:
            kept = min(channels, math.ceil(kept / multiple) * multiple)
        return min(kept, channels)

    def caps(self, groups: Sequence[Any], original: dict[str, Any], excluded: set[str] = frozenset()) -> dict[str, int]:
        """The most channels each group may lose now (min_channels, round_to, max_fraction, exclusions)."""
        caps = {}
        for group in groups:
            cap = 0 if group.root in excluded else group.channels - self.kept_count(self.min_channels, group.channels, _step(group))
            if self.max_fraction < 1.0:
                keep_at_least = math.ceil((1.0 - self.max_fraction) * original["channels"].get(group.root, group.channels))
                cap = min(cap, group.channels - keep_at_least)
            caps[group.root] = max(0, cap)
        return caps

    def reachable(self, model: nn.Module, input_shape: Sequence[int], groups: Sequence[Any], original: dict[str, Any],
                  excluded: set[str] = frozenset()) -> float:
        """The largest fraction of the original (in target units) any plan can remove."""
        layers = self.layers(model, input_shape, groups)
        caps = self.caps(groups, original, excluded)
        return self.achieved(layers, groups, original, self._rounded(groups, caps, caps))

    def layers(self, model: nn.Module, input_shape: Sequence[int], groups: Sequence[Any]) -> dict[str, _Layer]:
        """Per-layer costs now, keyed by layer name; ``""`` holds the totals (params, FLOPs)."""
        per_layer = layer_flops(model, input_shape)
        owners: dict[str, dict[str, str]] = {}
        for group in groups:
            for layer, side in group.members:
                owners.setdefault(layer, {})[side] = group.root
        attention = {name: owners[name]["out"] for name, module in model.named_modules()
                     if isinstance(module, nn.MultiheadAttention) and "out" in owners.get(name, {})}
        scores: dict[str, float] = {}
        if attention:  # attention's projections read and write the embedding (both sides shrink), its scores one side
            for site, flops in flop_table(model, input_shape).items():
                if site.layer in attention and site.parameter is None:
                    scores[site.layer] = scores.get(site.layer, 0.0) + flops
            for name, root in attention.items():
                owners[name]["in"] = root
                owners[f"{name}.out_proj" if name else "out_proj"] = {"out": root, "in": root}
        layers = {}
        for name, module in model.named_modules():
            parameters = list(module.named_parameters(recurse=False))
            if not parameters:
                continue
            weight = sum(p.numel() for key, p in parameters if key in ("weight", "in_proj_weight") and p.dim() >= 2)
            other = sum(p.numel() for key, p in parameters) - weight
            depthwise = isinstance(module, nn.modules.conv._ConvNd) and module.groups > 1 and module.groups == module.in_channels
            layers[name] = _Layer(per_layer.get(name, 0.0), weight, other, owners.get(name, {}).get("out"),
                                  owners.get(name, {}).get("in"), depthwise)
        for name, flops in scores.items():
            layers[name] = dataclasses.replace(layers[name], flops=layers[name].flops - flops)
            layers[f"{name}#scores"] = _Layer(flops, 0, 0, attention[name], None, False)
        layers[""] = _Layer(float(per_layer[""]), count_parameters(model), 0, None, None, False)
        return layers

    def achieved(self, layers: dict[str, _Layer], groups: Sequence[Any], original: dict[str, Any], removed: dict[str, int]) -> float:
        """Estimated fraction of the original network gone (in target units) after removing ``removed``."""
        if self.target == "channels":
            current = sum(group.channels for group in groups)
            total = sum(original["channels"].values())
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
            return 1 - params / original["params"]
        return 1 - flops / original["flops"]

    # -------------------------------------------------------------------------------- plan
    def plan(self, model: nn.Module, input_shape: Sequence[int], groups: Sequence[Any], scores: dict[str, torch.Tensor],
             amount: float, original: dict[str, Any]) -> dict[str, list[int]]:
        """Channel indices to remove from each group so that ``amount`` of the original is gone.

        Groups whose scores are all infinite (the criterion cannot score them) stay whole.
        """
        cost_aware = self.cost is not None and self.scope == "global"
        needs_layers = self.target != "channels" or (cost_aware and self.cost != "latency")
        layers = self.layers(model, input_shape, groups) if needs_layers else {}
        if cost_aware:
            costs = self._cost_per_channel(model, input_shape, groups, layers)
            scores = {root: score / costs[root] for root, score in scores.items()}
        by_root = {group.root: group for group in groups}
        order = {root: removal_order(by_root.get(root), score) for root, score in scores.items()}
        excluded = {g.root for g in groups if not torch.isfinite(scores[g.root]).any()}
        caps = self.caps(groups, original, excluded)
        if self.scope == "layer" and self.target == "channels":
            counts = {g.root: max(0, min(caps[g.root], g.channels - self.kept_count(
                round((1 - amount) * original["channels"].get(g.root, g.channels)), g.channels, _step(g)))) for g in groups}
        else:
            if self.achieved(layers, groups, original, {}) >= amount:
                return {}
            if self.scope == "global" and any(self._multiple(g) > 1 for g in groups):
                counts = self._take_blocks(layers, groups, original, scores, caps, amount)
            else:
                counts = self._search(layers, groups, original, scores, caps, amount)
        return {root: sorted(order[root][:count]) for root, count in counts.items() if count > 0}

    def _search(self, layers: dict[str, _Layer], groups: Sequence[Any], original: dict[str, Any],
                scores: dict[str, torch.Tensor], caps: dict[str, int], amount: float) -> dict[str, int]:
        """Smallest global k (or uniform fraction) whose removal reaches ``amount`` (achieved grows with k)."""
        ranked_roots = [root for _, root in sorted((value, g.root) for g in groups for value in scores[g.root].tolist())]

        def counts_global(k: int) -> dict[str, int]:
            taken: dict[str, int] = {}
            for root in ranked_roots[:k]:
                taken[root] = taken.get(root, 0) + 1
            return self._rounded(groups, taken, caps)

        def counts_uniform(step: int) -> dict[str, int]:
            return self._rounded(groups, {g.root: int(step / 1000 * g.channels) for g in groups}, caps)

        if self.scope == "global":
            low, high, counts_of = 0, sum(g.channels for g in groups), counts_global
        else:
            low, high, counts_of = 0, 1000, counts_uniform
        while low < high:
            middle = (low + high) // 2
            if self.achieved(layers, groups, original, counts_of(middle)) >= amount - 1e-12:
                high = middle
            else:
                low = middle + 1
        return counts_of(low)

    def _take_blocks(self, layers: dict[str, _Layer], groups: Sequence[Any], original: dict[str, Any],
                     scores: dict[str, torch.Tensor], caps: dict[str, int], amount: float) -> dict[str, int]:
        """Global ranking when channel counts must stay multiples of ``round_to``.

        Each group can only lose blocks (down to the next multiple, then ``round_to`` at a time),
        lowest-scored channels first. Blocks are taken in order of mean score; one that would
        overshoot the target by more than a percentage point is skipped (with the rest of its
        group), so a coarse block (half of a 16-channel group) does not blow past the target.
        """
        blocks: list[tuple[float, str, int]] = []
        for group in groups:
            ordered = scores[group.root][removal_order(group, scores[group.root])]
            kept = group.channels
            floor = self.kept_count(group.channels - caps[group.root], group.channels, _step(group))
            multiple = self._multiple(group)
            mean_so_far = -math.inf
            while True:
                step = kept % multiple or multiple
                if kept - step < floor:
                    break
                removed = group.channels - kept
                mean_so_far = max(mean_so_far, float(ordered[removed:removed + step].mean()))
                blocks.append((mean_so_far, group.root, step))
                kept -= step
        blocks.sort(key=lambda block: block[0])
        counts = {group.root: 0 for group in groups}
        blocked: set[str] = set()
        achieved = self.achieved(layers, groups, original, counts)
        for _, root, step in blocks:
            if achieved >= amount - 1e-12:
                break
            if root in blocked:
                continue
            trial = {**counts, root: counts[root] + step}
            trial_achieved = self.achieved(layers, groups, original, trial)
            if trial_achieved > amount + 0.01:
                blocked.add(root)
                continue
            counts, achieved = trial, trial_achieved
        if achieved < amount - 1e-12:
            # nothing fits within the slack: take blocks in order until the target is reached
            counts = {group.root: 0 for group in groups}
            for _, root, step in blocks:
                counts[root] += step
                if self.achieved(layers, groups, original, counts) >= amount - 1e-12:
                    break
        return counts

    def _multiple(self, group: Any) -> int:
        return math.lcm(self.round_to or 1, _step(group))

    def _rounded(self, groups: Sequence[Any], taken: dict[str, int], caps: dict[str, int]) -> dict[str, int]:
        counts = {}
        for group in groups:
            removed = min(taken.get(group.root, 0), caps[group.root])
            counts[group.root] = group.channels - self.kept_count(group.channels - removed, group.channels, _step(group))
        return counts

    def _cost_per_channel(self, model: nn.Module, input_shape: Sequence[int], groups: Sequence[Any],
                          layers: dict[str, _Layer]) -> dict[str, float]:
        """Relative cost of one channel of each group (mean 1 over all channels)."""
        if self.cost == "latency":
            per_layer = layer_times(model, input_shape)
        else:
            per_layer = {name: (layer.flops if self.cost == "flops" else layer.weight + layer.other)
                         for name, layer in layers.items() if name}
        costs = {g.root: sum(per_layer.get(layer, 0.0) for layer in g.layers) / g.channels for g in groups}
        total_channels = sum(g.channels for g in groups)
        mean = sum(costs[g.root] * g.channels for g in groups) / total_channels
        return {root: max(cost / mean, 1e-6) if mean > 0 else 1.0 for root, cost in costs.items()}
