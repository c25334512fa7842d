"""Channel growth: widen the network's channel groups on a schedule or a trigger, function-preserving.

:class:`ChannelGrowth` grows the same channel groups that :class:`~growprune.strategies.StructuredPruning`
prunes (:meth:`~growprune.surgery.channels.ChannelGraph.groups`: a layer's output channels together
with every layer that must change with them, residual streams included). Every growth step

1. plans how many channels each group gets (``scope``, ``round_to``, the ceilings),
2. appends them as NEUTRAL channels with :class:`~growprune.surgery.edits.AddChannels` through
   :meth:`Strategy.apply_edit` (the optimizer is rebuilt, new entries get zero state),
3. gives them values with the initializer (:class:`~growprune.growth.initializers.GrowthInitializer`,
   e.g. RandomInit, GradMax, Firefly) on training batches,
4. MEASURES the change of the function: the largest absolute difference of the eval-mode outputs on
   a fixed probe batch before and after. A function-preserving initializer must stay below
   ``tolerance`` (1e-5); otherwise a warning says so. The record and the logged metrics carry it.

The target is the fraction of the ORIGINAL channels (as this fit found them) ADDED: 3.0 takes a
quarter-width network to full width (4x the channels of every group with ``scope="layer"``).
Like pruning targets it is about the network as it is, not about the actions done: when another
strategy prunes in between, the next growth step grows back to its target (the "constant size"
scenario: grow and prune in turns).
"""

from __future__ import annotations

import contextlib
import copy
import math
from typing import Any, Callable, Iterator

import lightning.pytorch as pl
import torch
import torch.nn as nn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from growprune.errors import ConfigurationError
from growprune.growth.initializers import GrowthInitializer, RandomInit
from growprune.growth.units import new_units
from growprune.modes import evaluating
from growprune.planning import ChannelPlanner, original_size
from growprune.schedules import Schedule
from growprune.strategies.base import Strategy, broadcast_from_rank_zero
from growprune.surgery.channels import ChannelGraph, ChannelGroup
from growprune.surgery.edits import AddChannels
from growprune.triggers import Signal, Trigger
from growprune.validation import check_integer, check_number

SCOPES = ("layer", "global")
#: seed of the probe batch (the same samples before and after every growth step, in every fit)
PROBE_SEED = 2022


