"""Regularised channel pruning: train with a penalty on the batch-norm scales, then cut by threshold.

Two methods that steer the BN scaling factors gamma during training so that a threshold on them
separates channels that can go from channels that must stay:

* :class:`NetworkSlimming` (Liu et al., ICCV 2017): ``loss + lambda * sum |gamma|`` and ONE global
  percentile threshold on |gamma| over every regularised channel.
* :class:`PolarizationPruning` (Zhuang et al., NeurIPS 2020): scales initialised to 0.5 and kept
  in [0, 1]; ``loss + lambda * sum_i (t |gamma_i| - |gamma_i - mean(gamma)|)`` with the mean over
  ALL regularised scales of the network; a per-layer threshold at the first valley of a 100-bin
  histogram of the layer's scales on [0, 1].

Both reuse :class:`~growprune.strategies.structured.StructuredPruning` for the channel graph,
the surgery, the optimizer repair and the edit-log record (with the ``remove_channels`` edit a
checkpoint replays); they replace *which* channels go (:meth:`plan`) and what the record says
(the share of regularised channels the method asked for, its thresholds, and what it got).

Which BN layers are regularised: every batch-norm layer (with affine scales) that belongs to a
prunable channel group (see :class:`~growprune.surgery.channels.ChannelGraph`; skipped layers and
the output layer's group are not). Groups without batch norm (e.g. hidden linear layers) are
neither regularised nor pruned.

The scale of a channel of a group with several BN layers (a residual stream: the stem BN, the
last BN of every block of the stage, the shortcut BN) is the MEAN of |gamma| over the group's BN
layers. The penalties act on every BN layer's own scales.
"""

from __future__ import annotations

from typing import Any, Sequence

import lightning.pytorch as pl
import torch
import torch.nn as nn

from lightning.pytorch.utilities import rank_zero_warn

from growprune.criteria.channels import BNScaleCriterion
from growprune.errors import ConfigurationError
from growprune.planning import balanced_subset, original_size
from growprune.schedules import OneShot, Schedule
from growprune.strategies.base import broadcast_from_rank_zero, training_length
from growprune.strategies.structured import TOLERANCE, StructuredPruning
from growprune.surgery.channels import ChannelGroup
from growprune.surgery.edits import RemoveChannels
from growprune.validation import check_integer, check_number

#: Share of the epochs trained with the penalty before the default schedule prunes (the rest fine-tunes).
DEFAULT_PRUNE_AT = 0.75


# ------------------------------------------------------------------------------------ penalties
def _flat(scales: Sequence[torch.Tensor]) -> torch.Tensor:
    if not scales:
        raise ValueError("no scales to regularise")
    return torch.cat([scale.reshape(-1) for scale in scales])


def l1_penalty(scales: Sequence[torch.Tensor], strength: float) -> torch.Tensor:
    """Network slimming's sparsity penalty ``strength * sum |gamma|`` over every tensor in ``scales``."""
    return strength * _flat(scales).abs().sum()


def polarization_penalty(scales: Sequence[torch.Tensor], strength: float, t: float) -> torch.Tensor:
    """``strength * sum_i (t |g_i| - |g_i - mean(g)|)`` with ONE mean over all tensors in ``scales``.

    The mean is part of the formula (gradients flow through it), as in Zhuang et al. (2020).
    """
    values = _flat(scales)
    return strength * (t * values.abs().sum() - (values - values.mean()).abs().sum())


