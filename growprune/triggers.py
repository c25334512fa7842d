"""Triggers: schedules that belong to the method. They act when training asks for it, not at fixed times.

A trigger is a :class:`~growprune.schedules.Schedule` (so every strategy takes one under
``schedule:``, by ``class_path`` in YAML) that has no action times of its own: at each check (every
``every`` epochs or optimizer steps from ``start``) it looks at the training (a logged metric, or a
signal the strategy computes) and decides whether the strategy acts now. Each action raises the
target by ``step`` (a fraction of the ORIGINAL size, as for every schedule) up to ``amount``; the
trigger stops after ``max_actions`` actions, at ``amount``, or when the strategy says it cannot go
further (e.g. :class:`~growprune.strategies.ChannelGrowth` at a size ceiling)::

    Plateau(monitor="val/loss", patience=2, step=0.5, amount=3.0)   # grow when validation stalls
    Signal(threshold=0.05, step=0.5, amount=3.0, every=2)          # grow when growing would help

Because the action times are not known in advance, the refusal of schedules that cannot finish
within the training (``Strategy.fit_to_training``) does not apply to triggers: a trigger that
never fires simply never acts, and a run may end before ``amount`` is reached.

Strategies work on a per-fit copy of the configured trigger (``Strategy.active_schedule``): the
configured object is never changed, and the copy's state (counters, best value, actions done) goes
into checkpoints with the strategy's state, so a resumed run continues where it stopped.
"""

from __future__ import annotations

import copy
import math
from typing import Any

from growprune.errors import ConfigurationError
from growprune.schedules import Schedule
from growprune.validation import check_integer, check_number

MODES = ("min", "max")


