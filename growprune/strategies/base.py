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
import math
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info

from growprune.criteria.base import Batch
from growprune.errors import ConfigurationError
from growprune.schedules import OneShot, Schedule, Steps
from growprune.surgery.edits import Edit, EditResult
from growprune.triggers import Trigger
from growprune.validation import check_integer


class Strategy(Callback):
    """Base of every grow/prune method.

    Args:
        schedule: when to act and the target at each action (never modified; see ``active_schedule``).
        name: prefix of the logged metrics and key of the edit-log entries (default: class name
            in lower case; must differ between strategies of one run).
        scoring_batches: number of training batches drawn for data-driven criteria.
        verbose: print a line after each action.
        fit_schedule: when the schedule's last action comes after the end of training, compress
            the schedule into the training (:meth:`~growprune.schedules.Schedule.compressed`:
            every action time scaled by the same factor, the last one on the last epoch/step) and
            log the new times, instead of refusing to train. Off by default: a schedule that
            cannot finish raises :class:`~growprune.errors.ConfigurationError` when fit starts,
            before anything changes.

    Attributes:
        active_schedule: this fit's copy of ``schedule``, with ``end`` resolved and, with
            ``fit_schedule``, compressed (``None`` outside a fit).
        original: the network's size when this fit started (or as the resumed run recorded it);
            targets are fractions of it. Each strategy fills it in :meth:`check`.
        history: this fit's action records.
    """

    def __init__(self, schedule: Schedule, name: str | None = None, scoring_batches: int = 0, verbose: bool = True,
                 fit_schedule: bool = False):
        if not isinstance(schedule, Schedule):
            raise TypeError(f"schedule must be a growprune.schedules.Schedule, got {type(schedule).__name__}")
        check_integer("scoring_batches", scoring_batches, minimum=0)
        if not isinstance(fit_schedule, bool):
            raise ValueError(f"fit_schedule must be true or false, got {fit_schedule!r}")
        self.schedule = schedule
        self.name = name or type(self).__name__.lower()
        self.scoring_batches = scoring_batches
        self.verbose = verbose
        self.fit_schedule = fit_schedule
        self.reset()

    def reset(self) -> None:
        """Forget everything a fit learned (called at the start of every fit)."""
        self.history: list[dict[str, Any]] = []
        self.original: dict[str, Any] = {}
        self.active_schedule: Schedule | None = None
        self._done: set[int] = set()
        self._stored_end: int | None = None
        self._resolved_end: int | None = None  # this fit's end before any compression (stored)
        # the last time a compressed schedule was fitted to (kept in checkpoints: a resumed run
        # compresses the same way even if its own training length differs)
        self._fitted_to: int | None = None
        self._pending_edits: list[dict[str, Any]] = []
        self._stored_trigger: dict[str, Any] | None = None  # a resumed run's trigger state

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
        """This fit's schedule: a copy of ``schedule`` with ``end`` fixed to the last epoch/step,
        checked against the training length (see :meth:`fit_to_training`). A
        :class:`~growprune.triggers.Trigger` has no action times: its copy starts with fresh
        counters (or the resumed run's) and is never refused."""
        if isinstance(self.schedule, Trigger):
            return self.resolve_trigger()
        schedule = copy.deepcopy(self.schedule)
        length, bound = training_length(trainer, schedule.unit)
        if schedule.end is None:
            if self._stored_end is not None:
                end = self._stored_end  # a resumed run keeps its original end
            elif length is None:
                raise ConfigurationError(
                    f"{self.name}: the schedule has no end and training is unbounded ({bound}): give the schedule an end")
            else:
                # a start past the end of training stays a (late) action: fit_to_training reports it
                end = max(length - 1, schedule.start)
            schedule = schedule.resolved(end)
        self._resolved_end = schedule.end
        return self.fit_to_training(schedule, length, bound)

    def resolve_trigger(self) -> Trigger:
        """This fit's copy of the configured trigger, with the interrupted run's state when resuming."""
        self.schedule.check_strategy(self)
        trigger = copy.deepcopy(self.schedule)
        trigger.reset_state()
        if self._stored_trigger:
            trigger.load_state_dict(self._stored_trigger)
        return trigger

    def fit_to_training(self, schedule: Schedule, length: int | None, bound: str) -> Schedule:
        """``schedule`` (end resolved) if every action it has left happens within ``length``
        epochs/steps; compressed into them with ``fit_schedule``; otherwise a
        :class:`~growprune.errors.ConfigurationError` naming the strategy, the schedule's last
        action, the training length and the two ways out. ``length=None``: unbounded, anything goes."""
        if self._fitted_to is not None:
            schedule = schedule.compressed(self._fitted_to)  # as the interrupted run did
        if length is None:
            return schedule
        last = length - 1
        late = [time for time in schedule.times() if time > last and time not in self._done]
        if not late:
            return schedule
        unit = schedule.unit
        if not self.fit_schedule:
            times = schedule.times()
            reached = [schedule.target_at(time) for time in times if time <= last]
            shortfall = ""
            if schedule.final_target > 0:
                stop = f"stop at {reached[-1]:.1%}" if reached else "never act"
                shortfall = f", so it would {stop} instead of reaching {schedule.final_target:.1%}"
            runs = f"{length} {unit}{'s' if length != 1 else ''} ({f'{unit}s 0-{last}' if length else 'none'}; {bound})"
            raise ConfigurationError(
                f"{type(self).__name__} {self.name!r}: its {type(schedule).__name__} schedule acts last at {unit} "
                f"{schedule.last_time} but training runs {runs}: {len(late)} of its {len(times)} actions would never "
                f"happen{shortfall}. Shorten the schedule ({self.schedule_hint(schedule, last)}) or set "
                f"fit_schedule: true on the strategy to compress it into the training"
            )
        fitted = schedule.compressed(last)
        self._fitted_to = last
        targets = [round(fitted.target_at(time), 4) for time in fitted.times()]
        rank_zero_info(
            f"[{self.name}] fit_schedule: the {type(schedule).__name__} schedule acted until {unit} "
            f"{schedule.last_time} but training runs {length} {unit}s ({bound}); compressed to act at {unit}s "
            f"{fitted.times()}" + (f" with targets {targets}" if any(targets) else "")
        )
        return fitted

    def schedule_hint(self, schedule: Schedule, last: int) -> str:
        """How to shorten ``schedule`` so it ends by ``last`` (for the refusal message)."""
        if isinstance(schedule, OneShot):
            return f"at <= {last}"
        if isinstance(schedule, Steps):
            return f"steps <= {last}"
        return f"end <= {last}"

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
        # Every strategy's schedule is resolved (and refused) here, in the first strategy's hook:
        # no strategy may change the network (e.g. polarization's scale init) before another's
        # schedule is refused.
        for strategy in trainer.callbacks:
            if isinstance(strategy, Strategy) and strategy.active_schedule is None:
                strategy.active_schedule = strategy.resolve_schedule(trainer)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.schedule.unit == "epoch":
            self._maybe_act(trainer, pl_module, trainer.current_epoch)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        if self.schedule.unit == "step":
            self._maybe_act(trainer, pl_module, trainer.global_step)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if isinstance(self.active_schedule, Trigger) and not trainer.sanity_checking:
            self.active_schedule.observe(trainer)  # before the checkpoint callbacks save the state

    def _maybe_act(self, trainer: pl.Trainer, pl_module: Any, time: int) -> None:
        if time in self._done or self.active_schedule is None:
            return
        trigger = self.active_schedule if isinstance(self.active_schedule, Trigger) else None
        if trigger is not None:
            # rank 0 decides: every rank must change the network the same way at the same time
            target = broadcast_from_rank_zero(trainer, trigger.poll(time, trainer, pl_module, self))
            trigger.load_state_dict(broadcast_from_rank_zero(trainer, trigger.state_dict()))
        else:
            target = self.active_schedule.target_at(time)
        if target is None:
            return
        self._pending_edits = []
        record = self.act(trainer, pl_module, target)
        self._done.add(time)
        record = {"strategy": self.name, "type": type(self).__name__, "unit": self.schedule.unit, "time": time,
                  "target": target, **(trigger.record() if trigger is not None else {}), **record,
                  "ops": list(self._pending_edits)}
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
        end = self._resolved_end if self._resolved_end is not None else self._stored_end
        state = {"done": sorted(self._done), "history": list(self.history), "schedule_end": end,
                 "fitted_to": self._fitted_to, "original": self.original}
        if isinstance(self.active_schedule, Trigger):
            state["trigger"] = self.active_schedule.state_dict()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # called after setup() of a resumed fit: what the interrupted fit knew replaces the fresh state
        self._done = set(state_dict.get("done", []))
        self.history = list(state_dict.get("history", []))
        self._stored_end = state_dict.get("schedule_end")
        self._fitted_to = state_dict.get("fitted_to")
        if state_dict.get("original"):
            self.original = state_dict["original"]
        if state_dict.get("trigger") is not None:
            self._stored_trigger = dict(state_dict["trigger"])
            if isinstance(self.active_schedule, Trigger):
                self.active_schedule.load_state_dict(self._stored_trigger)