def histogram_threshold(scales: torch.Tensor, bins: int = 100, low: float = 0.0, high: float = 1.0) -> float | None:
    """Threshold at the first valley of the histogram of ``scales`` (``bins`` equal bins on [low, high]).

    Walk from the first occupied bin up the first mode to its peak, then down to the first bin
    after which the counts rise again: that bin (the first of a flat valley floor) is the first
    local minimum, and its LEFT edge is returned, so channels with ``scale < threshold`` lie in the
    first mode and channels in the valley bin itself are kept. Values outside [low, high] count in
    the first or last bin.

    Returns ``None`` when there is no valley between two modes (empty input, one mode, counts
    never rising again after the first mode): then nothing should be pruned.

    The rule assumes polarised scales (a cluster near 0 and one well above it). On a sparse
    histogram of unpolarised scales the first valley may come right after the first occupied bin.
    """
    if bins < 3:
        raise ValueError(f"bins must be >= 3 to have a valley, got {bins}")
    if not high > low:
        raise ValueError(f"high ({high}) must exceed low ({low})")
    values = scales.detach().float().reshape(-1).cpu()
    if values.numel() == 0:
        return None
    index = ((values - low) / (high - low) * bins).floor().long().clamp(0, bins - 1)
    counts = torch.bincount(index, minlength=bins).tolist()
    position = next(i for i, count in enumerate(counts) if count > 0)
    while position + 1 < bins and counts[position + 1] >= counts[position]:
        position += 1  # up the first mode
    peak = position
    while position + 1 < bins and counts[position + 1] <= counts[position]:
        position += 1  # down to the valley floor
    if position + 1 >= bins:
        return None  # the counts never rise again: one mode, no valley
    floor = position
    while floor - 1 > peak and counts[floor - 1] == counts[position]:
        floor -= 1  # first bin of a flat floor
    return low + floor * (high - low) / bins


class _RegularisedScaleCriterion(BNScaleCriterion):
    """Mean |gamma| over the group's BN layers; +inf for groups without batch norm (never pruned)."""

    def raw_scores(self, graph: Any, group: Any) -> torch.Tensor:
        scores = self._importance(graph.tp_group(group.root))
        if scores is None:
            return torch.full((group.channels,), float("inf"))
        return scores

    def __repr__(self) -> str:
        return "BNScale(mean |gamma| over the group's BN layers)"


