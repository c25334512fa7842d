"""Unstructured pruning: mask single weights, with optional lottery-ticket rewinding."""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn

from growprune.criteria.base import Criterion
from growprune.criteria.weights import MagnitudeCriterion
from growprune.errors import ConfigurationError
from growprune.schedules import Schedule
from growprune.scoring import loss_gradients
from growprune.strategies.base import Strategy, broadcast_from_rank_zero, scoring_batches_for, tensor_dict_to
from growprune.surgery.edits import Edit, EditResult, MaskWeights
from growprune.surgery.masks import SCOPES, keep_masks, select_layers, sparsity
from growprune.surgery.optimizer import reset_optimizer_state
from growprune.validation import check_number


def check_prune_amounts(schedule: Schedule) -> None:
    """Pruning targets are fractions of the original size: each must lie in [0, 1)."""
    amounts = getattr(schedule, "amounts", [schedule.amount, schedule.initial])
    for amount in amounts:
        if not 0.0 <= amount < 1.0:
            raise ValueError(f"pruning amounts must lie in [0, 1), got {amount}")


def layer_floors(sizes: dict[str, int], min_density: float) -> dict[str, int]:
    """Weights each layer keeps at least: ``ceil(min_density * size)`` (at least one when > 0)."""
    # the small tolerance keeps 0.01 * 1000 at 10, not 11 (0.01 * 1000 is 10.000000000000002)
    return {name: math.ceil(min_density * size - 1e-9) for name, size in sizes.items()}