def training_length(trainer: pl.Trainer, unit: str) -> tuple[int | None, str]:
    """How many epochs start (``unit="epoch"``) or optimizer steps run (``unit="step"``) in this
    fit, counted from the first epoch/step of the run (a resumed run counts the epochs/steps
    before the interruption too), and what bounds it, for messages. ``None``: unbounded
    (``max_epochs=-1`` without ``max_steps``) or unknown (an iterable data set of no length).

    Accounts for ``max_epochs``, ``max_steps`` (it may end training inside an earlier epoch),
    ``limit_train_batches`` and ``accumulate_grad_batches``; not for ``max_time`` or early stopping.
    Call it once fit has started (``on_fit_start``): it may load the training data, as
    Lightning's ``estimated_stepping_batches`` does.
    """
    max_epochs = trainer.max_epochs if trainer.max_epochs is not None else -1
    max_steps = trainer.max_steps
    if unit == "step":
        steps = trainer.estimated_stepping_batches
        if steps == float("inf") or steps < 0:
            return None, "max_epochs=-1 and no max_steps" if max_epochs == -1 else "training batches of unknown number"
        if max_steps != -1 and steps == max_steps:
            return int(steps), f"max_steps={max_steps}"
        return int(steps), _epochs_of_steps(trainer, max_epochs)
    bounds: list[tuple[int, str]] = []
    if max_epochs >= 0:
        bounds.append((max_epochs, f"max_epochs={max_epochs}"))
    if max_steps >= 0:
        per_epoch = _steps_per_epoch(trainer)
        if per_epoch:
            bounds.append((math.ceil(max_steps / per_epoch), f"max_steps={max_steps} at {per_epoch} optimizer steps per epoch"))
    if not bounds:
        return None, "max_epochs=-1 and no max_steps"
    return min(bounds)


def _steps_per_epoch(trainer: pl.Trainer) -> int | None:
    """Optimizer steps per epoch (``None`` when the number of training batches is unknown)."""
    if trainer.train_dataloader is None:
        trainer.fit_loop.setup_data()
    batches = trainer.num_training_batches
    if batches == float("inf"):
        return None
    return math.ceil(batches / trainer.accumulate_grad_batches)


def _epochs_of_steps(trainer: pl.Trainer, max_epochs: int) -> str:
    accumulate = trainer.accumulate_grad_batches
    text = f"max_epochs={max_epochs} x {trainer.num_training_batches} training batches per epoch"
    return text + (f" / accumulate_grad_batches={accumulate}" if accumulate > 1 else "")


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
