"""Unstructured pruning: mask single weights, with optional lottery-ticket rewinding."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch

from growprune.criteria.base import Criterion
from growprune.criteria.weights import MagnitudeCriterion
from growprune.schedules import Schedule
from growprune.scoring import loss_gradients
from growprune.strategies.base import Strategy, broadcast_from_rank_zero, scoring_batches_for, tensor_dict_to
from growprune.surgery.edits import Edit, EditResult, MaskWeights
from growprune.surgery.masks import SCOPES, keep_masks, select_layers, sparsity
from growprune.surgery.optimizer import reset_optimizer_state


def check_prune_amounts(schedule: Schedule) -> None:
    """Pruning targets are fractions of the original size: each must lie in [0, 1)."""
    amounts = getattr(schedule, "amounts", [schedule.amount, schedule.initial])
    for amount in amounts:
        if not 0.0 <= amount < 1.0:
            raise ValueError(f"pruning amounts must lie in [0, 1), got {amount}")


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
        layers: shell-style patterns of module names to prune (default: every linear/conv layer).
        skip: patterns of module names to leave dense (e.g. ``["features.0", "classifier"]``).
        skip_first_and_last: leave the first and last weight layer dense (a common choice).
        rewind_epoch: lottery-ticket rewinding: after every pruning step, reset the whole network
            to its weights at the start of this epoch (0: the initial weights) and apply the masks;
            the optimizer state is reset too. ``None`` (default) keeps training the pruned weights.
        scoring_batches: training batches for data-driven criteria (default 8 when needed).
        name: metric prefix and edit-log key.
        verbose: print a line after each pruning step.
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
    ):
        criterion = criterion if criterion is not None else MagnitudeCriterion()
        if not isinstance(criterion, Criterion) or not criterion.supports("weights"):
            raise TypeError(f"criterion must score single weights (a WeightCriterion), got {type(criterion).__name__}")
        super().__init__(schedule, name=name, scoring_batches=scoring_batches_for(criterion, scoring_batches), verbose=verbose)
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

    @property
    def original_sizes(self) -> dict[str, int]:
        """Selected layer -> its number of weights when the fit started (targets are fractions of them)."""
        return self.original.setdefault("weights", {})

    def check(self, trainer: pl.Trainer, pl_module: Any) -> None:
        selected = select_layers(pl_module.model, self.layers, self.skip, self.skip_first_and_last)
        # sizes at set-up are the originals; a resumed run replaces them by the stored ones
        for name, layer in selected.items():
            self.original_sizes.setdefault(name, layer.weight.numel())

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
        if self.scope == "layer":
            keep: dict[str, int] | int = {name: round((1.0 - target) * size) for name, size in self.original_sizes.items()}
        else:
            keep = round((1.0 - target) * sum(self.original_sizes.values()))
        current = {name: pl_module.masks[f"{name}.weight"] for name in layers if f"{name}.weight" in pl_module.masks}
        masks = keep_masks(scores, keep, current)
        masks = tensor_dict_to(broadcast_from_rank_zero(trainer, {k: v.cpu() for k, v in masks.items()}), pl_module.device)
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
