"""NNrelief: iterative pruning by each connection's share of its neuron's input signal.

Dekhovich et al., "Neural network relief: a pruning algorithm based on neural activity"
(arXiv 2109.10795). Every ``every`` epochs (``iterations`` times by default) the strategy:

1. takes a pruning set of ``pruning_samples`` training samples;
2. for each selected layer, from input to output, computes the NNrelief scores on the network
   as already pruned by this step (one forward pass per layer) and, per neuron / filter, keeps
   the smallest set of its largest scores (weights' and the bias's) whose cumulative share
   reaches ``alpha_fc`` (linear) or ``alpha_conv`` (conv); the rest is masked;
3. with ``remove_dead_units``: removes every unit whose output is exactly zero on the whole
   pruning set (its incoming weights and bias, and its outgoing connections in the layer that
   consumes it), then sweeps from the last layer back to the first removing units that have no
   outgoing connection left (their incoming weights and bias). Units of the network's output
   layer are never removed.

Step 3 needs to know which weight layer consumes each unit's output: the unit links of
:mod:`growprune.surgery.units` (:func:`~growprune.surgery.units.trace_unit_links`). Links are found with
``torch.fx`` and a shape check on a real batch, and only accepted along a single chain of ops that
keep units apart: element-wise activations, dropout, per-channel batch/instance norm and pooling,
and one flatten from ``(N, C, *S)`` to ``(N, C * prod(S))`` (channel ``c`` owns inputs
``c * prod(S) ... (c + 1) * prod(S) - 1`` of the next linear layer). Linear->Linear, Conv->Conv and
Conv->Flatten->Linear chains (LeNets, VGG) are linked; a layer whose output also goes elsewhere (a
residual add, a concatenation, an op not listed, a model ``torch.fx`` cannot trace) gets no link
and step 3 leaves it alone: the record lists it under ``unlinked_layers`` with the reason and a
warning is printed once. Links that are proven (e.g. ``conv1 -> conv2`` inside a residual block)
are still used, so residual nets get the dead-unit removal where it is safe and nowhere else.
Batch-norm parameters of removed channels are not masked (their channel no longer reaches any
weight); a skipped consumer layer keeps its weights.

Masks are computed on every rank, then rank 0's masks are applied on all ranks (DDP-safe): the
computation masks weights temporarily and restores them before the final masks are set.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import lightning.pytorch as pl
import torch
import torch.nn as nn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from growprune.criteria.base import Batch
from growprune.criteria.nnrelief import (
    DEFAULT_MAX_ELEMENTS,
    check_supported,
    collect_statistics,
    cumulative_keep_mask,
    expand_unit_tensor,
    is_conv,
    relief_scores,
)
from growprune.schedules import Constant, Schedule
from growprune.strategies.base import Strategy, broadcast_from_rank_zero, tensor_dict_to
from growprune.surgery.edits import MaskWeights
from growprune.surgery.masks import select_layers, sparsity, weight_layers
# the unit-level graph lives in growprune.surgery.units; UnitLink, LinkReport and trace_unit_links
# stay importable from here for existing users
from growprune.surgery.units import LinkReport, UnitLink, forward_order, trace_unit_links  # noqa: F401
from growprune.validation import check_integer, check_number


# ---------------------------------------------------------------------- unit-level mask ops
def _input_layout(layer: nn.Module) -> tuple[int, int, int]:
    """(groups, outputs per group, inputs per group) of a layer's weight."""
    groups = layer.groups if is_conv(layer) else 1
    return groups, layer.weight.shape[0] // groups, layer.weight.shape[1]


def input_unit_connected(layer: nn.Module, connections: torch.Tensor) -> torch.Tensor:
    """Per input unit of ``layer`` (feature or channel): does any nonzero entry of ``connections``
    (a 0/1 tensor of the weight's shape) read it? Bool, shape ``(in_features or in_channels,)``."""
    groups, out_per_group, in_per_group = _input_layout(layer)
    view = connections.reshape(groups, out_per_group, in_per_group, -1) != 0
    return view.any(dim=3).any(dim=1).reshape(groups * in_per_group)


