"""Search strategies over genomes: a genetic algorithm and three baselines at equal evaluation budget.

Every search is driven by ask / tell (see :func:`growprune.evolution.loop.evolve`):
:meth:`Search.ask` returns a generation of :class:`~growprune.evolution.types.Individual` s, the
loop scores the unevaluated ones, and :meth:`Search.tell` hands them back. Individuals a search
carries over (elites) keep their scores and cost no evaluation.

* :class:`GeneticSearch`: tournament selection (DEAP's ``tools.selTournament`` on the objective's
  rank), uniform or layer-wise crossover, mutation, elitism; with a Pareto objective NSGA-II
  survival over parents + offspring (the objective's ``select``, DEAP's ``selNSGA2``).
* :class:`RandomSearch`: a fresh random population every generation.
* :class:`SimulatedAnnealing`: ``population`` independent Metropolis chains, one step each per
  generation, temperature decaying geometrically.
* :class:`MagnitudeSearch`: magnitude pruning; the density hitting a target sparsity (one
  evaluation), bisection over the density for an accuracy floor, a density grid for a Pareto front.

Every random choice comes from the ``numpy.random.Generator`` given to :meth:`Search.start`
(DEAP's tournament uses Python's ``random``: it is seeded from that generator for the call and
restored afterwards). :meth:`Search.state_dict` holds that generator's state, so a search saved
after generation ``g`` and loaded into a new, started search continues exactly as the original
would have (same genomes, bit for bit). The state loads with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import random
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np
from deap import tools

from growprune.evolution.objectives import AccuracyAtSparsity, SmallestAboveFloor
from growprune.evolution.types import Individual

if TYPE_CHECKING:
    from growprune.evolution.genotypes import Genotype
    from growprune.evolution.objectives import Objective

CROSSOVER_KINDS = ("uniform", "layer")
MUTATION_KINDS = ("flip", "magnitude", "swap", "shrink", "perturb")  # masks: flip / magnitude / swap / shrink;
# widths and ratios: perturb
#: densities of the magnitude ladder seeding a GA's generation 0 (floor / Pareto objectives): geometric in this range
LADDER_RANGE = (0.05, 0.95)
INITIAL_KINDS = ("uniform", "magnitude")


# --- argument checks -----------------------------------------------------------------------------


def _check_int(owner: str, name: str, value: Any, low: int, high: int | None = None) -> int:
    ok = not isinstance(value, bool) and isinstance(value, (int, np.integer))
    ok = ok and value >= low and (high is None or value <= high)
    if not ok:
        bounds = f">= {low}" if high is None else f"in {low}..{high}"
        raise ValueError(f"{owner}: {name} must be an integer {bounds}, got {value!r}")
    return int(value)


def _check_number(owner: str, name: str, value: Any, low: float, high: float, low_open: bool = False) -> float:
    ok = not isinstance(value, bool) and isinstance(value, (int, float, np.floating)) and math.isfinite(value)
    ok = ok and (value > low if low_open else value >= low) and value <= high
    if not ok:
        raise ValueError(f"{owner}: {name} must be a number in {'(' if low_open else '['}{low}, {high}], got {value!r}")
    return float(value)


def _check_kind(owner: str, name: str, value: Any, kinds: tuple[str, ...]) -> str:
    if value not in kinds:
        raise ValueError(f"{owner}: {name} must be one of {kinds}, got {value!r}")
    return str(value)


# --- random state --------------------------------------------------------------------------------


def rng_state(rng: np.random.Generator) -> str:
    """The generator's bit-generator state as a JSON string (its 128-bit integers stay exact and the
    string loads with ``torch.load(weights_only=True)``)."""
    return json.dumps(rng.bit_generator.state)


def set_rng_state(rng: np.random.Generator, state: str) -> None:
    """Restore a state saved by :func:`rng_state` into ``rng`` (same bit-generator kind)."""
    decoded = json.loads(state)
    kind = type(rng.bit_generator).__name__
    if decoded.get("bit_generator") != kind:
        raise ValueError(f"saved random state is of {decoded.get('bit_generator')!r}, the generator is {kind!r}")
    rng.bit_generator.state = decoded


@contextlib.contextmanager
def python_random_from(rng: np.random.Generator) -> Iterator[None]:
    """Seed Python's global ``random`` from ``rng`` for the block (DEAP draws from it), then restore it."""
    saved = random.getstate()
    random.seed(int(rng.integers(0, 2**63 - 1)))
    try:
        yield
    finally:
        random.setstate(saved)