class ChannelGrowth(Strategy):
    """Add channels to every channel group on a schedule or a trigger, initialised by a growth initializer.

    Args:
        schedule: when to grow and how much: a :class:`~growprune.schedules.Schedule` (targets are
            fractions of the ORIGINAL channels added, >= 0; 3.0 = four times as wide) or a
            :class:`~growprune.triggers.Trigger` (``Plateau``, ``Signal``) that grows when training asks.
        initializer: gives the new channels their values (default: ``RandomInit()``, its BN-safe,
            function-preserving form). Any ``GrowthInitializer`` subclass, by ``class_path``.
        scope: ``"layer"``: every group grows to ``(1 + target)`` times its own original width (how a
            quarter-width VGG becomes full width); ``"global"``: the network's channels grow to
            ``(1 + target)`` times the original total, shared between groups in proportion to
            ``score x original width``, the score being the initializer's gradient norm per new
            channel when the group alone grows (measured on a copy of the network, one per group).
        skip: layers whose output channels must not grow (the output layer never grows).
        layers: grow only the groups rooted at these layers (``None``: every group not skipped).
        round_to: keep every group's channel count at a multiple of this (``None``: any count).
        max_params: ceiling on the total parameters.
        max_flops: ceiling on the dense FLOPs of one sample.
        max_width: ceiling on each group's channels, as a multiple of its original width (>= 1).
            A schedule whose final target would pass a ceiling is refused when fit starts (before
            anything changes); a trigger grows up to the ceiling and then stops.
        scoring_batches: training batches the initializer (and the global scores, the ``Signal``
            trigger and the logged ``gradient_norm``) sees at each step (default 4; 0: none, for
            data-free initializers with ``scope="layer"``; ``gradient_norm`` is then NaN).
        probe_samples: training samples in the fixed probe batch that measures the function change.
        tolerance: the largest output change a function-preserving initializer may cause.
        seed: seed of the initializer's random numbers (with the step's number: the same values on
            every DDP rank and in a resumed run; the global random state is left alone).
        name, verbose, fit_schedule: see :class:`~growprune.strategies.Strategy`.

    Attributes:
        exhausted: why the strategy cannot grow any more (a ceiling), or ``None``; triggers stop then.
    """

    def __init__(
        self,
        schedule: Schedule,
        initializer: GrowthInitializer | None = None,
        scope: str = "layer",
        skip: list[str] | None = None,
        layers: list[str] | None = None,
        round_to: int | None = None,
        max_params: int | None = None,
        max_flops: float | None = None,
        max_width: float | None = None,
        scoring_batches: int = 4,
        probe_samples: int = 32,
        tolerance: float = 1e-5,
        seed: int = 0,
        name: str | None = None,
        verbose: bool = True,
        fit_schedule: bool = False,
    ):
        initializer = initializer if initializer is not None else RandomInit()
        if not isinstance(initializer, GrowthInitializer):
            raise TypeError(f"initializer must be a growprune.growth.initializers.GrowthInitializer, got "
                            f"{type(initializer).__name__}")
        if scope not in SCOPES:
            raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
        if round_to is not None:
            check_integer("round_to", round_to, minimum=1)
        if max_params is not None:
            check_integer("max_params", max_params, minimum=1)
        if max_flops is not None:
            check_number("max_flops", max_flops, minimum=0.0, strict_minimum=True)
        if max_width is not None:
            check_number("max_width", max_width, minimum=1.0)
        check_integer("probe_samples", probe_samples, minimum=1)
        check_number("tolerance", tolerance, minimum=0.0)
        check_integer("seed", seed)
        super().__init__(schedule, name=name, scoring_batches=scoring_batches, verbose=verbose, fit_schedule=fit_schedule)
        needs_data = [why for why, needed in (("its initializer needs training data", initializer.requires_data),
                                              ("scope='global' scores groups on data", scope == "global"),
                                              ("its Signal trigger measures gradients", isinstance(schedule, Signal)))
                      if needed]
        if needs_data and scoring_batches < 1:
            raise ValueError(f"ChannelGrowth: {needs_data[0]}: set scoring_batches >= 1")
        self.initializer = initializer
        self.scope = scope
        self.skip = list(skip or [])
        self.layers = None if layers is None else list(layers)
        self.round_to = round_to
        self.max_params = max_params
        self.max_flops = max_flops
        self.max_width = max_width
        self.probe_samples = probe_samples
        self.tolerance = float(tolerance)
        self.seed = seed

    def reset(self) -> None:
        super().reset()
        self.exhausted: str | None = None
        self._probe: torch.Tensor | None = None

    # ------------------------------------------------------------------------------- set-up
    def groups(self, pl_module: Any) -> list[ChannelGroup]:
        """The groups this strategy grows (the module's channel groups minus ``skip``, within ``layers``)."""
        if pl_module.input_shape is None:
            raise ValueError(f"{self.name}: channel growth needs the module's input_shape")
        groups = pl_module.channel_graph().groups(self.skip)
        if self.layers is not None:
            groups = [group for group in groups if group.root in self.layers]
        return groups

    def check(self, trainer: pl.Trainer | None, pl_module: Any) -> None:
        if pl_module.input_shape is None:
            raise ValueError(f"{self.name}: channel growth needs the module's input_shape")
        graph = pl_module.channel_graph()
        every = graph.groups()  # every group that may change, for the messages
        roots = [group.root for group in every]
        groups = graph.groups(self.skip)  # names a skipped layer that does not exist
        if self.layers is not None:
            for layer in self.layers:
                if layer in self.skip:
                    raise ConfigurationError(f"{self.name}: layer {layer!r} is in both layers and skip: it cannot grow")
                if layer not in roots:
                    owner = next((g.root for g in every if any(name == layer for name, _ in g.members)), None)
                    hint = f" (its channels grow with the group rooted at {owner!r})" if owner else ""
                    raise ConfigurationError(f"{self.name}: {layer!r} is not the root of a channel group that may grow"
                                             f"{hint}; roots: {', '.join(roots)}")
                if layer not in {group.root for group in groups}:
                    raise ConfigurationError(f"{self.name}: {layer!r} cannot grow: growing it changes a skipped layer")
            groups = [group for group in groups if group.root in self.layers]
        if not groups:
            raise ConfigurationError(f"{self.name}: the model has no channel group that may grow")
        if not self.original:
            self.original = original_size(pl_module.model, pl_module.input_shape, groups)
        if not isinstance(self.schedule, Trigger):
            self._check_final_target(pl_module, groups, self.schedule.final_target)

    def _check_final_target(self, pl_module: Any, groups: list[ChannelGroup], final: float) -> None:
        """Refuse a schedule whose last target passes a ceiling (estimated from the layer-scope plan)."""
        kind = f"{type(self).__name__} {self.name!r}: its {type(self.schedule).__name__} schedule"
        if self.max_width is not None:
            order = {name: index for index, (name, _) in enumerate(pl_module.model.named_modules())}
            for group in sorted(groups, key=lambda g: order.get(g.root, 0)):  # the first layer first
                original = self.original["channels"][group.root]
                wanted = self._desired(group, original, final, capped=False)
                if wanted > self._cap(group, original):
                    raise ConfigurationError(
                        f"{kind} grows {group.root!r} to {wanted} channels (final target {final:g}) but max_width="
                        f"{self.max_width:g} allows {self._cap(group, original)} ({self.max_width:g} x {original})")
        plan = self._layer_plan(groups, final)
        params, flops = self.estimate(pl_module, groups, plan)
        for ceiling, value, size in (("max_params", self.max_params, params), ("max_flops", self.max_flops, flops)):
            if value is not None and size > value:
                raise ConfigurationError(f"{kind} grows the network to {size:,.0f} {ceiling[4:]} (final target {final:g}) "
                                         f"but {ceiling}={value:,.0f}; lower the schedule's amount or raise the ceiling")

    # ------------------------------------------------------------------------------ planning
    def _multiple(self, group: ChannelGroup) -> int:
        return math.lcm(int(group.step or 1), self.round_to or 1)

    def _cap(self, group: ChannelGroup, original: int) -> int | float:
        """The most channels the group may have (``max_width``), a multiple of its step."""
        if self.max_width is None:
            return math.inf
        multiple = self._multiple(group)
        return max(group.channels, math.floor(self.max_width * original / multiple + 1e-9) * multiple)

    def _desired(self, group: ChannelGroup, original: int, target: float, capped: bool = True) -> int | float:
        multiple = self._multiple(group)
        wanted = max(multiple, round((1.0 + target) * original / multiple) * multiple)
        return min(wanted, self._cap(group, original)) if capped else wanted

    def _layer_plan(self, groups: list[ChannelGroup], target: float) -> dict[str, int]:
        plan = {}
        for group in groups:
            count = int(self._desired(group, self.original["channels"].get(group.root, group.channels), target)) - group.channels
            if count > 0:
                plan[group.root] = count
        return plan

    def _global_plan(self, groups: list[ChannelGroup], target: float, scores: dict[str, float]) -> dict[str, int]:
        """Share ``(1 + target) x`` the original total among groups by ``score x original width``."""
        originals = {g.root: self.original["channels"].get(g.root, g.channels) for g in groups}
        to_add = round((1.0 + target) * sum(originals.values())) - sum(g.channels for g in groups)
        if to_add <= 0:
            return {}
        room = {g.root: self._cap(g, originals[g.root]) - g.channels for g in groups}
        weights = {g.root: max(0.0, scores.get(g.root, 0.0)) * originals[g.root] for g in groups}
        if not any(weight > 0 for weight in weights.values()):
            rank_zero_warn(f"{self.name}: every group's growth score is 0; sharing the new channels by original width")
            weights = dict(originals)
        share: dict[str, float] = {}
        open_roots = [root for root in weights if room[root] > 0 and weights[root] > 0]
        left = float(to_add)
        while open_roots and left > 1e-9:  # water-filling: groups at their ceiling pass their share on
            total = sum(weights[root] for root in open_roots)
            full = [root for root in open_roots if share.get(root, 0.0) + left * weights[root] / total >= room[root]]
            if not full:
                for root in open_roots:
                    share[root] = share.get(root, 0.0) + left * weights[root] / total
                left = 0.0
                break
            for root in full:
                left -= room[root] - share.get(root, 0.0)
                share[root] = float(room[root])
                open_roots.remove(root)
        by_root = {g.root: g for g in groups}
        plan = {root: int(value // self._multiple(by_root[root])) * self._multiple(by_root[root]) for root, value in share.items()}
        left = to_add - sum(plan.values())
        # the rounded-off remainder goes, a whole multiple at a time, to the largest remainders
        for root in sorted(share, key=lambda r: share[r] - plan[r], reverse=True):
            multiple = self._multiple(by_root[root])
            if left >= multiple and plan[root] + multiple <= room[root]:
                plan[root] += multiple
                left -= multiple
        return {root: count for root, count in plan.items() if count > 0}

    def plan(self, pl_module: Any, groups: list[ChannelGroup], target: float,
             scores: dict[str, float] | None = None) -> dict[str, int]:
        """Channels to add per group root so that ``target`` of the original channels is added."""
        if self.scope == "global":
            if scores is None:
                raise ValueError(f"{self.name}: global growth needs group scores")
            return self._global_plan(groups, target, scores)
        return self._layer_plan(groups, target)

    @staticmethod
    def size_estimator(pl_module: Any, groups: list[ChannelGroup]) -> Callable[[dict[str, int]], tuple[float, float]]:
        """A function: plan -> (parameters, dense FLOPs of one sample) after adding it, estimated per
        layer without changing the network (exact for chains, residual adds and depthwise
        convolutions). The per-layer costs are counted once, so a search over plans is cheap."""
        planner_params, planner_flops = ChannelPlanner(target="params"), ChannelPlanner(target="flops")
        layers = planner_params.layers(pl_module.model, pl_module.input_shape, groups)
        now = {"params": float(layers[""].weight), "flops": float(layers[""].flops), "channels": {}}

        def estimate(plan: dict[str, int]) -> tuple[float, float]:
            added = {root: -count for root, count in plan.items()}  # a negative removal is a growth
            return (now["params"] * (1 - planner_params.achieved(layers, groups, now, added)),
                    now["flops"] * (1 - planner_flops.achieved(layers, groups, now, added)))

        return estimate

    def estimate(self, pl_module: Any, groups: list[ChannelGroup], plan: dict[str, int]) -> tuple[float, float]:
        """Parameters and dense FLOPs (one sample) after adding ``plan`` (see :meth:`size_estimator`)."""
        return self.size_estimator(pl_module, groups)(plan)

    def _within_ceilings(self, pl_module: Any, groups: list[ChannelGroup], target: float, current: float,
                         scores: dict[str, float] | None) -> tuple[dict[str, int], str | None]:
        """The plan for ``target``, or for the largest target between ``current`` and it that keeps
        within ``max_params``/``max_flops`` (bisection); the second value names the ceiling that stopped it."""
        plan = self.plan(pl_module, groups, target, scores)
        stopped = None
        if self.max_width is not None:
            originals = {g.root: self.original["channels"].get(g.root, g.channels) for g in groups}
            if self.scope == "layer":
                bound = any(self._desired(g, originals[g.root], target, capped=False) > self._cap(g, originals[g.root])
                            for g in groups)
            else:
                room = sum(self._cap(g, originals[g.root]) - g.channels for g in groups)
                bound = room <= round((1.0 + target) * sum(originals.values())) - sum(g.channels for g in groups)
            if bound:
                stopped = f"max_width={self.max_width:g} reached"

        if self.max_params is None and self.max_flops is None:
            return plan, stopped
        estimate = self.size_estimator(pl_module, groups)

        def over(candidate: dict[str, int]) -> list[str]:
            params, flops = estimate(candidate)
            return [f"{ceiling}={value:,.0f}" for ceiling, value, size in
                    (("max_params", self.max_params, params), ("max_flops", self.max_flops, flops))
                    if value is not None and size > value]

        exceeded = over(plan)
        if not exceeded:
            return plan, stopped
        low, high = current, target
        for _ in range(30):
            middle = (low + high) / 2
            if over(self.plan(pl_module, groups, middle, scores)):
                high = middle
            else:
                low = middle
        plan = self.plan(pl_module, groups, low, scores)
        if over(plan):
            plan = {}
        return plan, f"{' and '.join(exceeded)} reached"

    # -------------------------------------------------------------------------------- scores
    def group_scores(self, pl_module: Any, groups: list[ChannelGroup], target: float,
                     batches: list[Any]) -> dict[str, float]:
        """Per group: the initializer's gradient norm per new channel if that group alone grew (on a copy)."""
        scores = {}
        for group in groups:
            original = self.original["channels"].get(group.root, group.channels)
            count = max(self._multiple(group), int(self._desired(group, original, target)) - group.channels)
            if group.channels + count > self._cap(group, original):
                scores[group.root] = 0.0  # at its ceiling: no share
                continue
            norm = self.candidate_gradient_norm(pl_module, {group.root: count}, batches, salt=len(scores) + 1)
            scores[group.root] = norm / math.sqrt(count)
        return scores

    def candidate_gradient_norm(self, pl_module: Any, plan: dict[str, int], batches: list[Any], salt: int = 0) -> float:
        """The initializer's ``gradient_norm`` of the channels ``plan`` would add, on a copy of the network."""
        model = copy.deepcopy(pl_module.model)
        changes = ChannelGraph(model, pl_module.example_inputs(), check=False).add(plan)
        units = new_units(model, changes)
        with self._seeded(pl_module, salt):
            stats = self.initializer.initialize(model, units, batches)
        return float(stats["gradient_norm"])

    def signal(self, trainer: pl.Trainer, pl_module: Any) -> float:
        """The :class:`~growprune.triggers.Signal` trigger's number: the loss gradient norm of the
        channels the next growth step would add (initialised by the initializer, on a copy)."""
        groups = self.groups(pl_module)
        target = self.active_schedule.next_target if isinstance(self.active_schedule, Trigger) else 0.0
        plan = self._layer_plan(groups, target)
        if not plan:  # at max_width, or already at the target (another strategy grew the network)
            if self.max_width is not None:
                self.exhausted = f"max_width={self.max_width:g} reached"
            return float("nan")
        return self.candidate_gradient_norm(pl_module, plan, self.collect_batches(trainer, pl_module), salt=-1)

    # -------------------------------------------------------------------------------- action
    @contextlib.contextmanager
    def _seeded(self, pl_module: Any, salt: int = 0) -> Iterator[None]:
        """A private random stream for the initializer: the same on every rank and in a resumed run
        (new channels must be equal on every DDP rank: DDP syncs gradients, not weights)."""
        device = pl_module.device
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(self.seed * 1_000_003 + len(self.history) * 101 + salt)
            yield

    def probe(self, trainer: pl.Trainer, pl_module: Any) -> torch.Tensor:
        """The fixed probe inputs (the same training samples at every step of this fit)."""
        if self._probe is None:
            from growprune.scoring import scoring_batches

            batches = scoring_batches(trainer, samples=self.probe_samples, seed=PROBE_SEED, device=pl_module.device)
            self._probe = torch.cat([inputs for inputs, _ in batches])
        return self._probe

    @staticmethod
    def outputs(model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
        with evaluating(model):
            return model(inputs).detach().clone()

    def achieved(self, groups: list[ChannelGroup]) -> float:
        """Fraction of the original channels added so far (negative when pruned below the original)."""
        original = sum(self.original["channels"].get(g.root, g.channels) for g in groups)
        return sum(g.channels for g in groups) / original - 1.0

    def act(self, trainer: pl.Trainer, pl_module: Any, target: float) -> dict[str, Any]:
        model = pl_module.model
        groups = self.groups(pl_module)
        current = self.achieved(groups)
        batches = self.collect_batches(trainer, pl_module) if self.scoring_batches else None
        scores = self.group_scores(pl_module, groups, target, batches) if self.scope == "global" else None
        plan, stopped = self._within_ceilings(pl_module, groups, target, current, scores)
        plan = broadcast_from_rank_zero(trainer, plan)
        probe = self.probe(trainer, pl_module)
        before = self.outputs(model, probe)
        stats: dict[str, float] = {"gradient_norm": float("nan")}
        if plan:
            result = self.apply_edit(pl_module, AddChannels(plan))
            units = new_units(model, result.changes)
            with self._seeded(pl_module):
                stats = dict(self.initializer.initialize(model, units, batches))
        change = float((self.outputs(model, probe) - before).abs().max())
        if stopped is not None:
            self.exhausted = stopped
        groups = self.groups(pl_module)
        size = pl_module.size_metrics()
        preserving = bool(getattr(self.initializer, "function_preserving", False))
        record: dict[str, Any] = {
            "action": "grow_channels",
            "initializer": repr(self.initializer),
            "function_preserving_init": preserving,
            "preserved": change < self.tolerance,
            "max_output_change": change,
            "gradient_norm": float(stats.get("gradient_norm", float("nan"))),
            "achieved": self.achieved(groups),
            "added": int(sum(plan.values())),
            "channels": int(sum(g.channels for g in groups)),
            "params": int(size["params/total"]),
            "flops": float(size["flops/dense"]),
            "per_layer": {g.root: g.channels for g in groups},
            **{f"init/{key}": float(value) for key, value in stats.items()
               if key != "gradient_norm" and isinstance(value, (int, float)) and not isinstance(value, bool)},
        }
        if scores is not None:
            record["scores"] = {root: float(value) for root, value in scores.items()}
        if stopped is not None:
            record["stopped"] = stopped
        if preserving and plan and change >= self.tolerance:
            rank_zero_warn(f"{self.name}: {record['initializer']} should preserve the network's function, but the "
                           f"outputs on the probe batch changed by up to {change:.3g} (tolerance {self.tolerance:g})")
        if self.verbose and plan:
            rank_zero_info(f"[{self.name}] added {record['added']} channels with {record['initializer']}: max output "
                           f"change {change:.3g} ({'function preserved' if record['preserved'] else 'function CHANGED'}), "
                           f"gradient norm {record['gradient_norm']:.4g}")
        return record

    # ------------------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "exhausted": self.exhausted}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.exhausted = state_dict.get("exhausted")