# ------------------------------------------------------------------------------- shared machinery
class _BNRegularisedPruning(StructuredPruning):
    """A penalty on the BN scales during training, then threshold-based channel removal.

    Subclasses implement :meth:`penalty` and :meth:`plan`. The penalty is registered with the
    module (``add_loss_term``) when training starts, unless every pruning action of the schedule
    is already done (a resumed run), and removed after the last pruning action and at the end of
    fit: fine-tuning after pruning runs without it.
    """

    def __init__(
        self,
        schedule: Schedule | None,
        skip: list[str] | None,
        min_channels: int,
        round_to: int | None,
        name: str | None,
        verbose: bool,
        fit_schedule: bool = False,
    ):
        self._default_schedule = schedule is None
        if schedule is None:
            schedule = OneShot(amount=0.0, at=0)  # each fit acts at DEFAULT_PRUNE_AT of its epochs instead
        super().__init__(schedule, criterion=_RegularisedScaleCriterion(), target="channels", scope="global",
                         skip=skip, min_channels=min_channels, round_to=round_to, name=name, verbose=verbose,
                         fit_schedule=fit_schedule)

    def reset(self) -> None:
        super().reset()
        self.regularised_layers: list[str] = []
        self._regularising = False
        self._last_penalty: torch.Tensor | None = None
        self._plan_notes: dict[str, Any] = {}
        self._stored_prune_at: int | None = None

    # ------------------------------------------------------------------------------ set-up
    def check(self, trainer: pl.Trainer | None, pl_module: Any) -> None:
        """Find the channel groups and the regularised BN layers; remember the original size."""
        groups = self.groups(pl_module)
        if not groups:
            raise ValueError(f"{self.name}: the model has no prunable channel group")
        layers: list[str] = []
        for group in groups:
            layers += self._bn_layers(pl_module.model, group)
        self.regularised_layers = list(dict.fromkeys(layers))
        if not self.regularised_layers:
            raise ValueError(
                f"{self.name}: {type(self).__name__} regularises batch-norm scales, but no prunable channel group "
                f"has a batch-norm layer (groups rooted at {', '.join(g.root for g in groups)}); use a model "
                "with batch norm after its convolutions (e.g. vgg16_bn, resnet56) or StructuredPruning"
            )
        if not self.original:
            self.original = original_size(pl_module.model, pl_module.input_shape, groups)
        if "regularised_channels" not in self.original:
            self.original["regularised_channels"] = sum(
                group.channels for group in groups if self._bn_layers(pl_module.model, group))

    @staticmethod
    def _bn_layers(model: nn.Module, group: ChannelGroup) -> list[str]:
        modules = dict(model.named_modules())
        names = []
        for name, _ in group.members:
            module = modules.get(name)
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.weight is not None:
                names.append(name)
        return list(dict.fromkeys(names))

    def _regularised_groups(self, model: nn.Module, groups: list[ChannelGroup]) -> list[ChannelGroup]:
        return [group for group in groups if self._bn_layers(model, group)]

    def resolve_schedule(self, trainer: pl.Trainer) -> Schedule:
        if not self._default_schedule:
            return super().resolve_schedule(trainer)
        length, bound = training_length(trainer, "epoch")
        at = self._stored_prune_at  # a resumed run prunes when the original run planned to
        if at is None:
            if length is None:
                raise ConfigurationError(f"{self.name}: the default schedule prunes after {DEFAULT_PRUNE_AT:.0%} of the "
                                         f"epochs, but training is unbounded ({bound}); give a schedule")
            # the epochs that really start (max_steps may end training early), not max_epochs
            at = max(0, min(length - 1, int(DEFAULT_PRUNE_AT * length)))
        return self.fit_to_training(OneShot(amount=0.0, at=at), length, bound)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        self.start_training(trainer, pl_module)
        if self.active_schedule.end not in self._done:
            pl_module.add_loss_term(self.name, self._loss_term)
            self._regularising = True

    def start_training(self, trainer: pl.Trainer, pl_module: Any) -> None:
        """Called when fit starts, before the penalty is registered (polarization initialises scales)."""

    def _loss_term(self, pl_module: Any) -> torch.Tensor:
        value = self.penalty(pl_module.model)
        self._last_penalty = value.detach()
        return value

    def scales(self, model: nn.Module) -> list[torch.Tensor]:
        """The regularised BN scale tensors (the parameters themselves, in graph order)."""
        return [model.get_submodule(name).weight for name in self.regularised_layers]

    def penalty(self, model: nn.Module) -> torch.Tensor:
        """The penalty added to the training loss (``check`` must have run)."""
        raise NotImplementedError(f"{type(self).__name__} must implement penalty()")

    def group_scales(self, pl_module: Any) -> dict[str, torch.Tensor]:
        """Per regularised group (by root layer): each channel's mean |gamma| over the group's BN layers."""
        groups = self._regularised_groups(pl_module.model, self.groups(pl_module))
        return self.criterion.score_channels(self.graph, groups)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self._regularising and self._last_penalty is not None:
            pl_module.log(f"{self.name}/penalty", self._last_penalty, on_step=False, on_epoch=True,
                          batch_size=len(batch[1]) if isinstance(batch, (list, tuple)) and len(batch) > 1 else None)

    def _stop_regularising(self, pl_module: Any) -> None:
        pl_module.remove_loss_term(self.name)
        self._regularising = False

    def _maybe_act(self, trainer: pl.Trainer, pl_module: Any, time: int) -> None:
        super()._maybe_act(trainer, pl_module, time)
        if self._regularising and time == self.active_schedule.end and time in self._done:
            self._stop_regularising(pl_module)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._stop_regularising(pl_module)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._stop_regularising(pl_module)

    # ------------------------------------------------------------------------------ action
    def act(self, trainer: pl.Trainer, pl_module: Any, target: float) -> dict[str, Any]:
        """Cut by the method's own threshold; the record says what the method asked for and what it got.

        ``target``/``achieved`` are shares of the ORIGINAL regularised channels (``target`` is
        ``None`` when the method sets no share, as polarization's histogram valleys do), next to
        the thresholds; the schedule's amount is not a target here.
        """
        groups = self.groups(pl_module)
        scores = self.score(trainer, pl_module, groups)
        self._plan_notes = {}
        plan = broadcast_from_rank_zero(trainer, self.plan(pl_module, groups, scores, target))
        notes = broadcast_from_rank_zero(trainer, self._plan_notes)
        self.apply_edit(pl_module, RemoveChannels(plan))
        record = self.measure(pl_module, plan)
        regularised = self._regularised_groups(pl_module.model, self.groups(pl_module))
        record["achieved_channels"] = record["achieved"]  # share of all prunable channels
        record["achieved"] = 1 - sum(group.channels for group in regularised) / self.original["regularised_channels"]
        record["target_type"] = "regularised_channels"
        record.update({"target": None, **notes})
        if record["target"] is not None and abs(record["achieved"] - record["target"]) > TOLERANCE:
            rank_zero_warn(f"{self.name}: asked for {record['target']:.1%} of the regularised channels, got "
                           f"{record['achieved']:.1%} (every group keeps min_channels={self.min_channels}"
                           f"{f', round_to={self.round_to}' if self.round_to else ''})")
        return record

    def _capped(self, groups: list[ChannelGroup], wanted: dict[str, list[int]]) -> dict[str, list[int]]:
        """Keep ``min_channels`` (and ``round_to`` multiples) per group: drop the highest-scoring candidates.

        ``wanted`` lists each group's candidate channels from lowest to highest scale.
        """
        caps = {group.root: group.channels - self.planner.kept_count(self.min_channels, group.channels) for group in groups}
        counts = self.planner._rounded(groups, {root: len(indices) for root, indices in wanted.items()}, caps)
        by_root = {group.root: group for group in groups}  # grouped convolutions: the same number from every part
        chosen = {root: balanced_subset(by_root[root], indices, counts[root], self.planner._multiple(by_root[root]))
                  for root, indices in wanted.items() if counts.get(root, 0) > 0}
        return {root: sorted(indices) for root, indices in chosen.items() if indices}

    # -------------------------------------------------------------------------- checkpoint
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        if self._default_schedule and self.active_schedule is not None:
            state["default_prune_at"] = self.active_schedule.start
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        if self._default_schedule and state_dict.get("default_prune_at") is not None:
            self._stored_prune_at = int(state_dict["default_prune_at"])