def floored_keep_masks(
    scores: dict[str, torch.Tensor],
    target: float,
    sizes: dict[str, int],
    scope: str,
    min_density: float = 0.0,
    current: dict[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """0/1 masks that remove ``target`` of the layers' ORIGINAL weights (``sizes``), keeping the
    highest scores, while every layer keeps at least :func:`layer_floors` of its weights.

    ``scope="layer"``: each layer keeps ``round((1 - target) * size)`` weights, or its floor if
    that is more. ``scope="global"``: each layer's best floor weights are reserved first, then
    the remaining count goes to the best of all other weights (one ranking across layers), so the
    overall target is met by pruning elsewhere. Weights already masked out in ``current`` stay out.
    """
    current = current or {}
    floors = layer_floors(sizes, min_density)
    if scope == "layer":
        keep = {name: max(round((1.0 - target) * size), floors[name]) for name, size in sizes.items()}
        return keep_masks(scores, keep, current)
    total = round((1.0 - target) * sum(sizes.values()))
    if not any(floors.values()):
        return keep_masks(scores, total, current)
    reserved = keep_masks(scores, floors, current)
    # the reserved weights leave the global ranking, which fills what is left of the budget
    others = {name: reserved[name].new_ones(reserved[name].shape) - reserved[name] for name in scores}
    for name, mask in current.items():
        if name in others:
            others[name] = others[name] * mask.to(others[name].dtype)
    reserved_count = sum(int(mask.sum()) for mask in reserved.values())
    rest = keep_masks(scores, max(0, total - reserved_count), others)
    return {name: reserved[name] + rest[name] for name in scores}


class UnstructuredPruning(Strategy):
    """Mask the lowest-scoring weights of linear and conv layers, on a schedule.

    The target is the fraction of the selected layers' ORIGINAL weights that must be zero.
    Masked weights stay exactly zero after every optimizer step (momentum, Adam, weight decay
    included); masks are monotone (a pruned weight never returns) and stored in checkpoints.

    Args:
        schedule: when to prune and how much (fractions in [0, 1)).
        criterion: scores weights (default: magnitude). Any ``WeightCriterion`` subclass, yours too.
        scope: ``"layer"`` (each layer loses the target fraction) or ``"global"`` (one ranking
            across all selected layers).
        min_density: the fraction of each selected layer's ORIGINAL weights that is never pruned
            (at least one weight when > 0), in [0, 1); 0 turns the floor off. Global ranking
            with a criterion whose scores differ in scale between layers would otherwise empty
            whole layers and cut the network's signal; with the floor the overall target is met
            by pruning other layers more. A global target the floors make unreachable is refused
            before training; in layer scope, layers whose floor stops them short of the target are
            named in a warning before training.
            A layer left with no weights at all gets a warning naming it (once per fit).
        layers: shell-style patterns of module names to prune (default: every linear/conv layer).
        skip: patterns of module names to leave dense (e.g. ``["features.0", "classifier"]``).
        skip_first_and_last: leave the first and last weight layer dense (a common choice).
        rewind_epoch: lottery-ticket rewinding: after every pruning step, reset the whole network
            to its weights at the start of this epoch (0: the initial weights) and apply the masks;
            the optimizer state is reset too. ``None`` (default) keeps training the pruned weights.
        scoring_batches: training batches for data-driven criteria (default 8 when needed).
        name: metric prefix and edit-log key.
        verbose: print a line after each pruning step.
        fit_schedule: compress a schedule that would end after training into it, instead of
            refusing it (see :class:`~growprune.strategies.Strategy`).
    """

    def __init__(
        self,
        schedule: Schedule,
        criterion: Criterion | None = None,
        scope: str = "layer",
        layers: list[str] | None = None,
        skip: list[str] | None = None,
        skip_first_and_last: bool = False,
        rewind_epoch: int | None = None,
        scoring_batches: int | None = None,
        name: str | None = None,
        verbose: bool = True,
        min_density: float = 0.01,
        fit_schedule: bool = False,
    ):
        criterion = criterion if criterion is not None else MagnitudeCriterion()
        if not isinstance(criterion, Criterion) or not criterion.supports("weights"):
            raise TypeError(f"criterion must score single weights (a WeightCriterion), got {type(criterion).__name__}")
        super().__init__(schedule, name=name, scoring_batches=scoring_batches_for(criterion, scoring_batches), verbose=verbose,
                         fit_schedule=fit_schedule)
        self.min_density = check_number("min_density", min_density, minimum=0.0, maximum=1.0, strict_maximum=True)
        check_prune_amounts(schedule)
        if scope not in SCOPES:
            raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
        if rewind_epoch is not None and rewind_epoch < 0:
            raise ValueError(f"rewind_epoch must be >= 0, got {rewind_epoch}")
        if rewind_epoch is not None and schedule.unit == "epoch" and rewind_epoch > schedule.start:
            raise ValueError(f"rewind_epoch ({rewind_epoch}) is after the first pruning epoch ({schedule.start})")
        self.criterion = criterion
        self.scope = scope
        self.layers = list(layers) if layers is not None else None
        self.skip = list(skip or [])
        self.skip_first_and_last = skip_first_and_last
        self.rewind_epoch = rewind_epoch

    def reset(self) -> None:
        super().reset()
        self.rewind_state: dict[str, torch.Tensor] | None = None
        self._warned_empty: set[str] = set()

    @property
    def original_sizes(self) -> dict[str, int]:
        """Selected layer -> its number of weights when the fit started (targets are fractions of them)."""
        return self.original.setdefault("weights", {})

    def check(self, trainer: pl.Trainer, pl_module: Any) -> None:
        selected = select_layers(pl_module.model, self.layers, self.skip, self.skip_first_and_last)
        # sizes at set-up are the originals; a resumed run replaces them by the stored ones
        for name, layer in selected.items():
            self.original_sizes.setdefault(name, layer.weight.numel())
        self._check_floors()

    def _check_floors(self) -> None:
        """Refuse a target that the per-layer floors (``min_density``) make unreachable."""
        amounts = getattr(self.schedule, "amounts", [self.schedule.amount, self.schedule.initial])
        target = max(amounts)
        sizes = self.original_sizes
        floors = layer_floors(sizes, self.min_density)
        if self.scope == "layer":
            short = {name: floors[name] for name, size in sizes.items() if round((1.0 - target) * size) < floors[name]}
            if short:
                # each layer is its own ranking: nothing elsewhere can make up for a floor, so it is said, not refused
                kept = ", ".join(f"{name!r} keeps {count} of {sizes[name]}" for name, count in short.items())
                rank_zero_warn(
                    f"{self.name}: pruning {target:.1%} of every layer would take some below min_density="
                    f"{self.min_density:g}; the floor holds ({kept}), so those layers stay below the target"
                )
            return
        total = sum(sizes.values())
        reachable = 1.0 - sum(floors.values()) / total
        if round((1.0 - target) * total) < sum(floors.values()):
            raise ConfigurationError(
                f"{self.name}: a target of {target:.1%} is not reachable: min_density={self.min_density:g} keeps at "
                f"least {sum(floors.values())} of the {total} weights ({len(sizes)} layers, at least one each), so at "
                f"most {reachable:.2%} can go; lower the target or min_density (0 turns the floor off)"
            )

    def resolve_schedule(self, trainer: pl.Trainer) -> Schedule:
        schedule = super().resolve_schedule(trainer)
        if self.rewind_epoch is not None and schedule.unit == "epoch" and self.rewind_epoch > schedule.start:
            # possible only once fit_schedule moved the first pruning epoch forward
            raise ConfigurationError(
                f"{self.name}: the schedule, compressed into the training, first prunes at epoch {schedule.start}, "
                f"before rewind_epoch ({self.rewind_epoch}): lower rewind_epoch or shorten the schedule yourself"
            )
        return schedule

    def score(self, trainer: pl.Trainer, pl_module: Any, layers: dict[str, Any]) -> dict[str, torch.Tensor]:
        """The criterion's weight scores, on scoring batches of its own when it needs data."""
        model = pl_module.model
        batches = self.collect_batches(trainer, pl_module) if self.criterion.requires_data else None
        if self.criterion.requires_grad:
            with loss_gradients(model, batches or []):
                self.criterion.prepare(model, batches)
                return self.criterion.score_weights(model, layers)
        self.criterion.prepare(model, batches)
        return self.criterion.score_weights(model, layers)

    def on_edit(self, trainer: pl.Trainer, pl_module: Any, edit: Edit, result: EditResult) -> None:
        """The rewind snapshot follows structural edits (removed channels go, added ones take their
        current values), so rewinding after a structural change loads the right shapes."""
        if self.rewind_state is None or not result.structural:
            return
        current = pl_module.model.state_dict()
        snapshot = {}
        for name, value in self.rewind_state.items():
            name = result.renamed.get(name, name)
            if name not in current:
                continue  # its layer was removed
            change = result.changes.get(name)
            if change is not None:
                value = change.carry(value.to(current[name].device), current[name].shape, fill=current[name])
            snapshot[name] = value if value.shape == current[name].shape else current[name].detach().clone()
        for name, value in current.items():
            snapshot.setdefault(name, value.detach().clone())  # tensors of inserted layers
        self.rewind_state = snapshot

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.rewind_epoch is not None and self.rewind_state is None and trainer.current_epoch == self.rewind_epoch:
            # clone: the snapshot must not alias the live weights, or it would train along with them
            self.rewind_state = {key: value.detach().clone() for key, value in pl_module.model.state_dict().items()}
        super().on_train_epoch_start(trainer, pl_module)

    def act(self, trainer: pl.Trainer, pl_module: Any, target: float) -> dict[str, Any]:
        model = pl_module.model
        layers = {name: model.get_submodule(name) for name in self.original_sizes}
        scores = self.score(trainer, pl_module, layers)
        current = {name: pl_module.masks[f"{name}.weight"] for name in layers if f"{name}.weight" in pl_module.masks}
        masks = floored_keep_masks(scores, target, self.original_sizes, self.scope, self.min_density, current)
        masks = tensor_dict_to(broadcast_from_rank_zero(trainer, {k: v.cpu() for k, v in masks.items()}), pl_module.device)
        self._warn_empty_layers(masks)
        if self.rewind_state is not None:
            model.load_state_dict(self.rewind_state)
            reset_optimizer_state(trainer.optimizers)
        self.apply_edit(pl_module, MaskWeights({f"{name}.weight": mask for name, mask in masks.items()}))
        pruned = sum(int((mask == 0).sum()) for mask in masks.values())
        total = sum(self.original_sizes.values())
        record = {
            "action": "prune_weights",
            "criterion": repr(self.criterion),
            "scope": self.scope,
            "achieved": (pruned + total - sum(m.numel() for m in masks.values())) / total,
            "per_layer": {name: sparsity(mask) for name, mask in masks.items()},
        }
        if self.rewind_state is not None:
            record["rewound_to_epoch"] = self.rewind_epoch
        return record

    def _warn_empty_layers(self, masks: dict[str, torch.Tensor]) -> None:
        """Say so (once per layer and fit) when a layer has no weight left: no signal passes it."""
        for name, mask in masks.items():
            if name not in self._warned_empty and not bool(mask.any()):
                self._warned_empty.add(name)
                rank_zero_warn(
                    f"{self.name}: layer {name!r} has no weights left (all {mask.numel()} pruned), so no signal "
                    f"passes through it; keep min_density > 0 (now {self.min_density:g}) or use scope='layer'"
                )

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        if self.rewind_state is not None:
            state["rewind_state"] = {key: value.cpu() for key, value in self.rewind_state.items()}
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        if "original_sizes" in state_dict:  # checkpoints written before sizes moved into `original`
            self.original["weights"] = dict(state_dict["original_sizes"])
        self.rewind_state = state_dict.get("rewind_state")
