"""Objectives of the evolutionary loop: fitness, floors, and NSGA-II ranking checked by brute force."""

from __future__ import annotations

import numpy as np
import pytest

from growprune.evolution.objectives import AccuracyAtSparsity, ParetoFront, SmallestAboveFloor
from growprune.evolution.types import Individual


def individuals(points) -> list[Individual]:
    return [Individual(genome=np.zeros(1, dtype=bool), fitness=tuple(float(v) for v in point)) for point in points]


def dominates(p, q) -> bool:
    return all(a >= b for a, b in zip(p, q)) and any(a > b for a, b in zip(p, q))


def brute_force_fronts(points) -> list[int]:
    """Front index of every point by repeatedly peeling off the non-dominated ones."""
    remaining, front, index = set(range(len(points))), [None] * len(points), 0
    while remaining:
        layer = {i for i in remaining if not any(dominates(points[j], points[i]) for j in remaining)}
        for i in layer:
            front[i] = index
        remaining -= layer
        index += 1
    return front


def crowding(points, members) -> dict[int, float]:
    """Deb's crowding distance within one front: per objective, the neighbours' gap over the range."""
    distance = {i: 0.0 for i in members}
    for axis in range(2):
        ordered = sorted(members, key=lambda i: points[i][axis])
        low, high = points[ordered[0]][axis], points[ordered[-1]][axis]
        distance[ordered[0]] = distance[ordered[-1]] = float("inf")
        if high == low:
            continue
        for before, here, after in zip(ordered, ordered[1:], ordered[2:]):
            distance[here] += (points[after][axis] - points[before][axis]) / (2 * (high - low))
    return distance


def random_points(seed: int, count: int, grid: int | None):
    rng = np.random.default_rng(seed)
    points = rng.random((count, 2))
    if grid:  # coarse values: ties and duplicate points
        points = np.round(points * grid) / grid
    return [tuple(p) for p in points]


CASES = [(seed, count, grid) for seed in range(4) for count, grid in [(1, None), (7, None), (40, None), (40, 5), (60, 3)]]


@pytest.mark.parametrize("seed,count,grid", CASES)
def test_pareto_rank_orders_fronts_like_a_brute_force_non_dominated_sort(seed, count, grid):
    points = random_points(seed, count, grid)
    population = individuals(points)
    objective = ParetoFront()
    ranks = objective.rank(population)
    fronts = brute_force_fronts(points)
    assert [int(np.ceil(-r)) for r in ranks] == fronts  # rank = -front + crowding in [0, 0.5)
    for i in range(count):
        for j in range(count):
            if fronts[i] < fronts[j]:
                assert ranks[i] > ranks[j]
    assert objective.front(population) == [i for i, f in enumerate(fronts) if f == 0]
    # within a front the less crowded ranks higher (distinct points: ties in value make the ends ambiguous)
    if grid is None:
        for number in set(fronts):
            members = [i for i in range(count) if fronts[i] == number]
            distance = crowding(points, members)
            for i in members:
                for j in members:
                    if distance[i] > distance[j]:
                        assert ranks[i] > ranks[j]


