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
from growprune.strategies.base import Strategy, broadcast_from_rank_zero, tensor_dict_to, training_length
from growprune.surgery.edits import Edit, EditResult, MaskWeights
from growprune.surgery.masks import select_layers, sparsity, weight_layers
# the unit-level graph lives in growprune.surgery.units; UnitLink, LinkReport and trace_unit_links
# stay importable from here for existing users
from growprune.surgery.units import LinkReport, UnitLink, forward_order, trace_unit_links  # noqa: F401
from growprune.triggers import Trigger
from growprune.validation import check_integer, check_number

REWIND_CHOICES = (None, "init", "pretrained")


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


# ------------------------------------------------------------------------------- snapshots
def cpu_snapshot(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached CPU copies of ``tensors`` (copies even when they already live on the CPU, so a
    snapshot never aliases, and never trains along with, the live weights)."""
    return {name: value.detach().to("cpu", copy=True) for name, value in tensors.items()}


def follow_edit(snapshot: dict[str, torch.Tensor], current: dict[str, torch.Tensor], result: EditResult,
                add_missing: bool = True) -> dict[str, torch.Tensor]:
    """``snapshot`` (tensor name -> CPU tensor) moved through a structural edit of the network whose
    tensors are now ``current``: renamed entries follow their tensor, carried entries keep their
    old values where the edit kept them (new entries take the current values), tensors of removed
    layers go, and (``add_missing``) tensors of ``current`` the snapshot lacks are added with their
    current values. Returns the new snapshot (CPU)."""
    moved: dict[str, torch.Tensor] = {}
    for name, value in snapshot.items():
        name = result.renamed.get(name, name)
        if name not in current:
            continue  # its layer was removed
        here = current[name].detach().cpu()
        change = result.changes.get(name)
        if change is not None:
            value = change.carry(value, here.shape, fill=here)
        moved[name] = value if value.shape == here.shape else here.clone()
    if add_missing:
        for name, value in current.items():
            moved.setdefault(name, value.detach().to("cpu", copy=True))
    return moved


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

    **Pruning until accuracy drops** (``stop_margin``, the paper's protocol). ``iterations`` becomes
    a cap (give a large one, e.g. 50, and ``max_epochs >= (iterations + 1) * every``). Before each
    pruning step the last validation of the retrained network (``monitor_metric`` of the epoch just
    before the step) is compared with the dense reference, the same metric right before the FIRST
    pruning step. Within the margin (``reference - metric <= stop_margin``) the previous step is
    accepted, the network (all weights and buffers, all masks) is snapshotted and pruned again.
    More than ``stop_margin`` below: the snapshot taken right before the last pruning step (the
    last retrained network that was within the margin) is restored, weights and masks, the
    optimizer is rebuilt, pruning stops for good (also in a resumed run), the validation loop runs
    once more on the restored network (so the last logged ``val/...`` metrics and
    ``trainer.callback_metrics`` are the restored network's) and training stops
    (``trainer.should_stop``; ``min_epochs`` can keep it going, training the restored network on).
    The last step is checked the same way at the end of the last epoch of training. Needs
    validation after every epoch (``check_val_every_n_epoch=1``, ``limit_val_batches > 0``) and an
    epoch schedule that is not a :class:`~growprune.triggers.Trigger`. With it each pruning record
    also has ``reference_metric``, ``metric_before`` (the metric of the network this step pruned),
    ``metric_retrained`` and ``accepted`` (filled in once this step's retraining was validated;
    ``None`` until then), ``compression`` (original / remaining weights of the selected layers);
    a restoration appends an ``nnrelief_restore`` record. See :attr:`stopped_reason` and
    :attr:`accepted_iterations`.

    **Rewinding** (``rewind``). After each pruning step (masks computed on the trained weights) the
    whole network (parameters and buffers) is reset to a snapshot, all masks are re-applied and
    the optimizer and LR schedulers are built afresh (``trainer.strategy.setup_optimizers``): no
    momentum carries over and the LR schedule restarts at every pruning step, as the paper's code
    does for LeNets. ``"init"``: the values at fit start, before any training; ``"pretrained"``:
    the values right before the first pruning step. ``None`` keeps training the pruned weights
    (the paper's VGG/ResNet fine-tuning).

    Snapshots (rewind weights, the accepted network) are CPU copies of the whole state dict: one
    extra copy of the network each, in host memory (LeNet-300-100 about 1 MB, a CIFAR VGG-16 about
    60 MB); they follow structural edits of other strategies and are stored in checkpoints with
    the dense reference and the last validation, so ``fit --ckpt_path`` resumes with them.

    Args:
        schedule: when to prune (its ``amount`` is not used). Default:
            ``Constant(amount=0.0, start=every, end=every * iterations, every=every)``; when given,
            ``iterations`` and ``every`` are ignored.
        iterations: number of prune + retrain rounds of the default schedule (>= 1); the most
            there can be with ``stop_margin``.
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
        stop_margin: ``None`` (default): prune at every time of the schedule. A number in [0, 1]:
            stop pruning once the validation metric falls more than this (absolute, e.g. 0.01 for
            one accuracy point) below the dense reference, and restore the last network within it
            (see above).
        monitor_metric: the validation metric ``stop_margin`` compares (a larger-is-better
            quantity, e.g. accuracy in [0, 1]), as in ``trainer.callback_metrics``.
        rewind: ``None`` (default), ``"init"`` or ``"pretrained"`` (see above).

    Attributes:
        reference_metric: the dense reference of ``stop_margin`` (``None`` before the first step).
        stopped_reason: why pruning stopped (``None`` while it goes on or without ``stop_margin``).

    Raises:
        ValueError: a bad argument (one line naming it), before anything is set.
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
        stop_margin: float | None = None,
        monitor_metric: str = "val/acc",
        rewind: str | None = None,
    ):
        self.iterations = check_integer("iterations", iterations, minimum=1)
        self.every = check_integer("every", every, minimum=1)
        self.pruning_samples = check_integer("pruning_samples", pruning_samples, minimum=1)
        self.alpha_fc = check_number("alpha_fc", alpha_fc, minimum=0.0, maximum=1.0, strict_minimum=True)
        self.alpha_conv = check_number("alpha_conv", alpha_conv, minimum=0.0, maximum=1.0, strict_minimum=True)
        if stop_margin is not None:
            stop_margin = check_number("stop_margin", stop_margin, minimum=0.0, maximum=1.0)
            if isinstance(schedule, Trigger) or (schedule is not None and schedule.unit != "epoch"):
                raise ValueError(
                    f"stop_margin needs an epoch schedule that is not a Trigger (it validates the network before each "
                    f"pruning epoch), got {type(schedule).__name__} with unit {getattr(schedule, 'unit', None)!r}")
        if not isinstance(monitor_metric, str) or not monitor_metric:
            raise ValueError(f"monitor_metric must be a metric name such as 'val/acc', got {monitor_metric!r}")
        if rewind not in REWIND_CHOICES:
            raise ValueError(f"rewind must be one of {', '.join(repr(choice) for choice in REWIND_CHOICES)}, got {rewind!r}")
        self.stop_margin = stop_margin
        self.monitor_metric = monitor_metric
        self.rewind = rewind
        self._default_schedule = schedule is None
        if schedule is None:
            schedule = Constant(amount=0.0, start=every, end=every * iterations, every=every)
        super().__init__(schedule, name=name, scoring_batches=0, verbose=verbose, fit_schedule=fit_schedule)
        self.layers = list(layers) if layers is not None else None
        self.skip = list(skip or [])
        self.remove_dead_units = bool(remove_dead_units)
        self._warned_unlinked = False

    def reset(self) -> None:
        super().reset()
        self.reference_metric: float | None = None
        self.stopped_reason: str | None = None
        # (epoch, value or None) of the last validation outside the sanity check
        self._last_validation: tuple[int, float | None] | None = None
        # the network right before the last pruning step: {"state", "masks", "iteration", "metric"}
        self._accepted: dict[str, Any] | None = None
        self._rewind_state: dict[str, torch.Tensor] | None = None

    @property
    def original_sizes(self) -> dict[str, int]:
        """Selected layer -> its number of weights when the fit started."""
        return self.original.setdefault("weights", {})

    @property
    def prune_records(self) -> list[dict[str, Any]]:
        """This fit's pruning records (``nnrelief_prune``), oldest first."""
        return [record for record in self.history if record.get("action") == "nnrelief_prune"]

    @property
    def accepted_iterations(self) -> int:
        """Pruning steps whose result the network keeps: with ``stop_margin`` the steps whose
        retrained network was validated within the margin; without it every step done."""
        if self.stop_margin is None:
            return len(self.prune_records)
        return sum(1 for record in self.prune_records if record.get("accepted") is True)

    def schedule_hint(self, schedule: Schedule, last: int) -> str:
        if self._default_schedule:
            return f"iterations * every <= {last}, now {self.iterations} * {self.every}"
        return super().schedule_hint(schedule, last)

    def check(self, trainer: pl.Trainer, pl_module: Any) -> None:
        if self.stop_margin is not None:
            every_n = getattr(trainer, "check_val_every_n_epoch", 1)
            limit = getattr(trainer, "limit_val_batches", 1.0)
            if every_n != 1 or limit == 0:
                raise ValueError(
                    f"{self.name}: stop_margin compares {self.monitor_metric!r} before every pruning step, so validation "
                    f"must run every epoch: set check_val_every_n_epoch=1 (now {every_n}) and limit_val_batches > 0 "
                    f"(now {limit})")
        selected = select_layers(pl_module.model, self.layers, self.skip)
        for name, layer in selected.items():
            check_supported(name, layer)
            # sizes at set-up are the originals; a resumed run replaces them by the stored ones
            self.original_sizes.setdefault(name, layer.weight.numel())

    # ------------------------------------------------------------------------------ hooks
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        # a resumed fit has loaded its snapshots by now (callback state is restored before on_fit_start);
        # a resumed network's weights are not its initial ones, so those must come from the checkpoint too
        resumed = getattr(trainer, "ckpt_path", None) is not None
        missing = (
            (self.rewind == "init" and self._rewind_state is None and (resumed or self.prune_records))
            or (self.rewind == "pretrained" and self._rewind_state is None and self.prune_records)
            or (self.stop_margin is not None and self.stopped_reason is None and self._accepted is None and self.prune_records))
        if missing:
            raise ValueError(
                f"{self.name}: the checkpoint has no snapshots for rewind={self.rewind!r} / stop_margin={self.stop_margin!r} "
                f"(it was written without them): resume with the options it was written with")
        if self.rewind == "init" and self._rewind_state is None:
            self._rewind_state = cpu_snapshot(pl_module.model.state_dict())

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        if trainer.sanity_checking:
            return
        value = trainer.callback_metrics.get(self.monitor_metric)
        self._last_validation = (trainer.current_epoch, None if value is None else float(value))

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.stop_margin is None or self.stopped_reason is not None or not self.prune_records:
            return
        if self.prune_records[-1].get("accepted") is not None:
            return
        # only the planned end: an interruption (or another callback's early stop) leaves the step pending
        length, _ = training_length(trainer, "epoch")
        if length is None or trainer.current_epoch < length - 1:
            return
        # the end of training: the last pruning step gets the same check as the others
        metric = self._validated_metric(trainer.current_epoch, "at the end of training")
        if self._within_margin(pl_module, metric):
            done = len(self.prune_records)
            self.stopped_reason = f"training ended after {done} pruning steps, the last within the margin"
        else:
            self._restore(trainer, pl_module, trainer.current_epoch, metric)

    def on_edit(self, trainer: pl.Trainer, pl_module: Any, edit: Edit, result: EditResult) -> None:
        """The snapshots follow structural edits (see :func:`follow_edit`)."""
        if not result.structural:
            return
        current = pl_module.model.state_dict()
        if self._rewind_state is not None:
            self._rewind_state = follow_edit(self._rewind_state, current, result)
        if self._accepted is not None:
            self._accepted["state"] = follow_edit(self._accepted["state"], current, result)
            # masks set after the snapshot do not belong to it; those of inserted tensors do
            masks = dict(pl_module.masks)
            carried = follow_edit(self._accepted["masks"], masks, result, add_missing=False)
            carried.update({name: masks[name].detach().to("cpu", copy=True) for name in result.added if name in masks})
            self._accepted["masks"] = carried

    def _maybe_act(self, trainer: pl.Trainer, pl_module: Any, time: int) -> None:
        if self.stopped_reason is not None:
            return
        schedule = self.active_schedule
        if (self.stop_margin is not None and schedule is not None and time not in self._done
                and schedule.target_at(time) is not None and not self._accept_before_step(trainer, pl_module, time)):
            return
        super()._maybe_act(trainer, pl_module, time)

    # ------------------------------------------------------------------------ stop margin
    def _validated_metric(self, epoch: int, when: str) -> float:
        """The monitored metric of the validation at the end of ``epoch``; raise when there was none."""
        last = self._last_validation
        if last is None or last[0] != epoch or last[1] is None:
            seen = ("no validation ran" if last is None else f"the last validation was at epoch {last[0]}"
                    if last[0] != epoch else "it was not logged")
            raise ValueError(
                f"{self.name}: stop_margin needs the validation metric {self.monitor_metric!r} of epoch {epoch} "
                f"({when}), but {seen}: validation must run every epoch and log {self.monitor_metric!r}")
        return last[1]

    def _within_margin(self, pl_module: Any, metric: float) -> bool:
        """Compare ``metric`` (the last step's retrained network) with the reference; settle that step's record."""
        accepted = self.reference_metric - metric <= self.stop_margin
        iteration = self.prune_records[-1]["iteration"]
        self._update_record(pl_module, iteration, metric_retrained=metric, accepted=accepted)
        return accepted

    def _accept_before_step(self, trainer: pl.Trainer, pl_module: Any, time: int) -> bool:
        """Before the pruning step at epoch ``time``: accept the network and snapshot it (True), or
        restore the last accepted one and stop (False)."""
        metric = self._validated_metric(time - 1, f"before the pruning step at epoch {time}")
        if self.reference_metric is None:
            self.reference_metric = metric  # the dense network, right before the first step
        elif not self._within_margin(pl_module, metric):
            self._restore(trainer, pl_module, time, metric)
            return False
        self._accepted = {
            "state": cpu_snapshot(pl_module.model.state_dict()),
            "masks": cpu_snapshot(pl_module.masks),
            "iteration": len(self.prune_records),
            "metric": metric,
        }
        return True

    def _restore(self, trainer: pl.Trainer, pl_module: Any, time: int, metric: float) -> None:
        """Put back the network accepted before the last pruning step, stop pruning and training,
        and validate the restored network."""
        accepted = self._accepted
        pl_module.model.load_state_dict(accepted["state"])
        pl_module.masks = dict(accepted["masks"])
        trainer.strategy.setup_optimizers(trainer)  # no momentum of the rejected weights
        rejected = len(self.prune_records)
        self.stopped_reason = (
            f"{self.monitor_metric} {metric:.4f} after pruning step {rejected} is more than stop_margin={self.stop_margin:g} "
            f"below the dense reference {self.reference_metric:.4f}; restored the network before that step "
            f"({accepted['iteration']} accepted steps, {self.monitor_metric} {accepted['metric']:.4f})")
        weights = {name: pl_module.masks.get(f"{name}.weight") for name in self.original_sizes}
        remaining = sum(self.original_sizes[name] if mask is None else int(mask.count_nonzero()) for name, mask in weights.items())
        record = {
            "strategy": self.name, "type": type(self).__name__, "unit": self.schedule.unit, "time": time,
            "target": None, "action": "nnrelief_restore", "restored_iteration": accepted["iteration"],
            "rejected_iteration": rejected, "rejected_metric": metric, "reference_metric": self.reference_metric,
            "restored_metric": accepted["metric"], "achieved": 1.0 - remaining / sum(self.original_sizes.values()),
            "reason": self.stopped_reason, "ops": [],
        }
        pl_module.edit_log.append(record)
        self.history.append(record)
        self._log_record(trainer, pl_module, record)
        rank_zero_info(f"[{self.name}] {self.stopped_reason}")
        trainer.should_stop = True
        self._revalidate(trainer)

    def _revalidate(self, trainer: pl.Trainer) -> None:
        """Run Lightning's validation loop once on the restored network (metrics, loggers and
        checkpoint callbacks see it as this epoch's validation, so a ``ModelCheckpoint`` that saves
        every epoch writes the restored network)."""
        loop = trainer.fit_loop.epoch_loop.val_loop
        for callback in trainer.checkpoint_callbacks:
            # a ModelCheckpoint saves once per optimizer step: at this step it saved the refused
            # network, so let its usual policy save (or not) the restored one over it
            if getattr(callback, "_last_global_step_saved", None) == trainer.global_step:
                callback._last_global_step_saved = -1
        trainer.validating = True  # what the training loop sets before its own validation runs
        try:
            loop.run()
        finally:
            trainer.training = True

    def _update_record(self, pl_module: Any, iteration: int, **fields: Any) -> None:
        """Add ``fields`` to pruning record ``iteration`` in the history and the edit log (one object
        in a fresh fit, two after a resume) and log the numbers."""
        for record in [*self.history, *pl_module.edit_log]:
            if record.get("strategy") == self.name and record.get("action") == "nnrelief_prune" and record.get("iteration") == iteration:
                record.update(fields)
        trainer = pl_module._trainer
        if trainer is not None and trainer.is_global_zero:
            metrics = {f"{self.name}/{key}": float(value) for key, value in fields.items() if isinstance(value, (int, float))}
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step)

    # ------------------------------------------------------------------------------ pruning
    def collect_pruning_set(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> list[Batch]:
        """``pruning_samples`` random training samples (the last batch cut to fit), on the module's device.

        Drawn from a loader of their own (see :mod:`growprune.scoring`): the training loader and
        the global random states are left alone. The seed is the iteration (number of pruning
        steps so far): the same pruning set on every rank and in a resumed run.
        """
        from growprune.scoring import scoring_batches

        return scoring_batches(trainer, samples=self.pruning_samples, seed=len(self.prune_records), device=pl_module.device)

    def act(self, trainer: pl.Trainer, pl_module: Any, target: float) -> dict[str, Any]:
        model = pl_module.model
        if self.rewind == "pretrained" and self._rewind_state is None:
            self._rewind_state = cpu_snapshot(model.state_dict())
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
        if self.rewind is not None:
            # the masks were chosen on the trained weights; the survivors restart from the snapshot
            model.load_state_dict(self._rewind_state)
            pl_module.apply_masks()
            if trainer.optimizers:
                trainer.strategy.setup_optimizers(trainer)  # fresh optimizer state and LR schedule
        weight_masks = {name: masks[f"{name}.weight"] for name in layers}
        total = sum(self.original_sizes.values())
        pruned = sum(int((mask == 0).sum()) for mask in weight_masks.values())
        record = {
            "action": "nnrelief_prune",
            "iteration": len(self.prune_records) + 1,
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
        if self.rewind is not None or self.stop_margin is not None:
            record["compression"] = 1.0 / max(1.0 - record["achieved"], 1.0 / total)
        if self.rewind is not None:
            record["rewound_to"] = self.rewind
        if self.stop_margin is not None:
            record.update({"reference_metric": self.reference_metric, "metric_before": self._accepted["metric"],
                           "metric_retrained": None, "accepted": None})
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

    # --------------------------------------------------------------------------- checkpoint
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["nnrelief"] = {
            "reference_metric": self.reference_metric,
            "stopped_reason": self.stopped_reason,
            "last_validation": None if self._last_validation is None else list(self._last_validation),
            "accepted": None if self._accepted is None else dict(self._accepted),
            "rewind_state": self._rewind_state,
        }
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        if "original_sizes" in state_dict:  # checkpoints written before sizes moved into `original`
            self.original["weights"] = dict(state_dict["original_sizes"])
        stored = state_dict.get("nnrelief") or {}
        self.reference_metric = stored.get("reference_metric")
        self.stopped_reason = stored.get("stopped_reason")
        last = stored.get("last_validation")
        self._last_validation = None if last is None else (int(last[0]), last[1])
        self._accepted = stored.get("accepted")
        self._rewind_state = stored.get("rewind_state")
