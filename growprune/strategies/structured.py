"""Structured (neuron/channel) pruning: remove whole units and channels, so the network really shrinks."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn

from growprune.criteria.base import Criterion
from growprune.criteria.channels import FilterNormCriterion
from growprune.planning import ChannelPlanner, original_size
from growprune.schedules import Schedule
from growprune.scoring import loss_gradients
from growprune.strategies.base import Strategy, broadcast_from_rank_zero, scoring_batches_for
from growprune.strategies.unstructured import check_prune_amounts
from growprune.surgery.channels import ChannelGraph, ChannelGroup
from growprune.surgery.edits import RemoveChannels

#: |achieved - target| above which a pruning step warns (the README promises the FLOPs target within 1.5 %)
TOLERANCE = 0.015


class StructuredPruning(Strategy):
    """Remove the lowest-scoring channels/units of every prunable group, on a schedule.

    The schedule's amount is the fraction of the ORIGINAL network (as this fit found it at set-up,
    or as the interrupted run recorded it when resuming) to remove, measured in
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
        fit_schedule: compress a schedule that would end after training into it, instead of
            refusing it (see :class:`~growprune.strategies.Strategy`).
    """

    def __init__(
        self,
        schedule: Schedule,
        criterion: Criterion | None = None,
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
        fit_schedule: bool = False,
    ):
        criterion = criterion if criterion is not None else FilterNormCriterion(p=1)
        if not isinstance(criterion, Criterion) or not criterion.supports("channels"):
            raise TypeError(f"criterion must score channels (a ChannelCriterion), got {type(criterion).__name__}")
        super().__init__(schedule, name=name, scoring_batches=scoring_batches_for(criterion, scoring_batches), verbose=verbose,
                         fit_schedule=fit_schedule)
        check_prune_amounts(schedule)
        self.planner = ChannelPlanner(target=target, scope=scope, min_channels=min_channels, round_to=round_to,
                                      max_fraction=max_fraction, cost=cost)
        self.criterion = criterion
        self.skip = list(skip or [])

    # the planner's options, readable as the strategy's own (as configured)
    target = property(lambda self: self.planner.target)
    scope = property(lambda self: self.planner.scope)
    min_channels = property(lambda self: self.planner.min_channels)
    round_to = property(lambda self: self.planner.round_to)
    max_fraction = property(lambda self: self.planner.max_fraction)
    cost = property(lambda self: self.planner.cost)

    # ------------------------------------------------------------------------------- set-up
    @property
    def graph(self) -> ChannelGraph | None:
        """The channel graph this strategy last worked with (the module's)."""
        return getattr(self, "_graph", None)

    def _channel_graph(self, pl_module: Any) -> ChannelGraph:
        if pl_module.input_shape is None:
            raise ValueError(f"{self.name}: structured pruning needs the module's input_shape")
        self._graph = pl_module.channel_graph()
        return self._graph

    def groups(self, pl_module: Any) -> list[ChannelGroup]:
        """The groups this strategy may prune (the module's channel groups minus ``skip``)."""
        return self._channel_graph(pl_module).groups(self.skip)

    def check(self, trainer: pl.Trainer | None, pl_module: Any) -> None:
        groups = self.groups(pl_module)
        if not groups:
            raise ValueError(f"{self.name}: the model has no prunable channel group")
        if not self.original:
            self.original = original_size(pl_module.model, pl_module.input_shape, groups)
        final = self.schedule.final_target
        if self.scope == "layer" and self.target == "channels":
            for group in groups:
                if round((1 - final) * self.original["channels"][group.root]) < self.min_channels:
                    raise ValueError(f"{self.name}: removing {final:.0%} of the channels of {group.root!r} would remove the whole layer")
        excluded = self.criterion.excluded_groups(self.graph, groups)
        reachable = self.planner.reachable(pl_module.model, pl_module.input_shape, groups, self.original, excluded)
        if final > reachable + 1e-9:
            limits = [f"keeping {self.min_channels} channel(s) per group"]
            if self.max_fraction < 1.0:
                limits.append(f"at most {self.max_fraction:.0%} of each group's channels")
            if excluded:
                limits.append(f"{len(excluded)} group(s) {type(self.criterion).__name__} cannot score")
            if self.graph.held:  # channel shuffles, blocks that call their layers' weights functionally, ...
                limits.append(f"{len(self.graph.held)} group(s) held whole (ChannelGraph.held says why, e.g. "
                              f"{next(iter(self.graph.held))!r}: {next(iter(self.graph.held.values()))})")
            raise ValueError(
                f"{self.name}: a {self.target} reduction of {final:.1%} is not reachable; with "
                f"{', '.join(limits)} (and skipped layers whole) at most {reachable:.1%} can go"
            )

    # ------------------------------------------------------------------------------ planning
    def plan(self, pl_module: Any, groups: list[ChannelGroup], scores: dict[str, torch.Tensor], target: float) -> dict[str, list[int]]:
        """Channel indices to remove from each group so that ``target`` is reached (see :mod:`growprune.planning`)."""
        if not self.original:
            self.original = original_size(pl_module.model, pl_module.input_shape, groups)
        return self.planner.plan(pl_module.model, pl_module.input_shape, groups, scores, target, self.original)

    def score(self, trainer: pl.Trainer, pl_module: Any, groups: list[ChannelGroup]) -> dict[str, torch.Tensor]:
        """The criterion's channel scores, on scoring batches of its own when it needs data.

        Gradient criteria see the loss gradients in ``.grad``; the training gradients (e.g. being
        accumulated under ``accumulate_grad_batches``) are put back afterwards.
        """
        model = pl_module.model
        batches = self.collect_batches(trainer, pl_module) if self.criterion.requires_data else None
        if self.criterion.requires_grad:
            with loss_gradients(model, batches or []):
                self.criterion.prepare(model, batches)
                return self.criterion.score_channels(self.graph, groups)
        self.criterion.prepare(model, batches)
        return self.criterion.score_channels(self.graph, groups)

    # -------------------------------------------------------------------------------- action
    def act(self, trainer: pl.Trainer, pl_module: Any, target: float) -> dict[str, Any]:
        groups = self.groups(pl_module)
        scores = self.score(trainer, pl_module, groups)
        plan = broadcast_from_rank_zero(trainer, self.plan(pl_module, groups, scores, target))
        self.apply_edit(pl_module, RemoveChannels(plan))
        record = self.measure(pl_module, plan)
        if abs(record["achieved"] - target) > TOLERANCE:
            # exact for chains, residual adds and depthwise convs; layers fed by several groups
            # (concatenation) are approximated, and min_channels / round_to / max_fraction can stop short
            rank_zero_warn(f"{self.name}: asked for {target:.1%} fewer {self.target}, got {record['achieved']:.1%}")
        return record

    def measure(self, pl_module: Any, plan: dict[str, list[int]]) -> dict[str, Any]:
        """The record of a channel removal: what is gone now, measured (not estimated)."""
        groups = self.groups(pl_module)
        # the module's size meter counts FLOPs once per architecture: the logged metrics reuse the count
        size = pl_module.size_metrics()
        measured = {"channels": sum(g.channels for g in groups), "params": int(size["params/total"]),
                    "flops": size["flops/dense"]}
        if self.target == "channels":
            achieved = 1 - measured["channels"] / sum(self.original["channels"].values())
        else:
            achieved = 1 - measured[self.target] / self.original[self.target]
        return {
            "action": "prune_channels",
            "criterion": repr(self.criterion),
            "target_type": self.target,
            "achieved": achieved,
            "flops_reduction": self.original["flops"] / measured["flops"],
            "params_reduction": self.original["params"] / measured["params"],
            "removed": int(sum(len(indices) for indices in plan.values())),
            "channels": {group.root: group.channels for group in groups},
        }