class _Ranked:
    """What DEAP's tournament sees: a comparable ``fitness`` (the objective's rank) and our index."""

    __slots__ = ("fitness", "index")

    def __init__(self, fitness: float, index: int) -> None:
        self.fitness, self.index = fitness, index


def tournament(ranks: np.ndarray, k: int, size: int, rng: np.random.Generator) -> list[int]:
    """Indices of ``k`` tournament winners (``size`` aspirants drawn with replacement; the highest
    rank wins, ties to the first drawn), through DEAP's ``tools.selTournament``."""
    wrapped = [_Ranked(float(rank), index) for index, rank in enumerate(ranks)]
    with python_random_from(rng):
        chosen = tools.selTournament(wrapped, k, size)
    return [member.index for member in chosen]


def density_for_sparsity(genotype: "Genotype", sparsity: float, measure: str = "params") -> float:
    """The largest density whose magnitude-pruned genome (``genotype.magnitude``) has
    ``1 - size / original >= sparsity`` (bisection on the genotype's closed-form size; no evaluation).

    Raises:
        ValueError: even density 0 does not reach ``sparsity`` (the unmasked parameters are too many).
    """
    original = genotype.original_size(measure)

    def reaches(density: float) -> bool:
        return 1.0 - genotype.size(genotype.magnitude(density), measure) / original >= sparsity

    low, high = 0.0, 1.0
    if reaches(high):
        return high
    if not reaches(low):
        raise ValueError(f"even density 0 leaves sparsity below {sparsity} (the unmasked layers are too large); "
                         f"lower the target")
    for _ in range(50):
        middle = (low + high) / 2
        low, high = (middle, high) if reaches(middle) else (low, middle)
    return low


def magnitude_ladder(count: int) -> list[float]:
    """``count`` densities spaced geometrically over :data:`LADDER_RANGE` (smallest first)."""
    low, high = LADDER_RANGE
    if count == 1:
        return [math.sqrt(low * high)]
    return [low * (high / low) ** (i / (count - 1)) for i in range(count)]


# --- base ----------------------------------------------------------------------------------------


