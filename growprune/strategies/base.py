"""The strategy base class: a Lightning ``Callback`` that composes when x what x how.

A strategy asks its :class:`~growprune.schedules.Schedule` at the start of every epoch (or step)
whether to act; when it does, :meth:`Strategy.act` changes the network (scoring with a criterion
and applying a surgery) and returns a record of what it did. The base class then appends that
record to the module's edit log (stored in checkpoints), logs it to every logger, and remembers
the action so a resumed run does not repeat it.

To write a new method, subclass :class:`Strategy` (or :class:`UnstructuredPruning` and friends)
and implement :meth:`act`; name the class in a YAML config under ``trainer.callbacks`` with
``class_path``.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info

from growprune.criteria.base import Batch
from growprune.schedules import Schedule


class Strategy(Callback):
    """Base of every grow/prune method.

    Args:
        schedule: when to act and the target at each action.
        name: prefix of the logged metrics and key of the edit-log entries (default: class name
            in lower case; must differ between strategies of one run).
        scoring_batches: number of training batches collected for data-driven criteria.
        verbose: print a line after each action.
    """

    def __init__(self, schedule: Schedule, name: str | None = None, scoring_batches: int = 0, verbose: bool = True):
        if not isinstance(schedule, Schedule):
            raise TypeError(f"schedule must be a growprune.schedules.Schedule, got {type(schedule).__name__}")
        if scoring_batches < 0:
            raise ValueError(f"scoring_batches must be >= 0, got {scoring_batches}")
        self.schedule = schedule
        self.name = name or type(self).__name__.lower()
        self.scoring_batches = scoring_batches
        self.verbose = verbose
        self.history: list[dict[str, Any]] = []
        self._done: set[int] = set()

    # ------------------------------------------------------------------------ to override
    def check(self, trainer: pl.Trainer, pl_module: Any) -> None:
        """Validate the configuration against the model; raise before training changes anything."""

    def act(self, trainer: pl.Trainer, pl_module: Any, target: float) -> dict[str, Any]:
        """Change the network towards ``target``; return a JSON-able record of what was done."""
        raise NotImplementedError(f"{type(self).__name__} must implement act()")

    # ------------------------------------------------------------------------------ hooks
    @property
    def state_key(self) -> str:
        # Lightning stores callback state under this key; the name keeps two strategies apart.
        return f"{type(self).__name__}[{self.name}]"

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        from growprune.module import GrowPruneModule

        if not isinstance(pl_module, GrowPruneModule):
            raise TypeError(f"{type(self).__name__} needs a growprune.GrowPruneModule, got {type(pl_module).__name__}")
        names = [callback.name for callback in trainer.callbacks if isinstance(callback, Strategy)]
        if names.count(self.name) > 1:
            raise ValueError(f"two strategies are named {self.name!r}: give each its own name=")
        self.check(trainer, pl_module)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.schedule.unit == "epoch":
            last = trainer.max_epochs - 1 if trainer.max_epochs and trainer.max_epochs > 0 else None
        else:
            last = int(trainer.estimated_stepping_batches) - 1
        if self.schedule.end is None:
            if last is None:
                raise ValueError(f"{self.name}: the schedule needs an explicit end when max_epochs is unlimited")
            self.schedule.resolve_end(last)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.schedule.unit == "epoch":
            self._maybe_act(trainer, pl_module, trainer.current_epoch)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        if self.schedule.unit == "step":
            self._maybe_act(trainer, pl_module, trainer.global_step)

    def _maybe_act(self, trainer: pl.Trainer, pl_module: Any, time: int) -> None:
        if time in self._done:
            return
        target = self.schedule.target_at(time)
        if target is None:
            return
        record = self.act(trainer, pl_module, target)
        self._done.add(time)
        record = {"strategy": self.name, "type": type(self).__name__, "unit": self.schedule.unit, "time": time,
                  "target": target, **record}
        pl_module.edit_log.append(record)
        self.history.append(record)
        self._log_record(trainer, pl_module, record)

    # --------------------------------------------------------------------------- helpers
    def collect_batches(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> list[Batch]:
        """``scoring_batches`` random training batches, on the module's device.

        Drawn from a loader of their own (see :mod:`growprune.scoring`): the training loader and
        the global random states are left alone. The seed is the number of actions so far: the
        same batches on every rank and in a resumed run, other batches at each action.
        """
        from growprune.scoring import scoring_batches

        if self.scoring_batches < 1:
            raise ValueError(f"{self.name}: this criterion needs data; set scoring_batches >= 1")
        return scoring_batches(trainer, batches=self.scoring_batches, seed=len(self.history), device=pl_module.device)

    def _log_record(self, trainer: pl.Trainer, pl_module: Any, record: dict[str, Any]) -> None:
        metrics = {f"{self.name}/{key}": float(value) for key, value in record.items()
                   if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "time"}
        for layer, value in record.get("per_layer", {}).items():
            metrics[f"{self.name}/per_layer/{layer}"] = float(value)
        if pl_module.input_shape is not None:
            metrics.update({f"{self.name}/{key}": value for key, value in pl_module.size_metrics().items()})
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step)
            if self.verbose:
                summary = ", ".join(f"{key} {record[key]:.4g}" for key in ("target", "achieved") if key in record)
                rank_zero_info(f"[{self.name}] {self.schedule.unit} {record['time']}: {summary}")

    # ------------------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict[str, Any]:
        return {"done": sorted(self._done), "history": list(self.history), "schedule_end": self.schedule.end}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._done = set(state_dict.get("done", []))
        self.history = list(state_dict.get("history", []))
        if self.schedule.end is None and state_dict.get("schedule_end") is not None:
            self.schedule.end = int(state_dict["schedule_end"])


def scoring_batches_for(criterion: Any, scoring_batches: int | None, default: int = 8) -> int:
    """How many training batches to collect for ``criterion``: ``default`` when it needs data and
    none was given; an explicit 0 for a data-driven criterion is an error."""
    needs_data = bool(getattr(criterion, "requires_data", False))
    if scoring_batches is None:
        return default if needs_data else 0
    if needs_data and scoring_batches < 1:
        raise ValueError(f"{type(criterion).__name__} needs training data: set scoring_batches >= 1")
    return scoring_batches


def broadcast_from_rank_zero(trainer: pl.Trainer, value: Any) -> Any:
    """Rank 0's ``value`` on every rank (data-driven scores differ between ranks' batches)."""
    if trainer.world_size <= 1:
        return value
    return trainer.strategy.broadcast(value, src=0)


def tensor_dict_to(value: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {key: tensor.to(device) for key, tensor in value.items()}
