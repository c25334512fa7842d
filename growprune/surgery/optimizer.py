"""Keep training whole after surgery: optimizer state, LR schedulers, masks, DDP.

After parameter objects change (structural pruning or growth), Lightning keeps stepping the old
optimizer with no error while the new parameters never learn. :func:`repair_training` rebuilds
the optimizers through ``configure_optimizers`` and carries over what the old ones knew:

* per-parameter state (momentum, Adam moments), sliced to the kept entries of a shrunk parameter,
  zero-padded for a grown one;
* each param group's hyper-parameters as they are now (the current learning rate, not the initial);
* LR scheduler state (epoch counters, base LRs);
* unstructured masks of changed parameters (sliced like them);
* under DDP, the wrapper is rebuilt around the changed model.

Train/eval modes and ``requires_grad`` flags are the surgery's to keep: wrap the edit in
:class:`growprune.modes.preserved_modes` (``ChannelGraph`` does).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
import torch.nn as nn

from growprune.surgery.changes import ParameterChange


def carry_optimizer_state(
    old_optimizer: torch.optim.Optimizer,
    new_optimizer: torch.optim.Optimizer,
    changes: dict[nn.Parameter, ParameterChange] | None = None,
) -> None:
    """Copy per-parameter state and current group hyper-parameters from ``old_optimizer``."""
    changes = changes or {}
    old_params = {id(p) for group in old_optimizer.param_groups for p in group["params"]}
    for new_group_index, new_group in enumerate(new_optimizer.param_groups):
        if new_group_index < len(old_optimizer.param_groups):
            old_group = old_optimizer.param_groups[new_group_index]
            for key, value in old_group.items():
                if key != "params":
                    new_group[key] = value
        for parameter in new_group["params"]:
            change = changes.get(parameter)
            old = change.old if change is not None else (parameter if id(parameter) in old_params else None)
            if old is None or old not in old_optimizer.state:
                continue
            carried = {}
            for key, value in old_optimizer.state[old].items():
                if isinstance(value, torch.Tensor) and value.shape == old.shape and value.dim() > 0:
                    carried[key] = change.carry(value, parameter.shape) if change is not None else value.clone()
                else:
                    carried[key] = value.clone() if isinstance(value, torch.Tensor) else value
            new_optimizer.state[parameter] = carried


def carry_masks(pl_module: Any, changes: Mapping[str, ParameterChange], renamed: Mapping[str, str] | None = None) -> None:
    """Move unstructured masks (keyed by parameter name) through a structural change.

    ``changes`` and ``renamed`` are keyed by tensor name in ``pl_module.model``: a changed
    parameter's mask moves with its entries (new entries unmasked), a renamed one follows its
    parameter, a mask whose parameter no longer exists is dropped.
    """
    if not getattr(pl_module, "masks", None):
        return
    renamed = renamed or {}
    carried = {}
    for name, mask in pl_module.masks.items():
        name = renamed.get(name, name)
        parameter = _parameter_or_none(pl_module.model, name)
        if parameter is None:
            continue
        change = changes.get(name)
        if change is not None and change.old.shape == mask.shape:
            carried[name] = change.carry(mask, parameter.shape, fill=1.0).to(parameter.device)
        elif change is None and parameter.shape == mask.shape:
            carried[name] = mask
    pl_module._masks = carried


def _parameter_or_none(model: nn.Module, name: str) -> nn.Parameter | None:
    try:
        return model.get_parameter(name)
    except AttributeError:
        return None


def mask_optimizer_state(optimizers: Sequence[torch.optim.Optimizer], parameter: nn.Parameter, mask: torch.Tensor) -> None:
    """Zero the state entries (momentum, moments) of masked-out weights, so none carries stale history."""
    for optimizer in optimizers:
        for value in optimizer.state.get(parameter, {}).values():
            if isinstance(value, torch.Tensor) and value.shape == parameter.shape:
                value.mul_(mask.to(value.dtype))


def reset_optimizer_state(optimizers: Sequence[torch.optim.Optimizer]) -> None:
    """Forget all per-parameter state (after rewinding weights, the old momentum is meaningless)."""
    for optimizer in optimizers:
        optimizer.state.clear()


def repair_training(trainer: Any, pl_module: Any, changes: Any = None) -> None:
    """Rebuild optimizers and schedulers after parameter objects changed, keeping their state.

    Call after the model was edited in place. ``changes`` says how the new parameters relate to
    the old ones, so optimizer state and masks follow them: an
    :class:`~growprune.surgery.edits.EditResult`, or a dict of :class:`ParameterChange` keyed by
    parameter name in ``pl_module.model`` or by the new ``nn.Parameter`` object.
    (``GrowPruneModule.apply_edit`` calls this for you.)
    """
    by_name, renamed = _changes_by_name(pl_module, changes)
    if by_name or renamed:
        carry_masks(pl_module, by_name, renamed)
    if hasattr(pl_module, "invalidate_mask_cache"):
        pl_module.invalidate_mask_cache()
    strategy = trainer.strategy
    old_optimizers = list(trainer.optimizers)
    old_schedulers = [config.scheduler.state_dict() for config in trainer.lr_scheduler_configs]
    _rewrap_distributed(strategy, pl_module)
    strategy.setup_optimizers(trainer)
    by_parameter = {}
    for name, change in by_name.items():
        parameter = _parameter_or_none(pl_module.model, name)
        if parameter is not None:
            by_parameter[parameter] = change
    for old, new in zip(old_optimizers, trainer.optimizers):
        carry_optimizer_state(old, new, by_parameter)
    for config, state in zip(trainer.lr_scheduler_configs, old_schedulers):
        config.scheduler.load_state_dict(state)
        # the scheduler's constructor reset the LR to its base; put the current one back
        last_lrs = state.get("_last_lr")
        if last_lrs:
            for group, lr in zip(config.scheduler.optimizer.param_groups, last_lrs):
                group["lr"] = lr


def _changes_by_name(pl_module: Any, changes: Any) -> tuple[dict[str, ParameterChange], dict[str, str]]:
    """Normalise the accepted forms of ``changes`` to (name -> change, old name -> new name)."""
    if changes is None:
        return {}, {}
    if hasattr(changes, "changes") and hasattr(changes, "renamed"):  # an EditResult
        return dict(changes.changes), dict(changes.renamed)
    names = {id(parameter): name for name, parameter in pl_module.model.named_parameters()}
    by_name = {}
    for key, change in changes.items():
        if isinstance(key, str):
            by_name[key] = change
        elif id(key) in names:
            by_name[names[id(key)]] = change
        else:
            raise ValueError("a change is keyed by a parameter that is not in the model")
    return by_name, {}


def _rewrap_distributed(strategy: Any, pl_module: nn.Module) -> None:
    """Under DDP the wrapper holds buckets of the old parameters: wrap the changed model anew."""
    from lightning.pytorch.strategies import DDPStrategy

    if isinstance(strategy, DDPStrategy) and strategy.model is not None and strategy.model is not pl_module:
        strategy.model = pl_module
        strategy.configure_ddp()