def mask_input_units(layer: nn.Module, mask: torch.Tensor, remove: torch.Tensor) -> torch.Tensor:
    """``mask`` (weight-shaped) with every weight reading a removed input unit set to 0."""
    groups, out_per_group, in_per_group = _input_layout(layer)
    keep = (~remove).reshape(groups, 1, in_per_group, 1).to(mask.dtype)
    return (mask.reshape(groups, out_per_group, in_per_group, -1) * keep).reshape(mask.shape)


def _unit_view(flags: torch.Tensor, units: int) -> torch.Tensor:
    return flags.reshape(units, -1)


# ---------------------------------------------------------------------------- one pruning step
@dataclass
class NNReliefResult:
    """What :func:`nnrelief_masks` computed.

    Attributes:
        masks: parameter name (``"<layer>.weight"``, ``"<layer>.bias"``) -> new 0/1 mask.
        order: the selected layers in the order they were pruned (forward order).
        dead_units: per layer, units removed because their output was zero on the pruning set.
        swept_units: per layer, units removed by the backward sweep (no outgoing connection left).
        removed_units: per layer, units now fully removed (no incoming weight and no bias).
        unlinked: selected non-output layers left out of dead-unit removal, with the reason.
        samples: size of the pruning set.
    """

    masks: dict[str, torch.Tensor]
    order: list[str]
    dead_units: dict[str, int]
    swept_units: dict[str, int]
    removed_units: dict[str, int]
    unlinked: dict[str, str]
    samples: int