class Search(ABC):
    """Proposes generations of genomes and learns from their scores (see the module docstring).

    Args:
        population: individuals per generation.
    """

    def __init__(self, population: int = 32) -> None:
        self.population = _check_int(self.name, "population", population, 1)
        self._genotype: "Genotype | None" = None
        self._objective: "Objective | None" = None
        self._rng: np.random.Generator | None = None
        self.generation = 0  # generations told so far
        self._pending: list[Individual] = []
        self._best: Individual | None = None
        self._front: list[Individual] = []

    @property
    def name(self) -> str:
        return type(self).__name__

    @property
    def config(self) -> dict[str, Any]:
        """The constructor arguments (checked against a loaded state)."""
        return {"population": self.population}

    # ------------------------------------------------------------------------------ protocol
    def start(self, genotype: "Genotype", objective: "Objective", rng: np.random.Generator) -> None:
        """Begin a new search on a bound genotype (forgets any previous one) and draw generation 0.

        Raises:
            ValueError: the genotype or objective does not suit this search (e.g. a mutation kind
                the genotype lacks, a Pareto objective for a scalar-only search).
            TypeError: ``rng`` is not a ``numpy.random.Generator``.
        """
        if not isinstance(rng, np.random.Generator):
            raise TypeError(f"{self.name}.start: rng must be a numpy.random.Generator, got {type(rng).__name__}")
        self._check_fits(genotype, objective)
        self._genotype, self._objective, self._rng = genotype, objective, rng
        self.generation, self._best, self._front = 0, None, []
        self._reset()
        self._pending = self._first_generation()

    def ask(self) -> list[Individual]:
        """This generation's individuals (the same objects until :meth:`tell`)."""
        self._require_started()
        return list(self._pending)

    def tell(self, individuals: list[Individual]) -> None:
        """The asked individuals, now evaluated; prepares the next generation.

        Raises:
            ValueError: not the asked individuals (count or genomes differ) or one not evaluated.
        """
        self._require_started()
        if len(individuals) != len(self._pending):
            raise ValueError(f"{self.name}.tell: expected the {len(self._pending)} asked individuals, got {len(individuals)}")
        for index, (told, asked) in enumerate(zip(individuals, self._pending)):
            if told.fitness is None:
                raise ValueError(f"{self.name}.tell: individual {index} has no fitness (not evaluated)")
            if told is not asked and not np.array_equal(told.genome, asked.genome):
                raise ValueError(f"{self.name}.tell: individual {index} is not the one asked for (genome differs)")
        self._remember(individuals)
        self._pending = self._next_generation(list(individuals))
        self.generation += 1

    def best(self) -> Individual:
        """The best individual evaluated so far (a Pareto objective: the front's most accurate one,
        ties to the smaller)."""
        if self._best is None:
            raise ValueError(f"{self.name}.best: no generation has been told yet")
        return self._best

    def front(self) -> list[Individual]:
        """Non-dominated individuals evaluated so far (a scalar objective: ``[best()]``)."""
        if self._best is None:
            return []
        return list(self._front) if self._objective.multi else [self._best]

    # ------------------------------------------------------------------------------- hooks
    def _check_fits(self, genotype: "Genotype", objective: "Objective") -> None:
        """Raise ``ValueError`` when this search cannot run on the genotype / objective."""

    def _reset(self) -> None:
        """Clear the subclass's state for a new search."""

    @abstractmethod
    def _first_generation(self) -> list[Individual]:
        """Generation 0."""

    @abstractmethod
    def _next_generation(self, told: list[Individual]) -> list[Individual]:
        """The generation after ``told`` (evaluated)."""

    def _extra_state(self) -> dict[str, Any]:
        return {}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        pass

    # ------------------------------------------------------------------------------ helpers
    def _require_started(self) -> None:
        if self._rng is None:
            raise ValueError(f"{self.name}: call start(genotype, objective, rng) first")

    def _remember(self, individuals: list[Individual]) -> None:
        """Track the best individual and (Pareto) the non-dominated archive over every generation."""
        objective = self._objective
        if objective.multi:
            seen = {individual.key for individual in self._front}
            candidates = list(self._front)
            for individual in individuals:
                if individual.key not in seen:
                    seen.add(individual.key)
                    candidates.append(individual)
            self._front = [candidates[i] for i in objective.front(candidates)]
            self._best = max(self._front, key=lambda ind: (ind.fitness[0], ind.fitness[1:]))
        else:
            candidates = ([self._best] if self._best is not None else []) + list(individuals)
            self._best = candidates[objective.select(candidates, 1)[0]]

    def _new(self, genome: np.ndarray) -> Individual:
        return Individual(genome=genome)

    def _child(self, genome: np.ndarray, parents: list[Individual], candidates: tuple[int, ...],
               index_parent: bool) -> Individual:
        """An offspring recording as its parent the candidate it differs from in fewest layers (the
        evaluator's activation cache starts from the parent's): ``changed`` names those layers."""
        best_changed: frozenset[str] | None = None
        best_index = candidates[0]
        for index in candidates:
            changed = self._changed(parents[index].genome, genome)
            if best_changed is None or len(changed) < len(best_changed):
                best_changed, best_index = changed, index
        return Individual(genome=genome, parent=best_index if index_parent else None, changed=best_changed,
                          extra={"parent_key": parents[best_index].key})

    def _changed(self, parent: np.ndarray, child: np.ndarray) -> frozenset[str]:
        differs = parent != child
        return frozenset(name for name, piece in self._genotype.layer_slices.items() if differs[piece].any())

    # -------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """Everything to continue exactly: configuration, generation, random state, the pending
        generation, best and front (plain Python and tensors: ``torch.load(weights_only=True)``)."""
        self._require_started()
        return {
            "search": self.name,
            "config": self.config,
            "generation": self.generation,
            "rng": rng_state(self._rng),
            "pending": [individual.to_state() for individual in self._pending],
            "best": self._best.to_state() if self._best is not None else None,
            "front": [individual.to_state() for individual in self._front],
            "extra": self._extra_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state_dict` (call :meth:`start` with the same genotype and objective first).

        Raises:
            ValueError: not started; a state of another search or with another configuration.
        """
        self._require_started()
        if state.get("search") != self.name:
            raise ValueError(f"{self.name}.load_state_dict: the state is of {state.get('search')!r}")
        if state.get("config") != self.config:
            raise ValueError(f"{self.name}.load_state_dict: the state's configuration {state.get('config')} "
                             f"differs from this search's {self.config}")
        pending = [Individual.from_state(s) for s in state["pending"]]
        for individual in pending:
            self._genotype.check(individual.genome)
        set_rng_state(self._rng, state["rng"])
        self.generation = int(state["generation"])
        self._pending = pending
        self._best = Individual.from_state(state["best"]) if state["best"] is not None else None
        self._front = [Individual.from_state(s) for s in state["front"]]
        if self._best is not None and self._objective.multi:
            # best() is a member of the front: keep it the same object
            by_key = {individual.key: individual for individual in self._front}
            self._best = by_key.get(self._best.key, self._best)
        self._load_extra_state(state["extra"])


