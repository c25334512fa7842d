"""Prune and regrow at constant sparsity: RigL (Evci et al. 2020) and SET (Mocanu et al. 2018).

Every ``update_interval`` optimizer steps, each selected layer drops the fraction ``alpha_t`` of its
active weights with the smallest magnitude and re-enables as many inactive ones, so every layer's
number of active weights (and the overall sparsity) stays the same from one update to the next.
``alpha_t`` decays from ``drop_fraction`` to 0 along a cosine (RigL) or stays constant (SET) until
the stop step; after it the masks are fixed.

Which inactive weights come back: ``growth="gradient"`` (RigL) takes those with the largest
``|dL/dw|`` of the DENSE gradient; ``growth="random"`` (SET) draws them uniformly.
Regrown weights start at exactly zero with zero optimizer state (momentum, Adam moments).

The dense gradient is the gradient of the last training batch before the update (or the mean over
the last ``gradient_steps`` batches), taken in the callback's ``on_before_optimizer_step`` hook: Lightning calls callbacks before the module's own hook,
so the module's ``mask_gradients`` has not zeroed the masked entries yet (masked weights are 0, but
their gradients are not). When there is no such gradient (an update at the very first step, or
the first update of a run resumed from a checkpoint), it is computed on ``scoring_batches``
training batches drawn for it; the record of the update says which (``"gradient"``).
"""

from __future__ import annotations

import copy
import math
from typing import Any

import lightning.pytorch as pl
import torch

from growprune.errors import ConfigurationError
from growprune.schedules import Constant, Schedule
from growprune.scoring import loss_gradients
from growprune.strategies.base import Strategy, broadcast_from_rank_zero, tensor_dict_to, training_length
from growprune.surgery.edits import Edit, EditResult, MaskWeights
from growprune.surgery.masks import keep_masks, select_layers
from growprune.validation import check_integer, check_number

DISTRIBUTIONS = ("erk", "uniform", "global")
GROWTH = ("gradient", "random")
DECAYS = ("cosine", "constant")


def erk_densities(shapes: dict[str, tuple[int, ...]], density: float) -> dict[str, float]:
    """Per-layer densities of the Erdos-Renyi-Kernel distribution (RigL) with overall ``density``.

    A layer's density is proportional to ``sum(shape) / prod(shape)`` (fan-in + fan-out + kernel
    sizes over the weight count), scaled so the layers together keep ``density`` of their weights.
    A layer whose share would exceed 1 is kept dense and the others are scaled again, as RigL does.
    """
    sizes = {name: math.prod(shape) for name, shape in shapes.items()}
    raw = {name: sum(shape) / sizes[name] for name, shape in shapes.items()}
    budget = density * sum(sizes.values())
    dense: set[str] = set()
    while True:
        sparse = [name for name in shapes if name not in dense]
        if not sparse:
            return {name: 1.0 for name in shapes}
        scale = (budget - sum(sizes[name] for name in dense)) / sum(raw[name] * sizes[name] for name in sparse)
        over = [name for name in sparse if scale * raw[name] > 1.0]
        if not over:
            return {name: 1.0 if name in dense else scale * raw[name] for name in shapes}
        # the most over-allocated layer becomes dense; the rest share what is left (RigL's loop)
        dense.add(max(over, key=lambda name: raw[name]))