@pytest.mark.parametrize("seed,count,grid", [c for c in CASES if c[1] > 1])
def test_nsga2_survivors_are_whole_better_fronts_then_the_least_crowded(seed, count, grid):
    points = random_points(seed, count, grid)
    fronts = brute_force_fronts(points)
    objective = ParetoFront()
    ranks = objective.rank(individuals(points))
    for k in (1, count // 3, count // 2, count):
        chosen = objective.select(individuals(points), k)
        assert len(chosen) == len(set(chosen)) == k
        cut = max(fronts[i] for i in chosen)
        assert all(i in chosen for i in range(count) if fronts[i] < cut)  # every better front survives whole
        assert all(fronts[i] <= cut for i in chosen)
        # within the cut front, no left-out member is less crowded than a survivor
        distance = crowding(points, [i for i in range(count) if fronts[i] == cut])
        left_out = [distance[i] for i in range(count) if fronts[i] == cut and i not in chosen]
        kept = [distance[i] for i in chosen if fronts[i] == cut]
        if left_out and kept:
            assert min(kept) >= max(left_out)


def test_pareto_fitness_and_scalar_only_racing():
    objective = ParetoFront(measure="macs")
    assert objective.multi and objective.measure == "macs"
    assert objective.fitness(0.9, 25.0, 100.0) == (0.9, 0.75)
    with pytest.raises(ValueError, match="racing needs a scalar objective"):
        objective.race_score(0.9, 25.0, 100.0)
    with pytest.raises(ValueError, match="individual 1 has not been evaluated"):
        objective.rank([individuals([(0.5, 0.5)])[0], Individual(genome=np.zeros(1, dtype=bool))])
    with pytest.raises(ValueError, match=r"k must be an integer in 0\.\.2"):
        objective.select(individuals([(0.5, 0.5), (0.6, 0.4)]), 3)


def test_accuracy_at_sparsity_penalises_only_missing_sparsity():
    objective = AccuracyAtSparsity(0.9, penalty=2.0)
    assert not objective.multi
    assert objective.fitness(0.8, 10.0, 100.0) == (0.8,)  # exactly 90 % sparse
    assert objective.fitness(0.8, 5.0, 100.0) == (0.8,)  # sparser: no bonus
    assert objective.fitness(0.8, 30.0, 100.0)[0] == pytest.approx(0.8 - 2.0 * 0.2)
    population = individuals([(0.5,), (0.9,), (0.7,), (0.9,)])
    assert objective.select(population, 3) == [1, 3, 2]
    assert objective.front(population) == [1]
    # racing score rises with accuracy at any size
    for size in (5.0, 50.0):
        scores = [objective.race_score(a, size, 100.0) for a in np.linspace(0, 1, 11)]
        assert scores == sorted(scores)


def test_smallest_above_floor_puts_every_feasible_network_above_every_infeasible_one():
    objective = SmallestAboveFloor(0.9)
    feasible = [objective.fitness(0.9, size, 100.0)[0] for size in (100.0, 50.0, 1.0)]
    assert feasible == [0.0, 0.5, 0.99]
    infeasible = [objective.fitness(acc, 1.0, 100.0)[0] for acc in (0.1, 0.5, 0.89)]
    assert infeasible == sorted(infeasible) and max(infeasible) < min(feasible)
    assert infeasible[-1] == pytest.approx(-0.01)
    scores = [objective.race_score(a, 20.0, 100.0) for a in np.linspace(0, 1, 21)]
    assert scores == sorted(scores)


def test_a_floor_above_the_unpruned_accuracy_is_refused():
    with pytest.raises(ValueError, match=r"^accuracy floor 0\.99 is above the unpruned model's accuracy 0\.97"):
        SmallestAboveFloor(0.99).check(0.97)
    SmallestAboveFloor(0.97).check(0.97)
    with pytest.raises(ValueError, match="the unpruned accuracy must be a number in"):
        ParetoFront().check(1.5)


@pytest.mark.parametrize("build,message", [
    (lambda: SmallestAboveFloor(0.0), r"floor must be a number in \(0\.0, 1\.0\], got 0\.0"),
    (lambda: SmallestAboveFloor(1.2), r"floor must be a number in \(0\.0, 1\.0\], got 1\.2"),
    (lambda: SmallestAboveFloor(0.9, measure="flops"), r"measure must be one of \('params', 'macs'\), got 'flops'"),
    (lambda: AccuracyAtSparsity(1.0), r"sparsity must be a number in \[0\.0, 1\.0\), got 1\.0"),
    (lambda: AccuracyAtSparsity(-0.1), r"sparsity must be a number in \[0\.0, 1\.0\), got -0\.1"),
    (lambda: AccuracyAtSparsity(0.5, penalty=-1), r"penalty must be a finite number >= 0, got -1"),
    (lambda: ParetoFront(measure="size"), r"measure must be one of"),
])
def test_constructor_arguments_are_checked(build, message):
    with pytest.raises(ValueError, match=message):
        build()
