"""Search strategies: seeds, exact resume from a state dict, selection, elitism, baselines, bad input."""

from __future__ import annotations

import io
import math
import random

import numpy as np
import pytest
import torch

from growprune.evolution.objectives import AccuracyAtSparsity, ParetoFront, SmallestAboveFloor
from growprune.evolution.search import (
    GeneticSearch,
    LADDER_RANGE,
    MagnitudeSearch,
    RandomSearch,
    SimulatedAnnealing,
    density_for_sparsity,
    tournament,
)
from tests.test_evolution_loop import FakeGenotype, fake_accuracy

GENOTYPE = FakeGenotype()


def score(individuals, objective):
    """Evaluate like the loop does (closed-form fake accuracy), skipping carried individuals."""
    for individual in individuals:
        if individual.fitness is None:
            individual.accuracy = fake_accuracy(individual.genome, GENOTYPE.importance)
            individual.size = GENOTYPE.size(individual.genome)
            individual.fitness = objective.fitness(individual.accuracy, individual.size, GENOTYPE.original_size())


def drive(search, objective, generations, seed=0, state=None):
    """Run `generations` ask/score/tell rounds; returns every asked generation's genomes and fitness."""
    if state is None:
        search.start(GENOTYPE, objective, np.random.default_rng(seed))
    history = []
    for _ in range(generations):
        individuals = search.ask()
        score(individuals, objective)
        history.append([(ind.genome.copy(), ind.fitness) for ind in individuals])
        search.tell(individuals)
    return history


def roundtrip(state):
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


SEARCHES = {
    "ga": (lambda: GeneticSearch(population=8, elite=2, tournament=3, mutation_rate=0.05), AccuracyAtSparsity(0.5)),
    "ga-layer-magnitude": (lambda: GeneticSearch(population=7, elite=1, crossover="layer", mutation="magnitude",
                                                 mutation_rate=0.1, initial="uniform"), SmallestAboveFloor(0.6)),
    "ga-pareto": (lambda: GeneticSearch(population=8, tournament=2, mutation_rate=0.05), ParetoFront()),
    "random": (lambda: RandomSearch(population=6), AccuracyAtSparsity(0.5)),
    "annealing": (lambda: SimulatedAnnealing(population=5, mutation_rate=0.1, steps=4), SmallestAboveFloor(0.6)),
    "magnitude-floor": (lambda: MagnitudeSearch(population=4), SmallestAboveFloor(0.6)),
    "magnitude-pareto": (lambda: MagnitudeSearch(population=4), ParetoFront()),
}


def same(history_a, history_b):
    assert len(history_a) == len(history_b)
    for generation_a, generation_b in zip(history_a, history_b):
        assert len(generation_a) == len(generation_b)
        for (genome_a, fitness_a), (genome_b, fitness_b) in zip(generation_a, generation_b):
            assert genome_a.dtype == genome_b.dtype and np.array_equal(genome_a, genome_b)
            assert tuple(fitness_a) == tuple(fitness_b)


@pytest.mark.parametrize("name", sorted(SEARCHES))
def test_same_seed_same_run_and_state_dict_resumes_exactly(name):
    factory, objective = SEARCHES[name]
    uninterrupted = drive(factory(), objective, 5, seed=11)
    same(uninterrupted, drive(factory(), objective, 5, seed=11))
    first = factory()
    head = drive(first, objective, 3, seed=11)
    state = roundtrip(first.state_dict())
    resumed = factory()
    resumed.start(GENOTYPE, objective, np.random.default_rng(999))  # a different stream, replaced by the state
    resumed.load_state_dict(state)
    tail = drive(resumed, objective, 2, state=state)
    same(uninterrupted, head + tail)
    assert resumed.best().key == drive_best(factory, objective, 5, seed=11)


def drive_best(factory, objective, generations, seed):
    search = factory()
    drive(search, objective, generations, seed=seed)
    return search.best().key