def _carry(individual: Individual, index: int | None) -> Individual:
    """An evaluated individual carried into the next generation (keeps its scores: no evaluation)."""
    return dataclasses.replace(individual, genome=individual.genome.copy(), parent=index, changed=frozenset(),
                               extra={**individual.extra, "parent_key": individual.key})


# --- genetic algorithm ---------------------------------------------------------------------------


class GeneticSearch(Search):
    """A generational genetic algorithm.

    Scalar objective: the ``elite`` best of a generation are carried over unchanged (no
    evaluation); the other ``population - elite`` are offspring. Each pair of offspring comes from
    two tournament winners (``tournament`` aspirants each, by the objective's rank), crossed over
    with probability ``crossover_rate`` and then each mutated. An offspring's ``parent`` is the
    winner it differs from in fewest layers (for the evaluator's activation cache).

    Pareto objective: NSGA-II. The survivors are the objective's ``select`` (``selNSGA2``) of the
    previous survivors plus the new offspring; tournaments run on the survivors' rank (front, then
    crowding); every generation is ``population`` new offspring; ``elite`` is not used (survival is
    elitist already).

    Args:
        population: individuals per generation.
        elite: best individuals carried over unchanged (scalar objectives), in 0..population-1.
        tournament: aspirants per tournament, in 1..population.
        crossover: ``"uniform"`` (gene-wise) or ``"layer"`` (whole layers).
        crossover_rate: probability that a pair is crossed over, in [0, 1].
        mutation: ``"flip"`` / ``"magnitude"`` / ``"swap"`` / ``"shrink"`` (masks) or ``"perturb"``
            (widths, ratios); ``"swap"`` keeps a child's size, ``"shrink"`` makes it smaller (see
            :class:`~growprune.evolution.genotypes.MaskGenotype`).
        mutation_rate: the genotype's mutation rate, in [0, 1].
        initial: initial population ``"uniform"`` (unbiased random genomes) or ``"magnitude"``:
            generation 0 starts with magnitude-pruned genomes (``genotype.magnitude``, the
            magnitude baseline, deterministic) and is filled with magnitude-biased random genomes
            (``genotype.initial(kind="magnitude")``) around them. The seeds:
            :class:`~growprune.evolution.objectives.AccuracyAtSparsity`: one, at the largest
            density reaching the target sparsity (:func:`density_for_sparsity`; the biased random
            genomes at ``initial_density``, or at that density when ``None``); other objectives:
            ``initial_density`` (one seed) when given, else a ladder of ``ceil(population / 2)``
            densities spaced geometrically over [0.05, 0.95] (:func:`magnitude_ladder`), the
            ``i``-th biased random genome at the ``i % len(ladder)``-th ladder density. With
            ``elite >= 1`` a scalar objective's best individual of a generation is carried, so the
            GA never ends below its best seed (the magnitude baseline at that density).
        initial_density: density of the initial genomes (``None``: drawn per individual for
            ``"uniform"``; see ``initial`` for ``"magnitude"``).

    Raises:
        ValueError: an argument out of range or an unknown kind (at construction).
    """

    def __init__(self, population: int = 32, elite: int = 2, tournament: int = 3, crossover: str = "uniform",
                 crossover_rate: float = 0.9, mutation: str = "flip", mutation_rate: float = 0.01,
                 initial: str = "magnitude", initial_density: float | None = None) -> None:
        super().__init__(population)
        owner = self.name
        self.elite = _check_int(owner, "elite", elite, 0, self.population - 1)
        self.tournament = _check_int(owner, "tournament", tournament, 1, self.population)
        self.crossover = _check_kind(owner, "crossover", crossover, CROSSOVER_KINDS)
        self.crossover_rate = _check_number(owner, "crossover_rate", crossover_rate, 0.0, 1.0)
        self.mutation = _check_kind(owner, "mutation", mutation, MUTATION_KINDS)
        self.mutation_rate = _check_number(owner, "mutation_rate", mutation_rate, 0.0, 1.0)
        self.initial = _check_kind(owner, "initial", initial, INITIAL_KINDS)
        self.initial_density = (None if initial_density is None
                                else _check_number(owner, "initial_density", initial_density, 0.0, 1.0))
        self._parents: list[Individual] | None = None

    @property
    def config(self) -> dict[str, Any]:
        return {"population": self.population, "elite": self.elite, "tournament": self.tournament,
                "crossover": self.crossover, "crossover_rate": self.crossover_rate, "mutation": self.mutation,
                "mutation_rate": self.mutation_rate, "initial": self.initial, "initial_density": self.initial_density}

    def _check_fits(self, genotype: "Genotype", objective: "Objective") -> None:
        if self.mutation not in genotype.mutation_kinds:
            raise ValueError(f"{self.name}: mutation {self.mutation!r} does not apply to {type(genotype).__name__} "
                             f"(its kinds: {genotype.mutation_kinds})")

    def _reset(self) -> None:
        self._parents = None

    def seed_densities(self) -> tuple[list[float], list[float | None]]:
        """The densities of generation 0's magnitude seeds and of its random genomes (``None``:
        drawn per genome); see ``initial`` in the class docstring."""
        self._require_started()
        random_count = self.population
        if self.initial == "uniform":
            return [], [self.initial_density] * random_count
        objective = self._objective
        if isinstance(objective, AccuracyAtSparsity):
            try:
                seeds = [density_for_sparsity(self._genotype, objective.sparsity, objective.measure)]
            except ValueError as error:
                raise ValueError(f"{self.name}: {error}") from error
            around = [self.initial_density if self.initial_density is not None else seeds[0]]
        elif self.initial_density is not None:
            seeds = around = [self.initial_density]
        else:
            seeds = around = magnitude_ladder(math.ceil(self.population / 2))
        seeds = seeds[: self.population]
        random_count -= len(seeds)
        return seeds, [around[i % len(around)] for i in range(random_count)]

    def _first_generation(self) -> list[Individual]:
        seeds, randoms = self.seed_densities()
        individuals = []
        for density in seeds:
            individual = self._new(self._genotype.magnitude(density))
            individual.extra["seed_density"] = float(density)  # a magnitude seed (for logs and tests)
            individuals.append(individual)
        return individuals + [self._new(self._genotype.initial(self._rng, self.initial, density))
                              for density in randoms]

    def _next_generation(self, told: list[Individual]) -> list[Individual]:
        objective = self._objective
        if objective.multi:
            pool = told if self._parents is None else self._parents + told
            self._parents = [pool[i] for i in objective.select(pool, min(self.population, len(pool)))]
            return self._offspring(self._parents, self.population, index_parent=False)
        elites = [_carry(told[i], i) for i in objective.select(told, self.elite)]
        return elites + self._offspring(told, self.population - self.elite, index_parent=True)

    def _offspring(self, pool: list[Individual], count: int, index_parent: bool) -> list[Individual]:
        genotype, rng = self._genotype, self._rng
        winners = tournament(self._objective.rank(pool), 2 * math.ceil(count / 2), self.tournament, rng)
        children: list[Individual] = []
        for first, second in zip(winners[0::2], winners[1::2]):
            a, b = pool[first].genome, pool[second].genome
            if rng.random() < self.crossover_rate:
                a, b = genotype.crossover(a, b, rng, self.crossover)
            for genome in (a, b):
                mutated, _ = genotype.mutate(genome, rng, self.mutation_rate, self.mutation)
                children.append(self._child(mutated, pool, (first, second), index_parent))
        return children[:count]

    def _extra_state(self) -> dict[str, Any]:
        return {"parents": None if self._parents is None else [p.to_state() for p in self._parents]}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        parents = state["parents"]
        self._parents = None if parents is None else [Individual.from_state(s) for s in parents]