# ------------------------------------------------------------------------------ network slimming
class NetworkSlimming(_BNRegularisedPruning):
    """Network slimming (Liu et al., ICCV 2017): L1 on the BN scales, then one global threshold.

    During training the loss gets ``lambda_l1 * sum |gamma|`` over the regularised BN layers
    (those in prunable channel groups). At a pruning action, every regularised channel is scored
    by its group's mean |gamma| (the mean over the group's BN layers: several in a residual
    stream) and the lowest-scoring channels of the whole network go, by ONE global threshold,
    until ``prune_fraction`` of the ORIGINAL regularised channels are gone. A group never keeps
    fewer than ``min_channels`` (its best channels stay; the threshold is not lowered elsewhere to
    compensate, so the record's ``achieved`` may fall short). The record adds ``threshold`` (the
    largest scale the global threshold selected) and ``prune_fraction``.

    Args:
        lambda_l1: penalty strength (the paper: 1e-4 for VGG, 1e-5 for ResNet on CIFAR), >= 0.
        prune_fraction: share of the regularised channels removed, in (0, 1) (the paper's VGG: 0.7).
        schedule: WHEN to prune (its amounts are not targets). Default: once, after 75 % of the
            epochs (``int(0.75 * max_epochs)``), so the last quarter fine-tunes without the penalty.
            With several actions, the share removed by an action is ``prune_fraction`` times the
            schedule's target then divided by its final target (e.g. ``Linear(amount=0.9, ...)``
            ramps up to ``prune_fraction``); a schedule whose amounts are 0 prunes
            ``prune_fraction`` at its first action.
        skip: names of layers whose channels must stay (the output layer always stays).
        min_channels: channels every group keeps at least.
        round_to: keep channel counts at multiples of this; ``None``: any.
        name: metric prefix, edit-log key and name of the loss term.
        verbose: print a line after each pruning step.
        fit_schedule: compress a given schedule that would end after training into it, instead of
            refusing it (see :class:`~growprune.strategies.Strategy`); the default schedule always fits.
    """

    def __init__(
        self,
        lambda_l1: float = 1e-4,
        prune_fraction: float = 0.5,
        schedule: Schedule | None = None,
        skip: list[str] | None = None,
        min_channels: int = 1,
        round_to: int | None = None,
        name: str | None = None,
        verbose: bool = True,
        fit_schedule: bool = False,
    ):
        self.lambda_l1 = check_number("lambda_l1", lambda_l1, minimum=0.0)
        self.prune_fraction = check_number("prune_fraction", prune_fraction, minimum=0.0, maximum=1.0,
                                           strict_minimum=True, strict_maximum=True)
        super().__init__(schedule, skip, min_channels, round_to, name, verbose, fit_schedule)

    def penalty(self, model: nn.Module) -> torch.Tensor:
        return l1_penalty(self.scales(model), self.lambda_l1)

    def fraction_at(self, target: float) -> float:
        """Share of the original regularised channels that must be gone after an action with ``target``."""
        final = self.schedule.final_target
        return self.prune_fraction if final <= 0 else self.prune_fraction * min(1.0, target / final)

    def plan(self, pl_module: Any, groups: list[ChannelGroup], scores: dict[str, torch.Tensor], target: float) -> dict[str, list[int]]:
        """The globally lowest-scale channels, so that the share of regularised channels gone reaches the fraction."""
        fraction = self.fraction_at(target)
        regularised = self._regularised_groups(pl_module.model, groups)
        total = self.original.get("regularised_channels") or sum(group.channels for group in regularised)
        already = total - sum(group.channels for group in regularised)
        count = int(round(fraction * total)) - already
        self._plan_notes = {"target": fraction, "prune_fraction": fraction, "threshold": None}
        if count <= 0:
            return {}
        ranked = sorted((float(scores[group.root][i]), group.root, i) for group in regularised for i in range(group.channels))
        chosen = ranked[:count]
        self._plan_notes["threshold"] = chosen[-1][0]
        wanted: dict[str, list[int]] = {}
        for _, root, index in chosen:
            wanted.setdefault(root, []).append(index)
        return self._capped(regularised, wanted)


