"""Objectives: what a pruned network scores (fitness, higher is better), and ranking / survival.

* :class:`AccuracyAtSparsity`: accuracy, minus a penalty for falling short of a target sparsity;
* :class:`SmallestAboveFloor`: the smallest network (parameters or MACs) whose accuracy is at least
  a floor; infeasible networks rank below every feasible one, closer to the floor first;
* :class:`ParetoFront`: accuracy x size, ranked and selected by NSGA-II (DEAP's
  ``tools.sortNondominated``, ``tools.emo.assignCrowdingDist`` and ``tools.selNSGA2``).

DEAP works on any objects with a ``.fitness``; small wrappers (:class:`_Fitness`, :class:`_Wrapped`)
give it ours without ``deap.creator`` globals. These DEAP functions make no random choice.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Sequence

import numpy as np
from deap import base, tools
from deap.tools import emo

from growprune.evolution.types import Individual

MEASURES = ("params", "macs")


def _check_measure(measure: str) -> str:
    if measure not in MEASURES:
        raise ValueError(f"measure must be one of {MEASURES}, got {measure!r}")
    return measure


def _check_fraction(name: str, value: float, low: float, high: float, low_open: bool, high_open: bool) -> float:
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    if ok:
        ok = (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not ok:
        interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise ValueError(f"{name} must be a number in {interval}, got {value!r}")
    return float(value)


def _sparsity(size: float, original: float) -> float:
    if original <= 0:
        raise ValueError(f"the original size must be > 0, got {original}")
    return 1.0 - float(size) / float(original)


def _fitness_of(individual: Individual, index: int) -> tuple[float, ...]:
    if individual.fitness is None:
        raise ValueError(f"individual {index} has not been evaluated (fitness is None)")
    return tuple(float(value) for value in individual.fitness)


class Objective(ABC):
    """Turns (accuracy, size) into a fitness and ranks individuals (see the module docstring).

    Attributes:
        measure: ``"params"`` (nonzero parameters) or ``"macs"`` (effective multiply-adds).
        multi: several objectives (a Pareto front) instead of one scalar.
    """

    measure: str = "params"
    multi: bool = False

    @abstractmethod
    def fitness(self, accuracy: float, size: float, original: float) -> tuple[float, ...]:
        """The fitness values (higher is better) of a network of ``size`` out of ``original``."""

    def check(self, unpruned_accuracy: float) -> None:
        """Refuse a run that cannot succeed, given the unpruned network's accuracy (``ValueError``)."""
        _check_fraction("the unpruned accuracy", unpruned_accuracy, 0.0, 1.0, False, False)

    def rank(self, individuals: Sequence[Individual]) -> np.ndarray:
        """One float per individual, higher is better (scalar objectives: the fitness)."""
        return np.array([_fitness_of(ind, i)[0] for i, ind in enumerate(individuals)], dtype=np.float64)

    def select(self, individuals: Sequence[Individual], k: int) -> list[int]:
        """Indices of the ``k`` survivors: the best by :meth:`rank` (ties: earlier first)."""
        self._check_k(individuals, k)
        ranks = self.rank(individuals)
        return [int(i) for i in np.argsort(-ranks, kind="stable")[:k]]

    def front(self, individuals: Sequence[Individual]) -> list[int]:
        """Indices of the non-dominated individuals (a scalar objective: the single best)."""
        if not individuals:
            return []
        return [int(np.argmax(self.rank(individuals)))]

    def race_score(self, accuracy: float, size: float, original: float) -> float:
        """A scalar, non-decreasing in accuracy at fixed size, for racing (the fitness)."""
        return self.fitness(accuracy, size, original)[0]

    @staticmethod
    def _check_k(individuals: Sequence[Individual], k: int) -> None:
        if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= len(individuals):
            raise ValueError(f"k must be an integer in 0..{len(individuals)} (the individuals), got {k!r}")


class AccuracyAtSparsity(Objective):
    """Accuracy at a target sparsity: ``accuracy - penalty * max(0, sparsity - achieved)``.

    ``achieved = 1 - size / original`` in the ``measure`` units.

    Args:
        sparsity: target fraction of the original size gone, in [0, 1).
        penalty: accuracy lost per unit of missing sparsity (>= 0).
        measure: ``"params"`` or ``"macs"``.
    """

    def __init__(self, sparsity: float, penalty: float = 1.0, measure: str = "params"):
        self.sparsity = _check_fraction("sparsity", sparsity, 0.0, 1.0, False, True)
        if isinstance(penalty, bool) or not isinstance(penalty, (int, float)) or not math.isfinite(penalty) or penalty < 0:
            raise ValueError(f"penalty must be a finite number >= 0, got {penalty!r}")
        self.penalty = float(penalty)
        self.measure = _check_measure(measure)

    def fitness(self, accuracy: float, size: float, original: float) -> tuple[float, ...]:
        shortfall = max(0.0, self.sparsity - _sparsity(size, original))
        return (float(accuracy) - self.penalty * shortfall,)


