"""Schedules: *when* a strategy acts and *how much* its target is at that moment.

A target is always a fraction of the ORIGINAL size (for pruning: the fraction of the original
prunable weights, channels or layers that must be gone), never of what is left, so targets do not
compound (Lightning's ``ModelPruning`` with 0.5 per epoch gives 50, 75, 87.5 %; here
``Constant(amount=0.5, every=1)`` keeps 50 %).

Time ``t`` counts completed epochs (``unit="epoch"``) or optimizer steps (``unit="step"``): an
action at ``t=3`` epochs happens before the 4th epoch, after 3 epochs of training. ``end=None``
means the last epoch (or step) of training, read from the trainer when training starts.

    OneShot(at=5, amount=0.9)                                   # prune 90 % after 5 epochs
    Linear(start=2, end=10, every=2, amount=0.8)                # 0, 20, 40, 60, 80 %
    Cubic(start=0, end=20, amount=0.95)                         # Zhu & Gupta's gradual pruning
    Exponential(start=0, end=4, amount=0.8)                     # same share of what is left each time
    Steps(steps=[3, 6, 9], amounts=[0.5, 0.75, 0.9])            # explicit list

A schedule whose last action comes after the end of training cannot finish: strategies refuse it
when training starts, unless the strategy's ``fit_schedule`` is on, which runs
:meth:`Schedule.compressed` on its per-fit copy.
"""

from __future__ import annotations

import copy
import math
from typing import Any

from growprune.errors import ConfigurationError

UNITS = ("epoch", "step")


class Schedule:
    """Base schedule: actions at ``start, start + every, ...`` up to ``end``; targets rise from
    ``initial`` to ``amount`` along :meth:`shape`.

    Args:
        amount: final target, a fraction of the original size (>= 0).
        start: time of the first action.
        end: time of the last action (``None``: the last epoch/step of training).
        every: time between actions.
        unit: ``"epoch"`` or ``"step"``.
        initial: target at ``start``.
    """

    def __init__(
        self,
        amount: float,
        start: int = 0,
        end: int | None = None,
        every: int = 1,
        unit: str = "epoch",
        initial: float = 0.0,
    ):
        if unit not in UNITS:
            raise ValueError(f"schedule unit must be one of {UNITS}, got {unit!r}")
        if not math.isfinite(amount) or amount < 0:
            raise ValueError(f"schedule amount must be a finite number >= 0, got {amount}")
        if not math.isfinite(initial) or initial < 0:
            raise ValueError(f"schedule initial must be a finite number >= 0, got {initial}")
        if start < 0:
            raise ValueError(f"schedule start must be >= 0, got {start}")
        if end is not None and end < start:
            raise ValueError(f"schedule end ({end}) is before its start ({start})")
        if every < 1:
            raise ValueError(f"schedule every must be >= 1, got {every}")
        self.amount = float(amount)
        self.initial = float(initial)
        self.start = int(start)
        self.end = None if end is None else int(end)
        self.every = int(every)
        self.unit = unit
        # explicit action times, set only on a compressed copy (see ``compressed``)
        self._times: list[int] | None = None

    # ----------------------------------------------------------------------------------- hooks
    def shape(self, progress: float) -> float:
        """Fraction of the way from ``initial`` to ``amount`` at ``progress`` in [0, 1]."""
        return progress

    def resolved(self, last_time: int) -> "Schedule":
        """A copy with ``end=None`` fixed to ``last_time``, the last epoch/step of training.

        Strategies call this when a fit starts and act on the copy: the configured schedule is
        never changed, so the same strategy can run in several fits.
        """
        schedule = copy.deepcopy(self)
        if schedule.end is None:
            if last_time < schedule.start:
                raise ConfigurationError(
                    f"schedule starts at {schedule.unit} {schedule.start} but training ends at {schedule.unit} {last_time}"
                )
            schedule.end = int(last_time)
        return schedule

    def compressed(self, last_time: int) -> "Schedule":
        """A copy whose actions all happen by ``last_time`` (the last epoch/step of training).

        Every action time ``t`` moves to ``round(t * last_time / T)``, ``T`` being the schedule's
        last action time, so the last action lands on ``last_time`` and the schedule keeps its
        proportions (a warm-up of 20 % of the schedule stays 20 % of the training). Targets
        follow the moved times (the first action keeps ``initial``, the last reaches ``amount``).
        Actions that land on the same time merge into one. A schedule that already finishes by
        ``last_time`` comes back unchanged. ``end`` must be resolved first.
        """
        if self.end is None:
            raise ValueError("resolve the schedule's end (resolved()) before compressing it")
        if last_time < 0:
            raise ConfigurationError(f"training has no {self.unit} in which the schedule could act")
        schedule = copy.deepcopy(self)
        last = self.last_time
        if last <= last_time:
            return schedule
        times = sorted({_moved(time, last, last_time) for time in self.times()})
        schedule.start, schedule.end = times[0], times[-1]
        schedule._times = times
        return schedule

    # ------------------------------------------------------------------------------- queries
    @property
    def last_time(self) -> int:
        """Time of the schedule's last action (``start`` while ``end`` is unresolved)."""
        return self.start if self.end is None else self.end

    def times(self) -> list[int]:
        """Every time at which the schedule acts."""
        if self._times is not None:
            return list(self._times)
        end = self.start if self.end is None else self.end
        times = list(range(self.start, end + 1, self.every))
        if times[-1] != end:
            times.append(end)  # always reach the final target at ``end``
        return times

    def acts_at(self, time: int) -> bool:
        """Whether the schedule acts at ``time`` (cheap: called at every step)."""
        if self._times is not None:
            return time in self._times
        end = self.start if self.end is None else self.end
        return self.start <= time <= end and ((time - self.start) % self.every == 0 or time == end)

    def target_at(self, time: int) -> float | None:
        """The target if the schedule acts at ``time``, else ``None``."""
        if not self.acts_at(time):
            return None
        end = self.start if self.end is None else self.end
        progress = 1.0 if end == self.start else (time - self.start) / (end - self.start)
        return self.initial + (self.amount - self.initial) * self.shape(progress)

    @property
    def final_target(self) -> float:
        return self.amount

    def describe(self) -> dict[str, Any]:
        """JSON-able description, stored in edit logs."""
        description = {"schedule": type(self).__name__, "amount": self.amount, "start": self.start, "end": self.end,
                       "every": self.every, "unit": self.unit, "initial": self.initial}
        if self._times is not None:
            description["times"] = list(self._times)
        return description