class Trigger(Schedule):
    """Base of the triggers: checks at ``start, start + every, ...``; each action adds ``step`` to
    the target, up to ``amount``, at most ``max_actions`` times.

    Subclasses implement :meth:`fires`. Args as in :class:`Plateau`.
    """

    def __init__(self, step: float, amount: float, max_actions: int | None = None, every: int = 1, start: int = 1,
                 unit: str = "epoch"):
        super().__init__(amount=amount, start=start, end=None, every=every, unit=unit)
        self.step = check_number("step", step, minimum=0.0, strict_minimum=True)
        if max_actions is not None:
            check_integer("max_actions", max_actions, minimum=1)
        self.max_actions = max_actions
        self.reset_state()

    # ------------------------------------------------------------------------------ state
    def reset_state(self) -> None:
        """Forget every check and action (the per-fit copy starts from here)."""
        self.actions = 0
        self.checks = 0
        self.last_checked: int | None = None
        self.stopped: str | None = None  # why the trigger acts no more (None: it may act)

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs to continue (plain values: checkpoints load with weights_only=True)."""
        return {"actions": self.actions, "checks": self.checks, "last_checked": self.last_checked,
                "stopped": self.stopped}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            setattr(self, key, value)

    # ------------------------------------------------------------------------ schedule API
    def resolved(self, last_time: int) -> "Trigger":
        return copy.deepcopy(self)  # no end to resolve: a trigger checks until training ends

    def compressed(self, last_time: int) -> "Trigger":
        return copy.deepcopy(self)  # no action times to compress

    def times(self) -> list[int]:
        return []  # no fixed action times (see the module docstring)

    def acts_at(self, time: int) -> bool:
        return False  # decided by poll(), which needs the trainer

    def target_at(self, time: int) -> float | None:
        return None

    @property
    def last_time(self) -> int:
        return self.start

    @property
    def next_target(self) -> float:
        """The target of the next action."""
        return min(self.amount, self.step * (self.actions + 1))

    def checks_at(self, time: int) -> bool:
        return time >= self.start and (time - self.start) % self.every == 0

    # ------------------------------------------------------------------------------ polling
    def poll(self, time: int, trainer: Any, pl_module: Any, strategy: Any) -> float | None:
        """The target if the strategy acts at ``time``, else ``None``; counts the check."""
        if self.stopped is not None or not self.checks_at(time):
            return None
        if self.last_checked is not None and time <= self.last_checked:
            return None  # the same step again (gradient accumulation) or a replayed time
        if getattr(strategy, "exhausted", None):
            self.stopped = f"{strategy.name}: {strategy.exhausted}"
            return None
        self.last_checked = time
        self.checks += 1
        if not self.fires(time, trainer, pl_module, strategy):
            return None
        target = self.next_target
        self.actions += 1
        self.after_action()
        if self.max_actions is not None and self.actions >= self.max_actions:
            self.stopped = f"max_actions={self.max_actions} reached"
        elif target >= self.amount - 1e-12:
            self.stopped = f"amount={self.amount:g} reached"
        return target

    def check_strategy(self, strategy: Any) -> None:
        """Refuse, when fit starts, a strategy this trigger cannot drive."""

    def observe(self, trainer: Any) -> None:
        """Called by the strategy after every validation (before checkpoints are saved)."""

    def record(self) -> dict[str, Any]:
        """What the action record says about the trigger (numbers are logged too)."""
        return {"trigger": type(self).__name__, "trigger_actions": self.actions}

    def fires(self, time: int, trainer: Any, pl_module: Any, strategy: Any) -> bool:
        """Whether the strategy should act now (called once per check)."""
        raise NotImplementedError(f"{type(self).__name__} must implement fires()")

    def after_action(self) -> None:
        """Called after the trigger fired (e.g. to start a cooldown)."""

    def describe(self) -> dict[str, Any]:
        return {"schedule": type(self).__name__, "amount": self.amount, "step": self.step,
                "max_actions": self.max_actions, "start": self.start, "every": self.every, "unit": self.unit}


class Plateau(Trigger):
    """Acts when a logged metric has stopped improving (like ``ReduceLROnPlateau``, for architecture).

    At every check the value of ``monitor`` in ``trainer.callback_metrics`` (what the module and
    the callbacks logged, e.g. ``val/loss`` after each validation) is compared with the best so far:
    it improves when it is below ``best - min_delta`` (``mode="min"``) or above ``best + min_delta``
    (``"max"``). After ``patience`` checks in a row without improvement the strategy acts, the count
    starts again, and the next ``cooldown`` checks do not count. The first check (at ``start``,
    default epoch 1: after the first epoch and its validation) at which metrics were logged fails
    with a one-line error naming the metric and the logged ones when the metric is not among them
    (so with ``check_val_every_n_epoch > 1``, check as rarely: ``every``). When validation runs less
    often than the checks, the repeated value counts as no improvement. The last validated value is
    kept in the trigger's state, so a resumed run (which starts with no logged metrics) checks it.

    Args:
        monitor: a logged metric's name (``val/loss``, ``val/acc``, ``train/loss_epoch``, ...).
        mode: ``"min"`` (lower is better) or ``"max"``.
        patience: checks without improvement before acting (>= 1).
        min_delta: the smallest change that counts as an improvement (>= 0).
        cooldown: checks after an action that are not counted (>= 0).
        step: how much each action raises the target (a fraction of the original size, > 0).
        amount: the final target: no action goes beyond it (the ceiling of the method's targets).
        max_actions: the most actions (``None``: until ``amount``).
        every: epochs/steps between checks.
        start: time of the first check.
        unit: ``"epoch"`` (checked when an epoch starts) or ``"step"``.
    """

    def __init__(self, monitor: str = "val/loss", mode: str = "min", patience: int = 2, min_delta: float = 0.0,
                 cooldown: int = 0, step: float = 0.5, amount: float = 1.0, max_actions: int | None = None,
                 every: int = 1, start: int = 1, unit: str = "epoch"):
        if mode not in MODES:
            raise ValueError(f"Plateau mode must be one of {MODES}, got {mode!r}")
        if not isinstance(monitor, str) or not monitor:
            raise ValueError(f"Plateau monitor must be the name of a logged metric, got {monitor!r}")
        check_integer("patience", patience, minimum=1)
        check_integer("cooldown", cooldown, minimum=0)
        self.monitor = monitor
        self.mode = mode
        self.patience = patience
        self.min_delta = check_number("min_delta", min_delta, minimum=0.0)
        self.cooldown = cooldown
        super().__init__(step=step, amount=amount, max_actions=max_actions, every=every, start=start, unit=unit)

    def reset_state(self) -> None:
        super().reset_state()
        self.best: float | None = None
        self.bad_checks = 0
        self.cooldown_left = 0
        self.latest: float | None = None  # the last validated value (a resumed run starts with no metrics)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "best": self.best, "bad_checks": self.bad_checks,
                "cooldown_left": self.cooldown_left, "latest": self.latest}

    def observe(self, trainer: Any) -> None:
        if self.monitor in trainer.callback_metrics:
            self.latest = float(trainer.callback_metrics[self.monitor])

    def value(self, trainer: Any) -> float | None:
        """The monitored metric now (``None``: nothing logged yet in this fit, and no value stored);
        a one-line error naming it and the logged ones when other metrics were logged but not it."""
        metrics = trainer.callback_metrics
        if self.monitor in metrics:
            return float(metrics[self.monitor])
        if not metrics:
            return self.latest  # nothing logged since the (resumed) fit started
        raise ConfigurationError(f"Plateau trigger monitors {self.monitor!r}, which was never logged; logged "
                                 f"metrics: {', '.join(sorted(metrics))}")

    def improved(self, value: float) -> bool:
        if self.best is None:
            return True
        if self.mode == "min":
            return value < self.best - self.min_delta
        return value > self.best + self.min_delta

    def fires(self, time: int, trainer: Any, pl_module: Any, strategy: Any) -> bool:
        value = self.value(trainer)
        if value is None or math.isnan(value):
            return False  # nothing measured yet, or a diverged run: nothing to compare
        if self.improved(value):
            self.best, self.bad_checks = value, 0
        else:
            self.bad_checks += 1
        if self.cooldown_left > 0:
            self.cooldown_left -= 1
            self.bad_checks = 0
            return False
        return self.bad_checks >= self.patience

    def record(self) -> dict[str, Any]:
        return {**super().record(), "monitor_best": self.best}

    def after_action(self) -> None:
        self.bad_checks = 0
        self.cooldown_left = self.cooldown

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "monitor": self.monitor, "mode": self.mode, "patience": self.patience,
                "min_delta": self.min_delta, "cooldown": self.cooldown}


class Signal(Trigger):
    """Acts when the method's own signal exceeds ``threshold``.

    At every check the strategy is asked for ``strategy.signal(trainer, pl_module)``, a number
    the method defines (:class:`~growprune.strategies.ChannelGrowth`: the norm of the loss gradient
    with respect to the channels its next action would add, initialised by its initializer on a
    copy of the network). A strategy without a ``signal`` method is refused when fit starts.

    Args:
        threshold: act when the signal is above it.
        step, amount, max_actions, every, start, unit: as in :class:`Plateau`.
    """

    def __init__(self, threshold: float, step: float = 0.5, amount: float = 1.0, max_actions: int | None = None,
                 every: int = 1, start: int = 1, unit: str = "epoch"):
        self.threshold = check_number("threshold", threshold)
        super().__init__(step=step, amount=amount, max_actions=max_actions, every=every, start=start, unit=unit)

    def reset_state(self) -> None:
        super().reset_state()
        self.last_signal: float | None = None

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "last_signal": self.last_signal}

    def check_strategy(self, strategy: Any) -> None:
        if not callable(getattr(strategy, "signal", None)):
            raise ConfigurationError(f"{type(strategy).__name__} {strategy.name!r} has no signal(trainer, pl_module) "
                                     "method for its Signal trigger; use a Plateau trigger or a schedule")

    def fires(self, time: int, trainer: Any, pl_module: Any, strategy: Any) -> bool:
        value = float(strategy.signal(trainer, pl_module))
        self.last_signal = value
        return value > self.threshold

    def record(self) -> dict[str, Any]:
        return {**super().record(), "signal": self.last_signal}

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "threshold": self.threshold}