def test_different_seeds_differ():
    factory, objective = SEARCHES["ga"]
    a, b = drive(factory(), objective, 2, seed=1), drive(factory(), objective, 2, seed=2)
    assert not np.array_equal(a[1][3][0], b[1][3][0])


def test_python_random_state_is_restored_around_deap_tournaments():
    random.seed(5)
    expected = [random.random() for _ in range(3)]
    random.seed(5)
    random.random()
    factory, objective = SEARCHES["ga"]
    drive(factory(), objective, 3)
    assert [random.random() for _ in range(2)] == expected[1:]


def test_tournament_wins_follow_the_rank():
    ranks = np.arange(10, dtype=float)  # index 9 is best
    winners = tournament(ranks, 20000, 3, np.random.default_rng(0))
    frequency = np.bincount(winners, minlength=10) / len(winners)
    # P(best wins) = 1 - (9/10)^3 with 3 aspirants drawn with replacement; P(worst wins) = (1/10)^3
    assert frequency[9] == pytest.approx(1 - 0.9**3, abs=0.015)
    assert frequency[0] == pytest.approx(0.001, abs=0.002)
    assert np.all(np.diff(frequency) > -0.01)
    same_seed = tournament(ranks, 50, 3, np.random.default_rng(0))
    assert same_seed == winners[:50]
    assert set(tournament(ranks, 200, 1, np.random.default_rng(1))) == set(range(10))  # size 1: random picks


def test_elites_are_carried_with_their_fitness_and_offspring_name_their_parent():
    search, objective = GeneticSearch(population=8, elite=2, tournament=3, mutation_rate=0.05), AccuracyAtSparsity(0.5)
    search.start(GENOTYPE, objective, np.random.default_rng(3))
    first = search.ask()
    score(first, objective)
    search.tell(first)
    second = search.ask()
    order = sorted(range(8), key=lambda i: -first[i].fitness[0])
    carried = [ind for ind in second if ind.fitness is not None]
    assert len(carried) == 2
    assert [ind.key for ind in carried] == [first[i].key for i in order[:2]]
    assert [ind.fitness for ind in carried] == [first[i].fitness for i in order[:2]]
    for child in second[2:]:
        assert child.fitness is None and child.parent is not None
        assert child.extra["parent_key"] == first[child.parent].key
        differs = {name for name, piece in GENOTYPE.layer_slices.items()
                   if (child.genome[piece] != first[child.parent].genome[piece]).any()}
        assert child.changed == differs


def test_genetic_search_beats_random_search_at_equal_budget_on_the_fake_problem():
    objective = AccuracyAtSparsity(0.5)
    for seed in range(4):
        ga = GeneticSearch(population=10, elite=2, tournament=3, mutation_rate=0.03, initial="uniform",
                           initial_density=0.5)
        rs = RandomSearch(population=10, initial="uniform", initial_density=0.5)
        ga_history, rs_history = drive(ga, objective, 30, seed=seed), drive(rs, objective, 30, seed=seed)
        assert ga.best().fitness[0] > rs.best().fitness[0] + 0.03
        # best() is the best of everything evaluated, by an independent max
        assert ga.best().fitness[0] == max(f[0] for generation in ga_history for _, f in generation)
        assert rs.best().fitness[0] == max(f[0] for generation in rs_history for _, f in generation)


def dominates(a, b):
    return all(x >= y for x, y in zip(a, b)) and any(x > y for x, y in zip(a, b))


def test_pareto_front_is_non_dominated_over_everything_evaluated():
    search, objective = GeneticSearch(population=8, tournament=2, mutation_rate=0.05), ParetoFront()
    history = drive(search, objective, 6)
    everything = [fitness for generation in history for _, fitness in generation]
    front = [ind.fitness for ind in search.front()]
    assert front and all(not any(dominates(other, f) for other in everything) for f in front)
    # every non-dominated fitness value evaluated is on the front
    expected = {f for f in everything if not any(dominates(other, f) for other in everything)}
    assert {tuple(f) for f in front} == expected
    assert search.best().fitness == max(front)