class Regrowth(Strategy):
    """Prune-and-regrow at constant sparsity (RigL or SET) on the module's weight masks.

    Acts on optimizer steps ``start_step, start_step + update_interval, ...`` up to the stop step.
    Starting from a dense model (no masks on the selected layers), the first action only prunes:
    each layer keeps the highest-magnitude weights of its share of ``density``. Every later action
    is a drop-and-regrow cycle that keeps each layer's count of active weights. Starting from a
    model that is already sparse (masks set, e.g. by an earlier pruning run or a checkpoint),
    ``density=None`` keeps its masks and their per-layer counts and starts cycling at once; a
    given ``density`` first prunes every layer that holds more than its share (a layer that is
    already sparser keeps its count).

    Args:
        density: fraction of the selected layers' weights that stay active, in (0, 1); ``None``:
            keep the sparsity of the masks the model already has.
        growth: ``"gradient"`` (RigL: largest dense-gradient magnitude) or ``"random"`` (SET).
        drop_fraction: alpha, the fraction of each layer's active weights dropped (and regrown) at
            the first cycle, in (0, 1) (RigL: 0.3).
        decay: ``"cosine"`` (RigL: ``alpha_t = alpha / 2 * (1 + cos(pi * t / T))``, t counted from
            the start step, T the stop step minus the start step) or ``"constant"`` (SET).
        update_interval: optimizer steps between updates (delta T, RigL: 100), >= 1.
        distribution: how ``density`` is shared between layers at the first prune. ``"erk"``
            (default, RigL's Erdos-Renyi-Kernel: small layers keep more, so at high sparsity the
            thin output layer is not cut to a handful of weights; RigL's best results use it),
            ``"uniform"`` (every layer keeps ``density``) or ``"global"`` (one magnitude ranking
            across the layers at the first prune decides the shares). Every layer keeps at least
            one weight. The shares are then fixed: regrowth never moves weights between layers.
        start_step: the optimizer step of the first action, >= 0.
        stop_step: the last update's step (``None``: ``stop_fraction`` of the training's steps).
        stop_fraction: with ``stop_step=None``, the fraction of the training's optimizer steps
            after which the masks stay fixed, in (0, 1] (RigL: 0.75).
        layers / skip / skip_first_and_last: which layers (shell-style module-name patterns), as
            in :class:`~growprune.strategies.UnstructuredPruning`.
        seed: seed of the random growth (``growth="random"``); each update draws anew.
        scoring_batches: training batches for the dense gradient when no training gradient was
            captured (see the module docstring); >= 1 with ``growth="gradient"``.
        gradient_steps: with ``growth="gradient"``, the dense gradient is the mean of the gradients
            of the last ``gradient_steps`` training batches before an update (1: RigL's last batch;
            more: a less noisy, larger-batch estimate), >= 1. An update with fewer captured batches
            (right after the start or a resume) uses those it has.
        drop_unused: with ``growth="gradient"``, every cycle also drops the active weights whose
            dense gradient is exactly zero (on top of the ``alpha_t`` share, even after alpha has
            decayed) and regrows as many by gradient. Such a weight does nothing for the loss on
            those batches: it feeds a unit with no path to the output, or a ReLU unit that is off
            for every sample, or reads an input that is always zero (MNIST's border pixels). At
            high sparsity gradual pruning leaves many of them (the fan-in of hidden units whose
            fan-out was pruned); this moves their budget to connections that matter. Use it with
            ``gradient_steps`` > 1 so "zero" means zero over several batches.
        name / verbose / fit_schedule: as in :class:`~growprune.strategies.Strategy`.

    Every update's record (edit log, loggers) has ``drop_fraction`` (alpha_t), ``dropped``,
    ``regrown``, ``density`` (overall), ``per_layer`` (density of each layer) and ``survival``:
    the fraction of the weights regrown at the previous update that are still active after this
    one (absent at the first cycle).
    """

    def __init__(
        self,
        density: float | None,
        growth: str = "gradient",
        drop_fraction: float = 0.3,
        decay: str = "cosine",
        update_interval: int = 100,
        distribution: str = "erk",
        start_step: int = 0,
        stop_step: int | None = None,
        stop_fraction: float = 0.75,
        layers: list[str] | None = None,
        skip: list[str] | None = None,
        skip_first_and_last: bool = False,
        seed: int = 0,
        scoring_batches: int = 1,
        gradient_steps: int = 1,
        drop_unused: bool = False,
        name: str | None = None,
        verbose: bool = True,
        fit_schedule: bool = False,
    ):
        if density is not None:
            density = check_number("density", density, minimum=0.0, maximum=1.0, strict_minimum=True, strict_maximum=True)
        drop_fraction = check_number("drop_fraction", drop_fraction, minimum=0.0, maximum=1.0, strict_minimum=True,
                                     strict_maximum=True)
        update_interval = check_integer("update_interval", update_interval, minimum=1)
        start_step = check_integer("start_step", start_step, minimum=0)
        if stop_step is not None:
            stop_step = check_integer("stop_step", stop_step, minimum=start_step)
        stop_fraction = check_number("stop_fraction", stop_fraction, minimum=0.0, maximum=1.0, strict_minimum=True)
        seed = check_integer("seed", seed)
        for argument, value, allowed in (("growth", growth, GROWTH), ("decay", decay, DECAYS),
                                         ("distribution", distribution, DISTRIBUTIONS)):
            if value not in allowed:
                raise ValueError(f"{argument} must be one of {', '.join(repr(a) for a in allowed)}, got {value!r}")
        check_integer("scoring_batches", scoring_batches, minimum=1 if growth == "gradient" else 0)
        gradient_steps = check_integer("gradient_steps", gradient_steps, minimum=1)
        if not isinstance(drop_unused, bool):
            raise ValueError(f"drop_unused must be true or false, got {drop_unused!r}")
        if drop_unused and growth != "gradient":
            raise ValueError(f"drop_unused needs growth='gradient' (it reads the dense gradient), got growth={growth!r}")
        schedule = Constant(amount=1.0 - density if density is not None else 0.0, start=start_step, end=stop_step,
                            every=update_interval, unit="step")
        super().__init__(schedule, name=name, scoring_batches=scoring_batches, verbose=verbose, fit_schedule=fit_schedule)
        self.density = density
        self.growth = growth
        self.drop_fraction = drop_fraction
        self.decay = decay
        self.update_interval = update_interval
        self.distribution = distribution
        self.stop_fraction = stop_fraction
        self.layers = list(layers) if layers is not None else None
        self.skip = list(skip or [])
        self.skip_first_and_last = skip_first_and_last
        self.seed = seed
        self.gradient_steps = gradient_steps
        self.drop_unused = drop_unused

    def reset(self) -> None:
        super().reset()
        self._captured: dict[str, torch.Tensor] | None = None  # sum of the dense gradients of the last batches
        self._captured_batches = 0  # how many batches that sum holds
        self._last_regrown: dict[str, torch.Tensor] = {}  # layer -> bool mask regrown at the last update
        self._started = False  # whether the first action (which may prune instead of cycling) is done

    # ------------------------------------------------------------------------------ set-up
    @property
    def original_sizes(self) -> dict[str, int]:
        """Selected layer -> its number of weights when the fit started."""
        return self.original.setdefault("weights", {})

    def check(self, trainer: pl.Trainer, pl_module: Any) -> None:
        try:
            selected = select_layers(pl_module.model, self.layers, self.skip, self.skip_first_and_last)
        except ValueError as error:
            raise ConfigurationError(f"{self.name}: {error}") from None
        for name, layer in selected.items():
            self.original_sizes.setdefault(name, layer.weight.numel())

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        others = [callback for callback in trainer.callbacks if isinstance(callback, Strategy) and callback is not self]
        if not others:
            # checked here, after a resumed run restored its masks, before any step changes anything; with
            # another strategy in the run (one that prunes before start_step) it is checked at the first update
            self._check_sparse(pl_module)

    def _check_sparse(self, pl_module: Any) -> None:
        """``density=None`` needs every selected layer masked already."""
        if self.density is not None or self._started:
            return
        missing = [name for name in self.original_sizes if f"{name}.weight" not in pl_module.masks]
        if missing:
            raise ConfigurationError(
                f"{self.name}: density=None keeps the model's sparsity, but layer {missing[0]!r} has no mask "
                f"(the model is not sparse there): give a density, or prune first")

    def resolve_schedule(self, trainer: pl.Trainer) -> Schedule:
        """The schedule with its stop step resolved: ``stop_fraction`` of the training's optimizer
        steps unless ``stop_step`` was given (a resumed run keeps its stored stop)."""
        schedule = copy.deepcopy(self.schedule)
        length, bound = training_length(trainer, "step")
        if schedule.end is None:
            if self._stored_end is not None:
                end = self._stored_end
            elif length is None:
                raise ConfigurationError(
                    f"{self.name}: training is unbounded ({bound}), so stop_fraction has nothing to be a fraction of: "
                    f"give stop_step")
            else:
                end = max(schedule.start, math.floor(self.stop_fraction * length) - 1)
            schedule = schedule.resolved(end)
        self._resolved_end = schedule.end
        return self.fit_to_training(schedule, length, bound)

    # ----------------------------------------------------------------------- dense gradient
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        # Runs before the module's own hook, which may mask gradients: here they are still dense.
        if self.growth != "gradient" or self.active_schedule is None or not self._updates_next(trainer):
            return
        gradients = {}
        for name in self.original_sizes:
            weight = pl_module.model.get_submodule(name).weight
            if weight.grad is not None:
                gradients[name] = weight.grad.detach().clone()
        previous = self._captured
        if previous is not None and set(previous) == set(gradients) and all(
                previous[name].shape == gradients[name].shape for name in gradients):
            self._captured = {name: previous[name] + gradients[name] for name in gradients}
            self._captured_batches += 1
        else:
            self._captured, self._captured_batches = gradients, 1

    def _updates_next(self, trainer: pl.Trainer) -> bool:
        """Whether an update that regrows comes within the next ``gradient_steps`` optimizer steps
        (so this batch's gradient is part of its dense gradient)."""
        return any(self.active_schedule.acts_at(after) and after not in self._done
                   for after in range(trainer.global_step + 1, trainer.global_step + 1 + self.gradient_steps))

    def dense_gradients(self, trainer: pl.Trainer, pl_module: Any) -> tuple[dict[str, torch.Tensor], str]:
        """Layer -> dense loss gradient of its weight, and where it came from."""
        captured, batches, self._captured, self._captured_batches = self._captured, self._captured_batches, None, 0
        if captured is not None and set(captured) == set(self.original_sizes):
            if batches == 1:
                return captured, "last batch"
            return {name: grad / batches for name, grad in captured.items()}, f"last {batches} batches"
        model = pl_module.model
        batches = self.collect_batches(trainer, pl_module)
        with loss_gradients(model, batches):
            gradients = {name: model.get_submodule(name).weight.grad for name in self.original_sizes}
            missing = [name for name, grad in gradients.items() if grad is None]
            if missing:
                raise RuntimeError(f"{self.name}: layer {missing[0]!r} got no gradient from the loss: it cannot regrow")
            return {name: grad.detach().clone() for name, grad in gradients.items()}, f"{len(batches)} scoring batches"

    # --------------------------------------------------------------------------------- acting
    def act(self, trainer: pl.Trainer, pl_module: Any, target: float) -> dict[str, Any]:
        self._check_sparse(pl_module)
        model = pl_module.model
        weights = {name: model.get_submodule(name).weight for name in self.original_sizes}
        active = {}
        for name, weight in weights.items():
            mask = pl_module.masks.get(f"{name}.weight")
            active[name] = mask.bool() if mask is not None else torch.ones_like(weight, dtype=torch.bool)
        first, self._started = not self._started, True
        if first:
            counts = self.layer_counts(weights, active)
            if any(int(active[name].sum()) > counts[name] for name in weights):
                return self._prune(trainer, pl_module, weights, active, counts)
        return self._cycle(trainer, pl_module, weights, active)

    def layer_counts(self, weights: dict[str, torch.Tensor], active: dict[str, torch.Tensor]) -> dict[str, int]:
        """Active weights each layer keeps from now on (at least one; never more than it has)."""
        if self.density is None:
            return {name: int(mask.sum()) for name, mask in active.items()}
        sizes = {name: weight.numel() for name, weight in weights.items()}
        if self.distribution == "uniform":
            shares = {name: round(self.density * size) for name, size in sizes.items()}
        elif self.distribution == "erk":
            densities = erk_densities({name: tuple(weight.shape) for name, weight in weights.items()}, self.density)
            shares = {name: round(densities[name] * sizes[name]) for name in sizes}
        else:
            scores = {name: weight.detach().abs().masked_fill(~active[name], -math.inf) for name, weight in weights.items()}
            kept = keep_masks(scores, round(self.density * sum(sizes.values())))
            shares = {name: int(mask.sum()) for name, mask in kept.items()}
        return {name: min(max(1, shares[name]), int(active[name].sum())) for name in sizes}

    def _prune(self, trainer: pl.Trainer, pl_module: Any, weights: dict[str, torch.Tensor],
               active: dict[str, torch.Tensor], counts: dict[str, int]) -> dict[str, Any]:
        """The first action on a model denser than its target: keep each layer's largest weights."""
        scores = {name: weight.detach().abs() for name, weight in weights.items()}
        masks = keep_masks(scores, counts, {name: mask.float() for name, mask in active.items()})
        masks = {name: mask.bool() for name, mask in self._broadcast(trainer, pl_module, masks).items()}
        self.apply_edit(pl_module, MaskWeights({f"{name}.weight": masks[name].to(weights[name].dtype) for name in masks}))
        return {"action": "prune_weights", "distribution": self.distribution, **self._densities(masks)}

    def _cycle(self, trainer: pl.Trainer, pl_module: Any, weights: dict[str, torch.Tensor],
               active: dict[str, torch.Tensor]) -> dict[str, Any]:
        """Drop the fraction alpha_t of each layer's active weights (smallest |w|) and regrow as many."""
        alpha = self.alpha_at(trainer.global_step)
        record: dict[str, Any] = {"action": "prune_regrow", "growth": self.growth, "drop_fraction": alpha}
        drops = {name: min(int(round(alpha * int(mask.sum()))), int(mask.sum())) for name, mask in active.items()}
        grow_scores: dict[str, torch.Tensor] = {}
        unused: dict[str, torch.Tensor] = {}
        if any(drops.values()) or self.drop_unused:
            if self.growth == "gradient":
                gradients, source = self.dense_gradients(trainer, pl_module)
                grow_scores = {name: gradients[name].abs().float() for name in weights}
                record["gradient"] = source
                if self.drop_unused:
                    unused = {name: active[name] & (gradients[name] == 0) for name in weights}
                    record["unused"] = sum(int(mask.sum()) for mask in unused.values())
            else:
                generator = torch.Generator().manual_seed(self.seed * 1_000_003 + len(self.history))
                grow_scores = {name: torch.rand(weight.shape, generator=generator).to(weight.device)
                               for name, weight in weights.items()}
        self._captured, self._captured_batches = None, 0
        masks = {}
        for name, weight in weights.items():
            extra = int(unused[name].sum()) if name in unused else 0
            k = min(drops[name] + extra, int(active[name].sum()))
            if k == 0:
                masks[name] = active[name].clone()
                continue
            magnitude = weight.detach().abs().float().masked_fill(~active[name], math.inf).flatten()
            if extra:
                # the unused weights go first; the alpha_t share is then the smallest of the rest
                magnitude = magnitude.masked_fill(unused[name].flatten(), -1.0)
            keep = active[name].flatten().clone()
            keep[torch.topk(magnitude, k, largest=False, sorted=False).indices] = False
            # candidates: everything inactive after the drop, the weights just dropped included
            # (RigL's rule: one dropped and regrown at once simply stays, with its value)
            candidates = grow_scores[name].flatten().masked_fill(keep, -math.inf)
            grown = torch.zeros_like(keep)
            grown[torch.topk(candidates, k, sorted=False).indices] = True
            masks[name] = (keep | grown).view_as(active[name])
        masks = {name: mask.bool() for name, mask in self._broadcast(trainer, pl_module, masks).items()}
        regrown = {name: masks[name] & ~active[name] for name in masks}
        dropped = {name: active[name] & ~masks[name] for name in masks}
        if self._last_regrown:
            previous = {name: mask for name, mask in self._last_regrown.items()
                        if name in masks and mask.shape == masks[name].shape}
            total = sum(int(mask.sum()) for mask in previous.values())
            if total:
                record["survival"] = sum(int((mask.to(masks[name].device) & masks[name]).sum())
                                         for name, mask in previous.items()) / total
        self.apply_edit(pl_module, MaskWeights({f"{name}.weight": masks[name].to(weights[name].dtype) for name in masks}))
        self._reset_regrown(trainer, pl_module, regrown)
        self._last_regrown = {name: mask.cpu() for name, mask in regrown.items()}
        record["dropped"] = sum(int(mask.sum()) for mask in dropped.values())
        record["regrown"] = sum(int(mask.sum()) for mask in regrown.values())
        record.update(self._densities(masks))
        return record

    def alpha_at(self, step: int) -> float:
        """The drop fraction at optimizer step ``step`` (alpha_t)."""
        if self.decay == "constant":
            return self.drop_fraction
        schedule = self.active_schedule
        span = schedule.end - schedule.start
        progress = 1.0 if span <= 0 else min(max((step - schedule.start) / span, 0.0), 1.0)
        return self.drop_fraction / 2.0 * (1.0 + math.cos(math.pi * progress))

    def _reset_regrown(self, trainer: pl.Trainer, pl_module: Any, regrown: dict[str, torch.Tensor]) -> None:
        """Regrown weights start at zero with no history: zero their values and optimizer state."""
        optimizers = trainer.optimizers if trainer is not None else []
        for name, mask in regrown.items():
            weight = pl_module.model.get_submodule(name).weight
            with torch.no_grad():
                weight.masked_fill_(mask, 0.0)
            for optimizer in optimizers:
                for value in optimizer.state.get(weight, {}).values():
                    if isinstance(value, torch.Tensor) and value.shape == weight.shape:
                        value.masked_fill_(mask, 0)

    def _broadcast(self, trainer: pl.Trainer, pl_module: Any, masks: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        # scores of a rank's own batch may differ between ranks: every rank takes rank 0's masks
        return tensor_dict_to(broadcast_from_rank_zero(trainer, {k: v.cpu() for k, v in masks.items()}), pl_module.device)

    def _densities(self, masks: dict[str, torch.Tensor]) -> dict[str, Any]:
        kept = sum(int(mask.sum()) for mask in masks.values())
        total = sum(mask.numel() for mask in masks.values())
        return {"target": 1.0 - self.density if self.density is not None else 1.0 - kept / total,
                "achieved": 1.0 - kept / total, "density": kept / total,
                "per_layer": {name: float(mask.float().mean()) for name, mask in masks.items()}}

    # ---------------------------------------------------------------------- edits, checkpoints
    def on_edit(self, trainer: pl.Trainer, pl_module: Any, edit: Edit, result: EditResult) -> None:
        # a structural change reshapes layers: last update's regrown set no longer lines up with them
        if result.structural:
            self._last_regrown = {}
            self._captured, self._captured_batches = None, 0

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["started"] = self._started
        state["last_regrown"] = {name: mask.cpu() for name, mask in self._last_regrown.items()}
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._started = bool(state_dict.get("started", False))
        self._last_regrown = dict(state_dict.get("last_regrown", {}))
