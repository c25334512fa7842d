"""The strategy base class: a Lightning ``Callback`` that composes when x what x how.

A strategy asks its :class:`~growprune.schedules.Schedule` at the start of every epoch (or step)
whether to act; when it does, :meth:`Strategy.act` changes the network (scoring with a criterion
and applying typed edits through :meth:`Strategy.apply_edit`, i.e. ``GrowPruneModule.apply_edit``)
and returns a record of what it did. The base class then appends that record, with the edits, to
the module's edit log (stored in checkpoints), logs it to every logger, and remembers the action so
a resumed run does not repeat it.

A strategy holds no state from one fit into the next: everything a fit learns (the actions done,
the original size, the schedule resolved against this trainer) is reset in ``setup`` and stored
in checkpoints, and the configured ``schedule`` is never changed (the fit works on a copy,
:attr:`Strategy.active_schedule`). The same instance can train several models one after another.

To write a new method, subclass :class:`Strategy` (or :class:`UnstructuredPruning` and friends)
and implement :meth:`act`; name the class in a YAML config under ``trainer.callbacks`` with
``class_path``.
"""

from __future__ import annotations

import copy
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from growprune.criteria.base import Batch
from growprune.schedules import Schedule
from growprune.surgery.edits import Edit, EditResult
from growprune.validation import check_integer


class Strategy(Callback):
    """Base of every grow/prune method.

    Args:
        schedule: when to act and the target at each action (never modified; see ``active_schedule``).
        name: prefix of the logged metrics and key of the edit-log entries (default: class name
            in lower case; must differ between strategies of one run).
        scoring_batches: number of training batches drawn for data-driven criteria.
        verbose: print a line after each action.

    Attributes:
        active_schedule: this fit's copy of ``schedule``, with ``end`` resolved (``None`` outside a fit).
        original: the network's size when this fit started (or as the resumed run recorded it);
            targets are fractions of it. Each strategy fills it in :meth:`check`.
        history: this fit's action records.
    """

    def __init__(self, schedule: Schedule, name: str | None = None, scoring_batches: int = 0, verbose: bool = True):
        if not isinstance(schedule, Schedule):
            raise TypeError(f"schedule must be a growprune.schedules.Schedule, got {type(schedule).__name__}")
        check_integer("scoring_batches", scoring_batches, minimum=0)
        self.schedule = schedule
        self.name = name or type(self).__name__.lower()
        self.scoring_batches = scoring_batches
        self.verbose = verbose
        self.reset()

    def reset(self) -> None:
        """Forget everything a fit learned (called at the start of every fit)."""
        self.history: list[dict[str, Any]] = []
        self.original: dict[str, Any] = {}
        self.active_schedule: Schedule | None = None
        self._done: set[int] = set()
        self._stored_end: int | None = None
        self._pending_edits: list[dict[str, Any]] = []

    # ------------------------------------------------------------------------ to override
    def check(self, trainer: pl.Trainer, pl_module: Any) -> None:
        """Validate the configuration against the model and fill :attr:`original`; raise before
        training changes anything."""

    def act(self, trainer: pl.Trainer, pl_module: Any, target: float) -> dict[str, Any]:
        """Change the network towards ``target``; return a JSON-able record of what was done.

        Change the network with :meth:`apply_edit` so the edit is logged and training repaired.
        The record may set its own ``"target"`` (e.g. ``None`` for methods that decide how much
        goes by themselves); otherwise the schedule's target is recorded.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement act()")

    def on_edit(self, trainer: pl.Trainer, pl_module: Any, edit: Edit, result: EditResult) -> None:
        """Called after every edit of the network (by any strategy or by hand) during a fit;
        override to move state that follows the tensors (e.g. snapshots) through ``result``."""

    def resolve_schedule(self, trainer: pl.Trainer) -> Schedule:
        """This fit's schedule: a copy of ``schedule`` with ``end`` fixed to the last epoch/step."""
        schedule = copy.deepcopy(self.schedule)
        if schedule.end is None:
            if self._stored_end is not None:
                return schedule.resolved(self._stored_end)  # a resumed run keeps its original end
            if schedule.unit == "epoch":
                last = trainer.max_epochs - 1 if trainer.max_epochs and trainer.max_epochs > 0 else None
            else:
                last = int(trainer.estimated_stepping_batches) - 1
            if last is None:
                raise ValueError(f"{self.name}: the schedule needs an explicit end when max_epochs is unlimited")
            schedule = schedule.resolved(last)
        return schedule

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
        clashes = [callback for callback in trainer.callbacks
                   if isinstance(callback, Strategy) and callback is not self and callback.name == self.name]
        if clashes:
            raise ValueError(f"two strategies are named {self.name!r} ({type(self).__name__} and "
                             f"{type(clashes[0]).__name__}): give each its own name=")
        self.reset()
        self.check(trainer, pl_module)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.active_schedule = self.resolve_schedule(trainer)
        self._warn_if_unfinished(trainer)

    def _warn_if_unfinished(self, trainer: pl.Trainer) -> None:
        """Say so when training ends before the schedule's last action (it would under-prune silently)."""
        schedule = self.active_schedule
        if schedule.unit == "epoch":
            if not trainer.max_epochs or trainer.max_epochs < 1:
                return
            last = trainer.max_epochs - 1
        else:
            last = int(trainer.estimated_stepping_batches) - 1
        times = schedule.times()
        late = [time for time in times if time > last and time not in self._done]
        if late:
            rank_zero_warn(
                f"{self.name}: training ends at {schedule.unit} {last}, before {len(late)} of the {len(times)} "
                f"actions of its schedule (at {schedule.unit}s {times}): they will not happen; train longer or "
                "move the schedule"
            )

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.schedule.unit == "epoch":
            self._maybe_act(trainer, pl_module, trainer.current_epoch)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        if self.schedule.unit == "step":
            self._maybe_act(trainer, pl_module, trainer.global_step)

    def _maybe_act(self, trainer: pl.Trainer, pl_module: Any, time: int) -> None:
        if time in self._done or self.active_schedule is None:
            return
        target = self.active_schedule.target_at(time)
        if target is None:
            return
        self._pending_edits = []
        record = self.act(trainer, pl_module, target)
        self._done.add(time)
        record = {"strategy": self.name, "type": type(self).__name__, "unit": self.schedule.unit, "time": time,
                  "target": target, **record, "ops": list(self._pending_edits)}
        self._pending_edits = []
        pl_module.edit_log.append(record)
        self.history.append(record)
        self._log_record(trainer, pl_module, record)

    def apply_edit(self, pl_module: Any, edit: Edit) -> EditResult:
        """Apply ``edit`` through the module (optimizer repaired); it goes into this action's record."""
        result = pl_module.apply_edit(edit, log=False)
        self._pending_edits.append(edit.to_dict())
        return result

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
                summary = ", ".join(f"{key} {record[key]:.4g}" for key in ("target", "achieved")
                                    if isinstance(record.get(key), (int, float)))
                rank_zero_info(f"[{self.name}] {self.schedule.unit} {record['time']}: {summary}")

    # ------------------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict[str, Any]:
        end = self.active_schedule.end if self.active_schedule is not None else self._stored_end
        return {"done": sorted(self._done), "history": list(self.history), "schedule_end": end,
                "original": self.original}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # called after setup() of a resumed fit: what the interrupted fit knew replaces the fresh state
        self._done = set(state_dict.get("done", []))
        self.history = list(state_dict.get("history", []))
        self._stored_end = state_dict.get("schedule_end")
        if state_dict.get("original"):
            self.original = state_dict["original"]


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