class SmallestAboveFloor(Objective):
    """The smallest network with accuracy >= ``floor``.

    Feasible networks score ``1 - size / original`` in [0, 1]; infeasible ones
    ``-(floor - accuracy)`` < 0, below every feasible one, and the closer to the floor the better.

    Args:
        floor: accuracy floor in (0, 1].
        measure: ``"params"`` or ``"macs"``.
    """

    def __init__(self, floor: float, measure: str = "params"):
        self.floor = _check_fraction("floor", floor, 0.0, 1.0, True, False)
        self.measure = _check_measure(measure)

    def fitness(self, accuracy: float, size: float, original: float) -> tuple[float, ...]:
        if accuracy >= self.floor:
            return (max(0.0, min(1.0, _sparsity(size, original))),)
        return (-(self.floor - float(accuracy)),)

    def check(self, unpruned_accuracy: float) -> None:
        super().check(unpruned_accuracy)
        if self.floor > unpruned_accuracy:
            raise ValueError(f"accuracy floor {self.floor:g} is above the unpruned model's accuracy "
                             f"{unpruned_accuracy:g}: no pruned network is likely to reach it; lower the floor")


class _Fitness(base.Fitness):
    """DEAP fitness maximising both values (accuracy, 1 - size/original); no creator globals."""

    weights = (1.0, 1.0)


class _Wrapped:
    """What DEAP's NSGA-II tools see of an individual: its fitness, and its index in our list."""

    __slots__ = ("fitness", "index")

    def __init__(self, values: tuple[float, ...], index: int):
        self.fitness = _Fitness(values)
        self.index = index


class ParetoFront(Objective):
    """Accuracy x size: fitness ``(accuracy, 1 - size / original)``, both maximised, NSGA-II survival.

    :meth:`rank` is ``-(front index) + crowding`` with the crowding distance mapped into [0, 0.5)
    (``0.48 c / (1 + c)``, infinite distance, the front's ends, to 0.49): every individual of a
    better front outranks every one of a worse front, and within a front the less crowded wins.

    Args:
        measure: ``"params"`` or ``"macs"``.
    """

    multi = True

    def __init__(self, measure: str = "params"):
        self.measure = _check_measure(measure)

    def fitness(self, accuracy: float, size: float, original: float) -> tuple[float, ...]:
        return (float(accuracy), _sparsity(size, original))

    @staticmethod
    def _wrap(individuals: Sequence[Individual]) -> list[_Wrapped]:
        wrapped = []
        for index, individual in enumerate(individuals):
            values = _fitness_of(individual, index)
            if len(values) != 2:
                raise ValueError(f"individual {index} has {len(values)} fitness values; ParetoFront needs 2")
            wrapped.append(_Wrapped(values, index))
        return wrapped

    def rank(self, individuals: Sequence[Individual]) -> np.ndarray:
        wrapped = self._wrap(individuals)
        ranks = np.zeros(len(wrapped), dtype=np.float64)
        for number, front in enumerate(tools.sortNondominated(wrapped, len(wrapped))):
            emo.assignCrowdingDist(front)
            for member in front:
                distance = member.fitness.crowding_dist
                crowding = 0.49 if math.isinf(distance) else 0.48 * distance / (1.0 + distance)
                ranks[member.index] = -number + crowding
        return ranks

    def select(self, individuals: Sequence[Individual], k: int) -> list[int]:
        """NSGA-II survivors (``tools.selNSGA2``): whole fronts, the last one cut by crowding distance."""
        self._check_k(individuals, k)
        if k == 0:
            return []
        return [member.index for member in tools.selNSGA2(self._wrap(individuals), k)]

    def front(self, individuals: Sequence[Individual]) -> list[int]:
        if not individuals:
            return []
        first = tools.sortNondominated(self._wrap(individuals), len(individuals), first_front_only=True)[0]
        return sorted(member.index for member in first)

    def race_score(self, accuracy: float, size: float, original: float) -> float:
        raise ValueError("racing needs a scalar objective: use method 'full' with ParetoFront")