def _layer_masks(layer: nn.Module, name: str, masks: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
    weight = layer.weight
    weight_mask = masks.get(f"{name}.weight")
    weight_mask = torch.ones_like(weight) if weight_mask is None else weight_mask.to(weight.device, weight.dtype).clone()
    bias_mask = None
    if getattr(layer, "bias", None) is not None:
        bias_mask = masks.get(f"{name}.bias")
        bias_mask = torch.ones_like(layer.bias) if bias_mask is None else bias_mask.to(layer.bias.device, layer.bias.dtype).clone()
    return weight_mask, bias_mask


def _removed(weight_mask: torch.Tensor, bias_mask: torch.Tensor | None) -> torch.Tensor:
    gone = weight_mask.reshape(weight_mask.shape[0], -1).sum(dim=1) == 0
    return gone if bias_mask is None else gone & (bias_mask == 0)


def nnrelief_masks(
    model: nn.Module,
    layers: dict[str, nn.Module],
    batches: Sequence[Batch],
    alpha_fc: float = 0.95,
    alpha_conv: float = 0.9,
    masks: dict[str, torch.Tensor] | None = None,
    remove_dead_units: bool = True,
    max_elements: int = DEFAULT_MAX_ELEMENTS,
) -> NNReliefResult:
    """One NNrelief pruning step on ``layers`` (name -> module of ``model``): new weight and bias masks.

    ``masks`` holds the current masks (parameter name -> 0/1); what they remove stays removed.
    The model's weights are masked temporarily while the layers are pruned one after another and
    restored before returning: nothing of ``model`` changes.
    """
    if not batches:
        raise ValueError("NNrelief needs a pruning set: got no batches")
    for name, layer in layers.items():
        check_supported(name, layer)
    masks = masks or {}
    order, calls = forward_order(model, batches[0][0][:2], layers)
    working: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {name: _layer_masks(layers[name], name, masks) for name in order}
    snapshot = {name: (layers[name].weight.detach().clone(), None if working[name][1] is None else layers[name].bias.detach().clone()) for name in order}

    def apply(name: str) -> None:
        weight_mask, bias_mask = working[name]
        with torch.no_grad():
            layers[name].weight.mul_(weight_mask)
            if bias_mask is not None:
                layers[name].bias.mul_(bias_mask)

    dead_units = {name: 0 for name in order}
    swept_units = {name: 0 for name in order}
    unlinked: dict[str, str] = {}
    try:
        for name in order:
            apply(name)  # the existing masks, before this layer's inputs are measured
        for name in order:
            layer = layers[name]
            statistics = collect_statistics(model, {name: layer}, batches, kernel_norms=True, max_elements=max_elements, stop_early=calls[name] == 1)[name]
            unit_scores, bias_scores = relief_scores(layer, statistics)
            weight_mask, bias_mask = working[name]
            candidates = unit_scores if bias_mask is None else torch.cat([unit_scores, bias_scores[:, None]], dim=1)
            keep = cumulative_keep_mask(candidates, alpha_conv if is_conv(layer) else alpha_fc)
            weight_mask = weight_mask * expand_unit_tensor(layer, keep[:, : unit_scores.shape[1]]).to(weight_mask)
            if bias_mask is not None:
                bias_mask = bias_mask * keep[:, -1].to(bias_mask)
            working[name] = (weight_mask, bias_mask)
            apply(name)
        if remove_dead_units:
            report = trace_unit_links(model, batches[0][0][:2], order)
            unlinked = dict(report.unlinked)
            links = {name: link for name, link in report.links.items() if name in working}
            _remove_dead_units(model, layers, links, working, batches, dead_units, swept_units, order, max_elements)
    finally:
        with torch.no_grad():
            for name, (weight, bias) in snapshot.items():
                layers[name].weight.copy_(weight)
                if bias is not None:
                    layers[name].bias.copy_(bias)
    new_masks: dict[str, torch.Tensor] = {}
    removed_units = {}
    for name in order:
        weight_mask, bias_mask = working[name]
        new_masks[f"{name}.weight"] = weight_mask
        if bias_mask is not None:
            new_masks[f"{name}.bias"] = bias_mask
        removed_units[name] = int(_removed(weight_mask, bias_mask).sum())
    samples = sum(int(batch[0].shape[0]) for batch in batches)
    return NNReliefResult(new_masks, order, dead_units, swept_units, removed_units, unlinked, samples)


def _remove_dead_units(
    model: nn.Module,
    layers: dict[str, nn.Module],
    links: dict[str, UnitLink],
    working: dict[str, tuple[torch.Tensor, torch.Tensor | None]],
    batches: Sequence[Batch],
    dead_units: dict[str, int],
    swept_units: dict[str, int],
    order: list[str],
    max_elements: int,
) -> None:
    if not links:
        return
    all_layers = weight_layers(model)
    consumers = {link.consumer: all_layers[link.consumer] for link in links.values()}
    activity = collect_statistics(model, consumers, batches, kernel_norms=False, max_elements=max_elements)

    def remove_units(name: str, units: torch.Tensor) -> int:
        """Mask the incoming weights and bias of ``units`` of layer ``name`` (and, when the consumer
        is selected too, their outgoing connections); return how many were not removed yet."""
        weight_mask, bias_mask = working[name]
        before = _removed(weight_mask, bias_mask)
        keep = (~units).to(weight_mask.dtype)
        weight_mask = weight_mask * keep.reshape(-1, *([1] * (weight_mask.dim() - 1)))
        bias_mask = None if bias_mask is None else bias_mask * keep
        working[name] = (weight_mask, bias_mask)
        link = links[name]
        if link.consumer in working:
            consumer_weight, consumer_bias = working[link.consumer]
            inputs = units.repeat_interleave(link.block)
            working[link.consumer] = (mask_input_units(consumers[link.consumer], consumer_weight, inputs), consumer_bias)
        return int((units & ~before).sum())

    # (1) zero activity: the consumer never sees anything from these units on the pruning set
    for name, link in links.items():
        units = layers[name].weight.shape[0]
        seen = activity[link.consumer].input_activity.to(working[name][0].device)
        dead = (_unit_view(seen, units) == 0).all(dim=1)
        if dead.any():
            dead_units[name] += remove_units(name, dead)
    # (2) backward sweep: consumers before their producers, so removals cascade to the input
    for name in reversed(order):
        link = links.get(name)
        if link is None:
            continue
        consumer = consumers[link.consumer]
        connections = working[link.consumer][0] if link.consumer in working else (consumer.weight.detach() != 0)
        connected = _unit_view(input_unit_connected(consumer, connections), layers[name].weight.shape[0]).any(dim=1)
        if (~connected).any():
            swept_units[name] += remove_units(name, ~connected)


# ---------------------------------------------------------------------------------- strategy
class NNReliefPruning(Strategy):
    """NNrelief (Dekhovich et al. 2021): iterative pruning where each neuron keeps the connections
    that carry ``alpha`` of its input signal on a pruning set, then retraining.

    By default it prunes after ``every`` epochs of training, ``iterations`` times (at epochs
    ``every, 2*every, ..., iterations*every``): train at least ``(iterations + 1) * every`` epochs
    so the last pruning step is retrained too. The paper uses 5 iterations for LeNets, 6 for
    VGG-like networks and 10 for ResNet-20, and 1,000 training samples as the pruning set. There is
    no sparsity target: ``alpha_fc`` / ``alpha_conv`` decide how much goes. Masks are monotone
    (pruned weights never return) and stay exactly zero during training. Each step appends one
    record to the edit log with ``achieved`` (fraction of the selected layers' original weights
    now masked), ``per_layer`` weight sparsity, ``removed_units`` (units with no incoming weight and
    no bias left, per layer), this step's ``dead_units`` and ``swept_units``, and
    ``unlinked_layers`` (layers left out of the dead-unit removal, with why). See
    :mod:`growprune.strategies.nnrelief` for the algorithm and its limits.

    Args:
        schedule: when to prune (its ``amount`` is not used). Default:
            ``Constant(amount=0.0, start=every, end=every * iterations, every=every)``; when given,
            ``iterations`` and ``every`` are ignored.
        iterations: number of prune + retrain rounds of the default schedule (>= 1).
        every: epochs of (re)training before each pruning step of the default schedule (>= 1).
        alpha_fc: share of each linear neuron's input signal its kept connections carry, in (0, 1].
        alpha_conv: the same for each conv filter (its units are input-channel kernels), in (0, 1].
        pruning_samples: training samples in the pruning set (>= 1; fewer if the training set is
            smaller), a seeded random draw from the training set at each step, from a loader of its
            own (the training loader and its shuffle order are untouched).
        layers: shell-style patterns of the linear/conv layers to prune (default: all of them).
        skip: patterns of layers to leave dense (e.g. ``["features.0"]``).
        remove_dead_units: remove units whose output is zero on the whole pruning set and, sweeping
            back from the output, units with no outgoing connection left (not the output layer's).
        name: metric prefix and edit-log key.
        verbose: print a line after each pruning step.
        fit_schedule: when the schedule (the default one too) would act after the end of
            training, compress it into the training (the same number of pruning steps, closer
            together) instead of refusing it (see :class:`~growprune.strategies.Strategy`).
    """

    def __init__(
        self,
        schedule: Schedule | None = None,
        iterations: int = 5,
        every: int = 5,
        alpha_fc: float = 0.95,
        alpha_conv: float = 0.9,
        pruning_samples: int = 1000,
        layers: list[str] | None = None,
        skip: list[str] | None = None,
        remove_dead_units: bool = True,
        name: str | None = None,
        verbose: bool = True,
        fit_schedule: bool = False,
    ):
        self.iterations = check_integer("iterations", iterations, minimum=1)
        self.every = check_integer("every", every, minimum=1)
        self.pruning_samples = check_integer("pruning_samples", pruning_samples, minimum=1)
        self.alpha_fc = check_number("alpha_fc", alpha_fc, minimum=0.0, maximum=1.0, strict_minimum=True)
        self.alpha_conv = check_number("alpha_conv", alpha_conv, minimum=0.0, maximum=1.0, strict_minimum=True)
        self._default_schedule = schedule is None
        if schedule is None:
            schedule = Constant(amount=0.0, start=every, end=every * iterations, every=every)
        super().__init__(schedule, name=name, scoring_batches=0, verbose=verbose, fit_schedule=fit_schedule)
        self.layers = list(layers) if layers is not None else None
        self.skip = list(skip or [])
        self.remove_dead_units = bool(remove_dead_units)
        self._warned_unlinked = False

    @property
    def original_sizes(self) -> dict[str, int]:
        """Selected layer -> its number of weights when the fit started."""
        return self.original.setdefault("weights", {})

    def schedule_hint(self, schedule: Schedule, last: int) -> str:
        if self._default_schedule:
            return f"iterations * every <= {last}, now {self.iterations} * {self.every}"
        return super().schedule_hint(schedule, last)

    def check(self, trainer: pl.Trainer, pl_module: Any) -> None:
        selected = select_layers(pl_module.model, self.layers, self.skip)
        for name, layer in selected.items():
            check_supported(name, layer)
            # sizes at set-up are the originals; a resumed run replaces them by the stored ones
            self.original_sizes.setdefault(name, layer.weight.numel())

    def collect_pruning_set(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> list[Batch]:
        """``pruning_samples`` random training samples (the last batch cut to fit), on the module's device.

        Drawn from a loader of their own (see :mod:`growprune.scoring`): the training loader and
        the global random states are left alone. The seed is the iteration (number of pruning
        steps so far): the same pruning set on every rank and in a resumed run.
        """
        from growprune.scoring import scoring_batches

        return scoring_batches(trainer, samples=self.pruning_samples, seed=len(self.history), device=pl_module.device)

    def act(self, trainer: pl.Trainer, pl_module: Any, target: float) -> dict[str, Any]:
        model = pl_module.model
        layers = {name: model.get_submodule(name) for name in self.original_sizes}
        batches = self.collect_pruning_set(trainer, pl_module)
        current = {key: value for key, value in pl_module.masks.items()}
        result = nnrelief_masks(
            model, layers, batches, self.alpha_fc, self.alpha_conv, current, remove_dead_units=self.remove_dead_units
        )
        info = {
            "dead_units": result.dead_units,
            "swept_units": result.swept_units,
            "removed_units": result.removed_units,
            "unlinked_layers": result.unlinked,
            "pruning_samples": result.samples,
        }
        # rank 0's pruning set decides for every rank: identical masks everywhere under DDP
        shared = broadcast_from_rank_zero(trainer, {"masks": {k: v.cpu() for k, v in result.masks.items()}, "info": info})
        masks = tensor_dict_to(shared["masks"], pl_module.device)
        info = shared["info"]
        self.apply_edit(pl_module, MaskWeights(masks))
        weight_masks = {name: masks[f"{name}.weight"] for name in layers}
        total = sum(self.original_sizes.values())
        pruned = sum(int((mask == 0).sum()) for mask in weight_masks.values())
        record = {
            "action": "nnrelief_prune",
            "iteration": len(self.history) + 1,
            "alpha_fc": self.alpha_fc,
            "alpha_conv": self.alpha_conv,
            "pruning_samples": info["pruning_samples"],
            "achieved": (pruned + total - sum(mask.numel() for mask in weight_masks.values())) / total,
            "per_layer": {name: sparsity(mask) for name, mask in weight_masks.items()},
            "removed_units": info["removed_units"],
            "removed_units_total": sum(info["removed_units"].values()),
            "dead_units": info["dead_units"],
            "swept_units": info["swept_units"],
            "unlinked_layers": info["unlinked_layers"],
        }
        if self.remove_dead_units and info["unlinked_layers"] and not self._warned_unlinked:
            self._warned_unlinked = True
            reasons = "; ".join(f"{name}: {why}" for name, why in info["unlinked_layers"].items())
            rank_zero_warn(
                f"{self.name}: dead-unit removal skips layers whose consumer is not a plain chain ({reasons})"
            )
        if self.verbose:
            layer_text = ", ".join(f"{name} {value:.3f}" for name, value in record["per_layer"].items())
            rank_zero_info(
                f"[{self.name}] iteration {record['iteration']}: sparsity {record['achieved']:.4f} "
                f"({layer_text}); units removed {record['removed_units']}"
            )
        return record

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        if "original_sizes" in state_dict:  # checkpoints written before sizes moved into `original`
            self.original["weights"] = dict(state_dict["original_sizes"])