def _moved(time: int, last: int, last_time: int) -> int:
    """``time`` scaled from a schedule ending at ``last`` to one ending at ``last_time`` (halves round up)."""
    return min(last_time, math.floor(time * last_time / last + 0.5))


class Constant(Schedule):
    """Acts every ``every`` epochs/steps with the same target ``amount`` (iterative re-pruning)."""

    def shape(self, progress: float) -> float:
        return 1.0


class OneShot(Schedule):
    """Acts once, at ``at``, with target ``amount``."""

    def __init__(self, amount: float, at: int = 0, unit: str = "epoch"):
        super().__init__(amount=amount, start=at, end=at, every=1, unit=unit)


class Linear(Schedule):
    """Target grows linearly from ``initial`` to ``amount`` between ``start`` and ``end``."""


class Cubic(Schedule):
    """Gradual pruning of Zhu and Gupta (2017): fast at first, slow near the end.

    target(t) = amount + (initial - amount) * (1 - (t - start) / (end - start)) ** 3
    """

    def shape(self, progress: float) -> float:
        return 1.0 - (1.0 - progress) ** 3


class Exponential(Schedule):
    """The same share of what is left goes at every action (geometric, as iterative magnitude
    pruning and lottery-ticket rounds do): remaining(t) = (1 - initial) * r ** progress."""

    def target_at(self, time: int) -> float | None:
        linear_target = super().target_at(time)
        if linear_target is None:
            return None
        if self.amount >= 1.0 or self.initial >= 1.0:
            return linear_target
        end = self.start if self.end is None else self.end
        progress = 1.0 if end == self.start else (time - self.start) / (end - self.start)
        remaining = (1.0 - self.initial) * ((1.0 - self.amount) / (1.0 - self.initial)) ** progress
        return 1.0 - remaining


class Steps(Schedule):
    """Acts at an explicit list of ``steps`` (epochs or optimizer steps) with the given ``amounts``.

    ``amounts`` may be one number (the same target each time) or one per step.
    """

    def __init__(self, steps: list[int], amounts: list[float] | float, unit: str = "epoch"):
        if not steps:
            raise ValueError("Steps schedule needs at least one step")
        if sorted(set(steps)) != list(steps):
            raise ValueError(f"Steps schedule steps must be strictly increasing, got {steps}")
        amounts_list = [float(amounts)] * len(steps) if isinstance(amounts, (int, float)) else [float(a) for a in amounts]
        if len(amounts_list) != len(steps):
            raise ValueError(f"Steps schedule has {len(steps)} steps but {len(amounts_list)} amounts")
        super().__init__(amount=max(amounts_list), start=steps[0], end=steps[-1], unit=unit)
        for value in amounts_list:
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"schedule amounts must be finite numbers >= 0, got {value}")
        self.steps = [int(step) for step in steps]
        self.amounts = amounts_list

    def times(self) -> list[int]:
        return list(self.steps)

    def acts_at(self, time: int) -> bool:
        return time in self.steps

    def target_at(self, time: int) -> float | None:
        return self.amounts[self.steps.index(time)] if time in self.steps else None

    @property
    def final_target(self) -> float:
        return self.amounts[-1]

    def compressed(self, last_time: int) -> "Steps":
        """A copy with every step moved as in :meth:`Schedule.compressed`; steps that land on the
        same time merge, the later step's amount winning."""
        if last_time < 0:
            raise ConfigurationError(f"training has no {self.unit} in which the schedule could act")
        schedule = copy.deepcopy(self)
        last = self.last_time
        if last <= last_time:
            return schedule
        merged: dict[int, float] = {}
        for step, amount in zip(self.steps, self.amounts):
            merged[_moved(step, last, last_time)] = amount  # later steps overwrite: their amount wins
        schedule.steps = sorted(merged)
        schedule.amounts = [merged[step] for step in schedule.steps]
        schedule.start, schedule.end = schedule.steps[0], schedule.steps[-1]
        return schedule

    def describe(self) -> dict[str, Any]:
        return {"schedule": "Steps", "steps": self.steps, "amounts": self.amounts, "unit": self.unit}