# --- baselines -----------------------------------------------------------------------------------


class RandomSearch(Search):
    """A fresh random population every generation (the same evaluation budget as the GA's).

    Args:
        population: individuals per generation.
        initial: ``"uniform"`` or ``"magnitude"`` (see the genotype's ``initial``).
        initial_density: density of the genomes (``None``: drawn per individual).
    """

    def __init__(self, population: int = 32, initial: str = "uniform", initial_density: float | None = None) -> None:
        super().__init__(population)
        self.initial = _check_kind(self.name, "initial", initial, INITIAL_KINDS)
        self.initial_density = (None if initial_density is None
                                else _check_number(self.name, "initial_density", initial_density, 0.0, 1.0))

    @property
    def config(self) -> dict[str, Any]:
        return {"population": self.population, "initial": self.initial, "initial_density": self.initial_density}

    def _first_generation(self) -> list[Individual]:
        return [self._new(self._genotype.initial(self._rng, self.initial, self.initial_density))
                for _ in range(self.population)]

    def _next_generation(self, told: list[Individual]) -> list[Individual]:
        return self._first_generation()


class SimulatedAnnealing(Search):
    """``population`` independent Metropolis chains; each proposes one mutation per generation.

    A proposal replaces its chain's state when its fitness is not lower, or with probability
    ``exp(delta / T)`` (``delta`` < 0, the fitness change). The temperature of the ``s``-th step
    (s = 0, 1, ...) is ``start_temperature * (end_temperature / start_temperature) ** (s / (steps - 1))``
    and stays at ``end_temperature`` after ``steps`` steps. Generation 0 is the chains' initial
    states. Scalar objectives only.

    Args:
        population: chains (evaluations per generation).
        start_temperature: first step's temperature (fitness units), > 0.
        end_temperature: last step's temperature, in (0, start_temperature].
        mutation: the genotype's mutation kind.
        mutation_rate: the genotype's mutation rate, in [0, 1].
        initial: initial states ``"uniform"`` or ``"magnitude"``.
        initial_density: density of the initial states (``None``: drawn per chain).
        steps: steps over which the temperature decays, >= 1.
    """

    def __init__(self, population: int = 32, start_temperature: float = 0.05, end_temperature: float = 0.001,
                 mutation: str = "flip", mutation_rate: float = 0.01, initial: str = "magnitude",
                 initial_density: float | None = None, steps: int = 100) -> None:
        super().__init__(population)
        owner = self.name
        self.start_temperature = _check_number(owner, "start_temperature", start_temperature, 0.0, math.inf, True)
        self.end_temperature = _check_number(owner, "end_temperature", end_temperature, 0.0, self.start_temperature,
                                             True)
        self.mutation = _check_kind(owner, "mutation", mutation, MUTATION_KINDS)
        self.mutation_rate = _check_number(owner, "mutation_rate", mutation_rate, 0.0, 1.0)
        self.initial = _check_kind(owner, "initial", initial, INITIAL_KINDS)
        self.initial_density = (None if initial_density is None
                                else _check_number(owner, "initial_density", initial_density, 0.0, 1.0))
        self.steps = _check_int(owner, "steps", steps, 1)
        self._current: list[Individual] = []

    @property
    def config(self) -> dict[str, Any]:
        return {"population": self.population, "start_temperature": self.start_temperature,
                "end_temperature": self.end_temperature, "mutation": self.mutation,
                "mutation_rate": self.mutation_rate, "initial": self.initial,
                "initial_density": self.initial_density, "steps": self.steps}

    def temperature(self, step: int) -> float:
        """Temperature of Metropolis step ``step`` (0-based)."""
        if self.steps == 1:
            return self.end_temperature
        fraction = min(step, self.steps - 1) / (self.steps - 1)
        return self.start_temperature * (self.end_temperature / self.start_temperature) ** fraction

    def _check_fits(self, genotype: "Genotype", objective: "Objective") -> None:
        if objective.multi:
            raise ValueError(f"{self.name} needs a scalar objective, got {type(objective).__name__}")
        if self.mutation not in genotype.mutation_kinds:
            raise ValueError(f"{self.name}: mutation {self.mutation!r} does not apply to {type(genotype).__name__} "
                             f"(its kinds: {genotype.mutation_kinds})")

    def _reset(self) -> None:
        self._current = []

    def _first_generation(self) -> list[Individual]:
        return [self._new(self._genotype.initial(self._rng, self.initial, self.initial_density))
                for _ in range(self.population)]

    def _next_generation(self, told: list[Individual]) -> list[Individual]:
        if not self._current:
            self._current = list(told)  # generation 0: the chains' initial states
        else:
            temperature = self.temperature(self.generation - 1)
            draws = self._rng.random(self.population)  # one per chain, always: a fixed stream
            for chain, (proposal, draw) in enumerate(zip(told, draws)):
                delta = proposal.fitness[0] - self._current[chain].fitness[0]
                if delta >= 0 or draw < math.exp(delta / temperature):
                    self._current[chain] = proposal
        proposals = []
        for chain, state in enumerate(self._current):
            genome, _ = self._genotype.mutate(state.genome, self._rng, self.mutation_rate, self.mutation)
            proposals.append(self._child(genome, self._current, (chain,), index_parent=False))
        return proposals

    def _extra_state(self) -> dict[str, Any]:
        return {"current": [individual.to_state() for individual in self._current]}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        self._current = [Individual.from_state(s) for s in state["current"]]