def test_annealing_at_near_zero_temperature_never_accepts_worse():
    search = SimulatedAnnealing(population=4, start_temperature=1e-9, end_temperature=1e-9, mutation_rate=0.1)
    objective = AccuracyAtSparsity(0.5)
    search.start(GENOTYPE, objective, np.random.default_rng(0))
    previous = None
    for _ in range(8):
        individuals = search.ask()
        score(individuals, objective)
        search.tell(individuals)
        current = [s["fitness"][0] for s in search.state_dict()["extra"]["current"]]
        if previous is not None:
            assert all(c >= p for c, p in zip(current, previous))
        previous = current
    assert search.temperature(0) == 1e-9
    hot = SimulatedAnnealing(start_temperature=1.0, end_temperature=0.01, steps=3)
    assert [hot.temperature(s) for s in range(4)] == pytest.approx([1.0, 0.1, 0.01, 0.01])


def test_magnitude_search_hits_the_target_sparsity_with_one_evaluation():
    search, objective = MagnitudeSearch(population=4), AccuracyAtSparsity(0.5)
    history = drive(search, objective, 3)
    assert [len(generation) for generation in history] == [1, 1, 1]
    genome = history[0][0][0]
    kept = int(genome.sum())
    # sparsity 1 - (kept + 10) / 58 >= 0.5  <=>  kept <= 19: the most kept that reaches it
    assert kept == 19 and np.array_equal(genome, GENOTYPE.magnitude(19 / 48))
    assert history[1][0][1] == history[0][0][1]  # carried, not re-drawn


def test_magnitude_search_bisects_to_the_smallest_density_above_the_floor():
    objective = SmallestAboveFloor(0.7)
    search = MagnitudeSearch(population=3)
    drive(search, objective, 6)
    # independent brute force: the fewest most-important genes reaching the floor
    needed = min(k for k in range(49) if fake_accuracy(GENOTYPE.magnitude(k / 48), GENOTYPE.importance) >= 0.7)
    assert int(search.best().genome.sum()) == needed