# ---------------------------------------------------------------------------- polarization pruning
class PolarizationPruning(_BNRegularisedPruning):
    """Polarization pruning (Zhuang et al., NeurIPS 2020): polarise the BN scales, cut at a histogram valley.

    * At the start of a fresh fit every regularised BN scale is set to ``initial_scale`` (0.5);
      a resumed fit (``ckpt_path``) keeps the checkpoint's scales.
    * After every training batch (i.e. after the optimizer step) the regularised scales are
      clamped to [0, 1].
    * The loss gets ``lambda_ * sum_i (t |g_i| - |g_i - mean(g)|)`` with ONE mean over all
      regularised scales of the network.
    * At a pruning action, each regularised group's channels (scale: the mean |gamma| over the
      group's BN layers) whose scale lies below that group's threshold go. The threshold is the
      left edge of the first valley of a ``bins``-bin histogram of the group's scales on [0, 1]
      (:func:`histogram_threshold`); no valley: nothing goes in that group. A group never keeps
      fewer than ``min_channels`` (the lowest scales go first). The record adds ``thresholds``
      (per group root; ``None`` where there was no valley).

    After the last pruning action the penalty and the clamping stop; fine-tuning is plain training.

    Why ``t > 1``: the gradient of the penalty on a scale above the mean is ``lambda_ * (t - 1)``;
    with ``t <= 1`` the penalty would push the important scales UP without limit (only the clamp
    holds them), so it is no longer a sparsity penalty. Without the data loss, scales in [0, a]
    polarise (some 0, the rest a) only while ``t < 2``; at ``t >= 2`` the penalty alone favours
    all-zero scales, so the paper's values lie between (1.4 for ResNet-56, 1.5 for VGG-16).

    Args:
        lambda_: penalty strength, >= 0 (the paper on CIFAR: 3e-5 for VGG-16, 5e-5 for ResNet-56).
        t: weight of the L1 part, > 1 (see above; the paper: 1.5 for VGG-16, 1.4 for ResNet-56).
        schedule: WHEN to prune (its amounts are not used). Default: once, after 75 % of the
            epochs (``int(0.75 * max_epochs)``); the rest fine-tunes.
        initial_scale: value of every regularised scale at the start of a fresh fit, in [0, 1];
            ``None`` keeps the model's scales (e.g. starting from a trained network).
        bins: histogram bins on [0, 1] (the paper: 100).
        skip: names of layers whose channels must stay (the output layer always stays).
        min_channels: channels every group keeps at least.
        round_to: keep channel counts at multiples of this; ``None``: any.
        name: metric prefix, edit-log key and name of the loss term.
        verbose: print a line after each pruning step.
        fit_schedule: compress a given schedule that would end after training into it, instead of
            refusing it (see :class:`~growprune.strategies.Strategy`); the default schedule always fits.
    """

    def __init__(
        self,
        lambda_: float = 3e-5,
        t: float = 1.5,
        schedule: Schedule | None = None,
        initial_scale: float | None = 0.5,
        bins: int = 100,
        skip: list[str] | None = None,
        min_channels: int = 1,
        round_to: int | None = None,
        name: str | None = None,
        verbose: bool = True,
        fit_schedule: bool = False,
    ):
        self.lambda_ = check_number("lambda_", lambda_, minimum=0.0)
        self.t = check_number("t", t, minimum=1.0, strict_minimum=True)
        if initial_scale is not None:
            initial_scale = check_number("initial_scale", initial_scale, minimum=0.0, maximum=1.0)  # scales live in [0, 1]
        check_integer("bins", bins, minimum=3)
        self.initial_scale = initial_scale
        self.bins = bins
        super().__init__(schedule, skip, min_channels, round_to, name, verbose, fit_schedule)

    def penalty(self, model: nn.Module) -> torch.Tensor:
        return polarization_penalty(self.scales(model), self.lambda_, self.t)

    def start_training(self, trainer: pl.Trainer, pl_module: Any) -> None:
        resumed = getattr(trainer, "ckpt_path", None) is not None or bool(self._done)
        if resumed or self.initial_scale is None:
            return
        with torch.no_grad():
            for scale in self.scales(pl_module.model):
                scale.fill_(self.initial_scale)

    def clamp_scales(self, model: nn.Module) -> None:
        """Clamp every regularised scale to [0, 1] in place."""
        with torch.no_grad():
            for scale in self.scales(model):
                scale.clamp_(0.0, 1.0)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self._regularising:
            self.clamp_scales(pl_module.model)
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def plan(self, pl_module: Any, groups: list[ChannelGroup], scores: dict[str, torch.Tensor], target: float) -> dict[str, list[int]]:
        """Per regularised group: the channels below its histogram threshold (lowest first, capped)."""
        wanted: dict[str, list[int]] = {}
        thresholds: dict[str, float | None] = {}
        regularised = self._regularised_groups(pl_module.model, groups)
        for group in regularised:
            score = scores[group.root]
            threshold = histogram_threshold(score, bins=self.bins)
            thresholds[group.root] = threshold
            if threshold is None:
                continue
            order = torch.argsort(score).tolist()
            wanted[group.root] = [i for i in order if float(score[i]) < threshold]
        self._plan_notes = {"thresholds": thresholds}
        return self._capped(regularised, wanted)