class MagnitudeSearch(Search):
    """Magnitude pruning (the genotype's ``magnitude(density)``) at the density the objective asks for.

    * :class:`~growprune.evolution.objectives.AccuracyAtSparsity`: the largest density whose size
      reaches the target sparsity (found on the genotype's closed-form size, no evaluation), one
      evaluation; later generations carry it (no evaluation).
    * :class:`~growprune.evolution.objectives.SmallestAboveFloor`: bisection over the density,
      ``population`` evenly spaced densities inside the current bracket per generation; the
      bracket shrinks to the lowest density that reached the floor and the highest below it that
      did not (accuracy need not be monotone in the density: those two bound the search).
    * a Pareto objective: ``population`` evenly spaced densities per generation, shifted each
      generation by the golden ratio so the densities fill (0, 1].

    Args:
        population: densities per generation.
    """

    GOLDEN = (math.sqrt(5) - 1) / 2

    def __init__(self, population: int = 32) -> None:
        super().__init__(population)
        self._mode = ""
        self._bracket = (0.0, 1.0)
        self._target_density: float | None = None

    def _check_fits(self, genotype: "Genotype", objective: "Objective") -> None:
        if not (objective.multi or isinstance(objective, (AccuracyAtSparsity, SmallestAboveFloor))):
            raise ValueError(f"{self.name} supports AccuracyAtSparsity, SmallestAboveFloor and Pareto objectives, "
                             f"got {type(objective).__name__}")

    def _reset(self) -> None:
        objective = self._objective
        self._mode = "grid" if objective.multi else "target" if isinstance(objective, AccuracyAtSparsity) else "floor"
        self._bracket = (0.0, 1.0)
        self._target_density = None

    def density_for_sparsity(self, sparsity: float) -> float:
        """The largest density whose magnitude-pruned genome has ``1 - size / original >= sparsity``
        (:func:`density_for_sparsity` on the objective's measure; no evaluation)."""
        try:
            return density_for_sparsity(self._genotype, sparsity, self._objective.measure)
        except ValueError as error:
            raise ValueError(f"{self.name}: {error}") from error

    def _grid(self) -> list[float]:
        if self._mode == "floor":
            low, high = self._bracket
            return [low + (high - low) * (i + 1) / (self.population + 1) for i in range(self.population)]
        offset = 1.0 - (self.generation * self.GOLDEN) % 1.0  # in (0, 1]: generation 0 ends at density 1
        return [(i + offset) / self.population for i in range(self.population)]

    def _individuals(self, densities: list[float]) -> list[Individual]:
        individuals = []
        for density in densities:
            individual = self._new(self._genotype.magnitude(density))
            individual.extra["density"] = float(density)
            individuals.append(individual)
        return individuals

    def _first_generation(self) -> list[Individual]:
        if self._mode == "target":
            self._target_density = self.density_for_sparsity(self._objective.sparsity)
            return self._individuals([self._target_density])
        return self._individuals(self._grid())

    def _next_generation(self, told: list[Individual]) -> list[Individual]:
        if self._mode == "target":
            return [_carry(self._best, None)]
        if self._mode == "floor":
            floor = self._objective.floor
            low, high = self._bracket
            feasible = [ind.extra["density"] for ind in told if ind.accuracy >= floor]
            if feasible:
                high = min(feasible)
            infeasible = [ind.extra["density"] for ind in told if ind.accuracy < floor and ind.extra["density"] < high]
            if infeasible:
                low = max(infeasible)
            self._bracket = (low, high)
        return self._individuals(self._grid())

    def _extra_state(self) -> dict[str, Any]:
        return {"mode": self._mode, "bracket": list(self._bracket), "target_density": self._target_density}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        self._mode = state["mode"]
        self._bracket = (float(state["bracket"][0]), float(state["bracket"][1]))
        self._target_density = state["target_density"]