@pytest.mark.parametrize("make, message", [
    (lambda: GeneticSearch(population=4, elite=5), "elite must be an integer in 0..3, got 5"),
    (lambda: GeneticSearch(population=4, elite=4), "elite must be an integer in 0..3, got 4"),
    (lambda: GeneticSearch(elite=-1), "elite must be an integer in 0..31, got -1"),
    (lambda: GeneticSearch(population=4, tournament=5), "tournament must be an integer in 1..4, got 5"),
    (lambda: GeneticSearch(tournament=0), "tournament must be an integer in 1..32, got 0"),
    (lambda: GeneticSearch(crossover_rate=1.5), r"crossover_rate must be a number in \[0.0, 1.0\], got 1.5"),
    (lambda: GeneticSearch(mutation_rate=-0.1), r"mutation_rate must be a number in \[0.0, 1.0\], got -0.1"),
    (lambda: GeneticSearch(crossover="onepoint"), "crossover must be one of .*, got 'onepoint'"),
    (lambda: GeneticSearch(mutation="exchange"), "mutation must be one of .*, got 'exchange'"),
    (lambda: GeneticSearch(initial="sobol"), "initial must be one of .*, got 'sobol'"),
    (lambda: GeneticSearch(population=0), "population must be an integer >= 1, got 0"),
    (lambda: RandomSearch(initial="normal"), "initial must be one of"),
    (lambda: SimulatedAnnealing(start_temperature=0.01, end_temperature=0.1), "end_temperature must be a number in"),
    (lambda: SimulatedAnnealing(mutation_rate=2), "mutation_rate must be a number in"),
    (lambda: SimulatedAnnealing(steps=0), "steps must be an integer >= 1, got 0"),
])
def test_bad_arguments_raise_value_errors_at_construction(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_misuse_raises_value_errors():
    with pytest.raises(ValueError, match="needs a scalar objective"):
        SimulatedAnnealing().start(GENOTYPE, ParetoFront(), np.random.default_rng(0))
    with pytest.raises(ValueError, match="mutation 'perturb' does not apply to FakeGenotype"):
        GeneticSearch(mutation="perturb").start(GENOTYPE, AccuracyAtSparsity(0.5), np.random.default_rng(0))
    with pytest.raises(TypeError, match="numpy.random.Generator"):
        GeneticSearch().start(GENOTYPE, AccuracyAtSparsity(0.5), 0)
    with pytest.raises(ValueError, match="call start"):
        GeneticSearch().ask()
    search = GeneticSearch(population=4, elite=1, tournament=2)
    search.start(GENOTYPE, AccuracyAtSparsity(0.5), np.random.default_rng(0))
    with pytest.raises(ValueError, match="no generation has been told"):
        search.best()
    individuals = search.ask()
    with pytest.raises(ValueError, match="individual 0 has no fitness"):
        search.tell(individuals)
    score(individuals, AccuracyAtSparsity(0.5))
    with pytest.raises(ValueError, match="expected the 4 asked individuals, got 3"):
        search.tell(individuals[:3])
    state = search.state_dict()
    other = GeneticSearch(population=4, elite=0, tournament=2)
    other.start(GENOTYPE, AccuracyAtSparsity(0.5), np.random.default_rng(0))
    with pytest.raises(ValueError, match="configuration"):
        other.load_state_dict(state)
    with pytest.raises(ValueError, match="of 'GeneticSearch'"):
        _started_random().load_state_dict(state)
    assert math.isfinite(individuals[0].fitness[0])


def _started_random():
    search = RandomSearch(population=4)
    search.start(GENOTYPE, AccuracyAtSparsity(0.5), np.random.default_rng(0))
    return search


# ------------------------------------------------------------------------ magnitude seeds, elitism
def test_magnitude_seeds_open_generation_0():
    ga = GeneticSearch(population=8, mutation_rate=0.05)
    ga.start(GENOTYPE, AccuracyAtSparsity(0.5), np.random.default_rng(0))
    first = ga.ask()
    # the target: kept + 10 <= 29 of 58 parameters -> 19 most important genes (as MagnitudeSearch finds)
    assert np.array_equal(first[0].genome, GENOTYPE.magnitude(19 / 48)) and "seed_density" in first[0].extra
    assert density_for_sparsity(GENOTYPE, 0.5) == pytest.approx(first[0].extra["seed_density"])
    assert all("seed_density" not in ind.extra for ind in first[1:])
    assert len({ind.key for ind in first}) == 8  # the others are biased random genomes
    floor = GeneticSearch(population=7, mutation_rate=0.05)
    floor.start(GENOTYPE, SmallestAboveFloor(0.7), np.random.default_rng(0))
    seeds = [ind for ind in floor.ask() if "seed_density" in ind.extra]
    low, high = LADDER_RANGE
    ladder = [low * (high / low) ** (i / 3) for i in range(4)]  # ceil(7 / 2) densities, geometric
    assert [ind.extra["seed_density"] for ind in seeds] == pytest.approx(ladder)
    assert all(np.array_equal(ind.genome, GENOTYPE.magnitude(d)) for ind, d in zip(seeds, ladder))
    one = GeneticSearch(population=5, initial_density=0.3)
    one.start(GENOTYPE, ParetoFront(), np.random.default_rng(0))
    assert [ind.extra.get("seed_density") for ind in one.ask()] == [0.3, None, None, None, None]
    unbiased = GeneticSearch(population=5, initial="uniform")
    unbiased.start(GENOTYPE, AccuracyAtSparsity(0.5), np.random.default_rng(0))
    assert all("seed_density" not in ind.extra for ind in unbiased.ask())
    with pytest.raises(ValueError, match="GeneticSearch: even density 0 leaves sparsity below 0.9"):
        GeneticSearch(population=4).start(GENOTYPE, AccuracyAtSparsity(0.9), np.random.default_rng(0))


@pytest.mark.parametrize("objective", [AccuracyAtSparsity(0.5), SmallestAboveFloor(0.7)], ids=["sparsity", "floor"])
@pytest.mark.parametrize("elite", [0, 1])
def test_the_ga_never_falls_below_its_best_magnitude_seed(objective, elite):
    for seed in range(3):
        search = GeneticSearch(population=6, elite=elite, tournament=2, mutation_rate=0.15)
        search.start(GENOTYPE, objective, np.random.default_rng(seed))
        first = search.ask()
        score(first, objective)
        seeded = max(ind.fitness[0] for ind in first if "seed_density" in ind.extra)
        search.tell(first)
        for _ in range(8):
            assert search.best().fitness[0] >= seeded
            generation = search.ask()
            score(generation, objective)
            if elite:  # the carried elite: the generation itself never falls below the seed
                assert max(ind.fitness[0] for ind in generation) >= seeded
            search.tell(generation)
        assert search.best().fitness[0] >= seeded


@pytest.fixture(scope="module")
def masks():
    from growprune.evolution.genotypes import MaskGenotype
    from tests.test_evolution_genotypes import make_module

    genotype = MaskGenotype(shrink=0.05)
    genotype.bind(make_module("lenet_300_100"))
    return genotype


def mask_drive(search, genotype, objective, generations, seed=0, state=None):
    """Like drive() on a real MaskGenotype; accuracy = the kept share of the total |w| (a closed-form stand-in)."""
    magnitude = genotype._magnitudes
    if state is None:
        search.start(genotype, objective, np.random.default_rng(seed))
    history = []
    for _ in range(generations):
        individuals = search.ask()
        for ind in individuals:
            if ind.fitness is None:
                ind.accuracy = float(magnitude[ind.genome].sum() / magnitude.sum())
                ind.size = genotype.size(ind.genome)
                ind.fitness = objective.fitness(ind.accuracy, ind.size, genotype.original_size())
        history.append([(ind.genome.copy(), ind.fitness) for ind in individuals])
        search.tell(individuals)
    return history


def test_a_shrinking_ga_finds_smaller_masks_than_its_seeds_and_resumes_exactly(masks):
    objective = SmallestAboveFloor(0.6)

    def make():
        return GeneticSearch(population=6, elite=2, tournament=2, mutation="shrink", mutation_rate=0.002)

    search = make()
    history = mask_drive(search, masks, objective, 6, seed=5)
    feasible_seeds = [masks.size(g) for g, f in history[0][:3] if f[0] >= 0]  # seeds: the first ceil(6 / 2)
    assert feasible_seeds and search.best().fitness[0] >= 0
    assert search.best().size < min(feasible_seeds) * 0.97  # shrinks below the smallest feasible seed
    same(history, mask_drive(make(), masks, objective, 6, seed=5))
    first = make()
    head = mask_drive(first, masks, objective, 3, seed=5)
    resumed = make()
    resumed.start(masks, objective, np.random.default_rng(999))  # any generator: the state restores it
    resumed.load_state_dict(roundtrip(first.state_dict()))
    same(head + mask_drive(resumed, masks, objective, 3, state=True), history)


def test_a_swapping_ga_keeps_the_seed_size_through_mutation(masks):
    objective = AccuracyAtSparsity(0.8)
    search = GeneticSearch(population=6, elite=1, tournament=2, crossover_rate=0.0, mutation="swap",
                           mutation_rate=0.002)
    history = mask_drive(search, masks, objective, 4, seed=1)
    seed_kept = int(history[0][0][0].sum())
    assert seed_kept == int(masks.magnitude(density_for_sparsity(masks, 0.8)).sum())
    sizes = {int(genome.sum()) for generation in history[1:] for genome, _ in generation}
    # without crossover every later genome descends from generation 0 by swaps: sizes of generation 0 only
    assert sizes <= {int(genome.sum()) for genome, _ in history[0]}
    assert search.best().fitness[0] >= history[0][0][1][0]
